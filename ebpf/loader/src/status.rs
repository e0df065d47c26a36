//! What the programs report: counters summed over CPUs and sampled deny events.

use std::collections::BTreeMap;

use aya::maps::PerCpuArray;
use outpost_ebpf_common::{Counter, DenyEvent, DIR_EGRESS, FAMILY_V4, MAX_RULES, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, SCOPE_CGROUP, VERDICTS};

use crate::{map_err, Enforcer, Error};

/// A deny event decoded.
#[derive(Clone, Debug)]
pub struct Denied {
    pub scope: String,
    pub direction: &'static str,
    pub protocol: String,
    pub remote: std::net::IpAddr,
    pub port: u16,
    pub audit: bool,
}

/// Counter values summed over CPUs.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub verdicts: BTreeMap<&'static str, u64>,
    /// Rule id, packets, bytes.
    pub rules: Vec<(String, u64, u64)>,
}

pub const VERDICT_NAMES: [&str; 6] = ["allowed", "denied", "audit_denied", "reply", "non_ip", "no_scope"];

impl Enforcer {
    /// Per-verdict and per-rule counters of the active generation.
    pub fn counters(&self) -> Result<Counters, Error> {
        let mut out = Counters::default();
        {
            let m = self.ebpf.map("VERDICT_COUNTERS").ok_or_else(|| Error::Load("map VERDICT_COUNTERS missing".into()))?;
            let v: PerCpuArray<_, u64> = PerCpuArray::try_from(m).map_err(map_err("VERDICT_COUNTERS"))?;
            for (i, name) in VERDICT_NAMES.iter().enumerate() {
                debug_assert!((i as u32) < VERDICTS);
                let vals = v.get(&(i as u32), 0).map_err(map_err("VERDICT_COUNTERS"))?;
                out.verdicts.insert(name, vals.iter().sum());
            }
        }
        if let Some(cur) = self.current.as_ref().and_then(|c| c.plan.as_ref()) {
            let m = self.ebpf.map("RULE_COUNTERS").ok_or_else(|| Error::Load("map RULE_COUNTERS missing".into()))?;
            let c: PerCpuArray<_, Counter> = PerCpuArray::try_from(m).map_err(map_err("RULE_COUNTERS"))?;
            for (i, id) in cur.rule_ids.iter().enumerate() {
                let vals = c.get(&(cur.gen * MAX_RULES + i as u32), 0).map_err(map_err("RULE_COUNTERS"))?;
                let (p, b) = vals.iter().fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
                out.rules.push((id.clone(), p, b));
            }
        }
        Ok(out)
    }

    /// Deny events sampled since the last call.
    pub fn drain_events(&mut self) -> Vec<Denied> {
        let mut out = Vec::new();
        let Some(rb) = self.events.as_mut() else { return out };
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<DenyEvent>() {
                continue;
            }
            // SAFETY: the record is at least size_of::<DenyEvent>() bytes and DenyEvent
            // is plain data (aya::Pod): any bytes are a valid value; the ring buffer
            // does not promise alignment, hence the unaligned read.
            let e: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DenyEvent>()) };
            let remote = if e.family == FAMILY_V4 {
                std::net::IpAddr::from([e.remote[0], e.remote[1], e.remote[2], e.remote[3]])
            } else {
                std::net::IpAddr::from(e.remote)
            };
            let scope = self.scope_names.get(&(e.scope_kind, e.scope_id)).cloned().unwrap_or_else(|| {
                format!("{} {}", if e.scope_kind == SCOPE_CGROUP { "cgroup" } else { "ifindex" }, e.scope_id)
            });
            let protocol = match e.proto {
                PROTO_TCP => "tcp".to_string(),
                PROTO_UDP => "udp".to_string(),
                PROTO_ICMP | PROTO_ICMPV6 => "icmp".to_string(),
                n => format!("ip proto {n}"),
            };
            out.push(Denied {
                scope,
                direction: if e.dir == DIR_EGRESS { "egress" } else { "ingress" },
                protocol,
                remote,
                port: u16::from_be(e.port_be),
                audit: e.audit != 0,
            });
        }
        out
    }
}
