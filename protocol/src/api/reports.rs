//! `GET /api/v1/reports`, `POST /api/v1/reports`, `GET /api/v1/audit`, `GET /api/v1/log`.

use serde::{Deserialize, Serialize};

use crate::report::ReportOutcome;
use crate::slot::Slot;

/// An install report as the server stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRow {
    pub received_at: String,
    pub device_id: String,
    pub hardware_class: String,
    pub target: String,
    pub version: String,
    pub outcome: ReportOutcome,
    pub reason: Option<String>,
    pub slot: Slot,
    /// When the device decided.
    pub at: String,
    /// Sent inside an attested check-in (else by a device without identity).
    pub attested: bool,
}

/// `GET /api/v1/reports`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportList {
    pub reports: Vec<ReportRow>,
}

/// An integrity incident as the server stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentRow {
    pub received_at: String,
    /// Sent inside an attested check-in (else by a device without identity).
    pub attested: bool,
    #[serde(flatten)]
    pub incident: crate::incident::IntegrityIncident,
}

/// `GET /api/v1/incidents`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentList {
    pub incidents: Vec<IncidentRow>,
}

/// `POST /api/v1/reports` and `POST /api/v1/incidents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub recorded: bool,
}

/// One audit log entry: who did what, with the action's details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub detail: serde_json::Value,
}

/// `GET /api/v1/audit` and `GET /api/v1/log`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditLog {
    pub entries: Vec<AuditEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::round_trip;
    use serde_json::json;

    #[test]
    fn reports_and_the_audit_log_round_trip() {
        let list: ReportList = round_trip(json!({"reports": [{
            "received_at": "2026-12-05T06:01:00+00:00", "device_id": "sim-1", "hardware_class": "gw", "target": "firmware/gw/1.0.0/fw.img",
            "version": "1.0.0", "outcome": "committed", "reason": null, "slot": "A", "at": "2026-12-05T06:00:00+00:00", "attested": false
        }]}));
        assert_eq!(list.reports[0].outcome, ReportOutcome::Committed);
        let _: Recorded = round_trip(json!({"recorded": true}));
        let log: AuditLog = round_trip(json!({"entries": [
            {"at": "2026-12-05T06:00:00+00:00", "actor": "ci", "action": "publish", "detail": {"roles": {"targets": 2}}},
            {"at": "2026-12-05T06:00:00+00:00", "actor": "server", "action": "resign", "detail": null}
        ]}));
        assert_eq!(log.entries.len(), 2);
    }
}
