//! `GET /api/v1/repository`, `POST /api/v1/targets`, `POST /api/v1/publish`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the server publishes now: versions of root, each targets role, snapshot and
/// timestamp (None before the first publish).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryStatus {
    pub root_version: u64,
    pub root_expires: String,
    pub roles: BTreeMap<String, u64>,
    pub snapshot_version: Option<u64>,
    pub timestamp_version: Option<u64>,
    pub timestamp_expires: Option<String>,
}

/// `GET /healthz`: `{"status": "ok"}` while the server serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

/// A target file received into staging (published once signed metadata names it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedTarget {
    pub sha256: String,
    pub length: u64,
}

/// The offline-signed metadata a publish uploads: new root versions in order, and
/// targets roles by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    #[serde(default)]
    pub roots: Vec<serde_json::Value>,
    #[serde(default)]
    pub roles: BTreeMap<String, serde_json::Value>,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOutcome {
    pub root_version: u64,
    /// The roles this publish changed, with their new versions.
    pub roles: BTreeMap<String, u64>,
    /// Roles no delegation reaches any more, dropped from the snapshot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_roles: Vec<String>,
    pub snapshot_version: u64,
    pub timestamp_version: u64,
    /// Everything uploaded was already published byte for byte (a retry): nothing changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::round_trip;
    use serde_json::json;

    #[test]
    fn status_upload_and_publish_answers_round_trip() {
        let s: RepositoryStatus = round_trip(json!({
            "root_version": 2, "root_expires": "2027-12-05T06:00:00Z", "roles": {"targets": 3, "firmware": 1},
            "snapshot_version": 7, "timestamp_version": 9, "timestamp_expires": "2026-12-06T06:00:00Z"
        }));
        assert_eq!(s.roles.get("targets"), Some(&3));
        let s: RepositoryStatus = round_trip(json!({
            "root_version": 1, "root_expires": "2027-12-05T06:00:00Z", "roles": {},
            "snapshot_version": null, "timestamp_version": null, "timestamp_expires": null
        }));
        assert_eq!(s.snapshot_version, None);
        let _: StagedTarget = round_trip(json!({"sha256": "ab", "length": 12}));
        let p: PublishOutcome = round_trip(json!({"root_version": 1, "roles": {"targets": 2}, "snapshot_version": 3, "timestamp_version": 4}));
        assert!(!p.unchanged && p.removed_roles.is_empty());
        let p: PublishOutcome =
            round_trip(json!({"root_version": 1, "roles": {}, "removed_roles": ["old"], "snapshot_version": 3, "timestamp_version": 4, "unchanged": true}));
        assert!(p.unchanged);
        let r: PublishRequest = round_trip(json!({"roots": [{"signed": {}, "signatures": []}], "roles": {"targets": {"signed": {}, "signatures": []}}}));
        assert_eq!(r.roots.len(), 1);
    }
}
