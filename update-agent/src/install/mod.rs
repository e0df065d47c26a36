//! The install pipeline on the device: check → refresh TUF → choose the release →
//! download (resumable, streaming, delta when possible) → verify → write the inactive
//! slot → trial boot → health checks → commit, or roll back and report.
//!
//! Every step is journaled before and after it happens, and every step is safe to
//! repeat, so a power cut at any instant leaves the active slot verified and the next
//! start continues or undoes the install.
//!
//! Rooms: [`select`] (which release), [`gates`] (SBOM and deny-list), [`download`]
//! (staging the image, over [`transfer`]), [`slot`] (writing the inactive slot),
//! [`stream`] (a partition slot: the image streamed into it, no staged copy),
//! [`trial`] (boot reconciliation, trial, commit, rollback), [`journal`] (where an
//! install stands). This module holds the installer and the pass that ties them.

mod download;
mod gates;
pub mod journal;
pub mod select;
mod partial;
mod slot;
mod stream;
pub mod transfer;
mod trial;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::boot::file::FileBootControl;
use crate::boot::grub::GrubBootControl;
use crate::boot::{BootControl, Slot};
use crate::config::{AgentConfig, BootBackend};
use crate::error::{AgentError, Result};
use crate::fetch::Fetcher;
use crate::updater::{TargetInfo, Updater};
use journal::{Journal, JournalFile, Phase, Release};
use select::{agrees, choose, release_of, versus_running, Candidate, Order, Pick, Versus};
use slot::hash_file;

pub use outpost_protocol::report::{InstallReport as Report, ReportOutcome};

/// What one check-and-install pass ended with (for `--json` and the caller).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PassResult {
    UpToDate { version: Option<String> },
    SkippedFailedRelease { version: String },
    Committed { version: String, slot: Slot },
    RolledBack { version: String, reason: String },
    /// The server's attestation verdict quarantined this device: nothing is installed.
    Quarantined { reason: String },
    /// The signed vulnerability deny-list says the newest release is affected.
    RefusedVulnerable { version: String, advisories: Vec<String> },
    /// The director assigns this device nothing new: it stays on what it runs.
    NoAssignment { version: Option<String> },
}

pub struct Installer {
    config: AgentConfig,
    boot: Box<dyn BootControl>,
    journal_file: JournalFile,
    journal: Journal,
    fetcher: Fetcher,
    /// What the boot step measured into the TPM this boot (with a `[tpm]` config).
    measured: Option<outpost_protocol::attest::MeasurementEvent>,
    /// Why the server quarantined this device, from the last check-in.
    quarantine: Option<String>,
    /// The slot the running system booted from (set by the boot step).
    booted: Option<crate::boot::Slot>,
    /// The director targets this pass's check-in accepted (also kept on disk for
    /// restarts), handed to the install step in memory.
    director_targets: Option<String>,
    /// Called with results that would otherwise be lost to a reboot.
    pub announce: Option<Box<dyn Fn(&PassResult) + Send>>,
    /// Kernel panics recorded since the agent last ran (pstore), for the reason of a
    /// rollback whose trial boots never came back.
    crash_notes: Vec<String>,
}

impl Installer {
    /// Opens the installer's journal and boot control. `fetcher` is the agent's shared
    /// HTTP client.
    pub fn open(config: &AgentConfig, fetcher: Fetcher) -> Result<Self> {
        let boot: Box<dyn BootControl> = match &config.install.boot_backend {
            BootBackend::File => Box::new(FileBootControl::open(&config.boot_dir())?),
            BootBackend::Grub { env, slot_a, slot_b, cmdline, .. } => Box::new(GrubBootControl::open(env, slot_a, slot_b, cmdline)?),
        };
        let journal_file = JournalFile::new(&config.state_dir.join("journal.json"));
        let journal = match journal_file.load() {
            Ok(j) => j,
            Err(AgentError::Corrupt { path, reason }) => {
                // Never guess from a corrupt journal: set it aside, keep the active
                // slot (verified when it was committed) and start over from idle.
                let aside = PathBuf::from(format!("{}.corrupt-{}", path.display(), chrono::Utc::now().timestamp()));
                tracing::error!(path = %path.display(), %reason, aside = %aside.display(), "install journal is corrupt; starting from idle on the active slot");
                std::fs::rename(&path, &aside).map_err(|e| AgentError::io("set aside corrupt journal", &path, e))?;
                Journal::default()
            }
            Err(e) => return Err(e),
        };
        let mut config = config.clone();
        if let Some(identity) = crate::attest::Identity::load(&config)? {
            // Enrolled: the TPM-derived id names this device everywhere.
            config.device_id = identity.device_id;
        }
        Ok(Installer { config, boot, journal_file, journal, fetcher, measured: None, quarantine: None, booted: None, director_targets: None, announce: None, crash_notes: Vec::new() })
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn set_phase(&mut self, phase: Phase) -> Result<()> {
        tracing::info!(from = self.journal.phase.name(), to = phase.name(), "install phase");
        self.journal.phase = phase;
        self.journal_file.store(&self.journal)?;
        self.write_metrics(None);
        Ok(())
    }

    /// Is this device enrolled and attesting (reports then travel in check-ins)?
    pub fn attesting(&self) -> bool {
        self.config.tpm.is_some() && crate::attest::Identity::path(&self.config).exists()
    }

    /// Takes up an enrollment made while this installer was open (`outpost-agent
    /// enroll` beside the running daemon): from then on the TPM-derived id names the
    /// device — the director signs its targets for that id — and the reports it queued
    /// under its configured name are this device's under the new one (a check-in
    /// refuses reports that name another device).
    pub fn take_up_enrollment(&mut self) -> Result<()> {
        if self.config.tpm.is_none() {
            return Ok(());
        }
        let Some(identity) = crate::attest::Identity::load(&self.config)? else { return Ok(()) };
        if identity.device_id == self.config.device_id {
            return Ok(());
        }
        tracing::info!(from = %self.config.device_id, to = %identity.device_id, "enrolled while running: the device is now named by its enrollment");
        for report in &mut self.journal.pending_reports {
            report.device_id.clone_from(&identity.device_id);
        }
        self.journal_file.store(&self.journal)?;
        self.config.device_id = identity.device_id;
        Ok(())
    }

    /// The installer's configuration (the device id is the TPM-derived one once
    /// enrolled).
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The slot the device booted from.
    pub fn active_slot(&self) -> Result<Slot> {
        Ok(self.boot.state()?.active)
    }

    /// The first `sent` queued reports reached the server (in a check-in): they leave
    /// the journal's queue.
    pub fn reports_sent(&mut self, sent: usize) -> Result<()> {
        if sent > 0 {
            self.journal.pending_reports.drain(..sent);
            self.journal_file.store(&self.journal)?;
        }
        Ok(())
    }

    /// The last attested check-in's quarantine (None: not quarantined): while set, the
    /// install step installs nothing.
    pub fn set_quarantine(&mut self, reason: Option<String>) {
        self.quarantine = reason;
    }

    /// The director targets an attested check-in just accepted, for the next install
    /// step (which verifies them again under the director root it syncs).
    pub fn hand_director_targets(&mut self, text: String) {
        self.director_targets = Some(text);
    }

    /// Sends queued reports; they stay queued while the server is unreachable.
    /// (Enrolled devices send them in attested check-ins instead.)
    pub async fn flush_reports(&mut self) {
        if self.journal.pending_reports.is_empty() || self.attesting() {
            return;
        }
        let sent = crate::report::send(self.fetcher.client(), &self.config.server_url, self.config.http_timeout, &self.journal.pending_reports).await;
        self.journal.pending_reports.drain(..sent);
        if sent > 0 {
            if let Err(e) = self.journal_file.store(&self.journal) {
                tracing::error!(error = %e, "cannot journal sent reports");
            }
        }
    }

    /// Reboots into the slot the bootloader chooses. With the file backend the agent
    /// restarts itself in place (same PID, fresh process image) and the next start
    /// runs the bootloader step; with a real bootloader the machine reboots.
    fn reboot<T>(&self) -> Result<T> {
        use std::os::unix::process::CommandExt;
        tracing::info!("rebooting");
        if self.boot.reboot_kind() == crate::boot::Reboot::Machine {
            return Err(crate::boot::reboot::machine());
        }
        let exe = std::env::current_exe().map_err(|e| AgentError::io("find own executable", "/proc/self/exe", e))?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let err = std::process::Command::new(exe).args(args).exec();
        Err(AgentError::io("re-exec for reboot", "/proc/self/exe", err))
    }

    /// One update check: refresh (unless `updater` already did this pass), choose, and
    /// install when a newer release exists.
    pub async fn check_and_install(&mut self, updater: &mut Updater) -> Result<PassResult> {
        if let Some(reason) = &self.quarantine {
            // The server assigns nothing to a quarantined device; it installs nothing.
            tracing::warn!(%reason, "quarantined by the server; not installing");
            return Ok(PassResult::Quarantined { reason: reason.clone() });
        }
        updater.refresh().await?;
        let directed = self.directed(updater).await?;
        if matches!(directed, Some(None)) && self.journal.running.is_some() {
            return Ok(self.no_assignment());
        }
        let class = self.config.hardware_class.to_string();
        let infos = updater.targets_under(&["firmware", &class]).await?;
        let assignment = match directed {
            None => None,
            Some(Some(a)) => Some(a),
            Some(None) => {
                // Nothing assigned: learn which signed release the active slot holds
                // (a fresh device, or a recovered journal), so check-ins name it.
                self.adopt_held_release(infos, "the active slot holds a signed release")?;
                return Ok(self.no_assignment());
            }
        };
        let cand = self.candidate(infos.clone(), assignment.as_ref())?;
        let release = release_of(&cand);
        let components = match &cand.sbom {
            Some(info) => Some(self.verify_sbom(updater, info, &release).await?),
            None => None,
        };
        if self.journal.running.is_none() && assignment.is_some() {
            // A device without a journal (fresh, or its state lost) still has a floor:
            // the signed release its active slot holds, proven by measuring it.
            self.adopt_held_release(infos, "the active slot holds a signed release: it is this device's version floor")?;
        }
        if let Some(settled) = self.settled(&cand, &release, Order::of(assignment.as_ref()))? {
            return Ok(settled);
        }
        if let Some(components) = &components {
            if let Some(refused) = self.deny_list_gate(updater, components, &release).await? {
                return Ok(refused);
            }
        }
        // Install only from a state the TPM vouches for: PCR = replayed log, and the
        // measured boot = the running release's expected measurement.
        crate::attest::self_check(&self.config, self.journal.running.as_ref().map(|r| r.sha256.as_str())).await?;
        self.install(updater, cand, release).await
    }

    /// What the director says for this device: None when it follows no director (not
    /// enrolled), `Some(None)` when the director assigns nothing (yet).
    async fn directed(&mut self, updater: &mut Updater) -> Result<Option<Option<outpost_protocol::director::Assignment>>> {
        if crate::director::pinned(&self.config)?.is_none() {
            return Ok(None);
        }
        // A newer director root (a rotated director key) is learned here.
        let root = crate::director::sync_root(&self.config, updater).await?;
        // What this pass's check-in accepted comes in memory; otherwise what an earlier
        // one kept. Verified again under the root just synced.
        let view = match self.director_targets.take() {
            Some(text) => Some(crate::director::verify(&root, text.as_bytes(), &self.config.device_id, chrono::Utc::now())?),
            None => crate::director::current(&self.config, &root, &self.config.device_id, chrono::Utc::now())?,
        };
        Ok(Some(view.and_then(|v| v.assignment)))
    }

    fn no_assignment(&self) -> PassResult {
        let version = self.journal.running.as_ref().map(|r| r.version.clone());
        self.write_metrics(None);
        PassResult::NoAssignment { version }
    }

    /// Learns the signed release the active slot holds (measured, see
    /// [`Installer::held_release`]) as the running one, when there is one.
    fn adopt_held_release(&mut self, infos: Vec<TargetInfo>, why: &str) -> Result<()> {
        if let Some(held) = self.held_release(infos)? {
            tracing::info!(version = %held.version, "{why}");
            self.journal.running = Some(release_of(&held));
            self.set_phase(Phase::Idle)?;
        }
        Ok(())
    }

    /// The release to consider: the director's assignment (which the image repository
    /// must sign, and agree with), else the newest.
    fn candidate(&self, infos: Vec<TargetInfo>, assignment: Option<&outpost_protocol::director::Assignment>) -> Result<Candidate> {
        let pick = assignment.map(|a| Pick::Path(&a.path)).unwrap_or(Pick::Newest);
        let Some(cand) = choose(infos, &self.config, pick)? else {
            let class = self.config.hardware_class.to_string();
            if let Some(a) = assignment {
                return Err(AgentError::Director(format!(
                    "the director assigns {}, which the image repository does not sign as a full firmware image for hardware class {class}",
                    a.path
                )));
            }
            return Err(AgentError::NoFirmware { class });
        };
        if let Some(a) = assignment {
            agrees(a, &cand, &self.config)?;
        }
        Ok(cand)
    }

    /// The pass's result when the candidate needs no install: the device runs it (or
    /// a newer one it keeps), the active slot already holds it, or it was rolled back
    /// here before.
    fn settled(&mut self, cand: &Candidate, release: &Release, order: Order) -> Result<Option<PassResult>> {
        if let Some(running) = &self.journal.running {
            if versus_running(&running.version, &cand.custom, order)? == Versus::UpToDate {
                let version = Some(running.version.clone());
                self.write_metrics(None);
                return Ok(Some(PassResult::UpToDate { version }));
            }
        } else {
            // A fresh or recovered journal: what the active slot holds is a fact.
            let active = self.boot.slot_path(self.boot.state()?.active);
            if hash_file(&active, Some(release.length)).is_ok_and(|(sha, len)| sha == release.sha256 && len == release.length) {
                tracing::info!(version = %release.version, "the active slot already holds the newest release");
                self.journal.running = Some(release.clone());
                self.set_phase(Phase::Idle)?;
                return Ok(Some(PassResult::UpToDate { version: Some(release.version.clone()) }));
            }
        }
        if self.journal.failed.contains(release) {
            tracing::info!(version = %release.version, "newest release was rolled back on this device; waiting for a newer one");
            return Ok(Some(PassResult::SkippedFailedRelease { version: release.version.clone() }));
        }
        Ok(None)
    }

    /// Puts the image into the inactive slot (a partition: streamed into it while it
    /// downloads; a file: staged, then copied), arms the trial and reboots.
    async fn install(&mut self, updater: &Updater, cand: Candidate, release: Release) -> Result<PassResult> {
        let slot = self.boot.state()?.active.other();
        let slot_path = self.boot.slot_path(slot);
        let slot = match slot::SlotKind::of(&slot_path)? {
            slot::SlotKind::Partition { size } => {
                self.stream_into_partition(updater, &cand, &release, slot, &slot_path, size).await?;
                self.set_phase(Phase::Installed { release: release.clone(), slot })?;
                slot
            }
            slot::SlotKind::File => {
                let image_path = self.stage(updater, &cand, &release).await?;
                let slot = self.write_inactive_slot(&release, &image_path)?;
                self.set_phase(Phase::Installed { release: release.clone(), slot })?;
                let _ = std::fs::remove_file(&image_path);
                slot
            }
        };
        self.arm_trial(&release, slot)?;
        self.reboot()
    }

    /// Arms the trial of `slot`, which holds `release`: first its signed dm-verity
    /// parameters go where the bootloader passes them to the slot's kernel.
    /// Kernel panics the kernel recorded in boots since the agent last ran (one line
    /// each, naming its record), given before the boot step: a trial whose attempts ran
    /// out is rolled back with them in its reason.
    pub fn note_crashes(&mut self, notes: Vec<String>) {
        self.crash_notes = notes;
    }

    fn arm_trial(&mut self, release: &Release, slot: Slot) -> Result<()> {
        if let Some(v) = &release.verity {
            v.validate(release.length).map_err(|e| AgentError::BootControl(format!("release {}: signed dm-verity parameters: {e}", release.version)))?;
        }
        self.boot.set_slot_verity(slot, release.verity.as_ref())?;
        self.boot.set_trial(slot, self.config.install.trial_attempts)
    }

    fn write_metrics(&self, progress: Option<(u64, u64)>) {
        write_metrics_file(&self.config.state_dir.join("metrics.prom"), &self.journal, progress);
    }
}

/// The installer's state for node_exporter's textfile collector (see
/// [`crate::metrics::write_install_textfile`]).
fn write_metrics_file(path: &Path, journal: &Journal, progress: Option<(u64, u64)>) {
    let running = journal.running.as_ref().map(|r| (r.version.as_str(), r.sha256.as_str()));
    crate::metrics::write_install_textfile(path, journal.phase.name(), running, journal.failed.len() as u64, progress);
}

