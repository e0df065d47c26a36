//! Loading the programs, resolving a profile's scopes on this device, and attaching
//! and detaching programs (links owned by this process, or pinned in bpffs and adopted
//! from an earlier agent; the pin layout is in `pins`).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap as BpfHashMap, RingBuf};
use aya::programs::cgroup_skb::CgroupSkbLinkId;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use outpost_ebpf_common::Config;
use outpost_protocol::display_chain;
use outpost_protocol::policy::{Profile, ScopeKind};

use crate::pins::prepare_pins;
use crate::{ifindex, map_err, prog, programs, ActiveGen, Enforcer, Error, Resolved};

/// Every map of the programs; all of them are pinned, so pinned programs and a
/// restarted agent share them.
const MAP_NAMES: [&str; 11] =
    ["CONFIG", "GENERATIONS", "SCOPES", "PREFIXES", "PORTS", "RANGES", "RULE_COUNTERS", "VERDICT_COUNTERS", "FLOWS", "EVENTS", "DENY_SEQ"];

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
pub(crate) enum Attachment {
    Cgroup { egress: CgroupSkbLinkId, ingress: CgroupSkbLinkId },
    Interface { egress: SchedClassifierLinkId, ingress: SchedClassifierLinkId },
    /// Links pinned in bpffs (they outlive this process until unpinned).
    Pinned { egress: PinnedLink, ingress: PinnedLink },
}

impl Enforcer {
    /// Loads the programs (nothing attached yet). `cgroup_root` is where workload
    /// cgroup paths start (the cgroup v2 mount). With `pin_root`, maps and links are
    /// pinned under it and whatever an earlier agent pinned there is adopted
    /// ([`Self::adopted`]); bpffs is mounted at [`BPFFS_MOUNT`] when the root is
    /// under it and nothing is mounted there.
    pub fn load(cgroup_root: &Path, pin_root: Option<&Path>) -> Result<Self, Error> {
        // Before anything is created or mounted: a build without programs stops here.
        let objects = programs()?;
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
        let mut ebpf = loader.load(objects).map_err(|e| load_error(display_chain(&e)))?;
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

    /// Resolves each scope of `profile` on this device.
    pub(crate) fn resolve(&self, profile: &Profile) -> Result<Vec<Resolved>, Error> {
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

    pub(crate) fn attach(&mut self, kind: ScopeKind, target: &str) -> Result<Attachment, Error> {
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

    pub(crate) fn detach(&mut self, key: &(ScopeKind, String)) {
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
