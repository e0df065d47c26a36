//! From a validated policy profile to the map entries of one generation. Pure: the
//! scopes come in already resolved to cgroup ids and ifindices.
//!
//! The prefix trie answers only the longest matching prefix, so every prefix entry
//! carries the rules of all the prefixes that contain it (a "class"): a packet to
//! 10.1.2.3 that matches 10.1.0.0/16 still finds the rules of 10.0.0.0/8. Classes are
//! built by walking each prefix's ancestors (at most 33 or 129 hash look-ups a prefix),
//! not by comparing every pair of rules.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use outpost_ebpf_common::{
    PortKey, PortRange, PrefixKey, RangeList, RuleRef, ScopeKey, CLASS_HAS_RANGES, CLASS_HAS_WILDCARD, DIR_EGRESS, DIR_INGRESS, EXPAND_RANGE_MAX, FAMILY_V4,
    FAMILY_V6, MAX_RANGES, MAX_RULES, PREFIX_FIXED_BITS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, SCOPE_CGROUP,
    SCOPE_INTERFACE,
};
use outpost_protocol::policy::{mask, addr_bytes, Direction, Profile, Protocol, ScopeKind};

use crate::Error;

/// A scope resolved on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub kind: u32,
    /// cgroup id or ifindex.
    pub id: u64,
}

impl Resolved {
    pub fn from_kind(kind: ScopeKind, id: u64) -> Self {
        let kind = match kind {
            ScopeKind::Workload => SCOPE_CGROUP,
            ScopeKind::Interface => SCOPE_INTERFACE,
        };
        Resolved { kind, id }
    }
}

/// Every entry one generation needs.
#[derive(Clone, Debug, Default)]
pub struct GenPlan {
    pub gen: u32,
    pub scopes: Vec<(ScopeKey, u32)>,
    /// Key, its full prefix length (fixed bits included), class id with the
    /// `CLASS_HAS_*` flags.
    pub prefixes: Vec<(PrefixKey, u32, u32)>,
    pub ports: Vec<(PortKey, RuleRef)>,
    pub ranges: Vec<(u32, RangeList)>,
    /// Rule ids in counter order (counter = gen * MAX_RULES + index).
    pub rule_ids: Vec<String>,
}

impl GenPlan {
    pub fn entry_count(&self) -> usize {
        self.scopes.len() + self.prefixes.len() + self.ports.len() + self.ranges.len()
    }
}

/// Class ids are unique across generations: the generation is in the top byte.
pub fn class_id(gen: u32, n: u32) -> u32 {
    (gen << 24) | (n + 1)
}

pub fn counter_index(gen: u32, rule: u32) -> u32 {
    gen * MAX_RULES + rule
}

/// The IP protocol number of a rule for a destination in `addr`'s family (ICMP has
/// one number per family).
fn proto_number(p: Protocol, addr: IpAddr) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
        Protocol::Icmp if addr.is_ipv4() => PROTO_ICMP,
        Protocol::Icmp => PROTO_ICMPV6,
    }
}

struct FlatRule {
    counter: u32,
    proto: u8,
    lo: u16,
    hi: u16,
    /// Scope and rule index in the profile, to name the rule in errors.
    at: (usize, usize),
}

/// Compiles `profile` into generation `gen`. `resolved[i]` is where `profile.scopes[i]` is.
pub fn plan(profile: &Profile, gen: u32, resolved: &[Resolved]) -> Result<GenPlan, Error> {
    if resolved.len() != profile.scopes.len() {
        return Err(Error::Plan(format!("{} scopes resolved for {} in the profile", resolved.len(), profile.scopes.len())));
    }
    if profile.rule_count() > MAX_RULES as usize {
        return Err(Error::Plan(format!("{} rules; one generation holds {MAX_RULES}", profile.rule_count())));
    }
    let mut out = GenPlan { gen, rule_ids: profile.rule_ids(), ..GenPlan::default() };
    // Group rules by (scope, direction, family); inside, by prefix.
    type Group = BTreeMap<(u8, u8), HashMap<(IpAddr, u8), Vec<FlatRule>>>;
    let mut rule_no = 0u32;
    for (scope_no, (scope, res)) in profile.scopes.iter().zip(resolved).enumerate() {
        let scope_no = scope_no as u32 + 1;
        out.scopes.push((ScopeKey { gen, kind: res.kind, id: res.id }, scope_no));
        let mut groups: Group = BTreeMap::new();
        for (rule_in_scope, r) in scope.rules.iter().enumerate() {
            let dir = match r.direction {
                Direction::Ingress => DIR_INGRESS,
                Direction::Egress => DIR_EGRESS,
            };
            let family = if r.cidr.is_v4() { FAMILY_V4 } else { FAMILY_V6 };
            let (lo, hi) = if r.protocol == Protocol::Icmp { (0, u16::MAX) } else { r.ports };
            groups.entry((dir, family)).or_default().entry((r.cidr.addr, r.cidr.prefix)).or_default().push(FlatRule {
                counter: counter_index(gen, rule_no),
                proto: proto_number(r.protocol, r.cidr.addr),
                lo,
                hi,
                at: (scope_no as usize - 1, rule_in_scope),
            });
            rule_no += 1;
        }
        for ((dir, family), prefixes) in &groups {
            // Only prefix lengths that occur can hold a containing prefix.
            let lengths: std::collections::BTreeSet<u8> = prefixes.keys().map(|k| k.1).collect();
            for (&(addr, len), _) in prefixes.iter() {
                // This prefix's class: its own rules and those of every prefix containing it.
                let mut members: Vec<&FlatRule> = Vec::new();
                for &l in lengths.range(..=len) {
                    if let Some(rs) = prefixes.get(&(mask(addr, l), l)) {
                        members.extend(rs.iter());
                    }
                }
                let class = class_id(gen, out.prefixes.len() as u32);
                let key = PrefixKey { gen: gen as u8, dir: *dir, family: *family, _pad: 0, scope: scope_no, addr: addr_bytes(addr) };
                let flags = add_ports(&mut out, class, &members).map_err(|(s, r)| {
                    let scope = &profile.scopes[s];
                    Error::Plan(format!(
                        "{:?} {:?} rule {:?}: more than {MAX_RANGES} port ranges wider than {EXPAND_RANGE_MAX} ports apply to the same addresses; merge ranges",
                        scope.kind, scope.name, scope.rules[r].name
                    ))
                })?;
                out.prefixes.push((key, PREFIX_FIXED_BITS + u32::from(len), class | flags));
            }
        }
    }
    Ok(out)
}

/// Adds the class's port entries; returns its `CLASS_HAS_*` flags, or where the rule is
/// that does not fit.
fn add_ports(out: &mut GenPlan, class: u32, members: &[&FlatRule]) -> Result<u32, (usize, usize)> {
    let mut flags = 0;
    let mut seen: HashMap<(u8, u16), ()> = HashMap::new();
    let mut ranges = RangeList::default();
    for r in members {
        let span = u32::from(r.hi) - u32::from(r.lo) + 1;
        if r.lo == 0 && r.hi == u16::MAX {
            // Port 0 stands for every port.
            flags |= CLASS_HAS_WILDCARD;
            if seen.insert((r.proto, 0), ()).is_none() {
                out.ports.push((PortKey { class, proto: r.proto, _pad: 0, port_be: 0 }, RuleRef { counter: r.counter }));
            }
        } else if span <= EXPAND_RANGE_MAX {
            for p in r.lo..=r.hi {
                if seen.insert((r.proto, p), ()).is_none() {
                    out.ports.push((PortKey { class, proto: r.proto, _pad: 0, port_be: p.to_be() }, RuleRef { counter: r.counter }));
                }
            }
        } else {
            let n = ranges.len as usize;
            if n == MAX_RANGES {
                return Err(r.at);
            }
            ranges.ranges[n] = PortRange { lo: r.lo, hi: r.hi, proto: r.proto, _pad: [0; 3], counter: r.counter };
            ranges.len += 1;
        }
    }
    if ranges.len > 0 {
        flags |= CLASS_HAS_RANGES;
        out.ranges.push((class, ranges));
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::policy::PolicyBundle;

    fn bundle(rules: &str) -> PolicyBundle {
        let doc = format!(
            "schema: outpost.policy/v1\nname: t\nversion: 1\nmode: enforce\nnot_after: 2030-01-01T00:00:00Z\nworkloads:\n  - name: w\n    cgroup: a/b\n    rules:\n{rules}essential: {{}}\n"
        );
        PolicyBundle::parse(doc.as_bytes()).expect("valid")
    }

    #[test]
    fn nested_prefixes_carry_their_ancestors_rules() {
        let b = bundle(
            "      - {name: wide, direction: egress, cidr: 10.0.0.0/8, protocol: tcp, ports: 443}\n      - {name: narrow, direction: egress, cidr: 10.1.0.0/16, protocol: tcp, ports: 22}\n",
        );
        let p = plan(&b.profile, 1, &[Resolved { kind: SCOPE_CGROUP, id: 99 }]).expect("plan");
        assert_eq!(p.scopes, vec![(ScopeKey { gen: 1, kind: SCOPE_CGROUP, id: 99 }, 1)]);
        assert_eq!(p.prefixes.len(), 2);
        let narrow = p.prefixes.iter().find(|(_, l, _)| *l == 64 + 16).expect("narrow").2 & outpost_ebpf_common::CLASS_ID_MASK;
        let wide = p.prefixes.iter().find(|(_, l, _)| *l == 64 + 8).expect("wide").2 & outpost_ebpf_common::CLASS_ID_MASK;
        let ports_of = |c: u32| {
            let mut v: Vec<u16> = p.ports.iter().filter(|(k, _)| k.class == c).map(|(k, _)| u16::from_be(k.port_be)).collect();
            v.sort();
            v
        };
        assert_eq!(ports_of(narrow), vec![22, 443]);
        assert_eq!(ports_of(wide), vec![443]);
        assert_eq!(p.rule_ids, vec!["workload/w/wide", "workload/w/narrow"]);
        // Counters of generation 1 start at MAX_RULES.
        assert!(p.ports.iter().all(|(_, r)| r.counter >= MAX_RULES));
    }

    #[test]
    fn ports_ranges_and_wildcards() {
        let b = bundle(
            "      - {name: r, direction: egress, cidr: \"::/0\", protocol: udp, ports: \"1000-1010\"}\n      - {name: big, direction: egress, cidr: \"::/0\", protocol: tcp, ports: \"2000-9000\"}\n      - {name: all, direction: ingress, cidr: \"::/0\", protocol: icmp}\n",
        );
        let p = plan(&b.profile, 0, &[Resolved { kind: SCOPE_CGROUP, id: 1 }]).expect("plan");
        assert_eq!(p.ports.iter().filter(|(k, _)| k.proto == PROTO_UDP).count(), 11);
        assert_eq!(p.ports.iter().filter(|(k, _)| k.proto == PROTO_ICMPV6 && k.port_be == 0).count(), 1);
        assert_eq!(p.ranges.len(), 1);
        // Only the class with the wide TCP range asks for range look-ups.
        assert_eq!(p.prefixes.iter().filter(|(_, _, v)| v & CLASS_HAS_RANGES != 0).count(), 1);
        assert_eq!(p.prefixes.iter().filter(|(_, _, v)| v & CLASS_HAS_WILDCARD != 0).count(), 1);
        assert_eq!((p.ranges[0].1.ranges[0].lo, p.ranges[0].1.ranges[0].hi), (2000, 9000));
    }

    #[test]
    fn too_many_wide_ranges_name_the_rule() {
        let mut rules = String::new();
        for i in 0..9 {
            rules.push_str(&format!(
                "      - {{name: r{i}, direction: egress, cidr: 10.0.0.0/8, protocol: tcp, ports: \"{}-{}\"}}\n",
                1000 * (i + 1),
                1000 * (i + 1) + 500
            ));
        }
        let b = bundle(&rules);
        let e = plan(&b.profile, 0, &[Resolved { kind: SCOPE_CGROUP, id: 1 }]).expect_err("refused").to_string();
        assert!(e.contains("\"r8\"") && e.contains("port ranges"), "{e}");
    }

    #[test]
    fn ten_thousand_disjoint_rules_plan_quickly() {
        let mut rules = String::new();
        for i in 0..10_000u32 {
            rules.push_str(&format!(
                "      - {{name: r{i}, direction: egress, cidr: 10.{}.{}.0/24, protocol: tcp, ports: 443}}\n",
                i / 256,
                i % 256
            ));
        }
        let b = bundle(&rules);
        let t = std::time::Instant::now();
        let p = plan(&b.profile, 0, &[Resolved { kind: SCOPE_CGROUP, id: 1 }]).expect("plan");
        assert_eq!(p.prefixes.len(), 10_000);
        assert_eq!(p.ports.len(), 10_000);
        // Not a timing assertion: the count shows no pairwise blow-up happened.
        eprintln!("planned 10,000 rules in {:?}", t.elapsed());
    }
}
