//! Fleet search queries: `NAME`, `NAME@VERSION`, `NAME@>=1.2,<2.0`, or a purl
//! (`pkg:deb/debian/openssl`, optionally `@VERSION` or `@RANGE`), and the version
//! ordering they use (dpkg's, which also orders semantic versions sensibly).

use std::cmp::Ordering;

use crate::{Result, SbomError};

/// What to look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Components with this exact name.
    Name(String),
    /// Components whose purl, without its version and qualifiers, is this.
    Purl(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
}

/// A parsed search query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub subject: Subject,
    /// All must hold (empty: any version).
    pub constraints: Vec<(Op, String)>,
}

impl Query {
    pub fn parse(q: &str) -> Result<Self> {
        let q = q.trim();
        if q.is_empty() {
            return Err(SbomError::Invalid("empty search query".into()));
        }
        let bad = |m: String| SbomError::Invalid(format!("search query {q:?}: {m}"));
        let (subject_part, range) = match q.rsplit_once('@') {
            Some((s, r)) if !s.is_empty() => (s, Some(r)),
            Some(_) => return Err(bad("nothing before '@'".into())),
            None => (q, None),
        };
        let subject = if subject_part.starts_with("pkg:") {
            let base = subject_part.split(['?', '#']).next().unwrap_or(subject_part);
            if base.matches('/').count() < 1 {
                return Err(bad("a purl looks like pkg:TYPE/[NAMESPACE/]NAME".into()));
            }
            Subject::Purl(base.to_owned())
        } else {
            Subject::Name(subject_part.to_owned())
        };
        let mut constraints = Vec::new();
        if let Some(r) = range {
            let r = r.split(['?', '#']).next().unwrap_or(r);
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
                constraints.push((op, percent_decode(v)));
            }
        }
        Ok(Query { subject, constraints })
    }

    /// Does a component version satisfy every constraint?
    pub fn matches_version(&self, version: Option<&str>) -> bool {
        if self.constraints.is_empty() {
            return true;
        }
        let Some(v) = version else { return false };
        self.constraints.iter().all(|(op, want)| {
            let c = compare_versions(v, want);
            match op {
                Op::Lt => c == Ordering::Less,
                Op::Le => c != Ordering::Greater,
                Op::Eq => c == Ordering::Equal,
                Op::Ge => c != Ordering::Less,
                Op::Gt => c == Ordering::Greater,
            }
        })
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The purl of a component without version and qualifiers (`pkg:deb/debian/libc6`).
pub fn purl_base(purl: &str) -> &str {
    let no_q = purl.split(['?', '#']).next().unwrap_or(purl);
    match no_q.rfind('@') {
        Some(i) if no_q[..i].contains('/') => &no_q[..i],
        _ => no_q,
    }
}

/// dpkg's version ordering: `[epoch:]upstream[-revision]`, comparing non-digit runs
/// lexically (with `~` before everything, letters before other characters) and digit
/// runs numerically.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
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

    #[test]
    fn dpkg_ordering() {
        use Ordering::*;
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
        ] {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn queries_parse_and_match() {
        let q = Query::parse("openssl@>=3.0.0,<3.0.14").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.subject, Subject::Name("openssl".into()));
        assert!(q.matches_version(Some("3.0.11-1~deb12u2")));
        assert!(!q.matches_version(Some("3.0.14-1")));
        assert!(!q.matches_version(None));
        let p = Query::parse("pkg:deb/debian/libc6@2.36-9%2Bdeb12u7").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.subject, Subject::Purl("pkg:deb/debian/libc6".into()));
        assert!(p.matches_version(Some("2.36-9+deb12u7")));
        assert_eq!(purl_base("pkg:deb/debian/libc6@2.36-9%2Bdeb12u7?arch=amd64"), "pkg:deb/debian/libc6");
        assert!(Query::parse("").is_err());
        assert!(Query::parse("x@>=").is_err());
        assert!(Query::parse("@1").is_err());
    }
}
