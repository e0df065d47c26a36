//! The device daemon (`outpost-agent run`): the [`Agent`] owns the agent's one HTTP
//! client, the installer and the policy engine, and runs each concern on its own timer.
//!
//! At start: the integrity incidents of earlier boots ([`crate::incidents`]: dm-verity
//! corruptions the kernel left in pstore, journaled before their records are deleted),
//! the bootloader step (finish or undo an install in progress), the policy
//! engine with its `/metrics` listener and its expiry watch (its own task with its own
//! one-second timer, so nothing the daemon waits on delays the fail-secure fallback).
//! Then one select loop with one deadline per concern ([`schedule`]):
//!
//! - policy, every `policy.check_interval`: fetch and offer a newer signed bundle;
//! - check-in, every `install.check_interval`: the attested check-in ([`checkin`],
//!   which carries the queued incidents; devices that do not attest post them),
//!   whose verdict (quarantine) and director assignment are handed to the install in
//!   memory, and which wakes the install;
//! - install, right after each check-in: director root, choice, gates, download,
//!   slot, trial reboot — on the verdict and the assignment of the check-in just made.
//!
//! Concerns due at the same time run in one round, in that order, on one TUF refresh
//! of the image repository (the intervals default to the same value, so by default
//! every round is policy, check-in, install on one refresh). SIGTERM or SIGINT stops
//! the loop wherever it waits; the policy enforcement stays pinned.

pub mod checkin;
pub mod schedule;

use std::sync::Arc;
use std::time::Instant;

use outpost_fsio::sdnotify::{Notice, Notifier};

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::fetch::Fetcher;
use crate::incidents::Incidents;
use crate::install::{Installer, PassResult};
use crate::mode::Passes;
use crate::policy::{self, SharedEngine};
use crate::updater::Updater;
use schedule::{Due, Schedule};

/// Where the daemon's results go (the CLI prints them, as text or JSON lines).
pub trait Output: Send + Sync + 'static {
    /// The outcome of a boot, of an install, or of a rollback about to reboot.
    fn pass(&self, result: &PassResult);
    /// The server's answer to an attested check-in.
    fn verdict(&self, verdict: &outpost_protocol::attest::CheckinVerdict);
}

pub struct Agent {
    config: AgentConfig,
    /// The one HTTP client (metadata, targets, check-ins, reports).
    fetcher: Fetcher,
    installer: Installer,
    /// Integrity incidents of earlier boots not yet delivered.
    incidents: Incidents,
    policy: Option<SharedEngine>,
    output: std::sync::Arc<dyn Output>,
}

impl Agent {
    /// Prepares the state directory, starts the policy engine (and its `/metrics`
    /// listener) when `[policy]` is set, and opens the installer.
    pub async fn start(config: AgentConfig, output: impl Output) -> Result<Self> {
        config.prepare_state()?;
        let policy = policy::start_for(&config);
        if let (Some(engine), Some(p)) = (&policy, config.policy.as_ref()) {
            if let Some(addr) = p.metrics_listen {
                policy::serve_metrics(addr, p.metrics_limits, engine.clone()).await?;
            }
        }
        let fetcher = config.device_fetcher()?;
        let mut installer = Installer::open(&config, fetcher.clone())?;
        let output: std::sync::Arc<dyn Output> = std::sync::Arc::new(output);
        let announce = output.clone();
        installer.announce = Some(Box::new(move |r| announce.pass(r)));
        let mut incidents = Incidents::open(installer.config())?;
        let context = checkin::incident_context(&installer);
        match incidents.collect(&context) {
            Ok(n) if n > 0 => tracing::warn!(new = n, queued = incidents.pending().len(), "integrity incidents of earlier boots queued for the server"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %outpost_protocol::display_chain(&e), "reading the kernel's pstore records failed"),
        }
        Ok(Agent { config, fetcher, installer, incidents, policy, output })
    }

    /// The bootloader step, then rounds until stopped (or one, see [`Passes`]).
    pub async fn run(mut self, passes: Passes) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        // The policy's expiry fallback runs on its own task: a check-in, policy
        // fetch or download that hangs never delays it.
        let _watch = self.policy.as_ref().map(|engine| policy::spawn_expiry_watch(&self.config, engine.clone()));
        // systemd (Type=notify): configuration and state are loaded (Agent::start), so
        // ready; watchdog pings from a task of this runtime; STOPPING=1 on SIGTERM/SIGINT.
        let systemd = Arc::new(Notifier::from_env_or_report(|e| tracing::warn!(error = %e, "not notifying systemd")));
        let report = |e: outpost_fsio::sdnotify::NotifyError| tracing::warn!(error = %e, "notifying systemd failed");
        // READY=1 before the watchdog task exists, so it is the first notice.
        systemd.notify_or_report(Notice::Ready, report);
        let _watchdog = systemd.spawn_watchdog();
        let stopping = || {
            systemd.notify_or_report(Notice::Stopping, report);
            Ok(())
        };
        self.installer.note_crashes(self.incidents.crashes().iter().map(|c| c.describe()).collect());
        if let Some(result) = self.installer.boot().await? {
            self.output.pass(&result);
        }
        if let Err(e) = self.incidents.clear_crashes() {
            tracing::error!(error = %outpost_protocol::display_chain(&e), "cannot journal the crash notes as used");
        }
        let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::Task { task: "SIGTERM handler", reason: e.to_string() })?;
        let policy_every = self.config.policy.as_ref().filter(|_| self.policy.is_some()).map(|p| p.check_interval);
        let mut schedule = Schedule::new(Instant::now(), policy_every, self.config.install.check_interval);
        loop {
            let due = schedule.due(Instant::now());
            if due.any() {
                tokio::select! {
                    r = self.round(due, passes) => r?,
                    _ = term.recv() => return stopping(),
                    _ = tokio::signal::ctrl_c() => return stopping(),
                }
                if passes == Passes::Once {
                    return Ok(());
                }
                schedule.ran(due, Instant::now());
            }
            tokio::select! {
                _ = tokio::time::sleep_until(schedule.next().into()) => {}
                _ = term.recv() => return stopping(),
                _ = tokio::signal::ctrl_c() => return stopping(),
            }
        }
    }

    /// The concerns `due` now, in order, on one TUF refresh (see the module header).
    async fn round(&mut self, due: Due, passes: Passes) -> Result<()> {
        // A device whose client certificate expired (offline past its lifetime) checks
        // in first: the check-in renews it, and a server that serves target files to
        // certificate holders only would refuse the policy bundle or release otherwise.
        let now = chrono::Utc::now().timestamp();
        let renew_first = due.checkin && self.installer.attesting() && self.fetcher.identity().is_some_and(|i| i.expired(now));
        if renew_first {
            self.installer.flush_reports().await;
            self.checkin().await;
        }
        // The first step that needs the metadata refreshes it; the others reuse it.
        let mut updater = Updater::for_agent(&self.config, self.fetcher.clone());
        if let (true, Some(engine)) = (due.policy, &self.policy) {
            policy::step(&self.config, engine, updater.as_mut().map_err(|e| &*e)).await;
        }
        if due.checkin {
            self.installer.flush_reports().await;
            if !self.installer.attesting() {
                let c = self.installer.config();
                self.incidents.flush_unattested(self.fetcher.client(), &c.server_url, c.http_timeout).await;
            }
            if !renew_first {
                self.checkin().await;
            }
            self.install(updater, passes).await?;
            self.installer.flush_reports().await;
        }
        Ok(())
    }

    /// The attested check-in (enrolled devices only); a failure is logged, the install
    /// it wakes acts on the last verdict the installer holds.
    async fn checkin(&mut self) {
        match checkin::checkin(&mut self.installer, &mut self.incidents, &self.fetcher).await {
            Ok(Some(v)) => self.output.verdict(&v),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %outpost_protocol::display_chain(&e), "attested check-in failed"),
        }
    }

    /// The round's TUF client, or a new one (which refreshes again) when metadata it
    /// loaded at the start of the round has expired since: a slow policy download or
    /// check-in must not stretch how long expired metadata is acted on.
    fn still_fresh(&self, updater: Updater) -> Result<Updater> {
        match updater.trusted().expired_at(chrono::Utc::now()) {
            None => Ok(updater),
            Some((role, expires)) => {
                tracing::warn!(%role, %expires, "metadata loaded at the start of this round has expired since: refreshing again");
                Updater::for_agent(&self.config, self.fetcher.clone())
            }
        }
    }

    /// The install step on the round's TUF client; with [`Passes::Once`] its error is
    /// the daemon's, otherwise it is logged.
    async fn install(&mut self, updater: Result<Updater>, passes: Passes) -> Result<()> {
        let installed = match updater.map(|u| self.still_fresh(u)) {
            Ok(Ok(mut updater)) => self.installer.check_and_install(&mut updater).await,
            Ok(Err(e)) | Err(e) => Err(e),
        };
        match installed {
            Ok(result) => self.output.pass(&result),
            Err(e) if passes == Passes::Once => return Err(e),
            Err(e) => tracing::error!(error = %outpost_protocol::display_chain(&e), "update check failed"),
        }
        Ok(())
    }
}
