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

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues, RingBuf};
use aya::programs::cgroup_skb::CgroupSkbLinkId;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType};
use aya::util::nr_cpus;
use aya::{Ebpf, EbpfLoader};
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

/// Every map of the programs; all of them are pinned, so pinned programs and a
/// restarted agent share them.
const MAP_NAMES: [&str; 11] =
    ["CONFIG", "GENERATIONS", "SCOPES", "PREFIXES", "PORTS", "RANGES", "RULE_COUNTERS", "VERDICT_COUNTERS", "FLOWS", "EVENTS", "DENY_SEQ"];

/// The statfs magic of a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the default pin root lives: bpffs is mounted here when nothing is.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

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
    #[error("pinning in {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
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
    /// Links pinned in bpffs (they outlive this process until unpinned).
    Pinned { egress: PinnedLink, ingress: PinnedLink },
}

/// The pinned layout of one build of the programs.
struct Pins {
    /// `<pin root>/<programs hash>`.
    dir: PathBuf,
    /// Directories of other builds of the programs under the same root: removed once
    /// this build's links are attached (an upgrade without a gap).
    retired: Vec<PathBuf>,
}

impl Pins {
    fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }

    fn links(&self) -> PathBuf {
        self.dir.join("links")
    }
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
    pins: Option<Pins>,
    /// The active generation (the one `CONFIG` names).
    current: Option<ActiveGen>,
    /// Scope target (cgroup path or interface name) → links.
    attached: BTreeMap<(ScopeKind, String), Attachment>,
    /// Scope id (cgroup id / ifindex) → its name, for events.
    scope_names: BTreeMap<(u32, u64), String>,
}

impl Enforcer {
    /// Loads the programs (nothing attached yet). `cgroup_root` is where workload
    /// cgroup paths start (the cgroup v2 mount). With `pin_root`, maps and links are
    /// pinned under it and whatever an earlier agent pinned there is adopted
    /// ([`Self::adopted`]); bpffs is mounted at [`BPFFS_MOUNT`] when the root is
    /// under it and nothing is mounted there.
    pub fn load(cgroup_root: &Path, pin_root: Option<&Path>) -> Result<Self, Error> {
        let pins = pin_root.map(prepare_pins).transpose()?;
        let adopted = pins.as_ref().is_some_and(|p| p.maps().join("CONFIG").exists());
        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&str, PathBuf)> = match &pins {
            Some(p) => MAP_NAMES.iter().map(|n| (*n, p.maps().join(n))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAMS).map_err(|e| load_error(display_chain(&e)))?;
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
        let mut enforcer = Enforcer {
            ebpf,
            events,
            prefixes,
            ports,
            cgroup_root: cgroup_root.to_path_buf(),
            pins,
            current: None,
            attached: BTreeMap::new(),
            scope_names: BTreeMap::new(),
        };
        if adopted {
            // The maps of an earlier agent: its active generation goes on enforcing
            // until the first swap; whatever a swap interrupted by its end left in the
            // other generation is cleared.
            let cfg = enforcer.array::<Config>("CONFIG")?.get(&0, 0).map_err(map_err("CONFIG"))?;
            let gen = cfg.active_gen & 1;
            enforcer.sweep_generation(1 - gen);
            enforcer.current = Some(ActiveGen { gen, plan: None });
            tracing::info!(generation = gen, pins = %enforcer.pins.as_ref().map(|p| p.dir.display().to_string()).unwrap_or_default(),
                "adopted the pinned network-policy maps of an earlier agent");
        }
        Ok(enforcer)
    }

    pub fn active_generation(&self) -> Option<u32> {
        self.current.as_ref().map(|c| c.gen)
    }

    /// Were the maps (and so the rules in force) adopted from an earlier agent?
    pub fn adopted(&self) -> bool {
        self.current.as_ref().is_some_and(|c| c.plan.is_none())
    }

    /// Links pinned by an earlier agent that no scope of this one has claimed yet.
    fn unclaimed_pins(&self) -> Vec<PathBuf> {
        let Some(p) = &self.pins else { return Vec::new() };
        let claimed: BTreeSet<PathBuf> = self.attached.keys().flat_map(|(k, t)| self.link_pin_paths(*k, t).ok()).flat_map(|(a, b)| [a, b]).collect();
        std::fs::read_dir(p.links())
            .map(|rd| rd.flatten().map(|e| e.path()).filter(|f| !claimed.contains(f)).collect())
            .unwrap_or_default()
    }

    /// The pin files of a scope's two links. Workloads are named by cgroup id (a
    /// cgroup removed and made again is another cgroup), interfaces by index and name.
    fn link_pin_paths(&self, kind: ScopeKind, target: &str) -> Result<(PathBuf, PathBuf), Error> {
        let p = self.pins.as_ref().ok_or_else(|| Error::Load("not pinned".into()))?;
        let stem = match kind {
            ScopeKind::Workload => {
                let path = self.cgroup_root.join(target);
                let ino = std::fs::metadata(&path)
                    .map_err(|e| Error::Scope { scope: format!("workload cgroup {}", path.display()), reason: e.to_string() })?
                    .ino();
                format!("cgroup-{ino}")
            }
            ScopeKind::Interface => {
                let idx = ifindex(target).ok_or_else(|| Error::Scope { scope: format!("interface {target:?}"), reason: "no such interface".into() })?;
                // bpffs refuses names with a dot (VLAN interfaces have one).
                format!("if-{idx}-{}", target.replace('.', "_"))
            }
        };
        Ok((p.links().join(format!("{stem}-egress")), p.links().join(format!("{stem}-ingress"))))
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
        let new_scopes: BTreeSet<(ScopeKind, String)> = profile.scopes.iter().map(|s| (s.kind, s.target.clone())).collect();
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
        if let Some(old) = self.current.replace(ActiveGen { gen: new_gen, plan: Some(new) }) {
            std::thread::sleep(GRACE);
            match &old.plan {
                Some(p) => self.remove_generation(p),
                None => self.sweep_generation(old.gen),
            }
        }
        // Scopes the new profile does not name: the signed policy took them out of
        // enforcement (a profile never drops a scope by falling back: the essential
        // profile keeps every scope of its bundle).
        let stale: Vec<_> = self.attached.keys().filter(|k| !new_scopes.contains(*k)).cloned().collect();
        for k in stale {
            tracing::warn!(scope = %k.1, "no longer named by the enforced policy: detaching its programs");
            self.detach(&k);
        }
        for f in self.unclaimed_pins() {
            tracing::warn!(pin = %f.display(), "a pinned link of an earlier policy names no scope of this one: removing it");
            if let Err(e) = std::fs::remove_file(&f) {
                tracing::warn!(pin = %f.display(), error = %e, "removing a stale pinned link");
            }
        }
        // Older builds of the programs, still attached beside this one: this build's
        // links are in place, so theirs can go.
        if let Some(p) = self.pins.as_mut() {
            for dir in std::mem::take(&mut p.retired) {
                match remove_pins(&dir) {
                    Ok(n) => tracing::info!(dir = %dir.display(), removed = n, "removed the pins of an earlier build of the policy programs"),
                    Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "removing the pins of an earlier build of the policy programs"),
                }
            }
        }
        self.scope_names = profile
            .scopes
            .iter()
            .zip(&resolved)
            .map(|(s, r)| ((r.kind, r.id), format!("{}/{}", if r.kind == SCOPE_CGROUP { "workload" } else { "interface" }, s.name)))
            .collect();
        let current = self.current.as_ref().and_then(|c| c.plan.as_ref()).map(|c| (c.rule_ids.len(), c.entry_count())).unwrap_or_default();
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

    /// Deletes every entry of generation `gen` whose plan this process does not know
    /// (written by an earlier agent, or left by a swap its end interrupted), found by
    /// walking the maps' keys, and zeroes its rule counters.
    fn sweep_generation(&mut self, gen: u32) {
        if let (Ok(cpus), Some(m)) = (nr_cpus(), self.ebpf.map_mut("RULE_COUNTERS")) {
            if let Ok(mut counters) = PerCpuArray::<_, Counter>::try_from(m) {
                for i in 0..MAX_RULES {
                    if let Ok(zero) = PerCpuValues::try_from(vec![Counter::default(); cpus]) {
                        let _ = counters.set(gen * MAX_RULES + i, zero, 0);
                    }
                }
            }
        }
        let class_gen = |class: u32| (class & outpost_ebpf_common::CLASS_ID_MASK) >> 24;
        if let Ok(mut scopes) = self.hash::<ScopeKey, u32>("SCOPES") {
            let keys: Vec<ScopeKey> = scopes.keys().flatten().filter(|k| k.gen == gen).collect();
            for k in keys {
                let _ = scopes.remove(&k);
            }
        }
        let keys: Vec<Key<PrefixKey>> = self.prefixes.keys().flatten().filter(|k| u32::from(k.data().gen) == gen).collect();
        for k in keys {
            let _ = self.prefixes.remove(&k);
        }
        let keys: Vec<PortKey> = self.ports.keys().flatten().filter(|k| class_gen(k.class) == gen).collect();
        for k in keys {
            let _ = self.ports.remove(&k);
        }
        if let Ok(mut ranges) = self.hash::<u32, RangeList>("RANGES") {
            let keys: Vec<u32> = ranges.keys().flatten().filter(|k| class_gen(*k) == gen).collect();
            for k in keys {
                let _ = ranges.remove(&k);
            }
        }
    }

    fn attach(&mut self, kind: ScopeKind, target: &str) -> Result<Attachment, Error> {
        if self.pins.is_some() {
            return self.attach_pinned(kind, target);
        }
        Ok(match kind {
            ScopeKind::Workload => {
                let (egress, ingress) = self.attach_cgroup(target)?;
                Attachment::Cgroup { egress, ingress }
            }
            ScopeKind::Interface => {
                let (egress, ingress) = self.attach_interface(target)?;
                Attachment::Interface { egress, ingress }
            }
        })
    }

    /// Both cgroup programs on a workload's cgroup (links owned by this process).
    fn attach_cgroup(&mut self, target: &str) -> Result<(CgroupSkbLinkId, CgroupSkbLinkId), Error> {
        let path = self.cgroup_root.join(target);
        let mut link = |name: &str, at: CgroupSkbAttachType| -> Result<CgroupSkbLinkId, Error> {
            let file = std::fs::File::open(&path).map_err(|e| Error::Attach { program: name.into(), target: path.display().to_string(), reason: e.to_string() })?;
            let p: &mut CgroupSkb = prog(&mut self.ebpf, name)?.try_into().map_err(|e| Error::Load(format!("{name}: {e}")))?;
            // Links are always multi-attach; the kernel wants no flags with them.
            p.attach(file, at, CgroupAttachMode::Single)
                .map_err(|e| Error::Attach { program: name.into(), target: path.display().to_string(), reason: display_chain(&e) })
        };
        let egress = link("outpost_cg_egress", CgroupSkbAttachType::Egress)?;
        match link("outpost_cg_ingress", CgroupSkbAttachType::Ingress) {
            Ok(ingress) => Ok((egress, ingress)),
            Err(e) => {
                let _ = detach_all!(&mut self.ebpf, CgroupSkb, [("outpost_cg_egress", egress)]);
                Err(e)
            }
        }
    }

    /// Both tcx programs on an interface (links owned by this process).
    fn attach_interface(&mut self, target: &str) -> Result<(SchedClassifierLinkId, SchedClassifierLinkId), Error> {
        let mut link = |name: &str, at: TcAttachType| -> Result<SchedClassifierLinkId, Error> {
            let p: &mut SchedClassifier = prog(&mut self.ebpf, name)?.try_into().map_err(|e| Error::Load(format!("{name}: {e}")))?;
            p.attach(target, at).map_err(|e| Error::Attach { program: name.into(), target: target.into(), reason: display_chain(&e) })
        };
        let egress = link("outpost_tc_egress", TcAttachType::Egress)?;
        match link("outpost_tc_ingress", TcAttachType::Ingress) {
            Ok(ingress) => Ok((egress, ingress)),
            Err(e) => {
                let _ = detach_all!(&mut self.ebpf, SchedClassifier, [("outpost_tc_egress", egress)]);
                Err(e)
            }
        }
    }

    /// Attaches a scope's two programs by links pinned in bpffs, or adopts the links
    /// an earlier agent pinned for the scope (they stay attached throughout).
    fn attach_pinned(&mut self, kind: ScopeKind, target: &str) -> Result<Attachment, Error> {
        let (egress_pin, ingress_pin) = self.link_pin_paths(kind, target)?;
        if egress_pin.exists() && ingress_pin.exists() {
            let adopt = |p: &Path| PinnedLink::from_pin(p).map_err(|e| Error::Pin { path: p.to_path_buf(), reason: display_chain(&e) });
            match (adopt(&egress_pin), adopt(&ingress_pin)) {
                (Ok(egress), Ok(ingress)) => {
                    tracing::info!(scope = %target, "adopted the pinned links of an earlier agent");
                    return Ok(Attachment::Pinned { egress, ingress });
                }
                (Err(e), _) | (_, Err(e)) => tracing::warn!(scope = %target, error = %e, "a pinned link cannot be adopted; attaching anew"),
            }
        }
        // Attach and pin a new pair; a half-pinned old pair is replaced only once the
        // new links filter (so the scope is never unfiltered in between).
        let attached = match kind {
            ScopeKind::Workload => {
                let (egress, ingress) = self.attach_cgroup(target)?;
                let take = |ebpf: &mut Ebpf, name: &str, id| -> Result<FdLink, Error> {
                    let p: &mut CgroupSkb = prog(ebpf, name)?.try_into().map_err(|e| Error::Load(format!("{name}: {e}")))?;
                    let link = p.take_link(id).map_err(|e| Error::Attach { program: name.into(), target: target.into(), reason: display_chain(&e) })?;
                    FdLink::try_from(link).map_err(|e| Error::Attach { program: name.into(), target: target.into(), reason: format!("not a BPF link: {e}") })
                };
                (take(&mut self.ebpf, "outpost_cg_egress", egress)?, take(&mut self.ebpf, "outpost_cg_ingress", ingress)?)
            }
            ScopeKind::Interface => {
                let (egress, ingress) = self.attach_interface(target)?;
                let take = |ebpf: &mut Ebpf, name: &str, id| -> Result<FdLink, Error> {
                    let p: &mut SchedClassifier = prog(ebpf, name)?.try_into().map_err(|e| Error::Load(format!("{name}: {e}")))?;
                    let link = p.take_link(id).map_err(|e| Error::Attach { program: name.into(), target: target.into(), reason: display_chain(&e) })?;
                    FdLink::try_from(link).map_err(|e| Error::Attach { program: name.into(), target: target.into(), reason: format!("not a BPF link (tcx needs Linux 6.6): {e}") })
                };
                (take(&mut self.ebpf, "outpost_tc_egress", egress)?, take(&mut self.ebpf, "outpost_tc_ingress", ingress)?)
            }
        };
        let pin = |link: FdLink, path: &Path| -> Result<PinnedLink, Error> {
            // (bpffs refuses names with a dot.)
            let mut tmp = path.as_os_str().to_owned();
            tmp.push("-new");
            let tmp = PathBuf::from(tmp);
            let _ = std::fs::remove_file(&tmp);
            let pinned = link.pin(&tmp).map_err(|e| Error::Pin { path: tmp.clone(), reason: display_chain(&e) })?;
            // The rename drops the old pin (its link detaches) only now that the new
            // one is attached.
            std::fs::rename(&tmp, path).map_err(|e| Error::Pin { path: path.to_path_buf(), reason: e.to_string() })?;
            drop(pinned);
            PinnedLink::from_pin(path).map_err(|e| Error::Pin { path: path.to_path_buf(), reason: display_chain(&e) })
        };
        let egress = pin(attached.0, &egress_pin)?;
        let ingress = match pin(attached.1, &ingress_pin) {
            Ok(l) => l,
            Err(e) => {
                let _ = egress.unpin();
                return Err(e);
            }
        };
        Ok(Attachment::Pinned { egress, ingress })
    }

    fn detach(&mut self, key: &(ScopeKind, String)) {
        let Some(a) = self.attached.remove(key) else { return };
        let r = match a {
            Attachment::Pinned { egress, ingress } => {
                // Unpinned and dropped: the links go, and with them the programs.
                let mut r = Ok(());
                for l in [egress, ingress] {
                    if let Err(e) = l.unpin() {
                        r = Err(e.to_string());
                    }
                }
                r
            }
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

/// Creates `<root>/<programs hash>/{maps,links}` on bpffs (mounting bpffs at
/// [`BPFFS_MOUNT`] when the root is under it and nothing is mounted) and lists the
/// directories of other builds of the programs under the same root.
fn prepare_pins(root: &Path) -> Result<Pins, Error> {
    let err = |path: &Path, reason: String| Error::Pin { path: path.to_path_buf(), reason };
    // Without the privilege to mount or write bpffs there is no eBPF either: say so.
    let io_err = |path: &Path, what: &str, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            Error::Unsupported(format!("{what} {}: {e} (the agent needs root, or CAP_BPF and CAP_NET_ADMIN)", path.display()))
        } else {
            err(path, format!("{what}: {e}"))
        }
    };
    if !has_bpf_privilege() {
        return Err(Error::Unsupported("no privilege to load BPF programs (the agent needs root, or CAP_BPF and CAP_NET_ADMIN)".into()));
    }
    if !is_bpffs(root) {
        let mount = Path::new(BPFFS_MOUNT);
        if root.starts_with(mount) && !is_bpffs(mount) {
            std::fs::create_dir_all(mount).map_err(|e| io_err(mount, "creating", e))?;
            mount_bpffs(mount).map_err(|e| io_err(mount, "mounting bpffs at", e))?;
            tracing::info!(path = BPFFS_MOUNT, "mounted the BPF file system");
        }
    }
    let private = || {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b
    };
    private().create(root).map_err(|e| io_err(root, "creating", e))?;
    if !is_bpffs(root) {
        return Err(err(root, format!("not on a BPF file system (mount one: mount -t bpf bpf {BPFFS_MOUNT})")));
    }
    let dir = root.join(programs_tag());
    for d in [dir.join("maps"), dir.join("links")] {
        private().create(&d).map_err(|e| io_err(&d, "creating", e))?;
    }
    // bpffs's root is world-writable (sticky): anyone may have made these directories
    // first, and whoever owns them can unlink the pins inside, which ends enforcement.
    // Only directories of this user, writable by no one else, hold pins.
    for d in [root.to_path_buf(), dir.clone(), dir.join("maps"), dir.join("links")] {
        let md = std::fs::symlink_metadata(&d).map_err(|e| io_err(&d, "reading", e))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !md.is_dir() || md.uid() != me || md.mode() & 0o022 != 0 {
            return Err(err(
                &d,
                format!(
                    "owned by uid {} with mode {:o}, not by uid {me} and writable only by it: another user could remove the pins and end enforcement; refusing to pin there (remove it, or choose another pin directory)",
                    md.uid(),
                    md.mode() & 0o7777
                ),
            ));
        }
    }
    let retired = std::fs::read_dir(root)
        .map_err(|e| err(root, e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && *p != dir && p.join("maps").is_dir())
        .collect();
    Ok(Pins { dir, retired })
}

/// Names this build of the programs: the first 16 hex digits of their SHA-256.
fn programs_tag() -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(PROGRAMS);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Root, or the effective capabilities CAP_BPF (39) or CAP_SYS_ADMIN (21).
fn has_bpf_privilege() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0);
    eff & ((1 << 39) | (1 << 21)) != 0
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is NUL-terminated and `buf` is a properly sized out-parameter.
    let rc = unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
    // SAFETY: statfs filled `buf` when it returned 0.
    rc == 0 && i64::from(unsafe { buf.assume_init() }.f_type) == BPF_FS_MAGIC
}

fn mount_bpffs(at: &Path) -> std::io::Result<()> {
    let target = CString::new(at.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let (src, fstype) = (c"bpf", c"bpf");
    // SAFETY: every pointer is a valid NUL-terminated string for the call; no data.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes one build's pins: links first (their programs detach), then maps. Returns
/// how many objects were unpinned.
fn remove_pins(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                std::fs::remove_file(e.path())?;
                n += 1;
            }
            std::fs::remove_dir(&d)?;
        }
    }
    std::fs::remove_dir(dir)?;
    Ok(n)
}

/// What [`detach_pinned`] removed.
#[derive(Debug, Default)]
pub struct Detached {
    /// Pinned links removed (each one detached a program).
    pub links: Vec<PathBuf>,
    /// Pinned maps removed.
    pub maps: usize,
}

/// Ends enforcement pinned under `root` by any build of the programs: unpins every
/// link (the programs detach once no agent holds them) and every map. An agent still
/// running holds its links open until it exits: stop it first.
pub fn detach_pinned(root: &Path) -> Result<Detached, Error> {
    let err = |path: &Path, e: std::io::Error| Error::Pin { path: path.to_path_buf(), reason: e.to_string() };
    let mut out = Detached::default();
    let Ok(rd) = std::fs::read_dir(root) else { return Ok(out) };
    for build in rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        if let Ok(links) = std::fs::read_dir(build.join("links")) {
            out.links.extend(links.flatten().map(|e| e.path()));
        }
        out.maps += std::fs::read_dir(build.join("maps")).map(|m| m.count()).unwrap_or(0);
        remove_pins(&build).map_err(|e| err(&build, e))?;
    }
    if std::fs::read_dir(root).is_ok_and(|mut r| r.next().is_none()) {
        std::fs::remove_dir(root).map_err(|e| err(root, e))?;
    }
    Ok(out)
}
