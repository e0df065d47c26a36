//! What a device reports of its network policy.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Applied, Mode};

/// What a device reports of its network policy (in check-ins and `policy status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub name: String,
    pub version: u64,
    /// The TUF target it came from (absent for a bundle enforced from a local file).
    #[serde(default)]
    pub target: Option<String>,
    pub applied: Applied,
    /// The mode in force (the essential profile is always enforced).
    pub mode: Mode,
    /// The eBPF programs are attached and the maps hold this policy.
    pub enforcing: bool,
    pub not_after: DateTime<Utc>,
    /// When the device fell back to the essential profile, if it did.
    #[serde(default)]
    pub fell_back_at: Option<DateTime<Utc>>,
    /// The last bundle refused, and why.
    #[serde(default)]
    pub refused: Option<String>,
    /// Why enforcement is not what this status names: the engine cannot start (no
    /// eBPF, no bpffs), or the stored bundle cannot be restored. `enforcing` says
    /// whether programs still filter (rules pinned by an earlier agent do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Packets per verdict since the agent started (allowed, denied, audit_denied, ...).
    #[serde(default)]
    pub verdicts: BTreeMap<String, u64>,
    pub updated_at: DateTime<Utc>,
}
