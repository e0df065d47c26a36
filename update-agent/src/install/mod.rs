//! The install pipeline on the device: check → refresh TUF → choose the release →
//! download (resumable, streaming, delta when possible) → verify → write the inactive
//! slot → trial boot → health checks → commit, or roll back and report.
//!
//! Every step is journaled before and after it happens, and every step is safe to
//! repeat, so a power cut at any instant leaves the active slot verified and the next
//! start continues or undoes the install.

pub mod journal;
pub mod transfer;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_protocol::release::{Encoding as SignedEncoding, FirmwareCustom, HealthCheck, ReleaseVersion};
use outpost_protocol::tuf::quote_file_name;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::boot::file::FileBootControl;
use crate::boot::grub::GrubBootControl;
use crate::config::BootBackend;
use crate::boot::{BootControl, BootOutcome, Slot};
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::fetch::Fetcher;
use crate::health::{self, BootFacts};
use crate::updater::{TargetInfo, Updater};
use journal::{Encoding, Journal, JournalFile, Phase, Release, Transfer};
use transfer::{TransferOptions, TransferSpec, TransferStats};

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
    /// Called with results that would otherwise be lost to a reboot.
    pub announce: Option<Box<dyn Fn(&PassResult) + Send>>,
}

/// Signed facts about one release version, gathered from its targets.
struct Candidate {
    version: ReleaseVersion,
    full: TargetInfo,
    custom: FirmwareCustom,
    deltas: Vec<(TargetInfo, FirmwareCustom)>,
    /// The signed SBOM target the release names.
    sbom: Option<TargetInfo>,
}

impl Installer {
    pub fn open(config: &AgentConfig) -> Result<Self> {
        let boot: Box<dyn BootControl> = match &config.install.boot_backend {
            BootBackend::File => Box::new(FileBootControl::open(&config.boot_dir())?),
            BootBackend::Grub { env, slot_a, slot_b } => Box::new(GrubBootControl::open(env, slot_a, slot_b)?),
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
        let fetcher = Fetcher::new(config.http_limits())?;
        Ok(Installer { config, boot, journal_file, journal, fetcher, measured: None, quarantine: None, announce: None })
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

    /// Power-on: the bootloader chooses a slot; reconcile the journal with it.
    /// Returns the result when the boot concluded an install (commit or rollback).
    pub async fn boot(&mut self) -> Result<Option<PassResult>> {
        let outcome = self.boot.boot()?;
        tracing::info!(?outcome, phase = self.journal.phase.name(), "booted");
        let booted = outcome.booted();
        // How much of the slot the image is: the release on trial there, else the one
        // running (a partition is larger than its image); unknown: the whole slot.
        let expected_length = match &self.journal.phase {
            Phase::Installed { release, slot } | Phase::TrialBoot { release, slot } if *slot == booted => Some(release.length),
            _ => self.journal.running.as_ref().map(|r| r.length),
        };
        self.measured = crate::attest::measure_boot(&self.config, &booted.to_string(), &self.boot.slot_path(booted), expected_length).await?;
        let phase = self.journal.phase.clone();
        match (phase, outcome) {
            (Phase::Installed { release, slot } | Phase::TrialBoot { release, slot }, BootOutcome::Trial { slot: booted, .. })
                if booted == slot =>
            {
                self.set_phase(Phase::TrialBoot { release: release.clone(), slot })?;
                Ok(Some(self.trial(release, slot).await?))
            }
            (Phase::Installed { release, slot } | Phase::TrialBoot { release, slot }, BootOutcome::TrialExhausted { .. }) => {
                let reason = format!("trial boot of slot {slot} was not confirmed before its boot attempts ran out");
                Ok(Some(self.roll_back(release, slot, reason, false)?))
            }
            (Phase::Installed { slot, .. }, BootOutcome::Normal { .. }) => {
                // Power cut between journaling Installed and arming the trial.
                self.boot.set_trial(slot, self.config.install.trial_attempts)?;
                self.reboot()
            }
            (Phase::TrialBoot { release, slot }, BootOutcome::Normal { slot: booted }) if booted == slot => {
                // Power cut between mark_good and journaling the commit.
                Ok(Some(self.commit(release, slot)?))
            }
            (Phase::TrialBoot { release, slot }, BootOutcome::Normal { .. }) => {
                let reason = "trial ended without confirmation (interrupted while rolling back)".to_owned();
                Ok(Some(self.roll_back(release, slot, reason, false)?))
            }
            (Phase::RolledBack { .. }, BootOutcome::Trial { .. }) => {
                // Power cut between journaling the rollback and cancelling the trial.
                self.boot.cancel_trial()?;
                self.reboot()
            }
            _ => Ok(None),
        }
    }

    async fn trial(&mut self, release: Release, slot: Slot) -> Result<PassResult> {
        let slot_path = self.boot.slot_path(slot);
        // What booted must be what was signed, byte for byte. With a TPM, the digest
        // is the one the boot step measured into it.
        let measured = self.measured.as_ref().filter(|e| e.slot == slot.to_string()).map(|e| (e.sha256.clone(), e.length));
        let (sha, len) = match &measured {
            Some(m) => m.clone(),
            None => hash_file(&slot_path, Some(release.length))?,
        };
        if sha != release.sha256 || len != release.length {
            let reason = if measured.is_some() {
                format!("measured boot digest {sha} of slot {slot} ({len} bytes) is not the release's expected measurement {}", release.sha256)
            } else {
                format!("booted slot {slot} holds {len} bytes with sha256 {sha}, not the signed image {}", release.sha256)
            };
            return self.roll_back(release, slot, reason, true);
        }
        let mut checks: Vec<HealthCheck> = self.config.health.clone();
        checks.extend(release.health.iter().cloned());
        let deadline = match release.trial_deadline_secs {
            Some(secs) => self.config.install.trial_deadline.min(std::time::Duration::from_secs(secs)),
            None => self.config.install.trial_deadline,
        };
        let facts = BootFacts {
            slot: slot.to_string(),
            slot_path: slot_path.display().to_string(),
            version: release.version.clone(),
            target: release.target.clone(),
        };
        match health::run_all(&checks, &facts, deadline).await {
            Ok(()) => {
                self.boot.mark_good(slot)?;
                self.commit(release, slot)
            }
            Err(e) => self.roll_back(release, slot, e.to_string(), true),
        }
    }

    fn commit(&mut self, release: Release, slot: Slot) -> Result<PassResult> {
        self.journal.running = Some(release.clone());
        self.queue_report(&release, slot, ReportOutcome::Committed, None);
        self.set_phase(Phase::Committed { release: release.clone(), slot })?;
        tracing::info!(version = %release.version, %slot, "committed");
        Ok(PassResult::Committed { version: release.version, slot })
    }

    fn roll_back(&mut self, release: Release, slot: Slot, reason: String, reboot: bool) -> Result<PassResult> {
        tracing::warn!(version = %release.version, %slot, %reason, "rolling back");
        if !self.journal.failed.contains(&release) {
            self.journal.failed.push(release.clone());
        }
        self.queue_report(&release, slot, ReportOutcome::RolledBack, Some(reason.clone()));
        self.set_phase(Phase::RolledBack { release: release.clone(), slot, reason: reason.clone() })?;
        self.boot.cancel_trial()?;
        let result = PassResult::RolledBack { version: release.version, reason };
        if reboot && self.boot.state()?.active != slot {
            // Running from the trial slot: say so, then boot the previous one.
            if let Some(announce) = &self.announce {
                announce(&result);
            }
            return self.reboot();
        }
        Ok(result)
    }

    fn queue_report(&mut self, release: &Release, slot: Slot, outcome: ReportOutcome, reason: Option<String>) {
        self.journal.pending_reports.push(Report {
            device_id: self.config.device_id.clone(),
            hardware_class: self.config.hardware_class.to_string(),
            target: release.target.clone(),
            version: release.version.clone(),
            outcome,
            reason,
            slot: slot.to_string(),
            at: chrono::Utc::now().to_rfc3339(),
        });
    }

    /// Is this device enrolled and attesting (reports then travel in check-ins)?
    pub fn attesting(&self) -> bool {
        self.config.tpm.is_some() && crate::attest::Identity::path(&self.config).exists()
    }

    /// An attested check-in with the device's state and queued install reports (which
    /// the quote then vouches for). Returns None when the device is not enrolled.
    pub async fn checkin(&mut self) -> Result<Option<outpost_protocol::attest::CheckinVerdict>> {
        if !self.attesting() {
            return Ok(None);
        }
        use outpost_protocol::attest::DeviceHealth;
        let health = match &self.journal.phase {
            Phase::Idle | Phase::Committed { .. } => DeviceHealth::Healthy,
            Phase::Downloading { .. } | Phase::Verified { .. } | Phase::Writing { .. } | Phase::Installed { .. } => DeviceHealth::Updating,
            Phase::TrialBoot { .. } => DeviceHealth::Trial,
            Phase::RolledBack { .. } => DeviceHealth::RolledBack,
        };
        let state = crate::attest::DeviceState {
            slot: self.boot.state()?.active.to_string(),
            version: self.journal.running.as_ref().map(|r| r.version.clone()),
            sbom_sha256: self.journal.running.as_ref().and_then(|r| r.sbom_sha256.clone()),
            health,
            reports: self.journal.pending_reports.clone(),
        };
        let verdict = crate::attest::checkin(&self.config, &state).await?;
        if !state.reports.is_empty() {
            self.journal.pending_reports.drain(..state.reports.len());
            self.journal_file.store(&self.journal)?;
        }
        self.quarantine = verdict.quarantined.then(|| verdict.reason.clone().unwrap_or_else(|| "attestation failed".into()));
        if let (Some(text), Some(root)) = (&verdict.director_targets, crate::director::pinned(&self.config)?) {
            let view = crate::director::accept(&self.config, &root, &self.config.device_id, text, chrono::Utc::now())?;
            match &view.assignment {
                Some(a) => tracing::info!(version = %a.custom.version, rollout = %a.custom.rollout_id, wave = a.custom.wave, rollback = a.custom.rollback, director_version = view.version, "director assignment"),
                None => tracing::info!(director_version = view.version, "director assigns nothing new"),
            }
        }
        Ok(Some(verdict))
    }

    /// Sends queued reports; they stay queued while the server is unreachable.
    /// (Enrolled devices send them in attested check-ins instead.)
    pub async fn flush_reports(&mut self) {
        if self.journal.pending_reports.is_empty() || self.attesting() {
            return;
        }
        let url = format!("{}/api/v1/reports", self.config.server_url);
        let client = reqwest::Client::new();
        let mut sent = 0;
        for report in &self.journal.pending_reports {
            let res = tokio::time::timeout(self.config.http_timeout, client.post(&url).json(report).send()).await;
            match res {
                Ok(Ok(r)) if r.status().is_success() => sent += 1,
                Ok(Ok(r)) => {
                    tracing::warn!(status = %r.status(), "server refused install report");
                    break;
                }
                _ => {
                    tracing::warn!("server unreachable; install reports stay queued");
                    break;
                }
            }
        }
        self.journal.pending_reports.drain(..sent);
        if sent > 0 {
            if let Err(e) = self.journal_file.store(&self.journal) {
                tracing::error!(error = %e, "cannot journal sent reports");
            }
        }
    }

    /// "Reboot" for the file backend: the agent restarts itself in place (same PID,
    /// fresh process image) and the next start runs the bootloader step.
    fn reboot<T>(&self) -> Result<T> {
        use std::os::unix::process::CommandExt;
        tracing::info!("rebooting");
        let exe = std::env::current_exe().map_err(|e| AgentError::io("find own executable", "/proc/self/exe", e))?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let err = std::process::Command::new(exe).args(args).exec();
        Err(AgentError::io("re-exec for reboot", "/proc/self/exe", err))
    }

    fn metadata_url(&self) -> String {
        format!("{}/metadata/", self.config.server_url)
    }

    /// One update check: refresh, choose, and install when a newer release exists.
    pub async fn check_and_install(&mut self) -> Result<PassResult> {
        if let Some(reason) = &self.quarantine {
            // The server assigns nothing to a quarantined device; it installs nothing.
            tracing::warn!(%reason, "quarantined by the server; not installing");
            return Ok(PassResult::Quarantined { reason: reason.clone() });
        }
        // An enrolled device installs only what the director assigns it (and the image
        // repository signs); one that follows no director takes the newest release.
        let mut updater = Updater::new(&self.config.metadata_dir(), &self.metadata_url(), self.fetcher.clone(), chrono::Utc::now())?;
        updater.refresh().await?;
        let directed = match crate::director::pinned(&self.config)? {
            None => None,
            Some(_) => {
                // A newer director root (a rotated director key) is learned here.
                let root = crate::director::sync_root(&self.config, &mut updater).await?;
                Some(crate::director::current(&self.config, &root, &self.config.device_id, chrono::Utc::now())?.and_then(|v| v.assignment))
            }
        };
        if matches!(directed, Some(None)) && self.journal.running.is_some() {
            let version = self.journal.running.as_ref().map(|r| r.version.clone());
            self.write_metrics(None);
            return Ok(PassResult::NoAssignment { version });
        }
        let class = self.config.hardware_class.to_string();
        let infos = updater.targets_under(&["firmware", &class]).await?;
        let infos_all = infos.clone();
        let assignment = match directed {
            None => None,
            Some(Some(a)) => Some(a),
            Some(None) => {
                // Nothing assigned: learn which signed release the active slot holds
                // (a fresh device, or a recovered journal), so check-ins name it.
                if let Some(cand) = self.held_release(infos)? {
                    tracing::info!(version = %cand.version, "the active slot holds a signed release");
                    self.journal.running = Some(release_of(&cand));
                    self.set_phase(Phase::Idle)?;
                }
                let version = self.journal.running.as_ref().map(|r| r.version.clone());
                self.write_metrics(None);
                return Ok(PassResult::NoAssignment { version });
            }
        };
        let pick = assignment.as_ref().map(|a| Pick::Path(&a.path)).unwrap_or(Pick::Newest);
        let Some(cand) = choose(infos, &self.config, pick)? else {
            if let Some(a) = &assignment {
                return Err(AgentError::Director(format!(
                    "the director assigns {}, which the image repository does not sign as a full firmware image for hardware class {class}",
                    a.path
                )));
            }
            return Err(AgentError::NoFirmware { class });
        };
        let rollback = match &assignment {
            Some(a) => {
                agrees(a, &cand, &self.config)?;
                a.custom.rollback
            }
            None => false,
        };
        let release = release_of(&cand);
        let components = match &cand.sbom {
            Some(info) => Some(self.verify_sbom(&updater, info, &release).await?),
            None => None,
        };
        if self.journal.running.is_none() && assignment.is_some() {
            // A device without a journal (fresh, or its state lost) still has a floor:
            // the signed release its active slot holds, proven by measuring it.
            if let Some(held) = self.held_release(infos_all.clone())? {
                tracing::info!(version = %held.version, "the active slot holds a signed release: it is this device's version floor");
                self.journal.running = Some(release_of(&held));
                self.set_phase(Phase::Idle)?;
            }
        }
        if let Some(running) = &self.journal.running {
            let running_version: Option<ReleaseVersion> = running.version.parse().ok();
            if running_version.as_ref().is_some_and(|v| *v == cand.version) {
                self.write_metrics(None);
                return Ok(PassResult::UpToDate { version: Some(running.version.clone()) });
            }
            if running_version.is_some_and(|v| v > cand.version) {
                if !rollback {
                    if assignment.is_some() {
                        return Err(AgentError::Director(format!(
                            "the director assigns {} but this device runs {}: versions do not go backwards without a signed rollback",
                            cand.version, running.version
                        )));
                    }
                    self.write_metrics(None);
                    return Ok(PassResult::UpToDate { version: Some(running.version.clone()) });
                }
                if !cand.custom.rollback_allowed {
                    return Err(AgentError::Director(format!(
                        "the director orders a rollback from {} to {}, but no rollback allowance signed by the image repository's offline keys covers {} \
                         (outpost release allow-rollback): the online director key alone cannot downgrade a device",
                        running.version, cand.version, cand.version
                    )));
                }
                tracing::warn!(from = %running.version, to = %cand.version, "the director assigns a rollback the image repository allows");
            }
        }
        if self.journal.running.is_none() {
            // A fresh or recovered journal: what the active slot holds is a fact.
            let active = self.boot.slot_path(self.boot.state()?.active);
            if hash_file(&active, Some(release.length)).is_ok_and(|(sha, len)| sha == release.sha256 && len == release.length) {
                tracing::info!(version = %release.version, "the active slot already holds the newest release");
                self.journal.running = Some(release.clone());
                self.set_phase(Phase::Idle)?;
                return Ok(PassResult::UpToDate { version: Some(release.version) });
            }
        }
        if self.journal.failed.contains(&release) {
            tracing::info!(version = %release.version, "newest release was rolled back on this device; waiting for a newer one");
            return Ok(PassResult::SkippedFailedRelease { version: release.version });
        }
        // Defense in depth: the signed deny-list, checked against the release's SBOM.
        if let Some(components) = &components {
            if let Some(list) = self.denylist(&mut updater).await? {
                // A component whose version cannot be placed against an entry's range is
                // a finding too (fail closed); its advisory says why.
                let findings = list.findings(components).map_err(|e| {
                    AgentError::Usage(format!("{}: {e}; not installing past a deny-list that cannot be read", outpost_sbom::denylist::DENYLIST_TARGET))
                })?;
                if !findings.is_empty() {
                    let advisories: Vec<String> = findings.iter().map(ToString::to_string).collect();
                    tracing::warn!(version = %release.version, ?advisories, "newest release is affected by the signed deny-list; not installing");
                    return Ok(PassResult::RefusedVulnerable { version: release.version, advisories });
                }
            }
        }
        // Install only from a state the TPM vouches for: PCR = replayed log, and the
        // measured boot = the running release's expected measurement.
        crate::attest::self_check(&self.config, self.journal.running.as_ref().map(|r| r.sha256.as_str())).await?;
        self.install(&updater, cand, release).await
    }

    async fn install(&mut self, updater: &Updater, cand: Candidate, release: Release) -> Result<PassResult> {
        let downloads = self.config.download_dir();
        std::fs::create_dir_all(&downloads).map_err(|e| AgentError::io("create", &downloads, e))?;
        let image_path = downloads.join(format!("{}.image", quote_file_name(&release.target)));
        self.clean_downloads(&image_path);
        let resumed = matches!(&self.journal.phase, Phase::Verified { release: r } | Phase::Writing { release: r, .. } if *r == release) && image_path.exists();
        // A staged image verified before a restart is checked again before it is
        // written: bytes that rotted (or were changed) since are discarded and fetched
        // again, never written over and over.
        let resumed = resumed && {
            let (sha, len) = hash_file(&image_path, None)?;
            let intact = len == release.length && sha.eq_ignore_ascii_case(&release.sha256);
            if !intact {
                tracing::warn!(target = %release.target, "the staged image no longer verifies: discarding it and fetching it again");
                std::fs::remove_file(&image_path).map_err(|e| AgentError::io("remove", &image_path, e))?;
            }
            intact
        };
        if !resumed {
            if self.staged_before_power_cut(&release, &image_path)? {
                tracing::info!(target = %release.target, "the staged image from before the restart verifies: not downloading it again");
            } else {
                self.download(updater, &cand, &release, &image_path).await?;
            }
            self.set_phase(Phase::Verified { release: release.clone() })?;
        }
        let active = self.boot.state()?.active;
        let slot = active.other();
        self.set_phase(Phase::Writing { release: release.clone(), slot })?;
        let slot_path = self.boot.slot_path(slot);
        let current = std::fs::metadata(&slot_path).map(|m| m.len()).unwrap_or(0);
        if let Some(dir) = slot_path.parent() {
            check_space(dir, release.length.saturating_sub(current))?;
        }
        if let Err(e) = write_slot(&image_path, &slot_path) {
            // The inactive slot holds nothing worth keeping now; give its space back so
            // the boot environment can still be written.
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&slot_path) {
                let _ = f.set_len(0);
            }
            return Err(e);
        }
        let (sha, len) = hash_file(&slot_path, Some(release.length))?;
        if sha != release.sha256 || len != release.length {
            // Not the staged image's fault (it verified just now): the slot did not keep
            // what was written. The next pass starts again from a fresh download.
            let _ = std::fs::remove_file(&image_path);
            return Err(AgentError::ImageMismatch {
                url: slot_path.display().to_string(),
                reason: format!("slot {slot} reads back {len} bytes with sha256 {sha} after writing {}", release.sha256),
            });
        }
        self.set_phase(Phase::Installed { release: release.clone(), slot })?;
        let _ = std::fs::remove_file(&image_path);
        self.boot.set_trial(slot, self.config.install.trial_attempts)?;
        self.reboot()
    }

    /// The signed release the active slot holds, found by hashing the slot's first
    /// bytes for each length a release of this class has (one pass over the slot).
    fn held_release(&self, infos: Vec<TargetInfo>) -> Result<Option<Candidate>> {
        let active = self.boot.slot_path(self.boot.state()?.active);
        let lengths: std::collections::BTreeSet<u64> = infos
            .iter()
            .filter_map(|i| FirmwareCustom::from_custom(i.file.custom.as_ref(), &i.path).ok().flatten().map(|c| (i, c)))
            .filter(|(_, c)| c.encoding != SignedEncoding::ZstdPatch)
            .map(|(i, c)| c.image.as_ref().map(|x| x.length).unwrap_or(i.file.length))
            .collect();
        let Ok(held) = hash_prefixes(&active, &lengths) else { return Ok(None) };
        choose(infos, &self.config, Pick::Measurement(&held))
    }

    /// Removes what no journal entry owns from the download directory: staged images and
    /// partial transfers of releases given up on (a crash, a newer assignment) would
    /// otherwise stay forever. `keep` is the staged image of the release at hand.
    fn clean_downloads(&self, keep: &Path) {
        let dir = self.config.download_dir();
        let mut owned: Vec<PathBuf> = vec![keep.to_owned()];
        if let Phase::Downloading { transfer, .. } = &self.journal.phase {
            owned.push(self.partial_path(transfer));
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for path in entries.flatten().map(|e| e.path()) {
            let ours = path.extension().is_some_and(|x| x == "image" || x == "partial");
            if ours && !owned.contains(&path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!(file = %path.display(), "removed a download no install needs any more"),
                    Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot remove a stale download"),
                }
            }
        }
    }

    /// Where the received bytes of `transfer` are kept (for resuming).
    fn partial_path(&self, transfer: &Transfer) -> PathBuf {
        self.config.download_dir().join(format!("{}.partial", quote_file_name(&transfer.target)))
    }

    /// Whether a power cut fell after the transfer of `release` finished (its partial
    /// file renamed to, or decoded into, the staged image and then removed) and before
    /// the journal said `Verified`: the journal still says `Downloading`, the partial
    /// file is gone and the staged image is there. The image's own length and SHA-256
    /// decide; anything else is downloaded again.
    fn staged_before_power_cut(&self, release: &Release, image_path: &Path) -> Result<bool> {
        let Phase::Downloading { release: r, transfer, .. } = &self.journal.phase else { return Ok(false) };
        let partial = self.partial_path(transfer);
        if r != release || partial.exists() || !image_path.exists() {
            return Ok(false);
        }
        let (sha256, length) = hash_file(image_path, None)?;
        Ok(length == release.length && sha256.eq_ignore_ascii_case(&release.sha256))
    }

    /// Fetches the release into `image_path`: by delta when the active slot is the
    /// patch's base, falling back to the full target.
    async fn download(&mut self, updater: &Updater, cand: &Candidate, release: &Release, image_path: &Path) -> Result<TransferStats> {
        let active_slot = self.boot.slot_path(self.boot.state()?.active);
        for (delta, custom) in &cand.deltas {
            let Some(base) = &custom.delta_base else { continue };
            let reference = match read_if_digest(&active_slot, &base.sha256)? {
                Some(r) => Arc::new(r),
                None => continue,
            };
            let transfer = Transfer { target: delta.path.clone(), encoding: Encoding::ZstdPatch, length: delta.file.length };
            match self.fetch(updater, release, &transfer, &delta.file.hashes, Some(reference), image_path).await {
                Ok(stats) => return Ok(stats),
                Err(e) => tracing::warn!(error = %e, delta = %delta.path, "delta update failed; falling back to the full image"),
            }
        }
        let encoding = match cand.custom.encoding {
            SignedEncoding::Zstd => Encoding::Zstd,
            _ => Encoding::Identity,
        };
        let transfer = Transfer { target: cand.full.path.clone(), encoding, length: cand.full.file.length };
        self.fetch(updater, release, &transfer, &cand.full.file.hashes, None, image_path).await
    }

    async fn fetch(
        &mut self,
        updater: &Updater,
        release: &Release,
        transfer: &Transfer,
        hashes: &BTreeMap<String, String>,
        reference: Option<Arc<Vec<u8>>>,
        image_path: &Path,
    ) -> Result<TransferStats> {
        let downloads = self.config.download_dir();
        let partial = self.partial_path(transfer);
        let durable = match &self.journal.phase {
            Phase::Downloading { release: r, transfer: t, durable } if r == release && t == transfer => *durable,
            _ => 0,
        };
        let info = TargetInfo { path: transfer.target.clone(), file: outpost_protocol::tuf::TargetFile {
            length: transfer.length, hashes: hashes.clone(), custom: None, extra: Default::default() }, role: String::new() };
        let url = updater.target_url(&info, &format!("{}/targets/", self.config.server_url))?;
        let spec = TransferSpec {
            url,
            length: transfer.length,
            hashes: hashes.clone(),
            encoding: transfer.encoding,
            reference,
            image_sha256: release.sha256.clone(),
            image_length: release.length,
            partial: partial.clone(),
            image: image_path.to_owned(),
            durable,
        };
        // What is still to come, plus the decoded image beside it unless the target
        // is the image as-is (then the received file is renamed into place).
        let to_receive = transfer.length - durable.min(transfer.length);
        check_space(&downloads, if spec.is_as_is() { to_receive } else { to_receive + release.length })?;
        self.set_phase(Phase::Downloading { release: release.clone(), transfer: transfer.clone(), durable })?;
        let opts = TransferOptions { retries: self.config.install.retries, bandwidth: self.config.install.bandwidth_limit, ..Default::default() };
        let journal_file = JournalFile::new(self.journal_file.path());
        let mut journal = self.journal.clone();
        let metrics = self.config.state_dir.join("metrics.prom");
        let total = transfer.length;
        let result = transfer::run(&self.fetcher, spec, &opts, |d| {
            if let Phase::Downloading { durable, .. } = &mut journal.phase {
                *durable = d;
            }
            tracing::info!(received = d, total, "download progress (durable)");
            write_metrics_file(&metrics, &journal, Some((d, total)));
            journal_file.store(&journal)
        })
        .await;
        self.journal = journal;
        match result {
            Ok(stats) => {
                tracing::info!(target = %transfer.target, resumed_from = stats.resumed_from, received = stats.received, attempts = stats.attempts, "download verified");
                let _ = std::fs::remove_file(&partial);
                Ok(stats)
            }
            Err(e) => {
                if matches!(e, AgentError::Tuf { .. } | AgentError::ImageMismatch { .. } | AgentError::TooLarge { .. }) {
                    // The bytes can never verify: nothing of them is kept.
                    let _ = std::fs::remove_file(&partial);
                    let _ = std::fs::remove_file(image_path);
                    if let Phase::Downloading { durable, .. } = &mut self.journal.phase {
                        *durable = 0;
                        self.journal_file.store(&self.journal)?;
                    }
                }
                Err(e)
            }
        }
    }

    /// The signed deny-list (`security/denylist.json`, under the `security`
    /// delegation), or None when the repository has none. A deny-list that does not
    /// verify or parse is an error: nothing is installed past a broken gate.
    async fn denylist(&self, updater: &mut Updater) -> Result<Option<outpost_sbom::denylist::DenyList>> {
        let target = outpost_sbom::denylist::DENYLIST_TARGET;
        let Some(info) = updater.get_target_info(target).await? else { return Ok(None) };
        let url = updater.target_url(&info, &format!("{}/targets/", self.config.server_url))?;
        let bytes = self.fetcher.fetch_bytes(&url, info.file.length).await?;
        outpost_protocol::hashing::verify_bytes(&bytes, Some(info.file.length), Some(&info.file.hashes), target)
            .map_err(|e| AgentError::tuf(format!("verify {target}"), e))?;
        outpost_sbom::denylist::DenyList::parse(&bytes)
            .map(Some)
            .map_err(|e| AgentError::Usage(format!("{target} (signed by {}): {e}; not installing past a deny-list that cannot be read", info.role)))
    }

    /// Fetches the release's SBOM (once; kept under state_dir/sbom), checks it against
    /// its signed hash and that it describes this release's image. Returns its components.
    async fn verify_sbom(&self, updater: &Updater, info: &TargetInfo, release: &Release) -> Result<Vec<outpost_sbom::ComponentRef>> {
        let err = |reason: String| AgentError::Sbom { release: release.target.clone(), reason };
        let dir = self.config.state_dir.join("sbom");
        let want = info.file.hashes.get("sha256").cloned().unwrap_or_default();
        let kept = dir.join(format!("{want}.cdx.json"));
        let bytes = match std::fs::read(&kept) {
            Ok(b) if hex::encode(Sha256::digest(&b)) == want => b,
            _ => {
                let url = updater.target_url(info, &format!("{}/targets/", self.config.server_url))?;
                let b = self.fetcher.fetch_bytes(&url, info.file.length).await.map_err(|e| err(e.to_string()))?;
                outpost_protocol::hashing::verify_bytes(&b, Some(info.file.length), Some(&info.file.hashes), &info.path)
                    .map_err(|e| err(format!("does not match its signed target: {e}")))?;
                b
            }
        };
        let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| err(format!("{} is not JSON: {e}", info.path)))?;
        if doc.get("bomFormat").and_then(|v| v.as_str()) != Some("CycloneDX") {
            return Err(err(format!("{} is not a CycloneDX document", info.path)));
        }
        let describes = doc
            .pointer("/metadata/component/hashes")
            .and_then(|h| h.as_array())
            .is_some_and(|hs| {
                hs.iter().any(|h| {
                    h.get("alg").and_then(|a| a.as_str()) == Some("SHA-256")
                        && h.get("content").and_then(|c| c.as_str()).is_some_and(|c| c.eq_ignore_ascii_case(&release.sha256))
                })
            });
        if !describes {
            return Err(err(format!("{} does not describe the image with sha256 {}", info.path, release.sha256)));
        }
        if !kept.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| AgentError::io("create", &dir, e))?;
            outpost_fsio::write_atomic(&kept, &bytes).map_err(|e| AgentError::io("write", &kept, e))?;
        }
        tracing::info!(sbom = %info.path, sha256 = %want, "SBOM verified");
        Ok(outpost_sbom::denylist::components_of(&doc))
    }

    fn write_metrics(&self, progress: Option<(u64, u64)>) {
        write_metrics_file(&self.config.state_dir.join("metrics.prom"), &self.journal, progress);
    }
}

/// The installer's state for node_exporter's textfile collector, written with the
/// same encoder as the agent's `/metrics` (values from signed metadata escaped).
fn write_metrics_file(path: &Path, journal: &Journal, progress: Option<(u64, u64)>) {
    let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut m = crate::metrics::Exposition::default();
    m.gauge("outpost_agent_install_phase", "Current install phase (1 = current).", vec![("phase", journal.phase.name().to_owned())], 1);
    if let Some(r) = &journal.running {
        m.gauge("outpost_agent_running_release_info", "The release the device runs.", vec![("version", r.version.clone()), ("sha256", r.sha256.clone())], 1);
    }
    m.gauge("outpost_agent_rolled_back_releases", "Releases rolled back on this device.", vec![], gauge(journal.failed.len() as u64));
    if let Some((done, total)) = progress {
        m.gauge("outpost_agent_download_durable_bytes", "Bytes of the current download kept durably.", vec![], gauge(done));
        m.gauge("outpost_agent_download_total_bytes", "Length of the current download.", vec![], gauge(total));
    }
    if let Err(e) = outpost_fsio::write_atomic(path, m.encode().as_bytes()) {
        tracing::warn!(error = %e, "cannot write metrics file");
    }
}

/// The director's assignment and the image repository's signed target must agree on
/// length, hashes, hardware class and version.
fn agrees(a: &outpost_protocol::director::Assignment, cand: &Candidate, config: &AgentConfig) -> Result<()> {
    let signed_sha = cand.full.file.hashes.get("sha256").map(String::as_str).unwrap_or("<none>");
    if a.length != cand.full.file.length || a.sha256 != signed_sha {
        return Err(AgentError::Director(format!(
            "the director's {} ({} bytes, sha256 {}) disagrees with the image repository's signed target ({} bytes, sha256 {signed_sha})",
            a.path, a.length, a.sha256, cand.full.file.length
        )));
    }
    if a.custom.hardware_class != config.hardware_class.as_str() {
        return Err(AgentError::Director(format!("the assignment is for hardware class {}, this device is {}", a.custom.hardware_class, config.hardware_class)));
    }
    if a.custom.version != cand.version.to_string() {
        return Err(AgentError::Director(format!("the director says {} is version {}, the image repository signs it as {}", a.path, a.custom.version, cand.version)));
    }
    Ok(())
}

/// Which full image `choose` picks.
enum Pick<'a> {
    Newest,
    Path(&'a str),
    /// The release whose image length maps to its sha256 here (the slot's first
    /// `length` bytes hashed, for each length a release has).
    Measurement(&'a BTreeMap<u64, String>),
}

/// What the journal keeps of a release.
fn release_of(cand: &Candidate) -> Release {
    Release {
        target: cand.full.path.clone(),
        version: cand.version.to_string(),
        sha256: cand.custom.expected_measurement.sha256.clone(),
        length: cand.custom.image.as_ref().map(|i| i.length).unwrap_or(cand.full.file.length),
        health: cand.custom.health.clone(),
        trial_deadline_secs: cand.custom.trial_deadline_secs,
        sbom_sha256: cand.custom.sbom.as_ref().map(|s| s.sha256.clone()),
    }
}

/// Groups signed firmware targets for this class by version and picks one full image
/// (`want`): the newest, the one at a path, or the one with a measurement. A target
/// filed under this class but signed for another is refused.
fn choose(infos: Vec<TargetInfo>, config: &AgentConfig, want: Pick<'_>) -> Result<Option<Candidate>> {
    let by_path: BTreeMap<String, TargetInfo> = infos.iter().map(|i| (i.path.clone(), i.clone())).collect();
    let mut fulls: BTreeMap<String, (ReleaseVersion, TargetInfo, FirmwareCustom)> = BTreeMap::new();
    let mut deltas: Vec<(TargetInfo, FirmwareCustom)> = Vec::new();
    for info in infos {
        let Some(custom) = FirmwareCustom::from_custom(info.file.custom.as_ref(), &info.path)
            .map_err(|e| AgentError::tuf(format!("read custom metadata of {}", info.path), e))?
        else {
            continue;
        };
        custom.validate(&info.path).map_err(|e| AgentError::tuf("release metadata", e))?;
        if custom.hardware_class != config.hardware_class {
            return Err(AgentError::HardwareClassMismatch {
                target: info.path.clone(),
                expected: config.hardware_class.to_string(),
                found: custom.hardware_class.to_string(),
            });
        }
        match custom.encoding {
            SignedEncoding::ZstdPatch => deltas.push((info, custom)),
            _ => {
                fulls.insert(info.path.clone(), (custom.version.clone(), info, custom));
            }
        }
    }
    let chosen = match want {
        Pick::Newest => fulls.into_values().max_by(|a, b| a.0.cmp(&b.0)),
        Pick::Path(path) => fulls.remove(path),
        Pick::Measurement(held) => fulls.into_values().find(|(_, info, c)| {
            held.get(&c.image.as_ref().map(|i| i.length).unwrap_or(info.file.length)).is_some_and(|sha| *sha == c.expected_measurement.sha256)
        }),
    };
    let Some((version, full, custom)) = chosen else { return Ok(None) };
    let deltas = deltas.into_iter().filter(|(_, c)| c.full_target.as_deref() == Some(full.path.as_str())).collect();
    let sbom = match &custom.sbom {
        None => None,
        Some(sref) => {
            let err = |reason: String| AgentError::Sbom { release: full.path.clone(), reason };
            let info = by_path.get(&sref.path).ok_or_else(|| err(format!("names {}, which is not a signed target", sref.path)))?;
            if info.file.hashes.get("sha256") != Some(&sref.sha256) || info.file.length != sref.length {
                return Err(err(format!(
                    "the signed SBOM target {} ({} bytes, sha256 {:?}) is not the SBOM the release names ({} bytes, sha256 {})",
                    sref.path,
                    info.file.length,
                    info.file.hashes.get("sha256"),
                    sref.length,
                    sref.sha256
                )));
            }
            Some(info.clone())
        }
    };
    Ok(Some(Candidate { version, full, custom, deltas, sbom }))
}

/// SHA-256 and length of a slot's (or file's) first `length` bytes: see [`outpost_fsio::hash_file`].
fn hash_file(path: &Path, length: Option<u64>) -> Result<(String, u64)> {
    outpost_fsio::hash_file(path, length).map_err(|e| AgentError::io("hash", path, e))
}

/// SHA-256 of the first `n` bytes of `path` for every `n` in `lengths`, in one pass
/// (lengths past the end are left out).
fn hash_prefixes(path: &Path, lengths: &std::collections::BTreeSet<u64>) -> Result<BTreeMap<u64, String>> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| AgentError::io("open", path, e))?;
    let mut out = BTreeMap::new();
    let mut h = Sha256::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for &len in lengths {
        while pos < len {
            let want = usize::try_from((len - pos).min(buf.len() as u64)).unwrap_or(buf.len());
            let n = f.read(&mut buf[..want]).map_err(|e| AgentError::io("read", path, e))?;
            if n == 0 {
                return Ok(out);
            }
            h.update(&buf[..n]);
            pos += n as u64;
        }
        out.insert(len, hex::encode(h.clone().finalize()));
    }
    Ok(out)
}

/// The file's bytes if its sha256 is `want` (the delta reference).
fn read_if_digest(path: &Path, want: &str) -> Result<Option<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| AgentError::io("read", path, e))?;
    Ok((hex::encode(Sha256::digest(&bytes)) == want).then_some(bytes))
}

/// Copies the verified image into the (inactive) slot and makes it durable.
fn write_slot(image: &Path, slot: &Path) -> Result<()> {
    let mut src = std::fs::File::open(image).map_err(|e| AgentError::io("open", image, e))?;
    let dst = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(slot).map_err(|e| AgentError::io("open slot", slot, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, dst);
    std::io::copy(&mut src, &mut out).map_err(|e| AgentError::io("write slot", slot, e))?;
    out.flush().map_err(|e| AgentError::io("write slot", slot, e))?;
    let dst = out.into_inner().map_err(|e| AgentError::io("write slot", slot, e.into_error()))?;
    dst.sync_all().map_err(|e| AgentError::io("fsync slot", slot, e))
}

fn check_space(dir: &Path, needed: u64) -> Result<()> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| AgentError::io("statvfs", dir, std::io::Error::from(e)))?;
    let available = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    if available < needed {
        return Err(AgentError::NoSpace { path: dir.to_owned(), needed, available });
    }
    Ok(())
}

pub fn state_paths(config: &AgentConfig) -> Vec<PathBuf> {
    vec![config.state_dir.join("journal.json"), config.boot_dir()]
}
