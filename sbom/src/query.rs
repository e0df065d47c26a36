//! Fleet search queries: `NAME`, `NAME@VERSION`, `NAME@>=1.2,<2.0`, or a purl
//! (`pkg:deb/debian/openssl`, optionally `@VERSION` or `@RANGE`), and how a component
//! stands against one ([`Query::check`]). The deny-list's entries are such queries, so
//! the device's gate and the server's views decide with this one function.
//!
//! Purls are read with the `packageurl` crate; a purl query matches components whose
//! purl has the same type, namespace and name (canonical form: qualifiers, version and
//! subpath dropped, names normalised as the purl type says, e.g. pypi `Foo_Bar` =
//! `foo-bar`).
//!
//! Versions are ordered by the rules of the component's ecosystem, chosen from the
//! purl type ([`crate::version`]): dpkg for `deb`, semver for `cargo` and `npm`, PEP 440
//! for `pypi`.
//! - A purl query names its ecosystem: its bounds are checked when it is parsed, and a
//!   range (`<`, `<=`, `>=`, `>`) on any other purl type is refused, naming the type.
//!   `=` (or a bare version) on such a type compares the text exactly.
//! - A name query has no ecosystem, so each component with that name is compared by its
//!   own purl's type. A component with no purl, a purl of another type or a purl that
//!   cannot be read is matched by `=` (exact text) only; under a range its answer is
//!   [`Match::Undecided`]. So is a component without a version under any constraint, a
//!   version (or bound) its ecosystem cannot read, and, for a purl query, a component
//!   whose purl cannot be read (it may be the package asked for).
//! - Undecided is never "no". The deny-list counts it as affected (fail closed), on the
//!   device and on the server alike, and says why; a search lists it with the reason.
//!
//! Ranges compare by order only, as OSV's ECOSYSTEM ranges do: a pre-release of the
//! bound is inside `<bound` (`1.0.0-alpha < 1.0.0`, `1.0.0rc1 < 1.0.0`), unlike Cargo's
//! and npm's requirement syntax or pip's specifiers, which leave pre-releases out; for
//! a deny-list, "left out" would mean "let through".

use std::cmp::Ordering;
use std::str::FromStr;

use packageurl::PackageUrl;

use crate::version::Ecosystem;
use crate::{ComponentRef, Result, SbomError};

/// What to look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Components with this exact name.
    Name(String),
    /// Components whose purl, without version, qualifiers and subpath, is `base` (the
    /// canonical form [`purl_base`] gives, e.g. `pkg:deb/debian/libc6`).
    Purl { base: String, purl_type: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
}

impl Op {
    fn holds(self, c: Ordering) -> bool {
        match self {
            Op::Lt => c == Ordering::Less,
            Op::Le => c != Ordering::Greater,
            Op::Eq => c == Ordering::Equal,
            Op::Ge => c != Ordering::Less,
            Op::Gt => c == Ordering::Greater,
        }
    }
}

/// A parsed search query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub subject: Subject,
    /// All must hold (empty: any version).
    pub constraints: Vec<(Op, String)>,
}

/// How a component stands against a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Not the subject, or the subject at a version outside the range.
    No,
    /// The subject, at a version inside the range.
    Yes,
    /// Possibly the subject inside the range, but it cannot be told; the text says why.
    /// The deny-list counts it as affected.
    Undecided(String),
}

impl Query {
    pub fn parse(q: &str) -> Result<Self> {
        let q = q.trim();
        if q.is_empty() {
            return Err(SbomError::Invalid("empty search query".into()));
        }
        let bad = |m: String| SbomError::Invalid(format!("search query {q:?}: {m}"));
        // A purl query's range sits where a purl's version does; packageurl decodes it.
        let (subject, range, decode) = if q.starts_with("pkg:") {
            let purl = PackageUrl::from_str(q).map_err(|e| bad(format!("not a purl (pkg:TYPE/[NAMESPACE/]NAME[@RANGE]): {e}")))?;
            let range = purl.version().map(str::to_owned);
            (Subject::Purl { base: base_of(&purl), purl_type: purl.ty().to_owned() }, range, false)
        } else {
            match q.rsplit_once('@') {
                Some(("", _)) => return Err(bad("nothing before '@'".into())),
                Some((name, range)) => (Subject::Name(name.to_owned()), Some(range.to_owned()), true),
                None => (Subject::Name(q.to_owned()), None, false),
            }
        };
        let mut constraints = Vec::new();
        if let Some(r) = range {
            for part in r.split(',').map(str::trim) {
                let (op, v) = if let Some(v) = part.strip_prefix(">=") {
                    (Op::Ge, v)
                } else if let Some(v) = part.strip_prefix("<=") {
                    (Op::Le, v)
                } else if let Some(v) = part.strip_prefix('>') {
                    (Op::Gt, v)
                } else if let Some(v) = part.strip_prefix('<') {
                    (Op::Lt, v)
                } else if let Some(v) = part.strip_prefix('=') {
                    (Op::Eq, v)
                } else {
                    (Op::Eq, part)
                };
                let v = v.trim();
                if v.is_empty() {
                    return Err(bad(format!("constraint {part:?} has no version")));
                }
                let v = if decode { percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned() } else { v.to_owned() };
                if let Subject::Purl { purl_type, .. } = &subject {
                    match Ecosystem::of_purl_type(purl_type) {
                        Some(e) => e.check(&v).map_err(|e| bad(e.to_string()))?,
                        None if op != Op::Eq => return Err(bad(SbomError::NoVersionOrdering { purl_type: purl_type.clone() }.to_string())),
                        None => {}
                    }
                }
                constraints.push((op, v));
            }
        }
        Ok(Query { subject, constraints })
    }

    /// Whether `c` is the subject at a version inside the range (see the module header
    /// for when the answer is [`Match::Undecided`]).
    pub fn check(&self, c: &ComponentRef) -> Match {
        let purl = c.purl.as_deref().map(read_purl);
        match (&self.subject, &purl) {
            (Subject::Name(n), _) if *n != c.name => return Match::No,
            (Subject::Name(_), _) => {}
            (Subject::Purl { .. }, None) => return Match::No,
            (Subject::Purl { base, .. }, Some(Ok(p))) if base_of(p) != *base => return Match::No,
            (Subject::Purl { .. }, Some(Ok(_))) => {}
            (Subject::Purl { base, .. }, Some(Err(e))) => return Match::Undecided(format!("{e}, so it may be {base}")),
        }
        if self.constraints.is_empty() {
            return Match::Yes;
        }
        let Some(version) = c.version.as_deref() else {
            return Match::Undecided(format!("component {} has no version to compare", c.name));
        };
        let ecosystem = match &purl {
            Some(Ok(p)) => Ecosystem::of_purl_type(p.ty()).ok_or_else(|| SbomError::NoVersionOrdering { purl_type: p.ty().to_owned() }.to_string()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err(format!("component {} has no purl, so no ecosystem whose rules order its versions; only an exact version (=) can be matched", c.name)),
        };
        let mut undecided = None;
        for (op, want) in &self.constraints {
            let holds = match (&ecosystem, op) {
                (Ok(e), _) => e.compare(version, want).map(|o| op.holds(o)).map_err(|e| e.to_string()),
                (Err(_), Op::Eq) => Ok(version == want),
                (Err(why), _) => Err(why.clone()),
            };
            match holds {
                Ok(true) => {}
                // One constraint surely false: outside the range, whatever the others say.
                Ok(false) => return Match::No,
                Err(why) => undecided = undecided.or(Some(why)),
            }
        }
        match undecided {
            Some(why) => Match::Undecided(why),
            None => Match::Yes,
        }
    }
}

fn read_purl(purl: &str) -> Result<PackageUrl<'static>> {
    PackageUrl::from_str(purl).map_err(|e| SbomError::Purl { purl: purl.to_owned(), reason: e.to_string() })
}

fn base_of(purl: &PackageUrl<'_>) -> String {
    let mut base = purl.clone();
    base.without_version().without_subpath().clear_qualifiers();
    base.to_string()
}

/// The canonical purl of a component without version, qualifiers and subpath
/// (`pkg:deb/debian/libc6@2.36-9%2Bdeb12u7?arch=amd64` → `pkg:deb/debian/libc6`);
/// an error names a purl that cannot be read.
pub fn purl_base(purl: &str) -> Result<String> {
    read_purl(purl).map(|p| base_of(&p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(name: &str, version: Option<&str>, purl: Option<&str>) -> ComponentRef {
        ComponentRef { name: name.into(), version: version.map(str::to_owned), purl: purl.map(str::to_owned) }
    }

    fn q(s: &str) -> Query {
        Query::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn queries_parse_and_match() {
        let q1 = q("openssl@>=3.0.0,<3.0.14");
        assert_eq!(q1.subject, Subject::Name("openssl".into()));
        let deb = |v: &str| comp("openssl", Some(v), Some("pkg:deb/debian/openssl?arch=amd64"));
        assert_eq!(q1.check(&deb("3.0.11-1~deb12u2")), Match::Yes);
        assert_eq!(q1.check(&deb("3.0.14-1")), Match::No);
        assert_eq!(q1.check(&comp("libssl3", Some("3.0.11-1"), None)), Match::No);
        let p = q("pkg:deb/debian/libc6@2.36-9%2Bdeb12u7");
        assert_eq!(p.subject, Subject::Purl { base: "pkg:deb/debian/libc6".into(), purl_type: "deb".into() });
        let libc6 = |v: &str| comp("libc6", Some(v), Some("pkg:deb/debian/libc6@x?arch=amd64"));
        assert_eq!(p.check(&libc6("2.36-9+deb12u7")), Match::Yes);
        assert_eq!(p.check(&libc6("2.36-9+deb12u8")), Match::No);
        assert_eq!(p.check(&comp("libc6", Some("2.36-9+deb12u7"), Some("pkg:deb/ubuntu/libc6"))), Match::No, "another namespace");
        assert_eq!(purl_base("pkg:deb/debian/libc6@2.36-9%2Bdeb12u7?arch=amd64").ok().as_deref(), Some("pkg:deb/debian/libc6"));
        assert!(Query::parse("").is_err());
        assert!(Query::parse("x@>=").is_err());
        assert!(Query::parse("@1").is_err());
        assert!(Query::parse("pkg:deb/debian/libc6@").is_err());
        assert!(Query::parse("pkg:nonsense").is_err());
    }

    #[test]
    fn purls_are_compared_in_canonical_form() {
        // Names a purl type normalises, percent-encoding, and npm scopes.
        assert_eq!(q("pkg:pypi/Foo_Bar").check(&comp("foo-bar", Some("1.0"), Some("pkg:pypi/foo-bar@1.0"))), Match::Yes);
        assert_eq!(q("pkg:deb/debian/libstdc++6").check(&comp("libstdc++6", Some("12.2.0-14"), Some("pkg:deb/debian/libstdc%2B%2B6@12.2.0-14"))), Match::Yes);
        let babel = q("pkg:npm/%40babel/core@<7.24.0");
        assert_eq!(babel.check(&comp("@babel/core", Some("7.23.0"), Some("pkg:npm/%40babel/core@7.23.0"))), Match::Yes);
        assert_eq!(babel.check(&comp("core", Some("7.23.0"), Some("pkg:npm/core@7.23.0"))), Match::No);
    }

    #[test]
    fn cargo_and_npm_pre_releases_are_before_the_release() {
        // Under dpkg's rules 1.0.0-alpha sorts after 1.0.0 and escaped `<1.0.0`.
        let cargo = q("pkg:cargo/foo@<1.0.0");
        assert_eq!(cargo.check(&comp("foo", Some("1.0.0-alpha"), Some("pkg:cargo/foo@1.0.0-alpha"))), Match::Yes);
        assert_eq!(cargo.check(&comp("foo", Some("1.0.0"), Some("pkg:cargo/foo@1.0.0"))), Match::No);
        let npm = q("pkg:npm/left-pad@>=1.0.0,<1.3.0");
        assert_eq!(npm.check(&comp("left-pad", Some("1.3.0-rc.1"), Some("pkg:npm/left-pad@1.3.0-rc.1"))), Match::Yes);
        assert_eq!(npm.check(&comp("left-pad", Some("1.0.0-beta"), Some("pkg:npm/left-pad@1.0.0-beta"))), Match::No);
        // A name query takes the rules from each component's purl type.
        let by_name = q("foo@<1.0.0");
        assert_eq!(by_name.check(&comp("foo", Some("1.0.0-alpha"), Some("pkg:cargo/foo@1.0.0-alpha"))), Match::Yes);
        assert_eq!(by_name.check(&comp("foo", Some("1.0.0-alpha"), Some("pkg:deb/debian/foo"))), Match::No, "dpkg: a revision");
    }

    #[test]
    fn pypi_and_deb_follow_their_own_rules() {
        let py = |v: &str| comp("django", Some(v), Some("pkg:pypi/django"));
        assert_eq!(q("pkg:pypi/django@<1.0.0").check(&py("1.0.0rc1")), Match::Yes);
        assert_eq!(q("pkg:pypi/django@>1.0.0").check(&py("1.0.0.post1")), Match::Yes);
        assert_eq!(q("pkg:pypi/django@>2.0").check(&py("1!0.1")), Match::Yes, "epoch");
        assert_eq!(q("pkg:pypi/django@=1.0").check(&py("1.0.0")), Match::Yes);
        let deb = |v: &str| comp("openssl", Some(v), Some("pkg:deb/debian/openssl"));
        assert_eq!(q("pkg:deb/debian/openssl@<1.0").check(&deb("1.0~rc1")), Match::Yes);
        assert_eq!(q("pkg:deb/debian/openssl@>2.0").check(&deb("1:0.1")), Match::Yes, "epoch");
    }

    #[test]
    fn ranges_on_types_without_an_ordering_are_refused_by_name() {
        for s in ["pkg:golang/github.com/x/y@<1.2.3", "pkg:generic/busybox@>=1.0"] {
            let err = Query::parse(s).err().map(|e| e.to_string()).unwrap_or_default();
            let ty = s.trim_start_matches("pkg:").split('/').next().unwrap_or_default();
            assert!(err.contains(&format!("purl type {ty:?}")) && err.contains("only an exact version"), "{err}");
        }
        // An exact version is still allowed, compared as text.
        let exact = q("pkg:generic/busybox@1.36.1");
        assert_eq!(exact.check(&comp("busybox", Some("1.36.1"), Some("pkg:generic/busybox@1.36.1"))), Match::Yes);
        assert_eq!(exact.check(&comp("busybox", Some("1.36.0"), Some("pkg:generic/busybox@1.36.0"))), Match::No);
    }

    #[test]
    fn malformed_bounds_in_purl_queries_name_the_version_and_ecosystem() {
        for (s, eco) in [("pkg:cargo/foo@<1.0", "cargo (semver)"), ("pkg:pypi/foo@<1.0-foo-bar", "pypi (PEP 440)"), ("pkg:deb/debian/foo@<a:1", "deb (dpkg)")] {
            let err = Query::parse(s).err().map(|e| e.to_string()).unwrap_or_default();
            let v = s.rsplit_once("@<").map(|(_, v)| v).unwrap_or_default();
            assert!(err.contains(&format!("{v:?}")) && err.contains(eco), "{err}");
        }
    }

    #[test]
    fn what_cannot_be_compared_is_undecided_never_no() {
        let undecided = |m: Match, want: &str| match m {
            Match::Undecided(why) => assert!(why.contains(want), "{why} should mention {want}"),
            other => panic!("{other:?}, not undecided ({want})"),
        };
        // A version its ecosystem cannot read.
        undecided(q("foo@<1.0.0").check(&comp("foo", Some("1.0"), Some("pkg:cargo/foo@1.0"))), "\"1.0\" is not a valid cargo (semver) version");
        undecided(q("pkg:cargo/foo@<1.0.0").check(&comp("foo", Some("latest"), Some("pkg:cargo/foo"))), "\"latest\"");
        // A name query's bound the component's ecosystem cannot read.
        undecided(q("foo@<2").check(&comp("foo", Some("1.0.0"), Some("pkg:npm/foo"))), "\"2\" is not a valid npm (semver) version");
        // No ecosystem: no purl, or a type without an ordering.
        undecided(q("openssl@<3.0.14").check(&comp("openssl", Some("3.0.11"), None)), "has no purl");
        undecided(q("busybox@<1.37").check(&comp("busybox", Some("1.36.1"), Some("pkg:generic/busybox"))), "purl type \"generic\"");
        // No version at all.
        undecided(q("pkg:cargo/foo@<1.0.0").check(&comp("foo", None, Some("pkg:cargo/foo"))), "no version");
        // A purl that cannot be read may be the package asked for.
        undecided(q("pkg:cargo/foo").check(&comp("foo", Some("1.0.0"), Some("pkg:cargo/ns/foo@1.0.0"))), "pkg:cargo/ns/foo@1.0.0");
        // But a constraint that surely fails decides: outside the range.
        assert_eq!(q("foo@>=2.0.0,<2").check(&comp("foo", Some("1.0.0"), Some("pkg:npm/foo"))), Match::No);
        // And an exact version needs no ordering.
        assert_eq!(q("openssl@=3.0.11").check(&comp("openssl", Some("3.0.11"), None)), Match::Yes);
        assert_eq!(q("openssl@3.0.12").check(&comp("openssl", Some("3.0.11"), None)), Match::No);
    }
}
