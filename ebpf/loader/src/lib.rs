//! User space of Outpost's network policy: loads the eBPF programs, attaches them to
//! workload cgroups (`cgroup_skb`) and interfaces (tcx), fills their maps from a policy
//! profile and switches generations atomically.
//!
//! A swap writes every entry of the inactive generation, attaches programs to scopes
//! that are new, and only then flips `CONFIG[0].active_gen` in one map update. Packets
//! read the generation once, so each sees the old rules or the new ones. The old
//! generation's entries are deleted after the flip (and a grace period longer than any
//! program run), and programs of scopes the new profile no longer names are detached.
//! A swap that fails before the flip removes what it wrote and leaves the active
//! generation as it was.
//!
//! Pinned (the agent's daemon and `policy enforce`): every map and every link is pinned
//! in bpffs under `<pin root>/<programs hash>/`, so enforcement does not depend on the
//! agent process. An agent that exits, crashes or is killed leaves the programs attached
//! and the maps holding the rules; the next one loads with the same pins, adopts the
//! maps (the active generation keeps enforcing while it starts) and the links, and swaps
//! to what it restores. An upgraded agent whose programs differ loads beside the old
//! pins, attaches its own links, and only then removes the old ones: for a moment both
//! programs filter (a packet must pass both), never neither. Removing enforcement is
//! [`detach_pinned`], an explicit act.
//!
//! Unpinned ([`Enforcer::load`] without a pin root; tests and benchmarks of the swap
//! itself): dropping the [`Enforcer`] detaches every program and frees every map.

mod load;
mod maps;
mod pins;
pub mod plan;
mod status;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::time::Duration;

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use aya::Ebpf;
use outpost_ebpf_common::{PortKey, PrefixKey, RuleRef, MAX_RULES};
use outpost_protocol::policy::ScopeKind;

use load::Attachment;
use pins::Pins;
pub use pins::{detach_pinned, Detached, BPFFS_MOUNT};
pub use plan::{plan, GenPlan, Resolved};
pub use status::{Counters, Denied, VERDICT_NAMES};

const _: () = assert!(outpost_protocol::policy::MAX_RULES == MAX_RULES as usize);

/// The compiled programs, built by build.rs (feature `programs`, on by default).
#[cfg(feature = "programs")]
fn programs() -> Result<&'static [u8], Error> {
    static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/outpost-ebpf-programs"));
    Ok(PROGRAMS)
}

/// Built without the `programs` feature (no nightly toolchain or bpf-linker needed):
/// there is nothing to load, and enforcement says so.
#[cfg(not(feature = "programs"))]
fn programs() -> Result<&'static [u8], Error> {
    Err(Error::NotBuiltIn)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This build carries no eBPF programs.
    #[error("policy enforcement is not built into this agent: it was built without the `ebpf` feature (which needs the nightly toolchain and bpf-linker)")]
    NotBuiltIn,
    /// The kernel refused to load BPF programs: not root, no CAP_BPF, or no BPF.
    #[error("eBPF enforcement is not available on this device: {0}")]
    Unsupported(String),
    #[error("loading the eBPF programs: {0}")]
    Load(String),
    #[error("{scope}: {reason}")]
    Scope { scope: String, reason: String },
    #[error("attaching {program} to {target}: {reason}")]
    Attach { program: String, target: String, reason: String },
    #[error("writing the {map} map: {reason}")]
    Map { map: String, reason: String },
    #[error("cannot compile the policy: {0}")]
    Plan(String),
    #[error("pinning in {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
}

fn map_err(map: &str) -> impl Fn(aya::maps::MapError) -> Error + '_ {
    move |e| Error::Map { map: map.to_string(), reason: e.to_string() }
}

/// The active generation's entries, when this process wrote them; an adopted
/// generation (written by an earlier agent) is known only by number.
struct ActiveGen {
    gen: u32,
    plan: Option<GenPlan>,
}

/// What a swap did and how long it took.
#[derive(Clone, Debug)]
pub struct SwapReport {
    pub generation: u32,
    pub rules: usize,
    pub entries: usize,
    /// From the start of the swap to the flip: how long the new rules took to apply.
    pub to_flip: Duration,
    /// The whole swap, old entries removed.
    pub total: Duration,
}

pub struct Enforcer {
    ebpf: Ebpf,
    events: Option<RingBuf<MapData>>,
    /// The two largest maps, owned so that a swap can fill them from two threads.
    prefixes: LpmTrie<MapData, PrefixKey, u32>,
    ports: BpfHashMap<MapData, PortKey, RuleRef>,
    cgroup_root: PathBuf,
    pins: Option<Pins>,
    /// The active generation (the one `CONFIG` names).
    current: Option<ActiveGen>,
    /// Scope target (cgroup path or interface name) → links.
    attached: BTreeMap<(ScopeKind, String), Attachment>,
    /// Scope id (cgroup id / ifindex) → its name, for events.
    scope_names: BTreeMap<(u32, u64), String>,
}

impl Enforcer {
    pub fn active_generation(&self) -> Option<u32> {
        self.current.as_ref().map(|c| c.gen)
    }

    /// Were the maps (and so the rules in force) adopted from an earlier agent?
    pub fn adopted(&self) -> bool {
        self.current.as_ref().is_some_and(|c| c.plan.is_none())
    }
}

fn prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program, Error> {
    ebpf.program_mut(name).ok_or_else(|| Error::Load(format!("program {name} missing from the object")))
}

/// The interface's index in the current network namespace.
fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
