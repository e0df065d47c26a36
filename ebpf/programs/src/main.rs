//! Outpost's packet filters. Deny by default: a packet passes only when a rule of the
//! active generation allows it, or when it is the reply of a connection that the
//! active rules allow. Maps and their layouts are in `outpost-ebpf-common`; the
//! loader (`outpost-ebpf`) fills them.
//!
//! - `outpost_cg_egress` / `outpost_cg_ingress`: `cgroup_skb` programs attached to
//!   workload cgroups (v2). The workload is found from the socket's cgroup id or the
//!   nearest ancestor the active generation names.
//! - `outpost_tc_egress` / `outpost_tc_ingress`: TC (tcx) classifiers attached to
//!   interfaces, scoped by ifindex.
//!
//! The generation switch: every packet reads `CONFIG[0].active_gen` once and uses only
//! entries of that generation, so it sees the old rules or the new ones, never a mix.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_PIPE, TC_ACT_SHOT, __sk_buff},
    helpers::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::{cgroup_skb, classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, TcContext},
};
use outpost_ebpf_common::*;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static GENERATIONS: Array<GenConfig> = Array::with_max_entries(2, 0);
#[map]
static SCOPES: HashMap<ScopeKey, u32> = HashMap::with_max_entries(MAX_SCOPES, 0);
#[map]
static PREFIXES: LpmTrie<PrefixKey, u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
static PORTS: HashMap<PortKey, RuleRef> = HashMap::with_max_entries(MAX_PORT_ENTRIES, 0);
#[map]
static RANGES: HashMap<u32, RangeList> = HashMap::with_max_entries(MAX_PREFIXES, 0);
#[map]
static RULE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(2 * MAX_RULES, 0);
#[map]
static VERDICT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICTS, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map]
static DENY_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

/// What the filters need of a packet.
struct Packet {
    family: u8,
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    src_port_be: u16,
    dst_port_be: u16,
    /// ICMPv6 type, for neighbour discovery on interfaces.
    icmp6_type: u8,
    len: u32,
}

/// Reading packet bytes, the same way from both program types: whole headers at once
/// (each read is a helper call).
trait Bytes {
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

macro_rules! impl_bytes {
    ($($ctx:ty),*) => {$(
        impl Bytes for $ctx {
            #[inline(always)]
            fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
                self.load::<[u8; N]>(off).ok()
            }
        }
    )*};
}

impl_bytes!(SkBuffContext, TcContext);

/// Parses the IP header at `l3`. `None` for anything that is not IPv4 or IPv6.
#[inline(always)]
fn parse<B: Bytes>(b: &B, l3: usize, len: u32) -> Option<Packet> {
    // 20 bytes: an IPv4 header without options, or the start of an IPv6 header.
    let h: [u8; 20] = b.read(l3)?;
    let mut p = Packet {
        family: 0,
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        src_port_be: 0,
        dst_port_be: 0,
        icmp6_type: 0,
        len,
    };
    let l4;
    let v = h[0] >> 4;
    if v == 4 {
        p.family = FAMILY_V4;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        p.proto = h[9];
        p.src[..4].copy_from_slice(&h[12..16]);
        p.dst[..4].copy_from_slice(&h[16..20]);
        // A non-first fragment carries no ports: it is matched with port 0.
        let frag = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
        if frag != 0 {
            return Some(p);
        }
        l4 = l3 + ihl;
    } else if v == 6 {
        p.family = FAMILY_V6;
        p.proto = h[6];
        let h6: [u8; 40] = b.read(l3)?;
        p.src.copy_from_slice(&h6[8..24]);
        p.dst.copy_from_slice(&h6[24..40]);
        l4 = l3 + 40;
    } else {
        return None;
    }
    if p.proto == PROTO_TCP || p.proto == PROTO_UDP {
        let ports: [u8; 4] = b.read(l4)?;
        // Kept in network order, as the maps hold them.
        p.src_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
        p.dst_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
    } else if p.proto == PROTO_ICMPV6 {
        let t: [u8; 1] = b.read(l4)?;
        p.icmp6_type = t[0];
    }
    Some(p)
}

#[inline(always)]
fn count_verdict(v: u32) {
    if let Some(c) = VERDICT_COUNTERS.get_ptr_mut(v) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count_rule(counter: u32, len: u32) {
    if let Some(c) = RULE_COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len as u64;
        }
    }
}

/// The rule of generation `gen` that allows (`dir`, `remote`, `proto`, `port_be`) in
/// `scope`, as its counter index.
#[inline(always)]
fn lookup(gen: u32, scope: u32, dir: u8, family: u8, proto: u8, remote: &[u8; 16], port_be: u16) -> Option<u32> {
    let bits = if family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        PREFIX_FIXED_BITS + bits,
        PrefixKey { gen: gen as u8, dir, family, _pad: 0, scope, addr: *remote },
    );
    let value = *PREFIXES.get(&key)?;
    let class = value & CLASS_ID_MASK;
    // SAFETY: the values are plain data; entries are replaced whole by the loader.
    unsafe {
        if let Some(r) = PORTS.get(&PortKey { class, proto, _pad: 0, port_be }) {
            return Some(r.counter);
        }
        if port_be != 0 && value & CLASS_HAS_WILDCARD != 0 {
            if let Some(r) = PORTS.get(&PortKey { class, proto, _pad: 0, port_be: 0 }) {
                return Some(r.counter);
            }
        }
        if value & CLASS_HAS_RANGES == 0 {
            return None;
        }
        let list = RANGES.get(&class)?;
        let port = u16::from_be(port_be);
        let mut i = 0;
        while i < MAX_RANGES {
            if i as u32 >= list.len {
                break;
            }
            let r = &list.ranges[i];
            if r.proto == proto && r.lo <= port && port <= r.hi {
                return Some(r.counter);
            }
            i += 1;
        }
    }
    None
}

fn sample_deny(kind: u32, raw_id: u64, gen: u32, dir: u8, p: &Packet, remote: &[u8; 16], audit: bool, every: u32) {
    let Some(seq) = DENY_SEQ.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU slot.
    let n = unsafe {
        *seq += 1;
        *seq
    };
    let every = if every == 0 { 1 } else { every as u64 };
    if n % every != 0 {
        return;
    }
    if let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) {
        entry.write(DenyEvent {
            scope_id: raw_id,
            scope_kind: kind,
            gen,
            dir,
            family: p.family,
            proto: p.proto,
            audit: audit as u8,
            port_be: p.dst_port_be,
            _pad: 0,
            remote: *remote,
        });
        entry.submit(0);
    }
}

/// The verdict for one packet: `true` passes it.
#[inline(always)]
fn decide(kind: u32, raw_id: u64, scope: Option<u32>, gen: u32, cfg: &Config, dir: u8, p: &Packet) -> bool {
    let audit = match GENERATIONS.get(gen) {
        Some(g) => g.mode == MODE_AUDIT,
        None => false,
    };
    let (remote, local_port_be, remote_port_be) = if dir == DIR_EGRESS {
        (&p.dst, p.src_port_be, p.dst_port_be)
    } else {
        (&p.src, p.dst_port_be, p.src_port_be)
    };
    let Some(scope) = scope else {
        count_verdict(VERDICT_NO_SCOPE);
        sample_deny(kind, raw_id, gen, dir, p, remote, audit, cfg.sample_every);
        return audit;
    };
    // The connection this packet belongs to, the same key in both directions.
    let flow = FlowKey {
        scope_kind: kind,
        scope_id: scope,
        proto: p.proto,
        family: p.family,
        local_port_be,
        remote_port_be,
        _pad: 0,
        remote: *remote,
    };
    // SAFETY: plain data.
    let opened = unsafe { FLOWS.get(&flow) }.map(|d| *d as u8);
    // Rules name the destination port: the remote one on egress, the local one on ingress.
    if let Some(counter) = lookup(gen, scope, dir, p.family, p.proto, remote, p.dst_port_be) {
        count_rule(counter, p.len);
        count_verdict(VERDICT_ALLOWED);
        if opened != Some(dir) {
            let _ = FLOWS.insert(&flow, &(dir as u32), 0);
        }
        return true;
    }
    // A reply: the connection was opened the other way, and the active rules still
    // allow it as it was opened.
    if let Some(opened) = opened {
        if opened != dir {
            let port_be = if opened == DIR_EGRESS { remote_port_be } else { local_port_be };
            if let Some(counter) = lookup(gen, scope, opened, p.family, p.proto, remote, port_be) {
                count_rule(counter, p.len);
                count_verdict(VERDICT_REPLY);
                return true;
            }
        }
    }
    count_verdict(if audit { VERDICT_AUDIT_DENIED } else { VERDICT_DENIED });
    sample_deny(kind, raw_id, gen, dir, p, remote, audit, cfg.sample_every);
    audit
}

#[inline(always)]
fn active() -> Option<(Config, u32)> {
    let cfg = *CONFIG.get(0)?;
    Some((cfg, cfg.active_gen & 1))
}

#[inline(always)]
fn workload_scope(skb: *mut __sk_buff, gen: u32) -> (u64, Option<u32>) {
    // SAFETY: helpers on the program's own context.
    let id = unsafe { bpf_skb_cgroup_id(skb) };
    let key = ScopeKey { gen, kind: SCOPE_CGROUP, id };
    // SAFETY: plain data.
    if let Some(s) = unsafe { SCOPES.get(&key) } {
        return (id, Some(*s));
    }
    let mut level = MAX_CGROUP_DEPTH;
    while level > 0 {
        level -= 1;
        // SAFETY: as above.
        let anc = unsafe { bpf_skb_ancestor_cgroup_id(skb, level) };
        if anc != 0 {
            let key = ScopeKey { gen, kind: SCOPE_CGROUP, id: anc };
            // SAFETY: plain data.
            if let Some(s) = unsafe { SCOPES.get(&key) } {
                return (anc, Some(*s));
            }
        }
    }
    (id, None)
}

#[inline(always)]
fn cgroup_verdict(ctx: &SkBuffContext, dir: u8) -> i32 {
    let Some((cfg, gen)) = active() else { return 0 };
    let len = ctx.len();
    let Some(p) = parse(ctx, 0, len) else {
        count_verdict(VERDICT_NON_IP);
        return 1;
    };
    let (raw, scope) = workload_scope(ctx.skb.skb, gen);
    if decide(SCOPE_CGROUP, raw, scope, gen, &cfg, dir, &p) {
        1
    } else {
        0
    }
}

#[cgroup_skb]
pub fn outpost_cg_egress(ctx: SkBuffContext) -> i32 {
    cgroup_verdict(&ctx, DIR_EGRESS)
}

#[cgroup_skb]
pub fn outpost_cg_ingress(ctx: SkBuffContext) -> i32 {
    cgroup_verdict(&ctx, DIR_INGRESS)
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, dir: u8) -> i32 {
    let Some((cfg, gen)) = active() else { return TC_ACT_SHOT };
    let proto = match ctx.read::<2>(12) {
        Some(v) => u16::from_be_bytes(v),
        None => return TC_ACT_SHOT,
    };
    if proto != ETH_P_IP && proto != ETH_P_IPV6 {
        count_verdict(VERDICT_NON_IP);
        return TC_ACT_PIPE;
    }
    let len = ctx.len();
    let Some(p) = parse(ctx, ETH_HLEN, len) else {
        count_verdict(VERDICT_NON_IP);
        return TC_ACT_PIPE;
    };
    // IPv6 neighbour discovery (router/neighbour solicitation and advertisement,
    // redirect) is what keeps IPv6 working on the link at all.
    if p.proto == PROTO_ICMPV6 && (133..=137).contains(&p.icmp6_type) {
        count_verdict(VERDICT_NON_IP);
        return TC_ACT_PIPE;
    }
    // SAFETY: reading the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex } as u64;
    let key = ScopeKey { gen, kind: SCOPE_INTERFACE, id: ifindex };
    // SAFETY: plain data.
    let scope = unsafe { SCOPES.get(&key) }.copied();
    if decide(SCOPE_INTERFACE, ifindex, scope, gen, &cfg, dir, &p) {
        TC_ACT_PIPE
    } else {
        TC_ACT_SHOT
    }
}

#[classifier]
pub fn outpost_tc_egress(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn outpost_tc_ingress(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, DIR_INGRESS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
