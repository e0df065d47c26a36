//! Map updates: a swap writes the inactive generation, flips `CONFIG`, and removes
//! the old generation's entries (by plan, or by walking the maps when adopted).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::util::nr_cpus;
use outpost_ebpf_common::{Config, Counter, GenConfig, PortKey, PrefixKey, RangeList, ScopeKey, MAX_RULES, MODE_AUDIT, MODE_ENFORCE, SCOPE_CGROUP};
use outpost_protocol::policy::{Mode, Profile, ScopeKind};

use crate::pins::remove_pins;
use crate::{map_err, plan, ActiveGen, Enforcer, Error, GenPlan, SwapReport};

/// How long old entries stay after a flip: programs that read the old generation
/// just before it finish in microseconds.
const GRACE: Duration = Duration::from_millis(20);

impl Enforcer {
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
        let newly = match self.attach_new_scopes(profile) {
            Ok(n) => n,
            Err(e) => {
                self.remove_generation(&new);
                return Err(e);
            }
        };
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
        self.retire_stale(&new_scopes);
        self.scope_names = profile
            .scopes
            .iter()
            .zip(&resolved)
            .map(|(s, r)| ((r.kind, r.id), format!("{}/{}", if r.kind == SCOPE_CGROUP { "workload" } else { "interface" }, s.name)))
            .collect();
        let current = self.current.as_ref().and_then(|c| c.plan.as_ref()).map(|c| (c.rule_ids.len(), c.entry_count())).unwrap_or_default();
        Ok(SwapReport { generation: new_gen, rules: current.0, entries: current.1, to_flip, total: start.elapsed() })
    }

    /// Attaches the scopes of `profile` that have no programs yet; on error detaches
    /// those it attached and returns the error. Returns the scopes it attached.
    fn attach_new_scopes(&mut self, profile: &Profile) -> Result<Vec<(ScopeKind, String)>, Error> {
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
                    return Err(e);
                }
            }
        }
        Ok(newly)
    }

    /// After a flip: detaches scopes the new profile does not name, removes pinned
    /// links no scope claims and the pins of older builds of the programs.
    fn retire_stale(&mut self, new_scopes: &BTreeSet<(ScopeKind, String)>) {
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
    }

    pub(crate) fn array<V: aya::Pod>(&mut self, name: &str) -> Result<Array<&mut MapData, V>, Error> {
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
    pub(crate) fn sweep_generation(&mut self, gen: u32) {
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
}
