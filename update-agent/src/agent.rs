//! The device daemon (`outpost-agent run`): the [`Agent`] owns the agent's one HTTP
//! client, the installer and the policy engine, and runs them in passes.
//!
//! At start: the bootloader step (finish or undo an install in progress), the policy
//! engine with its `/metrics` listener and its expiry watch (its own task with its own
//! one-second timer, so nothing a pass waits on delays the fail-secure fallback). Then
//! one pass every `install.check_interval`:
//!
//! 1. one TUF refresh of the image repository, shared by the steps below;
//! 2. policy: fetch and offer a newer signed bundle;
//! 3. check-in: the attested check-in, whose verdict (quarantine) and director
//!    assignment are handed to the install step in memory;
//! 4. install: director root, choice, gates, download, slot, trial reboot.
//!
//! The steps of a pass stay in this order, one after the other: the install acts on
//! the verdict and the assignment of the check-in just made, and on the metadata the
//! pass refreshed once.

use crate::config::AgentConfig;
use crate::error::Result;
use crate::fetch::Fetcher;
use crate::install::{Installer, PassResult};
use crate::policy::{self, SharedEngine};
use crate::updater::Updater;

/// Where the daemon's results go (the CLI prints them, as text or JSON lines).
pub trait Output: Send + Sync + 'static {
    /// The outcome of a boot, of an install pass, or of a rollback about to reboot.
    fn pass(&self, result: &PassResult);
    /// The server's answer to an attested check-in.
    fn verdict(&self, verdict: &outpost_protocol::attest::CheckinVerdict);
}

/// How long the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passes {
    /// Until the process is stopped, one pass every `install.check_interval`.
    Forever,
    /// One pass (and the installs and reboots it leads to); its install error is the
    /// daemon's error.
    Once,
}

pub struct Agent {
    config: AgentConfig,
    /// The one HTTP client (metadata, targets, check-ins, reports).
    fetcher: Fetcher,
    installer: Installer,
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
        let fetcher = Fetcher::new(config.http_limits())?;
        let mut installer = Installer::open(&config, fetcher.clone())?;
        let output: std::sync::Arc<dyn Output> = std::sync::Arc::new(output);
        let announce = output.clone();
        installer.announce = Some(Box::new(move |r| announce.pass(r)));
        Ok(Agent { config, fetcher, installer, policy, output })
    }

    /// The bootloader step, then passes until stopped (or one, see [`Passes`]).
    pub async fn run(mut self, passes: Passes) -> Result<()> {
        // The policy's expiry fallback runs on its own task: a check-in, policy
        // fetch or download that hangs never delays it.
        let _watch = self.policy.as_ref().map(|engine| policy::spawn_expiry_watch(&self.config, engine.clone()));
        if let Some(result) = self.installer.boot().await? {
            self.output.pass(&result);
        }
        loop {
            self.pass(passes).await?;
            if passes == Passes::Once {
                return Ok(());
            }
            tokio::time::sleep(self.config.install.check_interval).await;
        }
    }

    /// One pass: one TUF refresh, then policy, check-in and install (see the module
    /// header).
    async fn pass(&mut self, passes: Passes) -> Result<()> {
        // The first step that needs the metadata refreshes it; the others reuse it.
        let mut updater = Updater::for_agent(&self.config, self.fetcher.clone());
        if let Some(engine) = &self.policy {
            policy::step(&self.config, engine, updater.as_mut().map_err(|e| &*e)).await;
        }
        self.installer.flush_reports().await;
        self.checkin().await;
        let installed = match updater {
            Ok(mut updater) => self.installer.check_and_install(&mut updater).await,
            Err(e) => Err(e),
        };
        match installed {
            Ok(result) => self.output.pass(&result),
            Err(e) if passes == Passes::Once => return Err(e),
            Err(e) => tracing::error!(error = %outpost_protocol::display_chain(&e), "update check failed"),
        }
        self.installer.flush_reports().await;
        Ok(())
    }

    /// The attested check-in (enrolled devices only); a failure is logged, the pass
    /// goes on.
    async fn checkin(&mut self) {
        match self.installer.checkin().await {
            Ok(Some(v)) => self.output.verdict(&v),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %outpost_protocol::display_chain(&e), "attested check-in failed"),
        }
    }
}
