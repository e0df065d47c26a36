//! Device-to-server messages: install outcomes.

use serde::{Deserialize, Serialize};

use crate::slot::Slot;

/// What a device reports after an install ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallReport {
    pub device_id: String,
    pub hardware_class: String,
    /// Target path of the release's full image.
    pub target: String,
    pub version: String,
    pub outcome: ReportOutcome,
    /// Why, for a rollback.
    pub reason: Option<String>,
    /// The slot the release was installed into.
    pub slot: Slot,
    /// When the device decided (RFC 3339).
    pub at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportOutcome {
    Committed,
    RolledBack,
}

impl ReportOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportOutcome::Committed => "committed",
            ReportOutcome::RolledBack => "rolled_back",
        }
    }
}

impl InstallReport {
    /// Field limits; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value, max) in [
            ("device_id", &self.device_id, 128),
            ("hardware_class", &self.hardware_class, 64),
            ("target", &self.target, 1024),
            ("version", &self.version, 64),
            ("at", &self.at, 64),
        ] {
            if value.is_empty() || value.len() > max {
                return Err(format!("{name} must be 1-{max} characters"));
            }
        }
        if self.reason.as_ref().is_some_and(|r| r.len() > 4096) {
            return Err("reason must be at most 4096 characters".into());
        }
        if chrono::DateTime::parse_from_rfc3339(&self.at).is_err() {
            return Err(format!("at {:?} is not an RFC 3339 time", self.at));
        }
        Ok(())
    }
}
