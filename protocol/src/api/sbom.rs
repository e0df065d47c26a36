//! `GET /api/v1/sbom/search` and `GET /api/v1/sbom/affected`.

use serde::{Deserialize, Serialize};

/// One release containing a matching component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SbomHit {
    pub component: String,
    pub component_version: Option<String>,
    pub purl: Option<String>,
    pub sbom_sha256: String,
    pub target: String,
    pub hardware_class: String,
    pub version: String,
    pub image_sha256: String,
    /// Set when the component may match but its version cannot be placed against the
    /// query's range (the reason); it is listed, and counted as affected by the
    /// deny-list views, rather than left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undecided: Option<String>,
}

/// A device whose attested image is a release among the hits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SbomDevice {
    pub device_id: String,
    pub hardware_class: String,
    pub version: Option<String>,
    pub quarantined: bool,
    /// Target path of the release it runs.
    pub release: String,
}

/// `GET /api/v1/sbom/search?q=QUERY`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchAnswer {
    pub query: String,
    /// Distinct releases among `releases`.
    pub release_count: usize,
    pub device_count: usize,
    pub took_ms: f64,
    pub releases: Vec<SbomHit>,
    pub devices: Vec<SbomDevice>,
}

/// A deny-list entry's status (as the signed deny-list says it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenylistStatus {
    Affected,
    NotAffected,
    Fixed,
    UnderInvestigation,
}

/// One entry of the signed deny-list, as published (`outpost_sbom::denylist::Entry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenylistEntry {
    pub id: String,
    pub component: Option<String>,
    pub purl: Option<String>,
    /// The affected version range.
    pub affected: String,
    pub status: DenylistStatus,
    pub detail: Option<String>,
}

/// Which deny-list the view is of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenylistRef {
    pub target: String,
    pub sha256: String,
}

/// One affected entry with the releases that carry the component and the devices
/// running them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffectedEntry {
    pub entry: DenylistEntry,
    pub releases: Vec<SbomHit>,
    pub devices: Vec<SbomDevice>,
}

/// `GET /api/v1/sbom/affected`: `denylist` is null when none is published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffectedAnswer {
    pub denylist: Option<DenylistRef>,
    pub entries: Vec<AffectedEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::round_trip;
    use serde_json::{json, Value};

    fn hit(undecided: bool) -> Value {
        let mut h = json!({
            "component": "openssl", "component_version": "3.0.2", "purl": "pkg:deb/debian/openssl@3.0.2", "sbom_sha256": "5b",
            "target": "firmware/gw/1.0.0/fw.img", "hardware_class": "gw", "version": "1.0.0", "image_sha256": "ab"
        });
        if undecided {
            h["undecided"] = json!("version 3.0.2a is not semver");
        }
        h
    }

    #[test]
    fn a_search_answer_round_trips() {
        let a: SearchAnswer = round_trip(json!({
            "query": "openssl@<3.1", "release_count": 1, "device_count": 1, "took_ms": 0.75,
            "releases": [hit(false), hit(true)],
            "devices": [{"device_id": "d1", "hardware_class": "gw", "version": null, "quarantined": false, "release": "firmware/gw/1.0.0/fw.img"}]
        }));
        assert_eq!((a.releases[0].undecided.as_deref(), a.releases[1].undecided.is_some()), (None, true));
    }

    #[test]
    fn the_affected_view_round_trips_with_and_without_a_denylist() {
        let a: AffectedAnswer = round_trip(json!({"denylist": null, "entries": []}));
        assert_eq!(a.denylist, None);
        let a: AffectedAnswer = round_trip(json!({
            "denylist": {"target": "security/denylist.json", "sha256": "cc"},
            "entries": [{"entry": {"id": "CVE-2026-1", "component": null, "purl": "pkg:deb/debian/openssl", "affected": "<3.1", "status": "affected", "detail": null},
                         "releases": [hit(false)], "devices": []}]
        }));
        assert_eq!(a.entries[0].entry.status, DenylistStatus::Affected);
    }
}
