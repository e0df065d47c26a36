//! The map layouts shared by the eBPF programs (`outpost-ebpf-programs`) and the loader
//! (`outpost-ebpf`). Everything is `#[repr(C)]` plain data; with the `user` feature the
//! types implement `aya::Pod` so user space can read and write the maps.
//!
//! Addresses and ports are kept in network byte order as they appear on the wire, so
//! the programs never convert.
#![no_std]

/// Rules a single generation can hold. Rule counters are indexed
/// `generation * MAX_RULES + rule`.
pub const MAX_RULES: u32 = 16_384;
/// Port ranges (wider than [`EXPAND_RANGE_MAX`] ports) one destination class can hold.
pub const MAX_RANGES: usize = 8;
/// Ranges of at most this many ports are expanded into exact-port entries.
pub const EXPAND_RANGE_MAX: u32 = 64;
/// Entries of the prefix trie (both generations together).
pub const MAX_PREFIXES: u32 = 65_536;
/// Entries of the port table (both generations together).
pub const MAX_PORT_ENTRIES: u32 = 262_144;
/// Scopes (workloads and interfaces) of both generations together.
pub const MAX_SCOPES: u32 = 4_096;
/// Connections remembered for reply traffic (least recently used are forgotten).
pub const MAX_FLOWS: u32 = 65_536;
/// Deepest cgroup level searched for the workload a socket belongs to.
pub const MAX_CGROUP_DEPTH: i32 = 16;

pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

pub const SCOPE_CGROUP: u32 = 1;
pub const SCOPE_INTERFACE: u32 = 2;

pub const MODE_ENFORCE: u32 = 0;
pub const MODE_AUDIT: u32 = 1;

/// Indices of the per-verdict counters.
pub const VERDICT_ALLOWED: u32 = 0;
pub const VERDICT_DENIED: u32 = 1;
/// Would have been denied, passed because the generation is in audit mode.
pub const VERDICT_AUDIT_DENIED: u32 = 2;
/// Reply traffic of a connection that the active rules allow.
pub const VERDICT_REPLY: u32 = 3;
/// Neither IPv4 nor IPv6 (ARP on an interface): passed, counted.
pub const VERDICT_NON_IP: u32 = 4;
/// Packets of a scope the active generation does not know: denied.
pub const VERDICT_NO_SCOPE: u32 = 5;
pub const VERDICTS: u32 = 8;

/// `CONFIG[0]`: which generation the programs read. Written last, in one update, by
/// the loader: that single write is the switch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    pub active_gen: u32,
    /// Emit one deny event out of this many (at least 1).
    pub sample_every: u32,
}

/// `GENERATIONS[g]`: what generation `g` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GenConfig {
    pub mode: u32,
    pub _pad: u32,
}

/// Which scope (workload or interface) a cgroup id or ifindex is, per generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ScopeKey {
    pub gen: u32,
    pub kind: u32,
    pub id: u64,
}

/// The data part of a prefix-trie key. The first 64 bits (generation, direction,
/// family, scope) are always matched whole; the prefix length of the key is
/// `64 + CIDR prefix length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrefixKey {
    pub gen: u8,
    pub dir: u8,
    pub family: u8,
    pub _pad: u8,
    pub scope: u32,
    pub addr: [u8; 16],
}

/// Bits of [`PrefixKey`] before the address.
pub const PREFIX_FIXED_BITS: u32 = 64;

/// Flags in a prefix-trie value beside the class id: which port look-ups can hit, so
/// the programs skip the others.
pub const CLASS_HAS_WILDCARD: u32 = 1 << 30;
pub const CLASS_HAS_RANGES: u32 = 1 << 31;
pub const CLASS_ID_MASK: u32 = CLASS_HAS_WILDCARD - 1;

/// The port table: class (from the trie), protocol and port (network order); port 0
/// stands for every port of the protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub class: u32,
    pub proto: u8,
    pub _pad: u8,
    pub port_be: u16,
}

/// The rule an entry stands for, as an index into the rule counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleRef {
    pub counter: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    /// Host byte order, inclusive.
    pub lo: u16,
    pub hi: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
    pub counter: u32,
}

/// Wide port ranges of one class, scanned in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeList {
    pub len: u32,
    pub ranges: [PortRange; MAX_RANGES],
}

/// Per-rule traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// A connection seen in its allowed direction, so that its replies can be recognised.
/// The key is the same whichever direction the packet travels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub scope_kind: u32,
    pub scope_id: u32,
    pub proto: u8,
    pub family: u8,
    pub local_port_be: u16,
    pub remote_port_be: u16,
    pub _pad: u16,
    pub remote: [u8; 16],
}

/// A sampled deny (or audit-mode would-deny), sent over the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DenyEvent {
    pub scope_id: u64,
    pub scope_kind: u32,
    pub gen: u32,
    pub dir: u8,
    pub family: u8,
    pub proto: u8,
    /// 1 when passed because of audit mode.
    pub audit: u8,
    pub port_be: u16,
    pub _pad: u16,
    pub remote: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): plain `#[repr(C)]` data of integers and byte arrays, every bit
    // pattern valid; explicit padding fields leave no uninitialised bytes.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::GenConfig {}
    unsafe impl aya::Pod for super::ScopeKey {}
    unsafe impl aya::Pod for super::PrefixKey {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::RuleRef {}
    unsafe impl aya::Pod for super::RangeList {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::DenyEvent {}
}
