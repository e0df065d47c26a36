//! The policy part of the daemon: choosing and fetching the signed bundle through the
//! pass's TUF client, the status file check-ins carry, `policy run`, the expiry watch
//! and the `/metrics` listener.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use outpost_ebpf::SwapReport;
use outpost_protocol::policy::{PolicyStatus, PolicyTargetCustom, POLICY_ROLE};

use super::{lock, start_engine, SharedEngine, Source};
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::mode::Passes;
use crate::updater::{TargetInfo, Updater};

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
pub(super) fn store_status(config: &AgentConfig, status: Option<&PolicyStatus>) {
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
pub async fn run_daemon(config: &AgentConfig, passes: Passes) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let p = config.policy.as_ref().ok_or_else(|| AgentError::MissingSection { section: "policy", hint: "" })?;
    config.prepare_state()?;
    let engine = start_engine(config)?;
    write_status(config, &engine);
    if let Some(addr) = p.metrics_listen {
        serve_metrics(addr, p.metrics_limits, engine.clone()).await?;
    }
    let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::Policy(format!("SIGTERM handler: {e}")))?;
    let fetcher = config.device_fetcher()?;
    let one_step = || async {
        let mut updater = Updater::for_agent(config, fetcher.clone());
        step(config, &engine, updater.as_mut().map_err(|e| &*e)).await
    };
    if passes == Passes::Once {
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
            _ = tokio::time::sleep(p.check_interval) => {}
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
