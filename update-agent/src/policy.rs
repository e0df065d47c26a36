//! Network policy on the device: bundles signed under the `policy` delegation, fetched
//! and verified by the TUF client, enforced by the eBPF programs of `outpost-ebpf`.
//!
//! - A verified bundle replaces the enforced one only when it parses, has not expired,
//!   is not an older version of the same bundle, and its scopes exist on this device;
//!   otherwise it is refused and the current policy stays.
//! - When the enforced bundle's `not_after` passes (typically while the device cannot
//!   reach the server), the agent switches to the bundle's essential profile and says
//!   so in its next check-in.
//! - The essential profile keeps every scope the bundle named under enforcement: a
//!   scope it does not list allows nothing (fail-secure, never unfiltered).
//! - Programs, maps and links are pinned in bpffs (`[policy] pin_dir`): enforcement
//!   survives the agent's exits, crashes and upgrades, and a restarted agent adopts
//!   what is pinned without a gap. Only `outpost-agent policy detach` removes it.
//! - The enforced bundle is kept in the state directory, so a restarted agent enforces
//!   it again before it reaches any server; when the engine cannot start or the bundle
//!   cannot be restored, the status (and so the next check-in) says so.
//! - Counters go to check-ins and to a Prometheus `/metrics` endpoint; sampled deny
//!   events go to the log (target `outpost::policy::deny`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outpost_ebpf::{Enforcer, SwapReport};
use outpost_protocol::policy::{Applied, Mode, PolicyBundle, PolicyStatus, PolicyTargetCustom, POLICY_ROLE};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::updater::{TargetInfo, Updater};

/// The cgroup v2 mount point, from /proc/self/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    target: Option<String>,
    fell_back_at: Option<DateTime<Utc>>,
}

struct Active {
    bundle: PolicyBundle,
    target: Option<String>,
    applied: Applied,
    fell_back_at: Option<DateTime<Utc>>,
}

pub struct PolicyEngine {
    enforcer: Enforcer,
    /// Where the enforced bundle is kept (none: a local `policy enforce`).
    dir: Option<PathBuf>,
    active: Option<Active>,
    refused: Option<String>,
    /// Why the enforced policy is not the one the agent means to enforce (the stored
    /// bundle could not be restored).
    error: Option<String>,
    deny_events: u64,
}

/// Who vouches for a bundle offered to the engine.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A target of the image repository signed by the `policy` role, with the name and
    /// version its signed metadata gives (the content must match them).
    Signed { target: &'a str, custom: &'a PolicyTargetCustom },
    /// A local file no signature vouches for (`policy enforce FILE`).
    Unsigned(crate::danger::UnsignedPolicy),
}

impl Source<'_> {
    /// The signed target's path, for signed bundles.
    pub fn target(&self) -> Option<&str> {
        match self {
            Source::Signed { target, .. } => Some(target),
            Source::Unsigned(_) => None,
        }
    }
}

pub type SharedEngine = Arc<Mutex<PolicyEngine>>;

fn lock(engine: &SharedEngine) -> std::sync::MutexGuard<'_, PolicyEngine> {
    engine.lock().unwrap_or_else(|p| p.into_inner())
}

impl PolicyEngine {
    /// Loads the programs, pinned under `pin_root` (adopting what an earlier agent
    /// pinned there). With `dir`, the bundle enforced before a restart is enforced
    /// again at once (its essential profile if it has expired meanwhile).
    pub fn start(cgroup_root: &Path, dir: Option<PathBuf>, pin_root: &Path) -> Result<Self> {
        let enforcer = Enforcer::load(cgroup_root, Some(pin_root)).map_err(|e| AgentError::Policy(e.to_string()))?;
        let mut engine = PolicyEngine { enforcer, dir, active: None, refused: None, error: None, deny_events: 0 };
        if let Some(dir) = engine.dir.clone() {
            if let Err(e) = engine.restore(&dir) {
                let kept = if engine.enforcer.adopted() { "the rules pinned before the restart stay enforced" } else { "nothing is enforced" };
                tracing::error!(error = %e, "cannot restore the enforced network policy; {kept}");
                engine.error = Some(format!("cannot restore the stored bundle: {e}; {kept}"));
            }
        }
        Ok(engine)
    }

    /// Enforces the stored bundle again, if there is one.
    fn restore(&mut self, dir: &Path) -> Result<()> {
        let (bundle_file, meta_file) = (dir.join("active.yaml"), dir.join("active.json"));
        let Some(bytes) = read_if_exists(&bundle_file)? else { return Ok(()) };
        let bundle = PolicyBundle::parse(&bytes).map_err(|e| AgentError::Policy(format!("{}: {e}", bundle_file.display())))?;
        let meta = match read_if_exists(&meta_file)? {
            Some(m) => serde_json::from_slice::<Persisted>(&m).map_err(|e| AgentError::Corrupt { path: meta_file.clone(), reason: e.to_string() })?,
            None => Persisted { target: None, fell_back_at: None },
        };
        let now = Utc::now();
        let applied = bundle.applied(now);
        let (profile, mode) = bundle.profile_for(applied);
        let r = self.enforcer.apply(profile, mode, bundle.sample_denies).map_err(|e| AgentError::Policy(format!("{} v{}: {e}", bundle.name, bundle.version)))?;
        tracing::info!(name = %bundle.name, version = bundle.version, ?applied, generation = r.generation, "restored the enforced network policy");
        let fell_back_at = match applied {
            Applied::Essential => meta.fell_back_at.or(Some(now)),
            Applied::Bundle => None,
        };
        self.active = Some(Active { bundle, target: meta.target, applied, fell_back_at });
        self.persist();
        Ok(())
    }

    fn persist(&self) {
        let (Some(dir), Some(a)) = (&self.dir, &self.active) else { return };
        let meta = Persisted { target: a.target.clone(), fell_back_at: a.fell_back_at };
        let r = std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::io("create", dir, e))
            .and_then(|_| {
                let path = dir.join("active.json");
                outpost_fsio::write_atomic(&path, &serde_json::to_vec_pretty(&meta).unwrap_or_default()).map_err(|e| AgentError::io("write", &path, e))
            });
        if let Err(e) = r {
            tracing::error!(error = %e, "saving the policy state");
        }
    }

    /// The enforced bundle's name and version.
    pub fn current(&self) -> Option<(&str, u64, Applied)> {
        self.active.as_ref().map(|a| (a.bundle.name.as_str(), a.bundle.version, a.applied))
    }

    /// Offers a bundle from `source` (a signed target, whose signed name and version
    /// the content must match, or an unsigned local file). `Ok(None)`: it is the one
    /// enforced already.
    pub fn offer(&mut self, bytes: &[u8], source: Source<'_>, now: DateTime<Utc>) -> Result<Option<SwapReport>> {
        let what = source.target().unwrap_or("bundle").to_owned();
        let result = self.try_offer(bytes, source, now);
        match &result {
            Err(e) => {
                self.refused = Some(format!("{what}: {e}"));
                tracing::error!(bundle = %what, error = %e, "network policy bundle refused; the current policy stays");
            }
            Ok(Some(_)) => {
                self.refused = None;
                self.error = None;
            }
            Ok(None) => {}
        }
        result
    }

    fn try_offer(&mut self, bytes: &[u8], source: Source<'_>, now: DateTime<Utc>) -> Result<Option<SwapReport>> {
        let bundle = PolicyBundle::parse(bytes).map_err(|e| AgentError::Policy(e.to_string()))?;
        if let Source::Signed { custom: signed, .. } = source {
            if bundle.name != signed.name || bundle.version != signed.version {
                return Err(AgentError::Policy(format!(
                    "the bundle is {} v{} but its signed metadata says {} v{}",
                    bundle.name, bundle.version, signed.name, signed.version
                )));
            }
        }
        if let Some(a) = &self.active {
            if a.bundle.name == bundle.name {
                if bundle.version < a.bundle.version {
                    return Err(AgentError::Policy(format!(
                        "version {} of {} is older than the enforced version {}",
                        bundle.version, bundle.name, a.bundle.version
                    )));
                }
                if bundle.version == a.bundle.version {
                    if a.bundle != bundle {
                        return Err(AgentError::Policy(format!("version {} of {} differs from the enforced copy of that version", bundle.version, bundle.name)));
                    }
                    return Ok(None);
                }
            }
        }
        if bundle.applied(now) == Applied::Essential {
            return Err(AgentError::Policy(format!("{} version {} expired at {} (not_after)", bundle.name, bundle.version, bundle.not_after)));
        }
        let report = self.enforcer.apply(&bundle.profile, bundle.mode, bundle.sample_denies).map_err(|e| AgentError::Policy(e.to_string()))?;
        tracing::info!(name = %bundle.name, version = bundle.version, mode = ?bundle.mode, rules = report.rules, generation = report.generation,
            to_flip_ms = report.to_flip.as_secs_f64() * 1e3, "network policy applied");
        if let Some(dir) = &self.dir {
            std::fs::create_dir_all(dir).map_err(|e| AgentError::io("create", dir, e))?;
            let path = dir.join("active.yaml");
            outpost_fsio::write_atomic(&path, bytes).map_err(|e| AgentError::io("write", &path, e))?;
        }
        self.active = Some(Active { bundle, target: source.target().map(str::to_owned), applied: Applied::Bundle, fell_back_at: None });
        self.persist();
        Ok(Some(report))
    }

    /// Falls back to the essential profile once the enforced bundle has expired.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Option<SwapReport> {
        let a = self.active.as_mut()?;
        if a.applied != Applied::Bundle || a.bundle.applied(now) != Applied::Essential {
            return None;
        }
        let (essential, mode) = a.bundle.profile_for(Applied::Essential);
        match self.enforcer.apply(essential, mode, a.bundle.sample_denies) {
            Ok(r) => {
                tracing::warn!(name = %a.bundle.name, version = a.bundle.version, not_after = %a.bundle.not_after,
                    "network policy expired without a newer one: enforcing its essential profile (fail-secure)");
                a.applied = Applied::Essential;
                a.fell_back_at = Some(now);
                self.persist();
                Some(r)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot apply the essential profile; the expired policy stays enforced");
                None
            }
        }
    }

    /// When [`tick`](Self::tick) next has something to do.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        self.active.as_ref().filter(|a| a.applied == Applied::Bundle).map(|a| a.bundle.not_after)
    }

    /// What the engine enforces; `None` only when it has nothing and nothing is wrong.
    pub fn status(&self) -> Option<PolicyStatus> {
        let counters = self.enforcer.counters().ok();
        let verdicts = counters.map(|c| c.verdicts.into_iter().map(|(k, v)| (k.to_string(), v)).collect()).unwrap_or_default();
        let enforcing = self.enforcer.active_generation().is_some();
        let mut status = match &self.active {
            Some(a) => PolicyStatus {
                name: a.bundle.name.clone(),
                version: a.bundle.version,
                target: a.target.clone(),
                applied: a.applied,
                mode: a.bundle.profile_for(a.applied).1,
                enforcing,
                not_after: a.bundle.not_after,
                fell_back_at: a.fell_back_at,
                refused: self.refused.clone(),
                error: None,
                verdicts,
                updated_at: Utc::now(),
            },
            None => {
                let error = self.error.clone()?;
                let mut s = failed_status(self.dir.as_deref(), error);
                s.enforcing = enforcing;
                s.verdicts = verdicts;
                s.refused = self.refused.clone();
                s
            }
        };
        if status.error.is_none() {
            status.error = self.error.clone();
        }
        Some(status)
    }

    /// The policy counters for `/metrics`.
    pub fn metrics(&self) -> crate::metrics::Exposition {
        let mut m = crate::metrics::Exposition::default();
        let enforcing = self.enforcer.active_generation().is_some();
        m.gauge("outpost_policy_enforcing", "1 when the eBPF programs enforce a policy.", vec![], i64::from(enforcing));
        if let Some(a) = &self.active {
            let labels = vec![
                ("name", a.bundle.name.clone()),
                ("version", a.bundle.version.to_string()),
                ("applied", if a.applied == Applied::Bundle { "bundle" } else { "essential" }.to_owned()),
                ("mode", if a.bundle.profile_for(a.applied).1 == Mode::Enforce { "enforce" } else { "audit" }.to_owned()),
            ];
            m.gauge("outpost_policy_info", "The enforced policy.", labels, 1);
            m.gauge("outpost_policy_not_after_seconds", "When the enforced bundle expires.", vec![], a.bundle.not_after.timestamp());
        }
        m.counter("outpost_policy_deny_events", "Deny events sampled to the log.", vec![], self.deny_events);
        match self.enforcer.counters() {
            Ok(c) => {
                for (v, n) in &c.verdicts {
                    m.counter("outpost_policy_packets", "Packets by verdict.", vec![("verdict", v.to_string())], *n);
                }
                for (id, p, _) in &c.rules {
                    m.counter("outpost_policy_rule_packets", "Packets each rule of the enforced profile matched.", vec![("rule", id.clone())], *p);
                }
                for (id, _, b) in &c.rules {
                    m.counter("outpost_policy_rule_bytes", "Bytes each rule of the enforced profile matched.", vec![("rule", id.clone())], *b);
                }
            }
            Err(e) => tracing::warn!(error = %e, "policy counters unavailable for /metrics"),
        }
        m
    }

    /// Logs the deny events sampled since the last call.
    pub fn log_denies(&mut self) {
        for d in self.enforcer.drain_events() {
            self.deny_events += 1;
            tracing::info!(target: "outpost::policy::deny", scope = %d.scope, direction = d.direction, protocol = %d.protocol,
                remote = %d.remote, port = d.port, audit = d.audit, "{}", if d.audit { "would deny (audit mode)" } else { "denied" });
        }
    }
}

/// A status for a device whose policy engine is not running as it should: named after
/// the stored bundle when there is one (name empty otherwise), `enforcing` false.
fn failed_status(dir: Option<&Path>, error: String) -> PolicyStatus {
    let now = Utc::now();
    let stored = dir.and_then(|d| std::fs::read(d.join("active.yaml")).ok()).and_then(|b| PolicyBundle::parse(&b).ok());
    let target = dir
        .and_then(|d| std::fs::read(d.join("active.json")).ok())
        .and_then(|m| serde_json::from_slice::<Persisted>(&m).ok())
        .and_then(|p| p.target);
    PolicyStatus {
        name: stored.as_ref().map(|b| b.name.clone()).unwrap_or_default(),
        version: stored.as_ref().map_or(0, |b| b.version),
        target,
        applied: stored.as_ref().map_or(Applied::Bundle, |b| b.applied(now)),
        mode: stored.as_ref().map_or(Mode::Enforce, |b| b.profile_for(b.applied(now)).1),
        enforcing: false,
        not_after: stored.as_ref().map_or(now, |b| b.not_after),
        fell_back_at: None,
        refused: None,
        error: Some(error),
        verdicts: Default::default(),
        updated_at: now,
    }
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io("read", path, e)),
    }
}

/// Loads the programs for the agent's `[policy]` and restores the enforced bundle. When
/// the engine cannot start, the status file says so (check-ins carry it), so a device
/// never goes on reporting the enforcement it had before.
fn start_engine(config: &AgentConfig) -> Result<SharedEngine> {
    let p = config.policy.as_ref().ok_or_else(|| AgentError::MissingSection { section: "policy", hint: "" })?;
    let started = p
        .cgroup_root
        .clone()
        .or_else(cgroup2_mount)
        .ok_or_else(|| AgentError::Policy("no cgroup v2 mount found; set policy.cgroup_root".into()))
        .and_then(|root| PolicyEngine::start(&root, Some(config.policy_dir()), &p.pin_dir));
    match started {
        Ok(engine) => Ok(Arc::new(Mutex::new(engine))),
        Err(e) => {
            let status = failed_status(Some(&config.policy_dir()), format!("the policy engine cannot start: {e}"));
            store_status(config, Some(&status));
            Err(e)
        }
    }
}

/// Starts the engine for the full daemon when `[policy]` is set, or says clearly why
/// there is no enforcement (the daemon goes on without it; its status says so).
pub fn start_for(config: &AgentConfig) -> Option<SharedEngine> {
    config.policy.as_ref()?;
    match start_engine(config) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::error!(error = %e, "NOT enforcing network policy");
            eprintln!("outpost-agent: {e}; NOT enforcing network policy");
            None
        }
    }
}

/// `outpost-agent policy detach`: the explicit end of enforcement.
pub fn detach(pin_dir: &Path, json: bool) -> Result<()> {
    let d = outpost_ebpf::detach_pinned(pin_dir).map_err(|e| AgentError::Policy(e.to_string()))?;
    tracing::warn!(pin_dir = %pin_dir.display(), links = d.links.len(), maps = d.maps, "network policy enforcement removed by policy detach");
    if json {
        let links: Vec<String> = d.links.iter().map(|l| l.display().to_string()).collect();
        println!("{}", serde_json::json!({"event": "detached", "pin_dir": pin_dir.display().to_string(), "links": links, "maps": d.maps}));
    } else if d.links.is_empty() && d.maps == 0 {
        println!("nothing pinned under {}: no network policy was enforced from there", pin_dir.display());
    } else {
        println!("detached: {} program link(s) and {} map(s) unpinned from {}; nothing filters any more", d.links.len(), d.maps, pin_dir.display());
    }
    Ok(())
}

/// The bundle for this device among the signed targets of the `policy` role: the most
/// specific selector that matches, then the newest version.
pub fn select(candidates: Vec<TargetInfo>, hardware_class: &str, labels: &std::collections::BTreeMap<String, String>) -> Option<(TargetInfo, PolicyTargetCustom)> {
    let mut best: Option<(TargetInfo, PolicyTargetCustom)> = None;
    for info in candidates {
        if info.role != POLICY_ROLE {
            tracing::warn!(target = %info.path, role = %info.role, "policy target not signed by the policy role; ignored");
            continue;
        }
        let Some(custom) = info.file.custom.as_ref().and_then(|c| serde_json::from_value::<PolicyTargetCustom>(c.clone()).ok()) else {
            tracing::warn!(target = %info.path, "policy target without policy metadata; ignored");
            continue;
        };
        if custom.kind != "policy" || !custom.selector.matches(hardware_class, labels) {
            continue;
        }
        let better = match &best {
            None => true,
            Some((_, b)) => (custom.selector.specificity(), custom.version) > (b.selector.specificity(), b.version),
        };
        if better {
            best = Some((info, custom));
        }
    }
    best
}

/// Refreshes the image repository (unless `updater` already did this pass), downloads
/// the selected bundle (verified length and hashes) and offers it. `Err` when the
/// server cannot be reached or the bundle is refused.
pub async fn sync(config: &AgentConfig, engine: &SharedEngine, updater: &mut Updater) -> Result<Option<SwapReport>> {
    let labels = config.policy.as_ref().map(|p| p.labels.clone()).unwrap_or_default();
    // Metadata that does not verify is a refusal worth reporting; an unreachable
    // server is not.
    let refuse = |e: AgentError| -> AgentError {
        if matches!(e, AgentError::Tuf { .. }) {
            lock(engine).refused = Some(format!("signed metadata: {}", outpost_protocol::display_chain(&e)));
        }
        e
    };
    updater.refresh().await.map_err(refuse)?;
    let candidates = updater.targets_under(&["policy"]).await.map_err(refuse)?;
    let Some((info, custom)) = select(candidates, config.hardware_class.as_str(), &labels) else {
        return Ok(None);
    };
    if let Some((name, version, _)) = lock(engine).current() {
        if name == custom.name && version == custom.version {
            return Ok(None);
        }
    }
    let dir = config.policy_dir().join("downloads");
    std::fs::create_dir_all(&dir).map_err(|e| AgentError::io("create", &dir, e))?;
    let path = match updater.download_target(&info, &format!("{}/targets/", config.server_url), &dir, crate::fetch::Durability::Fsync).await {
        Ok(p) => p,
        Err(e) => {
            lock(engine).refused = Some(format!("{}: {}", info.path, outpost_protocol::display_chain(&e)));
            return Err(e);
        }
    };
    let bytes = std::fs::read(&path).map_err(|e| AgentError::io("read", &path, e))?;
    let _ = std::fs::remove_file(&path);
    lock(engine).offer(&bytes, Source::Signed { target: &info.path, custom: &custom }, Utc::now())
}

/// Writes the status for check-ins (`STATE/policy/status.json`).
pub fn write_status(config: &AgentConfig, engine: &SharedEngine) {
    let status = lock(engine).status();
    store_status(config, status.as_ref());
}

/// Stores `status`, or removes a stored one when there is none: a status file never
/// outlives what it describes.
fn store_status(config: &AgentConfig, status: Option<&PolicyStatus>) {
    let dir = config.policy_dir();
    let file = dir.join("status.json");
    let r = match status {
        Some(s) => std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::io("create", &dir, e))
            .and_then(|_| outpost_fsio::write_atomic(&file, &serde_json::to_vec_pretty(s).unwrap_or_default()).map_err(|e| AgentError::io("write", &file, e))),
        None => match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(AgentError::io("remove", &file, e)),
            _ => Ok(()),
        },
    };
    if let Err(e) = r {
        tracing::error!(error = %e, "writing the policy status");
    }
}

/// The status the daemon last wrote, for a check-in.
pub fn read_status(config: &AgentConfig) -> Option<PolicyStatus> {
    config.policy.as_ref()?;
    let bytes = std::fs::read(config.policy_dir().join("status.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// One daemon step: fetch and offer a newer bundle through `updater` (the pass's TUF
/// client; an error when it could not be opened), fall back if expired, write the
/// status. Logs what fails; never stops the daemon.
pub async fn step(config: &AgentConfig, engine: &SharedEngine, updater: std::result::Result<&mut Updater, &AgentError>) {
    let synced = match updater {
        Ok(updater) => sync(config, engine, updater).await.map(|_| ()),
        Err(e) => Err(e.to_string()).map_err(|reason| AgentError::Policy(format!("no TUF client this pass: {reason}"))),
    };
    if let Err(e) = synced {
        tracing::warn!(error = %outpost_protocol::display_chain(&e), "network policy update check failed");
    }
    let mut e = lock(engine);
    e.tick(Utc::now());
    e.log_denies();
    drop(e);
    write_status(config, engine);
}

/// `outpost-agent policy run`: the policy part of the daemon alone.
pub async fn run_daemon(config: &AgentConfig, once: bool) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let p = config.policy.as_ref().ok_or_else(|| AgentError::MissingSection { section: "policy", hint: "" })?;
    config.prepare_state()?;
    let engine = start_engine(config)?;
    write_status(config, &engine);
    if let Some(addr) = p.metrics_listen {
        serve_metrics(addr, p.metrics_limits, engine.clone()).await?;
    }
    let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::Policy(format!("SIGTERM handler: {e}")))?;
    let fetcher = crate::fetch::Fetcher::new(config.http_limits())?;
    let one_step = || async {
        let mut updater = Updater::for_agent(config, fetcher.clone());
        step(config, &engine, updater.as_mut().map_err(|e| &*e)).await
    };
    if once {
        one_step().await;
        return Ok(());
    }
    let _watch = spawn_expiry_watch(config, engine.clone());
    loop {
        // A step may wait on a slow server for as long as the retrieval limits allow;
        // SIGTERM ends it there too.
        tokio::select! {
            _ = one_step() => {}
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.install.check_interval) => {}
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Watches the enforced bundle's expiry on its own task: every second it falls back to
/// the essential profile once `not_after` has passed (writing the status then, for
/// check-ins) and drains sampled deny events. It shares nothing with the network
/// work of the daemon but the engine's lock, which no fetch holds, so a fetch that
/// hangs or an install that takes hours never delays the fail-secure fallback. The
/// status is not rewritten every second (flash wear); each daemon step writes it.
pub fn spawn_expiry_watch(config: &AgentConfig, engine: SharedEngine) -> WatchGuard {
    let config = config.clone();
    let task = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let fell_back = {
                let mut e = lock(&engine);
                e.log_denies();
                e.tick(Utc::now()).is_some()
            };
            if fell_back {
                write_status(&config, &engine);
            }
        }
    });
    WatchGuard(task)
}

/// Stops the expiry watch when dropped.
pub struct WatchGuard(tokio::task::JoinHandle<()>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `GET /metrics` (the engine's counters) on `addr` until the process ends.
pub async fn serve_metrics(addr: std::net::SocketAddr, limits: crate::metrics::ListenerLimits, engine: SharedEngine) -> Result<()> {
    crate::metrics::serve(addr, limits, Arc::new(move || lock(&engine).metrics().encode())).await
}

/// `outpost-agent policy enforce FILE`: enforce a local bundle in the foreground (for
/// trying a bundle on a device; the daemon enforces only signed bundles). SIGHUP
/// re-reads FILE; SIGINT/SIGTERM detach everything and exit.
pub async fn enforce_local(file: &Path, unsigned: crate::danger::UnsignedPolicy, cgroup_root: Option<PathBuf>, metrics: Option<std::net::SocketAddr>, pin_dir: &Path, json: bool) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let root = cgroup_root.or_else(cgroup2_mount).ok_or_else(|| AgentError::Policy("no cgroup v2 mount found; pass --cgroup-root".into()))?;
    // Handlers first: a SIGHUP sent as soon as the bundle is announced is a re-read,
    // never the default action (exit).
    let mut hup = signal(SignalKind::hangup()).map_err(|e| AgentError::Policy(format!("SIGHUP handler: {e}")))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::Policy(format!("SIGTERM handler: {e}")))?;
    let engine = Arc::new(Mutex::new(PolicyEngine::start(&root, None, pin_dir)?));
    let emit = |event: &str, r: Option<&SwapReport>, e: &mut PolicyEngine| {
        let (name, version, applied) = match e.current() {
            Some((n, v, a)) => (n.to_string(), v, Some(a)),
            None => (String::new(), 0, None),
        };
        let line = serde_json::json!({
            "event": event, "name": name, "version": version, "applied": applied,
            "generation": r.map(|r| r.generation), "rules": r.map(|r| r.rules), "entries": r.map(|r| r.entries),
            "to_flip_ms": r.map(|r| r.to_flip.as_secs_f64() * 1e3), "total_ms": r.map(|r| r.total.as_secs_f64() * 1e3),
            "refused": e.refused,
        });
        if json {
            println!("{line}");
        } else {
            println!("{event}: {name} v{version} ({}){}", applied.map(|a| format!("{a:?}").to_lowercase()).unwrap_or_default(), r.map(|r| format!(", {} rules in generation {}, applied in {:.2} ms", r.rules, r.generation, r.to_flip.as_secs_f64() * 1e3)).unwrap_or_default());
        }
    };
    let read = |f: &Path| std::fs::read(f).map_err(|e| AgentError::io("read", f, e));
    {
        let bytes = read(file)?;
        let mut e = lock(&engine);
        let r = e.offer(&bytes, Source::Unsigned(unsigned), Utc::now())?;
        emit("applied", r.as_ref(), &mut e);
    }
    if let Some(addr) = metrics {
        serve_metrics(addr, crate::metrics::ListenerLimits::default(), engine.clone()).await?;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let mut e = lock(&engine);
                match read(file).and_then(|b| e.offer(&b, Source::Unsigned(unsigned), Utc::now())) {
                    Ok(Some(r)) => emit("applied", Some(&r), &mut e),
                    Ok(None) => emit("unchanged", None, &mut e),
                    Err(_) => emit("refused", None, &mut e),
                }
            }
            _ = tick.tick() => {
                let mut e = lock(&engine);
                if let Some(r) = e.tick(Utc::now()) {
                    emit("essential", Some(&r), &mut e);
                }
                e.log_denies();
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // The links and maps are pinned: the policy stays enforced after this process.
    drop(engine);
    if json {
        println!("{}", serde_json::json!({"event": "stopped", "pin_dir": pin_dir.display().to_string()}));
    } else {
        println!("stopped: the policy stays enforced (pinned in {}); `outpost-agent policy detach` removes it", pin_dir.display());
    }
    Ok(())
}
