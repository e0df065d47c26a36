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
//! Dropping the [`Enforcer`] detaches every program and frees every map: nothing is
//! pinned.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues, RingBuf};
use aya::programs::cgroup_skb::CgroupSkbLinkId;
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType};
use aya::util::nr_cpus;
use aya::Ebpf;
use outpost_ebpf_common::{
    Config, Counter, DenyEvent, GenConfig, PortKey, PrefixKey, RangeList, RuleRef, ScopeKey, DIR_EGRESS, FAMILY_V4,
    MAX_RULES, MODE_AUDIT, MODE_ENFORCE, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, SCOPE_CGROUP, VERDICTS,
};
use outpost_protocol::display_chain;
use outpost_protocol::policy::{Mode, Profile, ScopeKind};

pub use plan::{plan, GenPlan, Resolved};

const _: () = assert!(outpost_protocol::policy::MAX_RULES == MAX_RULES as usize);

/// The compiled programs, built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/outpost-ebpf-programs"));

/// How long old entries stay after a flip: programs that read the old generation
/// just before it finish in microseconds.
const GRACE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
}

fn map_err(map: &str) -> impl Fn(aya::maps::MapError) -> Error + '_ {
    move |e| Error::Map { map: map.to_string(), reason: e.to_string() }
}

/// Detaches links of programs of type `$ty` (named, with their link ids); every one
/// is tried, the last error is returned.
macro_rules! detach_all {
    ($ebpf:expr, $ty:ty, [$(($name:expr, $id:expr)),*]) => {{
        let mut r: Result<(), String> = Ok(());
        $(
            match prog($ebpf, $name).and_then(|p| <&mut $ty>::try_from(p).map_err(|e| Error::Load(e.to_string()))) {
                Ok(p) => {
                    if let Err(e) = p.detach($id) {
                        r = Err(e.to_string());
                    }
                }
                Err(e) => r = Err(e.to_string()),
            }
        )*
        r
    }};
}

/// Where a scope was attached.
enum Attachment {
    Cgroup { egress: CgroupSkbLinkId, ingress: CgroupSkbLinkId },
    Interface { egress: SchedClassifierLinkId, ingress: SchedClassifierLinkId },
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

pub struct Enforcer {
    ebpf: Ebpf,
    events: Option<RingBuf<MapData>>,
    /// The two largest maps, owned so that a swap can fill them from two threads.
    prefixes: LpmTrie<MapData, PrefixKey, u32>,
    ports: BpfHashMap<MapData, PortKey, RuleRef>,
    cgroup_root: PathBuf,
    /// The active generation's entries (its `gen` is the one `CONFIG` names).
    current: Option<GenPlan>,
    /// Scope target (cgroup path or interface name) → links.
    attached: BTreeMap<(ScopeKind, String), Attachment>,
    /// Scope id (cgroup id / ifindex) → its name, for events.
    scope_names: BTreeMap<(u32, u64), String>,
}

impl Enforcer {
    /// Loads the programs (nothing attached yet). `cgroup_root` is where workload
    /// cgroup paths start (the cgroup v2 mount).
    pub fn load(cgroup_root: &Path) -> Result<Self, Error> {
        let mut ebpf = Ebpf::load(PROGRAMS).map_err(|e| load_error(display_chain(&e)))?;
        for name in ["outpost_cg_egress", "outpost_cg_ingress"] {
            let p: &mut CgroupSkb = prog(&mut ebpf, name)?.try_into().map_err(|e| Error::Load(format!("{name}: {e}")))?;
            p.load().map_err(|e| load_error(format!("{name}: {}", verifier_tail(&e.to_string()))))?;
        }
        for name in ["outpost_tc_egress", "outpost_tc_ingress"] {
            let p: &mut SchedClassifier = prog(&mut ebpf, name)?.try_into().map_err(|e| Error::Load(format!("{name}: {e}")))?;
            p.load().map_err(|e| load_error(format!("{name}: {}", verifier_tail(&e.to_string()))))?;
        }
        let events = ebpf.take_map("EVENTS").map(RingBuf::try_from).transpose().map_err(map_err("EVENTS"))?;
        let prefixes = ebpf.take_map("PREFIXES").ok_or_else(|| Error::Load("map PREFIXES missing".into()))?;
        let prefixes = LpmTrie::try_from(prefixes).map_err(map_err("PREFIXES"))?;
        let ports = ebpf.take_map("PORTS").ok_or_else(|| Error::Load("map PORTS missing".into()))?;
        let ports = BpfHashMap::try_from(ports).map_err(map_err("PORTS"))?;
        Ok(Enforcer {
            ebpf,
            events,
            prefixes,
            ports,
            cgroup_root: cgroup_root.to_path_buf(),
            current: None,
            attached: BTreeMap::new(),
            scope_names: BTreeMap::new(),
        })
    }

    pub fn active_generation(&self) -> Option<u32> {
        self.current.as_ref().map(|c| c.gen)
    }

    /// Resolves each scope of `profile` on this device.
    fn resolve(&self, profile: &Profile) -> Result<Vec<Resolved>, Error> {
        let mut out = Vec::with_capacity(profile.scopes.len());
        for s in &profile.scopes {
            match s.kind {
                ScopeKind::Workload => {
                    let path = self.cgroup_root.join(&s.target);
                    let md = std::fs::metadata(&path).map_err(|e| Error::Scope {
                        scope: format!("workload {:?}", s.name),
                        reason: format!("cgroup {}: {e}", path.display()),
                    })?;
                    if !md.is_dir() {
                        return Err(Error::Scope { scope: format!("workload {:?}", s.name), reason: format!("{} is not a cgroup directory", path.display()) });
                    }
                    // On cgroup v2 the cgroup id is the directory's inode number.
                    out.push(Resolved::from_kind(ScopeKind::Workload, md.ino()));
                }
                ScopeKind::Interface => {
                    let idx = ifindex(&s.target).ok_or_else(|| Error::Scope {
                        scope: format!("interface {:?}", s.name),
                        reason: format!("no interface {:?} in this network namespace", s.target),
                    })?;
                    out.push(Resolved::from_kind(ScopeKind::Interface, u64::from(idx)));
                }
            }
        }
        Ok(out)
    }

    /// Makes `profile` (in `mode`) the enforced policy. On error the previous policy
    /// stays enforced, untouched.
    pub fn apply(&mut self, profile: &Profile, mode: Mode, sample_every: u32) -> Result<SwapReport, Error> {
        let start = Instant::now();
        let resolved = self.resolve(profile)?;
        let new_gen = self.current.as_ref().map_or(1, |c| 1 - c.gen);
        let new = plan(profile, new_gen, &resolved)?;
        if let Err(e) = self.write_generation(&new, mode) {
            self.remove_generation(&new);
            return Err(e);
        }
        let mut newly = Vec::new();
        for s in &profile.scopes {
            let key = (s.kind, s.target.clone());
            if self.attached.contains_key(&key) {
                continue;
            }
            match self.attach(s.kind, &s.target) {
                Ok(a) => {
                    self.attached.insert(key.clone(), a);
                    newly.push(key);
                }
                Err(e) => {
                    for k in newly {
                        self.detach(&k);
                    }
                    self.remove_generation(&new);
                    return Err(e);
                }
            }
        }
        // The switch.
        let flip = self
            .array::<Config>("CONFIG")
            .and_then(|mut c| c.set(0, Config { active_gen: new_gen, sample_every: sample_every.max(1) }, 0).map_err(map_err("CONFIG")));
        if let Err(e) = flip {
            for k in newly {
                self.detach(&k);
            }
            self.remove_generation(&new);
            return Err(e);
        }
        let to_flip = start.elapsed();
        if let Some(old) = self.current.replace(new) {
            std::thread::sleep(GRACE);
            self.remove_generation(&old);
        }
        let wanted: BTreeSet<(ScopeKind, String)> = profile.scopes.iter().map(|s| (s.kind, s.target.clone())).collect();
        let stale: Vec<_> = self.attached.keys().filter(|k| !wanted.contains(*k)).cloned().collect();
        for k in stale {
            self.detach(&k);
        }
        self.scope_names = profile
            .scopes
            .iter()
            .zip(&resolved)
            .map(|(s, r)| ((r.kind, r.id), format!("{}/{}", if r.kind == SCOPE_CGROUP { "workload" } else { "interface" }, s.name)))
            .collect();
        let current = self.current.as_ref().map(|c| (c.rule_ids.len(), c.entry_count())).unwrap_or_default();
        Ok(SwapReport { generation: new_gen, rules: current.0, entries: current.1, to_flip, total: start.elapsed() })
    }

    fn array<V: aya::Pod>(&mut self, name: &str) -> Result<Array<&mut MapData, V>, Error> {
        let m = self.ebpf.map_mut(name).ok_or_else(|| Error::Load(format!("map {name} missing from the programs")))?;
        Array::try_from(m).map_err(map_err(name))
    }

    fn write_generation(&mut self, p: &GenPlan, mode: Mode) -> Result<(), Error> {
        let gen = p.gen;
        // The generation's rule counters are zero: they were reset when it was last
        // removed (off the swap's critical path).
        let mode = match mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Audit => MODE_AUDIT,
        };
        self.array::<GenConfig>("GENERATIONS")?.set(gen, GenConfig { mode, _pad: 0 }, 0).map_err(map_err("GENERATIONS"))?;
        {
            let mut scopes: BpfHashMap<_, ScopeKey, u32> = self.hash("SCOPES")?;
            for (k, v) in &p.scopes {
                scopes.insert(k, v, 0).map_err(map_err("SCOPES"))?;
            }
        }
        // The two big tables from two threads: each update is a system call.
        let (trie, ports) = (&mut self.prefixes, &mut self.ports);
        let (a, b) = std::thread::scope(|s| {
            let t = s.spawn(|| -> Result<(), Error> {
                for (k, len, class) in &p.prefixes {
                    trie.insert(&Key::new(*len, *k), class, 0).map_err(map_err("PREFIXES"))?;
                }
                Ok(())
            });
            let mut r = Ok(());
            for (k, v) in &p.ports {
                if let Err(e) = ports.insert(k, v, 0) {
                    r = Err(map_err("PORTS")(e));
                    break;
                }
            }
            (t.join().unwrap_or_else(|_| Err(Error::Load("the map writer thread panicked".into()))), r)
        });
        a?;
        b?;
        {
            let mut ranges: BpfHashMap<_, u32, RangeList> = self.hash("RANGES")?;
            for (k, v) in &p.ranges {
                ranges.insert(k, v, 0).map_err(map_err("RANGES"))?;
            }
        }
        Ok(())
    }

    fn hash<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> Result<BpfHashMap<&mut MapData, K, V>, Error> {
        let m = self.ebpf.map_mut(name).ok_or_else(|| Error::Load(format!("map {name} missing from the programs")))?;
        BpfHashMap::try_from(m).map_err(map_err(name))
    }

    /// Deletes a generation's entries (missing ones are fine: a failed write) and
    /// zeroes its rule counters for the next time it is used.
    fn remove_generation(&mut self, p: &GenPlan) {
        if let (Ok(cpus), Some(m)) = (nr_cpus(), self.ebpf.map_mut("RULE_COUNTERS")) {
            if let Ok(mut counters) = PerCpuArray::<_, Counter>::try_from(m) {
                for i in 0..p.rule_ids.len() as u32 {
                    if let Ok(zero) = PerCpuValues::try_from(vec![Counter::default(); cpus]) {
                        let _ = counters.set(p.gen * MAX_RULES + i, zero, 0);
                    }
                }
            }
        }
        if let Ok(mut scopes) = self.hash::<ScopeKey, u32>("SCOPES") {
            for (k, _) in &p.scopes {
                let _ = scopes.remove(k);
            }
        }
        let (trie, ports) = (&mut self.prefixes, &mut self.ports);
        std::thread::scope(|s| {
            s.spawn(|| {
                for (k, len, _) in &p.prefixes {
                    let _ = trie.remove(&Key::new(*len, *k));
                }
            });
            for (k, _) in &p.ports {
                let _ = ports.remove(k);
            }
        });
        if let Ok(mut ranges) = self.hash::<u32, RangeList>("RANGES") {
            for (k, _) in &p.ranges {
                let _ = ranges.remove(k);
            }
        }
    }

    fn attach(&mut self, kind: ScopeKind, target: &str) -> Result<Attachment, Error> {
        match kind {
            ScopeKind::Workload => {
                let path = self.cgroup_root.join(target);
                let mut link = |name: &str, at: CgroupSkbAttachType| -> Result<CgroupSkbLinkId, Error> {
                    let file = std::fs::File::open(&path).map_err(|e| Error::Attach { program: name.into(), target: path.display().to_string(), reason: e.to_string() })?;
                    let p: &mut CgroupSkb = prog(&mut self.ebpf, name)?.try_into().map_err(|e| Error::Load(format!("{name}: {e}")))?;
                    // Links are always multi-attach; the kernel wants no flags with them.
                    p.attach(file, at, CgroupAttachMode::Single)
                        .map_err(|e| Error::Attach { program: name.into(), target: path.display().to_string(), reason: display_chain(&e) })
                };
                let egress = link("outpost_cg_egress", CgroupSkbAttachType::Egress)?;
                let ingress = match link("outpost_cg_ingress", CgroupSkbAttachType::Ingress) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = detach_all!(&mut self.ebpf, CgroupSkb, [("outpost_cg_egress", egress)]);
                        return Err(e);
                    }
                };
                Ok(Attachment::Cgroup { egress, ingress })
            }
            ScopeKind::Interface => {
                let mut link = |name: &str, at: TcAttachType| -> Result<SchedClassifierLinkId, Error> {
                    let p: &mut SchedClassifier = prog(&mut self.ebpf, name)?.try_into().map_err(|e| Error::Load(format!("{name}: {e}")))?;
                    p.attach(target, at).map_err(|e| Error::Attach { program: name.into(), target: target.into(), reason: display_chain(&e) })
                };
                let egress = link("outpost_tc_egress", TcAttachType::Egress)?;
                let ingress = match link("outpost_tc_ingress", TcAttachType::Ingress) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = detach_all!(&mut self.ebpf, SchedClassifier, [("outpost_tc_egress", egress)]);
                        return Err(e);
                    }
                };
                Ok(Attachment::Interface { egress, ingress })
            }
        }
    }

    fn detach(&mut self, key: &(ScopeKind, String)) {
        let Some(a) = self.attached.remove(key) else { return };
        let r = match a {
            Attachment::Cgroup { egress, ingress } => {
                detach_all!(&mut self.ebpf, CgroupSkb, [("outpost_cg_egress", egress), ("outpost_cg_ingress", ingress)])
            }
            Attachment::Interface { egress, ingress } => {
                detach_all!(&mut self.ebpf, SchedClassifier, [("outpost_tc_egress", egress), ("outpost_tc_ingress", ingress)])
            }
        };
        if let Err(e) = r {
            tracing::warn!(scope = %key.1, error = %e, "detaching policy programs");
        }
    }

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
        if let Some(cur) = &self.current {
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

fn prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program, Error> {
    ebpf.program_mut(name).ok_or_else(|| Error::Load(format!("program {name} missing from the object")))
}

/// A load failure; one the kernel refused for lack of privilege says what is needed.
fn load_error(text: String) -> Error {
    if text.contains("Operation not permitted") || text.contains("Permission denied") || text.contains("EPERM") {
        Error::Unsupported(format!("{text} (the agent needs root, or CAP_BPF and CAP_NET_ADMIN)"))
    } else {
        Error::Load(text)
    }
}

/// The verifier's log can be thousands of lines: keep its first line and its end,
/// where the reason is.
fn verifier_tail(full: &str) -> String {
    let lines: Vec<&str> = full.lines().collect();
    if lines.len() > 12 {
        format!("{} [...] {}", lines[0], lines[lines.len() - 10..].join("\n"))
    } else {
        full.to_string()
    }
}

/// The interface's index in the current network namespace.
fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
