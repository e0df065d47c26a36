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

use chrono::{DateTime, Utc};
use outpost_ebpf::{Enforcer, SwapReport};
use outpost_protocol::policy::{Applied, Mode, PolicyBundle, PolicyStatus, PolicyTargetCustom};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};

mod daemon;
mod local;

pub use daemon::{read_status, run_daemon, serve_metrics, spawn_expiry_watch, step};
use daemon::store_status;
pub use local::{detach, enforce_local};

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
