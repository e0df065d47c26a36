//! Version ordering by each ecosystem's own rules, chosen from the purl type.
//!
//! One ordering for everything is wrong somewhere: under dpkg's rules
//! `1.0.0-alpha` sorts *after* `1.0.0` (the `-` starts a Debian revision), so a cargo
//! or npm pre-release would escape a `<1.0.0` deny-list rule. So:
//!
//! | purl type | rules | crate |
//! |---|---|---|
//! | `deb` | dpkg (`[epoch:]upstream[-revision]`, `~` sorts first) | this module |
//! | `cargo`, `npm` | semver 2.0 precedence (pre-releases before the release; build metadata ignored) | `semver` |
//! | `pypi` | PEP 440 (epochs, pre/post/dev releases, local versions after the public one) | `pep440_rs` |
//!
//! Any other type has no ordering here: only exact matches are possible for it.
//!
//! A version its ecosystem cannot read is an error naming the version and the
//! ecosystem, never "not in range": the deny-list gate must not let a release through
//! because one of its versions could not be compared.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use crate::{Result, SbomError};

/// A package ecosystem whose version ordering Outpost knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ecosystem {
    /// Debian packages: dpkg's ordering.
    Deb,
    /// Rust crates: semver.
    Cargo,
    /// npm packages: semver.
    Npm,
    /// Python packages: PEP 440.
    Pypi,
}

impl Ecosystem {
    /// The ecosystem of a purl type (`deb`, `cargo`, `npm`, `pypi`); None for others.
    pub fn of_purl_type(purl_type: &str) -> Option<Self> {
        match purl_type {
            "deb" => Some(Ecosystem::Deb),
            "cargo" => Some(Ecosystem::Cargo),
            "npm" => Some(Ecosystem::Npm),
            "pypi" => Some(Ecosystem::Pypi),
            _ => None,
        }
    }

    /// The purl type.
    pub fn purl_type(self) -> &'static str {
        match self {
            Ecosystem::Deb => "deb",
            Ecosystem::Cargo => "cargo",
            Ecosystem::Npm => "npm",
            Ecosystem::Pypi => "pypi",
        }
    }

    /// The name of the ordering rules.
    pub fn rules(self) -> &'static str {
        match self {
            Ecosystem::Deb => "dpkg",
            Ecosystem::Cargo | Ecosystem::Npm => "semver",
            Ecosystem::Pypi => "PEP 440",
        }
    }

    /// Checks that `version` is a version of this ecosystem.
    pub fn check(self, version: &str) -> Result<()> {
        match self {
            Ecosystem::Deb => self.dpkg(version).map(drop),
            Ecosystem::Cargo | Ecosystem::Npm => self.semver(version).map(drop),
            Ecosystem::Pypi => self.pep440(version).map(drop),
        }
    }

    /// Orders two versions by this ecosystem's rules; an error names the version that
    /// is not one of this ecosystem's.
    pub fn compare(self, a: &str, b: &str) -> Result<Ordering> {
        Ok(match self {
            Ecosystem::Deb => dpkg_compare(self.dpkg(a)?, self.dpkg(b)?),
            Ecosystem::Cargo | Ecosystem::Npm => self.semver(a)?.cmp_precedence(&self.semver(b)?),
            Ecosystem::Pypi => self.pep440(a)?.cmp(&self.pep440(b)?),
        })
    }

    fn bad(self, version: &str, reason: impl fmt::Display) -> SbomError {
        SbomError::Version { version: version.to_owned(), ecosystem: self, reason: reason.to_string() }
    }

    fn dpkg(self, version: &str) -> Result<&str> {
        dpkg_check(version).map(|()| version).map_err(|reason| self.bad(version, reason))
    }

    fn semver(self, version: &str) -> Result<semver::Version> {
        semver::Version::parse(version).map_err(|e| self.bad(version, e))
    }

    fn pep440(self, version: &str) -> Result<pep440_rs::Version> {
        pep440_rs::Version::from_str(version).map_err(|e| self.bad(version, e))
    }
}

impl fmt::Display for Ecosystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.purl_type(), self.rules())
    }
}

/// What dpkg calls bad syntax in a version (its `parseversion`): the reason, or Ok.
/// dpkg itself only warns about a non-digit start and odd characters; here they are
/// refused too, since a version dpkg cannot vouch for is not ordered silently.
fn dpkg_check(v: &str) -> std::result::Result<(), &'static str> {
    if v.is_empty() {
        return Err("version string is empty");
    }
    if v.chars().any(char::is_whitespace) {
        return Err("version string has spaces");
    }
    let rest = match v.split_once(':') {
        Some((epoch, rest)) => {
            if epoch.is_empty() {
                return Err("epoch in version is empty");
            }
            if !epoch.bytes().all(|c| c.is_ascii_digit()) {
                return Err("epoch in version is not a number");
            }
            if epoch.parse::<i32>().is_err() {
                return Err("epoch in version is too big");
            }
            if rest.is_empty() {
                return Err("nothing after colon in version number");
            }
            rest
        }
        None => v,
    };
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((_, "")) => return Err("revision number is empty"),
        Some((u, r)) => (u, r),
        None => (rest, ""),
    };
    if upstream.is_empty() {
        return Err("version number is empty");
    }
    if !upstream.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("version number does not start with digit");
    }
    if !upstream.bytes().all(|c| c.is_ascii_alphanumeric() || b".-+~:".contains(&c)) {
        return Err("invalid character in version number");
    }
    if !revision.bytes().all(|c| c.is_ascii_alphanumeric() || b".+~".contains(&c)) {
        return Err("invalid character in revision number");
    }
    Ok(())
}

/// dpkg's version ordering: `[epoch:]upstream[-revision]`, comparing non-digit runs
/// lexically (with `~` before everything, letters before other characters) and digit
/// runs numerically. Total on any input; [`Ecosystem::compare`] checks the syntax first.
pub fn dpkg_compare(a: &str, b: &str) -> Ordering {
    let (ea, ra) = split_epoch(a);
    let (eb, rb) = split_epoch(b);
    ea.cmp(&eb).then_with(|| {
        let (ua, va) = ra.rsplit_once('-').unwrap_or((ra, ""));
        let (ub, vb) = rb.rsplit_once('-').unwrap_or((rb, ""));
        verrevcmp(ua, ub).then_with(|| verrevcmp(va, vb))
    })
}

fn split_epoch(v: &str) -> (u64, &str) {
    match v.split_once(':') {
        Some((e, rest)) if !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), rest),
        _ => (0, v),
    }
}

fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(c) => c as i32 + 256,
    }
}

fn verrevcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let mut first_diff = 0;
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let ac = order(a.get(i).copied().filter(|c| !c.is_ascii_digit()));
            let bc = order(b.get(j).copied().filter(|c| !c.is_ascii_digit()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == 0 {
                first_diff = a[i] as i32 - b[j] as i32;
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != 0 {
            return first_diff.cmp(&0);
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    fn cmp(e: Ecosystem, a: &str, b: &str) -> Ordering {
        e.compare(a, b).unwrap_or_else(|err| panic!("{a} vs {b}: {err}"))
    }

    #[test]
    fn dpkg_ordering() {
        for (a, b, want) in [
            ("1.0", "1.0", Equal),
            ("1.0", "1.1", Less),
            ("1.10", "1.9", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1:0.1", "2.0", Greater),
            ("3.0.11-1~deb12u2", "3.0.13-1~deb12u1", Less),
            ("2.36-9+deb12u7", "2.36-9+deb12u14", Less),
            ("1.0a", "1.0", Greater),
            ("1.0-1", "1.0-2", Less),
            // dpkg's own reading of a hyphen: a revision, so this is after 1.0.0.
            ("1.0.0-alpha", "1.0.0", Greater),
        ] {
            assert_eq!(cmp(Ecosystem::Deb, a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn semver_orders_pre_releases_before_the_release() {
        for e in [Ecosystem::Cargo, Ecosystem::Npm] {
            for (a, b, want) in [
                ("1.0.0-alpha", "1.0.0", Less),
                ("1.0.0-alpha", "1.0.0-alpha.1", Less),
                ("1.0.0-alpha.1", "1.0.0-alpha.beta", Less),
                ("1.0.0-beta.2", "1.0.0-beta.11", Less),
                ("1.0.0-rc.1", "1.0.0", Less),
                ("1.10.0", "1.9.0", Greater),
                // Build metadata has no precedence.
                ("1.0.0+build.5", "1.0.0", Equal),
            ] {
                assert_eq!(cmp(e, a, b), want, "{e}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn pep440_ordering() {
        for (a, b, want) in [
            ("1.0.0rc1", "1.0.0", Less),
            ("1.0.0.post1", "1.0.0", Greater),
            ("1!0.1", "2.0", Greater),
            ("1.0.dev1", "1.0a1", Less),
            ("1.0a1", "1.0b1", Less),
            ("1.0", "1.0.0", Equal),
            ("1.0.0RC1", "1.0.0rc1", Equal),
            ("1.0+local.1", "1.0", Greater),
            ("1.10", "1.9", Greater),
        ] {
            assert_eq!(cmp(Ecosystem::Pypi, a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn malformed_versions_name_the_version_and_the_ecosystem() {
        for (e, v, reason) in [
            (Ecosystem::Cargo, "1.0", "cargo (semver)"),
            (Ecosystem::Npm, "latest", "npm (semver)"),
            (Ecosystem::Pypi, "1.0-foo-bar", "pypi (PEP 440)"),
            (Ecosystem::Deb, "", "empty"),
            (Ecosystem::Deb, "a:1.0", "epoch in version is not a number"),
            (Ecosystem::Deb, "1:", "nothing after colon"),
            (Ecosystem::Deb, "1.0-", "revision number is empty"),
            (Ecosystem::Deb, "1.0 beta", "spaces"),
            (Ecosystem::Deb, "v1.0", "does not start with digit"),
            (Ecosystem::Deb, "1.0_1", "invalid character"),
        ] {
            let err = e.compare(v, "1.0.0").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(&format!("{v:?}")) && err.contains(e.purl_type()) && err.contains(reason), "{e} {v:?}: {err}");
            // Either side.
            assert!(e.compare("1.0.0", v).is_err(), "{e} {v:?}");
        }
    }

    #[test]
    fn purl_types_choose_the_rules() {
        assert_eq!(Ecosystem::of_purl_type("deb"), Some(Ecosystem::Deb));
        assert_eq!(Ecosystem::of_purl_type("cargo"), Some(Ecosystem::Cargo));
        assert_eq!(Ecosystem::of_purl_type("npm"), Some(Ecosystem::Npm));
        assert_eq!(Ecosystem::of_purl_type("pypi"), Some(Ecosystem::Pypi));
        assert_eq!(Ecosystem::of_purl_type("golang"), None);
        assert_eq!(Ecosystem::of_purl_type("generic"), None);
    }
}
