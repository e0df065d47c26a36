//! Parsing a bundle: every field checked, the wrong one named.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Cidr, Direction, Mode, PolicyBundle, Profile, Protocol, Rule, Scope, ScopeKind, MAX_RULES, SCHEMA};
use crate::error::{Error, Result};

impl PolicyBundle {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|_| bad("bundle", "", "is not UTF-8 text"))?;
        let doc: Value =
            serde_yaml::from_str(text).map_err(|e| bad("bundle", "", &format!("is not valid YAML or JSON: {e}")))?;
        let top = doc.as_object().ok_or_else(|| bad("bundle", "", "must be a mapping"))?;
        known_fields(top, "bundle", &["schema", "name", "version", "mode", "not_after", "sample_denies", "workloads", "interfaces", "essential"])?;
        let schema = req_str(top, "bundle", "schema")?;
        if schema != SCHEMA {
            return Err(bad("bundle", "schema", &format!("is {schema:?}; this agent reads {SCHEMA:?}")));
        }
        let name = req_str(top, "bundle", "name")?;
        check_name(&name, "bundle", "name")?;
        let version = top
            .get("version")
            .ok_or_else(|| bad("bundle", "version", "is missing"))?
            .as_u64()
            .filter(|v| *v >= 1)
            .ok_or_else(|| bad("bundle", "version", "must be an integer >= 1"))?;
        let mode = match req_str(top, "bundle", "mode")?.as_str() {
            "enforce" => Mode::Enforce,
            "audit" => Mode::Audit,
            other => return Err(bad("bundle", "mode", &format!("is {other:?}; use enforce or audit"))),
        };
        let na = req_str(top, "bundle", "not_after")?;
        let not_after = DateTime::parse_from_rfc3339(&na)
            .map_err(|e| bad("bundle", "not_after", &format!("{na:?} is not an RFC 3339 time: {e}")))?
            .with_timezone(&Utc);
        let sample_denies = match top.get("sample_denies") {
            None => 1,
            Some(v) => v
                .as_u64()
                .filter(|v| (1..=u64::from(u32::MAX)).contains(v))
                .ok_or_else(|| bad("bundle", "sample_denies", "must be an integer >= 1"))? as u32,
        };
        let profile = parse_profile(top, "bundle")?;
        let essential = match top.get("essential") {
            None => return Err(bad("bundle", "essential", "is missing: a bundle names the profile to fall back to when it expires offline (an empty mapping denies everything)")),
            Some(Value::Object(m)) => {
                known_fields(m, "essential", &["workloads", "interfaces"])?;
                parse_profile(m, "essential")?
            }
            Some(_) => return Err(bad("bundle", "essential", "must be a mapping with workloads and interfaces")),
        };
        let essential = essential.enclosing(&profile);
        for (p, what) in [(&profile, "bundle"), (&essential, "essential")] {
            if p.rule_count() > MAX_RULES {
                return Err(bad(what, "rules", &format!("{} rules; at most {MAX_RULES}", p.rule_count())));
            }
        }
        Ok(PolicyBundle { name, version, mode, not_after, sample_denies, profile, essential })
    }
}

fn bad(location: &str, field: &str, reason: &str) -> Error {
    if field.is_empty() {
        Error::Policy(format!("{location} {reason}"))
    } else {
        Error::Policy(format!("{location}: field {field:?} {reason}"))
    }
}

fn known_fields(m: &serde_json::Map<String, Value>, location: &str, known: &[&str]) -> Result<()> {
    for k in m.keys() {
        if !known.contains(&k.as_str()) {
            return Err(bad(location, k, &format!("is not a known field (known: {})", known.join(", "))));
        }
    }
    Ok(())
}

fn req_str(m: &serde_json::Map<String, Value>, location: &str, field: &str) -> Result<String> {
    match m.get(field) {
        None => Err(bad(location, field, "is missing")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(location, field, "must be a string")),
    }
}

fn check_name(name: &str, location: &str, field: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(bad(location, field, &format!("{name:?} must be 1-64 characters of letters, digits, '-', '_' and '.'")))
    }
}

fn parse_profile(m: &serde_json::Map<String, Value>, location: &str) -> Result<Profile> {
    let mut scopes = Vec::new();
    for (field, kind) in [("workloads", ScopeKind::Workload), ("interfaces", ScopeKind::Interface)] {
        let list = match m.get(field) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => return Err(bad(location, field, "must be a list")),
        };
        let mut names = BTreeSet::new();
        let mut targets = BTreeSet::new();
        for (i, item) in list.iter().enumerate() {
            let here = format!("{location} {field}[{i}]");
            let s = parse_scope(item, kind, &here)?;
            if !names.insert(s.name.clone()) {
                return Err(bad(&here, "name", &format!("{:?} is used twice", s.name)));
            }
            if !targets.insert(s.target.clone()) {
                let f = if kind == ScopeKind::Workload { "cgroup" } else { "interface" };
                return Err(bad(&here, f, &format!("{:?} is named by two entries; merge their rules", s.target)));
            }
            scopes.push(s);
        }
    }
    Ok(Profile { scopes })
}

fn parse_scope(v: &Value, kind: ScopeKind, here: &str) -> Result<Scope> {
    let m = v.as_object().ok_or_else(|| bad(here, "", "must be a mapping"))?;
    let (target_field, known): (&str, &[&str]) = match kind {
        ScopeKind::Workload => ("cgroup", &["name", "cgroup", "rules"]),
        ScopeKind::Interface => ("interface", &["name", "interface", "rules"]),
    };
    known_fields(m, here, known)?;
    let name = req_str(m, here, "name")?;
    check_name(&name, here, "name")?;
    let what = match kind {
        ScopeKind::Workload => format!("workload {name:?}"),
        ScopeKind::Interface => format!("interface {name:?}"),
    };
    let target = req_str(m, &what, target_field)?;
    match kind {
        ScopeKind::Workload => {
            let ok = !target.is_empty()
                && !target.starts_with('/')
                && target.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
                && !target.contains('\0');
            if !ok {
                return Err(bad(&what, "cgroup", &format!("{target:?} must be a relative cgroup v2 path (like outpost/telemetry) without '.', '..' or empty parts")));
            }
        }
        ScopeKind::Interface => {
            let ok = !target.is_empty()
                && target.len() <= 15
                && target.chars().all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
            if !ok {
                return Err(bad(&what, "interface", &format!("{target:?} is not an interface name (1-15 characters, no '/' or ':')")));
            }
        }
    }
    let rules_v = match m.get("rules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(bad(&what, "rules", "must be a list")),
    };
    let mut rules = Vec::with_capacity(rules_v.len());
    let mut names = BTreeSet::new();
    for (i, r) in rules_v.iter().enumerate() {
        let rule = parse_rule(r, &format!("{what} rules[{i}]"), &what)?;
        if !names.insert(rule.name.clone()) {
            return Err(bad(&format!("{what} rule {:?}", rule.name), "name", "is used twice in this scope"));
        }
        rules.push(rule);
    }
    Ok(Scope { kind, name, target, rules })
}

fn parse_rule(v: &Value, index_loc: &str, scope_loc: &str) -> Result<Rule> {
    let m = v.as_object().ok_or_else(|| bad(index_loc, "", "must be a mapping"))?;
    let name = req_str(m, index_loc, "name")?;
    check_name(&name, index_loc, "name")?;
    let here = format!("{scope_loc} rule {name:?}");
    known_fields(m, &here, &["name", "direction", "cidr", "protocol", "ports"])?;
    let direction = match req_str(m, &here, "direction")?.as_str() {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        other => return Err(bad(&here, "direction", &format!("is {other:?}; use ingress or egress"))),
    };
    let cidr = Cidr::parse(&req_str(m, &here, "cidr")?).map_err(|e| bad(&here, "cidr", &e))?;
    let protocol = match req_str(m, &here, "protocol")?.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        other => return Err(bad(&here, "protocol", &format!("is {other:?}; use tcp, udp or icmp"))),
    };
    let ports = match m.get("ports") {
        None | Some(Value::Null) => (0, u16::MAX),
        Some(_) if protocol == Protocol::Icmp => return Err(bad(&here, "ports", "is not allowed with protocol icmp")),
        Some(Value::Number(n)) => {
            let p = n.as_u64().filter(|p| (1..=65535).contains(p)).ok_or_else(|| bad(&here, "ports", &format!("{n} is not a port (1-65535)")))?;
            (p as u16, p as u16)
        }
        Some(Value::String(s)) => parse_range(s).map_err(|e| bad(&here, "ports", &e))?,
        Some(_) => return Err(bad(&here, "ports", "must be a port (443) or a range (\"8000-8999\")")),
    };
    Ok(Rule { name, direction, cidr, protocol, ports })
}

fn parse_range(s: &str) -> std::result::Result<(u16, u16), String> {
    let port = |p: &str| -> std::result::Result<u16, String> {
        p.trim().parse::<u16>().ok().filter(|p| *p >= 1).ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("range {s:?} ends before it starts"));
    }
    Ok((lo, hi))
}
