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

mod cidr;
mod parse;
mod status;
mod target;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use cidr::{addr_bytes, mask, Cidr};
pub use status::PolicyStatus;
pub use target::{PolicyTargetCustom, Selector};

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::Value;

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
