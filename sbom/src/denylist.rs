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
//!
//! Each entry is a [`Query`]: versions compare by the rules of the component's
//! ecosystem (dpkg, semver, PEP 440; see [`crate::query`]). A component whose version
//! cannot be placed against an entry's range (a version its ecosystem cannot read, no
//! purl to tell the ecosystem, no version) is a finding too, with the reason in
//! [`Finding::undecided`]: the gate fails closed rather than let an affected release
//! through.

use serde::{Deserialize, Serialize};

use crate::query::{Match, Query};
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
    /// Set when the component's version could not be placed against the range (the
    /// reason): it is counted as affected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undecided: Option<String>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {}", self.id, self.component, self.version.as_deref().unwrap_or(""))?;
        match &self.undecided {
            Some(why) => write!(f, " (counted as affected: {why})"),
            None => Ok(()),
        }
    }
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

    /// The entries with status `affected` that match `components`, including the
    /// components that cannot be told apart from a match (fail closed). An entry that
    /// cannot be read is an error, not skipped.
    pub fn findings(&self, components: &[ComponentRef]) -> Result<Vec<Finding>> {
        let mut out = Vec::new();
        for e in self.entries.iter().filter(|e| e.status == Status::Affected) {
            let q = e.query()?;
            for c in components {
                let undecided = match q.check(c) {
                    Match::No => continue,
                    Match::Yes => None,
                    Match::Undecided(why) => Some(why),
                };
                out.push(Finding { id: e.id.clone(), component: c.name.clone(), version: c.version.clone(), affected: e.affected.clone(), undecided });
            }
        }
        Ok(out)
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
            ComponentRef { name: "openssl".into(), version: Some("3.0.11-1~deb12u2".into()), purl: Some("pkg:deb/debian/openssl@3.0.11-1~deb12u2".into()) },
            ComponentRef { name: "libc6".into(), version: Some("2.36-9+deb12u14".into()), purl: Some("pkg:deb/debian/libc6@2.36-9%2Bdeb12u14?arch=amd64".into()) },
        ];
        let f = list.findings(&comps).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["CVE-1"]);
        assert_eq!(f[0].undecided, None);
        assert_eq!(f[0].to_string(), "CVE-1: openssl 3.0.11-1~deb12u2");
    }

    fn list(entries: &str) -> DenyList {
        DenyList::parse(format!(r#"{{"outpost_denylist":1,"entries":[{entries}]}}"#).as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn comp(name: &str, version: &str, purl: &str) -> ComponentRef {
        ComponentRef { name: name.into(), version: Some(version.into()), purl: Some(purl.into()) }
    }

    fn ids(list: &DenyList, c: ComponentRef) -> Vec<String> {
        list.findings(&[c]).unwrap_or_else(|e| panic!("{e}")).into_iter().map(|f| f.id).collect()
    }

    #[test]
    fn a_pre_release_does_not_escape_a_less_than_rule() {
        // Under dpkg's rules (the old, single ordering) 1.0.0-alpha sorted after 1.0.0.
        let l = list(
            r#"{"id":"RUSTSEC-1","purl":"pkg:cargo/foo","affected":"<1.0.0","status":"affected"},
               {"id":"GHSA-1","purl":"pkg:npm/bar","affected":">=0.5.0,<1.0.0","status":"affected"},
               {"id":"NAME-1","component":"foo","affected":"<1.0.0","status":"affected"}"#,
        );
        assert_eq!(ids(&l, comp("foo", "1.0.0-alpha", "pkg:cargo/foo@1.0.0-alpha")), ["RUSTSEC-1", "NAME-1"]);
        assert_eq!(ids(&l, comp("foo", "1.0.0-rc.2", "pkg:cargo/foo@1.0.0-rc.2")), ["RUSTSEC-1", "NAME-1"]);
        assert!(ids(&l, comp("foo", "1.0.0", "pkg:cargo/foo@1.0.0")).is_empty());
        assert_eq!(ids(&l, comp("bar", "1.0.0-beta.1", "pkg:npm/bar@1.0.0-beta.1")), ["GHSA-1"]);
        assert!(ids(&l, comp("bar", "1.0.0", "pkg:npm/bar@1.0.0")).is_empty());
    }

    #[test]
    fn pypi_and_deb_entries_follow_their_rules() {
        let l = list(
            r#"{"id":"PYSEC-1","purl":"pkg:pypi/django","affected":"<1.0.0","status":"affected"},
               {"id":"PYSEC-2","purl":"pkg:pypi/django","affected":"<=1.0.0","status":"affected"},
               {"id":"PYSEC-3","purl":"pkg:pypi/django","affected":"<2.0","status":"affected"},
               {"id":"DSA-1","purl":"pkg:deb/debian/openssl","affected":"<1.0","status":"affected"},
               {"id":"DSA-2","purl":"pkg:deb/debian/openssl","affected":"<2.0","status":"affected"}"#,
        );
        let py = |v: &str| comp("django", v, &format!("pkg:pypi/django@{v}"));
        assert_eq!(ids(&l, py("1.0.0rc1")), ["PYSEC-1", "PYSEC-2", "PYSEC-3"]);
        assert_eq!(ids(&l, py("1.0.0.post1")), ["PYSEC-3"]);
        assert!(ids(&l, py("1!0.1")).is_empty(), "epoch 1 is after 2.0");
        let deb = |v: &str| comp("openssl", v, "pkg:deb/debian/openssl?arch=amd64");
        assert_eq!(ids(&l, deb("1.0~rc1")), ["DSA-1", "DSA-2"]);
        assert!(ids(&l, deb("1:0.1")).is_empty(), "epoch 1 is after 2.0");
    }

    #[test]
    fn a_range_on_an_unknown_purl_type_is_refused_naming_the_type() {
        let doc = br#"{"outpost_denylist":1,"entries":[{"id":"GO-1","purl":"pkg:golang/github.com/x/net","affected":"<0.23.0","status":"affected"}]}"#;
        let err = DenyList::parse(doc).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("GO-1") && err.contains("purl type \"golang\""), "{err}");
        // An exact version is still allowed.
        let l = list(r#"{"id":"GO-2","purl":"pkg:golang/github.com/x/net","affected":"=0.22.0","status":"affected"}"#);
        assert_eq!(ids(&l, comp("net", "0.22.0", "pkg:golang/github.com/x/net@0.22.0")), ["GO-2"]);
        assert!(ids(&l, comp("net", "0.23.0", "pkg:golang/github.com/x/net@0.23.0")).is_empty());
        // A malformed bound for the entry's ecosystem is refused when the list is read.
        let doc = br#"{"outpost_denylist":1,"entries":[{"id":"RS-1","purl":"pkg:cargo/foo","affected":"<1.0","status":"affected"}]}"#;
        let err = DenyList::parse(doc).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("RS-1") && err.contains("\"1.0\"") && err.contains("cargo (semver)"), "{err}");
    }

    #[test]
    fn versions_that_cannot_be_compared_count_as_affected() {
        let l = list(
            r#"{"id":"RUSTSEC-2","purl":"pkg:cargo/foo","affected":"<1.0.0","status":"affected"},
               {"id":"NAME-2","component":"busybox","affected":"<1.37.0","status":"affected"}"#,
        );
        for (c, want) in [
            (comp("foo", "1.0", "pkg:cargo/foo@1.0"), "version \"1.0\" is not a valid cargo (semver) version"),
            (ComponentRef { name: "busybox".into(), version: Some("1.36.1".into()), purl: None }, "has no purl"),
            (comp("busybox", "1.36.1", "pkg:generic/busybox@1.36.1"), "purl type \"generic\""),
        ] {
            let f = l.findings(std::slice::from_ref(&c)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(f.len(), 1, "{c:?}: {f:?}");
            let why = f[0].undecided.clone().unwrap_or_default();
            assert!(why.contains(want), "{why} should mention {want}");
            assert!(f[0].to_string().contains("counted as affected"), "{}", f[0]);
        }
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
