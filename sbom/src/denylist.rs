//! The signed vulnerability deny-list (VEX-style): which component versions are
//! affected by which advisory. Published as the target `security/denylist.json`,
//! signed by the `security` delegation; devices refuse to install an affected release,
//! the server flags releases and devices that carry an affected component.
//!
//! ```json
//! {"outpost_denylist": 1,
//!  "entries": [{"id": "CVE-2026-0001", "component": "openssl", "affected": ">=3.0.0,<3.0.14",
//!               "status": "affected", "detail": "..."}]}
//! ```
//! An entry names `component` (a name) or `purl` (without version); `affected` is a
//! version range (empty: every version); `status` is one of VEX's `affected`,
//! `not_affected`, `fixed`, `under_investigation`, and only `affected` blocks.

use serde::{Deserialize, Serialize};

use crate::query::{Query, Subject};
use crate::{ComponentRef, Result, SbomError};

/// Where devices and the server find the deny-list in the image repository.
pub const DENYLIST_TARGET: &str = "security/denylist.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Affected,
    NotAffected,
    Fixed,
    UnderInvestigation,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: String,
    #[serde(default)]
    pub component: Option<String>,
    #[serde(default)]
    pub purl: Option<String>,
    #[serde(default)]
    pub affected: String,
    pub status: Status,
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyList {
    pub outpost_denylist: u32,
    pub entries: Vec<Entry>,
}

/// One affected component found in a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub id: String,
    pub component: String,
    pub version: Option<String>,
    pub affected: String,
}

impl Entry {
    /// The entry as a search query (subject and version range).
    pub fn query(&self) -> Result<Query> {
        let subject = match (&self.component, &self.purl) {
            (Some(c), None) => c.clone(),
            (None, Some(p)) => p.clone(),
            _ => return Err(SbomError::Invalid(format!("deny-list entry {}: name exactly one of component and purl", self.id))),
        };
        let text = if self.affected.trim().is_empty() { subject } else { format!("{subject}@{}", self.affected) };
        Query::parse(&text).map_err(|e| SbomError::Invalid(format!("deny-list entry {}: {e}", self.id)))
    }
}

impl DenyList {
    /// Parses and checks a deny-list; errors name the entry and field.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let list: DenyList = serde_json::from_slice(bytes).map_err(|e| SbomError::Invalid(format!("deny-list: {e}")))?;
        if list.outpost_denylist != 1 {
            return Err(SbomError::Invalid(format!("deny-list: outpost_denylist {} is not format 1", list.outpost_denylist)));
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, e) in list.entries.iter().enumerate() {
            if e.id.trim().is_empty() {
                return Err(SbomError::Invalid(format!("deny-list entry {i}: id is empty")));
            }
            if !ids.insert(e.id.clone()) {
                return Err(SbomError::Invalid(format!("deny-list entry {i}: id {} appears twice", e.id)));
            }
            e.query().map_err(|err| SbomError::Invalid(format!("deny-list entry {i}: {err}")))?;
        }
        Ok(list)
    }

    /// The entries with status `affected` that match `components`.
    pub fn findings(&self, components: &[ComponentRef]) -> Vec<Finding> {
        let mut out = Vec::new();
        for e in self.entries.iter().filter(|e| e.status == Status::Affected) {
            let Ok(q) = e.query() else { continue };
            for c in components {
                let hit = match &q.subject {
                    Subject::Name(n) => &c.name == n,
                    Subject::Purl(p) => c.purl.as_deref().map(crate::query::purl_base) == Some(p.as_str()),
                };
                if hit && q.matches_version(c.version.as_deref()) {
                    out.push(Finding { id: e.id.clone(), component: c.name.clone(), version: c.version.clone(), affected: e.affected.clone() });
                }
            }
        }
        out
    }
}

/// Components of a CycloneDX JSON document, read leniently (the device side: the
/// document's hash was already verified against signed metadata).
pub fn components_of(doc: &serde_json::Value) -> Vec<ComponentRef> {
    doc.get("components")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
        .filter(|c| c.get("type").and_then(|t| t.as_str()) != Some("file"))
        .filter_map(|c| {
            Some(ComponentRef {
                name: c.get("name")?.as_str()?.to_owned(),
                version: c.get("version").and_then(|v| v.as_str()).map(str::to_owned),
                purl: c.get("purl").and_then(|v| v.as_str()).map(str::to_owned),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_follow_status_and_range() {
        let list = DenyList::parse(
            br#"{"outpost_denylist":1,"entries":[
              {"id":"CVE-1","component":"openssl","affected":">=3.0.0,<3.0.14","status":"affected"},
              {"id":"CVE-2","purl":"pkg:deb/debian/libc6","affected":"","status":"not_affected"},
              {"id":"CVE-3","purl":"pkg:deb/debian/libc6","affected":"<2.36-9+deb12u10","status":"affected"}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let comps = vec![
            ComponentRef { name: "openssl".into(), version: Some("3.0.11-1~deb12u2".into()), purl: None },
            ComponentRef { name: "libc6".into(), version: Some("2.36-9+deb12u14".into()), purl: Some("pkg:deb/debian/libc6@2.36-9%2Bdeb12u14?arch=amd64".into()) },
        ];
        let f = list.findings(&comps);
        assert_eq!(f.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["CVE-1"]);
    }

    #[test]
    fn malformed_deny_lists_name_the_entry() {
        for (doc, want) in [
            (&br#"{"outpost_denylist":1,"entries":[{"id":"X","status":"affected"}]}"#[..], "entry 0"),
            (br#"{"outpost_denylist":1,"entries":[{"id":"X","component":"a","affected":">=","status":"affected"}]}"#, "no version"),
            (br#"{"outpost_denylist":1,"entries":[{"id":"X","component":"a","status":"bad"}]}"#, "unknown variant"),
            (br#"{"outpost_denylist":2,"entries":[]}"#, "format 1"),
            (br#"{"outpost_denylist":1,"entries":[{"id":"X","component":"a","status":"fixed"},{"id":"X","component":"b","status":"fixed"}]}"#, "twice"),
        ] {
            let err = DenyList::parse(doc).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
