//! Network-policy bundles: the signed document a device enforces with eBPF.
//!
//! A bundle is YAML (JSON is YAML too). It allows traffic per workload (a cgroup v2
//! path, relative to the device's cgroup root) and per interface; everything else is
//! denied. `docs/policy.md` documents the schema and `examples/policy.yaml` is a
//! commented example.
//!
//! Parsing checks every field and names the one that is wrong: `workload "telemetry"
//! rule "mqtt": field "ports": ...`. What comes out ([`PolicyBundle`]) is valid by
//! construction.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// The `schema` a bundle must name.
pub const SCHEMA: &str = "outpost.policy/v1";
/// Rules one profile may hold (the size of a generation in the eBPF maps).
pub const MAX_RULES: usize = 16_384;
/// The TUF delegation policy bundles are signed under.
pub const POLICY_ROLE: &str = "policy";
/// Target paths of policy bundles start with this.
pub const TARGET_PREFIX: &str = "policy/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny what no rule allows.
    Enforce,
    /// Count and report what would be denied, deny nothing.
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic to the workload or arriving on the interface; the CIDR is the source.
    Ingress,
    /// Traffic from the workload or leaving by the interface; the CIDR is the destination.
    Egress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP for IPv4 rules, ICMPv6 for IPv6 rules.
    Icmp,
}

/// An address prefix, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        let masked = mask(addr, prefix);
        if masked != addr {
            return Err(format!("{s:?} has host bits set (did you mean {masked}/{prefix}?)"));
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The address as 16 bytes, IPv4 in the first four.
    pub fn bytes(&self) -> [u8; 16] {
        addr_bytes(self.addr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `addr` with all but the first `prefix` bits cleared.
pub fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// An address as 16 bytes in network order, IPv4 in the first four.
pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub direction: Direction,
    pub cidr: Cidr,
    pub protocol: Protocol,
    /// Inclusive; `(0, 65535)` for every port (and for ICMP).
    pub ports: (u16, u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKind {
    Workload,
    Interface,
}

/// A workload (cgroup) or an interface and the traffic it may have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub kind: ScopeKind,
    pub name: String,
    /// The cgroup path relative to the cgroup root, or the interface name.
    pub target: String,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub scopes: Vec<Scope>,
}

impl Profile {
    /// This profile, plus every scope of `other` it does not name (by kind and
    /// target) with no rules: those scopes stay under enforcement and allow nothing.
    pub fn enclosing(mut self, other: &Profile) -> Profile {
        for s in &other.scopes {
            if !self.scopes.iter().any(|m| m.kind == s.kind && m.target == s.target) {
                self.scopes.push(Scope { kind: s.kind, name: s.name.clone(), target: s.target.clone(), rules: Vec::new() });
            }
        }
        self
    }

    pub fn rule_count(&self) -> usize {
        self.scopes.iter().map(|s| s.rules.len()).sum()
    }

    /// Every rule with a stable id (`workload/NAME/RULE` or `interface/NAME/RULE`) in
    /// counter order.
    pub fn rule_ids(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.rule_count());
        for s in &self.scopes {
            let kind = match s.kind {
                ScopeKind::Workload => "workload",
                ScopeKind::Interface => "interface",
            };
            for r in &s.rules {
                out.push(format!("{kind}/{}/{}", s.name, r.name));
            }
        }
        out
    }
}

/// A parsed and validated bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyBundle {
    pub name: String,
    pub version: u64,
    pub mode: Mode,
    pub not_after: DateTime<Utc>,
    /// One deny event out of this many is reported.
    pub sample_denies: u32,
    pub profile: Profile,
    /// Enforced (always in enforce mode) once `not_after` has passed: the bundle's
    /// `essential` section, plus every other scope the bundle names, with no rules.
    /// Fail-secure: a workload or interface the bundle put under enforcement never
    /// leaves it because the bundle expired; absent from `essential` means denied
    /// everything, not unfiltered.
    pub essential: Profile,
}

/// Which profile of a bundle applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Applied {
    Bundle,
    Essential,
}

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

    /// The rules and mode of one of the bundle's profiles (the essential profile is
    /// always enforced).
    pub fn profile_for(&self, applied: Applied) -> (&Profile, Mode) {
        match applied {
            Applied::Bundle => (&self.profile, self.mode),
            Applied::Essential => (&self.essential, Mode::Enforce),
        }
    }

    /// The profile to enforce at `now`: the bundle's until `not_after`, then the
    /// essential profile.
    pub fn applied(&self, now: DateTime<Utc>) -> Applied {
        if now >= self.not_after {
            Applied::Essential
        } else {
            Applied::Bundle
        }
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

/// Selector of a published bundle: the devices it is meant for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// Hardware classes; empty means every class.
    #[serde(default)]
    pub hardware_classes: Vec<String>,
    /// Labels a device must all have; empty means no constraint.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn matches(&self, hardware_class: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.hardware_classes.is_empty() || self.hardware_classes.iter().any(|c| c == hardware_class))
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// How specific the selector is: a device takes the most specific bundle that
    /// selects it (labels count more than hardware class).
    pub fn specificity(&self) -> (usize, bool) {
        (self.labels.len(), !self.hardware_classes.is_empty())
    }
}

/// The `custom` of a policy bundle's TUF target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTargetCustom {
    /// Always `"policy"`.
    pub kind: String,
    pub name: String,
    pub version: u64,
    pub not_after: DateTime<Utc>,
    pub selector: Selector,
}

impl PolicyTargetCustom {
    pub fn from_bundle(b: &PolicyBundle, selector: Selector) -> Self {
        PolicyTargetCustom { kind: "policy".into(), name: b.name.clone(), version: b.version, not_after: b.not_after, selector }
    }

    /// The target path a bundle is published under.
    pub fn target_path(&self) -> String {
        format!("{TARGET_PREFIX}{}/v{}.yaml", self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
schema: outpost.policy/v1
name: edge
version: 3
mode: enforce
not_after: 2030-01-01T00:00:00Z
workloads:
  - name: telemetry
    cgroup: outpost/telemetry
    rules:
      - {name: mqtt, direction: egress, cidr: 10.0.0.0/8, protocol: tcp, ports: 8883}
      - {name: dns, direction: egress, cidr: "fd00::/64", protocol: udp, ports: "53-54"}
      - {name: ping, direction: egress, cidr: 0.0.0.0/0, protocol: icmp}
interfaces:
  - name: uplink
    interface: eth0
    rules:
      - {name: ssh, direction: ingress, cidr: 192.168.1.0/24, protocol: tcp, ports: 22}
essential:
  workloads:
    - name: telemetry
      cgroup: outpost/telemetry
      rules:
        - {name: server, direction: egress, cidr: 10.0.0.1/32, protocol: tcp, ports: 443}
"#;

    fn err(doc: &str) -> String {
        PolicyBundle::parse(doc.as_bytes()).expect_err("must be refused").to_string()
    }

    #[test]
    fn parses_a_complete_bundle() {
        let b = PolicyBundle::parse(GOOD.as_bytes()).expect("valid");
        assert_eq!(b.version, 3);
        assert_eq!(b.profile.rule_count(), 4);
        assert_eq!(b.essential.rule_count(), 1);
        assert_eq!(b.profile.scopes[0].rules[1].ports, (53, 54));
        assert_eq!(b.profile.scopes[0].rules[2].ports, (0, 65535));
        assert_eq!(b.profile.rule_ids()[3], "interface/uplink/ssh");
        let t = DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z").expect("time").with_timezone(&Utc);
        assert_eq!(b.applied(t - chrono::Duration::seconds(1)), Applied::Bundle);
        assert_eq!(b.applied(t), Applied::Essential);
    }

    #[test]
    fn the_essential_profile_keeps_every_scope_of_the_bundle_enforced() {
        // GOOD's essential section names only the telemetry workload: the uplink
        // interface must stay under enforcement with nothing allowed, not fall open.
        let b = PolicyBundle::parse(GOOD.as_bytes()).expect("valid");
        let (essential, mode) = b.profile_for(Applied::Essential);
        assert_eq!(mode, Mode::Enforce);
        let uplink = essential.scopes.iter().find(|s| s.kind == ScopeKind::Interface && s.target == "eth0").expect("uplink kept");
        assert!(uplink.rules.is_empty());
        let telemetry = essential.scopes.iter().find(|s| s.target == "outpost/telemetry").expect("telemetry");
        assert_eq!(telemetry.rules.len(), 1, "essential's own rules, not the bundle's");
        // `essential: {}` keeps both scopes, both denied everything.
        let empty = GOOD.split("essential:").next().expect("head").to_owned() + "essential: {}\n";
        let b = PolicyBundle::parse(empty.as_bytes()).expect("valid");
        assert_eq!(b.essential.scopes.len(), 2);
        assert_eq!(b.essential.rule_count(), 0);
    }

    #[test]
    fn json_is_accepted_too() {
        let v: Value = serde_yaml::from_str(GOOD).expect("yaml");
        let json = serde_json::to_vec(&v).expect("json");
        assert_eq!(PolicyBundle::parse(&json).expect("valid"), PolicyBundle::parse(GOOD.as_bytes()).expect("valid"));
    }

    #[test]
    fn errors_name_the_rule_and_field() {
        let e = err(&GOOD.replace("cidr: 10.0.0.0/8", "cidr: 10.0.0.0/33"));
        assert!(e.contains("workload \"telemetry\" rule \"mqtt\"") && e.contains("\"cidr\""), "{e}");
        let e = err(&GOOD.replace("cidr: 10.0.0.0/8", "cidr: 10.0.0.1/8"));
        assert!(e.contains("host bits"), "{e}");
        let e = err(&GOOD.replace("ports: 8883", "ports: 70000"));
        assert!(e.contains("rule \"mqtt\"") && e.contains("\"ports\""), "{e}");
        let e = err(&GOOD.replace("\"53-54\"", "\"54-53\""));
        assert!(e.contains("rule \"dns\"") && e.contains("ends before"), "{e}");
        let e = err(&GOOD.replace("protocol: icmp}", "protocol: icmp, ports: 1}"));
        assert!(e.contains("rule \"ping\"") && e.contains("icmp"), "{e}");
        let e = err(&GOOD.replace("direction: ingress", "direction: inbound"));
        assert!(e.contains("rule \"ssh\"") && e.contains("\"direction\""), "{e}");
        let e = err(&GOOD.replace("protocol: tcp, ports: 22", "protocol: sctp, ports: 22"));
        assert!(e.contains("\"protocol\""), "{e}");
        let e = err(&GOOD.replace("mode: enforce", "mode: permissive"));
        assert!(e.contains("\"mode\""), "{e}");
        let e = err(&GOOD.replace("not_after: 2030-01-01T00:00:00Z", "not_after: tomorrow"));
        assert!(e.contains("\"not_after\""), "{e}");
        let e = err(&GOOD.replace("cgroup: outpost/telemetry\n    rules", "cgroup: ../etc\n    rules"));
        assert!(e.contains("\"cgroup\""), "{e}");
        let e = err(&GOOD.replace("interface: eth0", "interface: a/b"));
        assert!(e.contains("\"interface\""), "{e}");
        let e = err(GOOD.split("essential:").next().expect("head"));
        assert!(e.contains("\"essential\""), "{e}");
        let e = err(&GOOD.replace("schema: outpost.policy/v1", "schema: other"));
        assert!(e.contains("\"schema\""), "{e}");
        let e = err(&GOOD.replace("{name: ping,", "{name: mqtt,"));
        assert!(e.contains("used twice"), "{e}");
        let e = err(&GOOD.replace("protocol: tcp, ports: 8883", "protocol: tcp, port: 8883"));
        assert!(e.contains("\"port\"") && e.contains("not a known field"), "{e}");
        let e = err("schema: [");
        assert!(e.contains("not valid YAML"), "{e}");
        let e = err(&GOOD.replace("version: 3", "version: 0"));
        assert!(e.contains("\"version\""), "{e}");
    }

    #[test]
    fn cidrs() {
        assert_eq!(Cidr::parse("10.1.2.3").expect("host").prefix, 32);
        assert_eq!(Cidr::parse("::/0").expect("all").prefix, 0);
        assert!(Cidr::parse("2001:db8::1/64").is_err());
        assert_eq!(Cidr::parse("2001:db8::/32").expect("v6").bytes()[..4], [0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn selectors() {
        let mut labels = BTreeMap::new();
        labels.insert("site".to_string(), "north".to_string());
        let s = Selector { hardware_classes: vec!["gw".into()], labels: labels.clone() };
        assert!(s.matches("gw", &labels));
        assert!(!s.matches("cam", &labels));
        assert!(!s.matches("gw", &BTreeMap::new()));
        assert!(Selector::default().matches("any", &BTreeMap::new()));
    }
}
