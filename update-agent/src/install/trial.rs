//! The trial half of an install: at power-on, reconcile the journal with the slot the
//! bootloader chose; on a trial boot, check what booted and run the health checks;
//! then commit the slot or roll back to the previous one.

use outpost_protocol::release::HealthCheck;

use super::journal::{Phase, Release};
use super::slot::hash_file;
use super::{Installer, PassResult, Report, ReportOutcome};
use crate::boot::{BootOutcome, Slot};
use crate::error::Result;
use crate::health::{self, BootFacts};

/// What a rollback does once it is journaled and the trial cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterRollback {
    /// Stay on the slot that runs: the bootloader already went back to the previous
    /// slot (trial attempts ran out, or a rollback was interrupted).
    Stay,
    /// The trial slot runs: announce the result, then boot the previous slot.
    LeaveTrialSlot,
}

impl Installer {
    /// Power-on: the bootloader chooses a slot; reconcile the journal with it.
    /// Returns the result when the boot concluded an install (commit or rollback).
    pub async fn boot(&mut self) -> Result<Option<PassResult>> {
        let outcome = self.boot.boot()?;
        tracing::info!(?outcome, phase = self.journal.phase.name(), "booted");
        let booted = outcome.booted();
        self.booted = Some(booted);
        // How much of the slot the image is: the release on trial there, else the one
        // running (a partition is larger than its image); unknown: the whole slot.
        let expected_length = match &self.journal.phase {
            Phase::Installed { release, slot } | Phase::TrialBoot { release, slot } if *slot == booted => Some(release.length),
            _ => self.journal.running.as_ref().map(|r| r.length),
        };
        self.measured = crate::attest::measure_boot(&self.config, booted, &self.boot.slot_path(booted), expected_length).await?;
        let phase = self.journal.phase.clone();
        match (phase, outcome) {
            (Phase::Installed { release, slot } | Phase::TrialBoot { release, slot }, BootOutcome::Trial { slot: booted, .. })
                if booted == slot =>
            {
                self.set_phase(Phase::TrialBoot { release: release.clone(), slot })?;
                Ok(Some(self.trial(release, slot).await?))
            }
            (Phase::Installed { release, slot } | Phase::TrialBoot { release, slot }, BootOutcome::TrialExhausted { .. }) => {
                let mut reason = format!("trial boot of slot {slot} was not confirmed before its boot attempts ran out");
                if !self.crash_notes.is_empty() {
                    reason.push_str(&format!("; the kernel recorded a panic since: {}", self.crash_notes.join("; ")));
                }
                Ok(Some(self.roll_back(release, slot, reason, AfterRollback::Stay)?))
            }
            (Phase::Installed { release, slot }, BootOutcome::Normal { .. }) => {
                // Power cut between journaling Installed and arming the trial.
                self.arm_trial(&release, slot)?;
                self.reboot()
            }
            (Phase::TrialBoot { release, slot }, BootOutcome::Normal { slot: booted }) if booted == slot => {
                // Power cut between mark_good and journaling the commit.
                Ok(Some(self.commit(release, slot)?))
            }
            (Phase::TrialBoot { release, slot }, BootOutcome::Normal { .. }) => {
                let reason = "trial ended without confirmation (interrupted while rolling back)".to_owned();
                Ok(Some(self.roll_back(release, slot, reason, AfterRollback::Stay)?))
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
        let measured = self.measured.as_ref().filter(|e| e.slot == slot).map(|e| (e.sha256.clone(), e.length));
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
            return self.roll_back(release, slot, reason, AfterRollback::LeaveTrialSlot);
        }
        let mut checks: Vec<HealthCheck> = self.config.health.clone();
        checks.extend(release.health.iter().cloned());
        let deadline = match release.trial_deadline_secs {
            Some(secs) => self.config.install.trial_deadline.min(std::time::Duration::from_secs(secs)),
            None => self.config.install.trial_deadline,
        };
        let facts = BootFacts {
            slot,
            slot_path: slot_path.display().to_string(),
            version: release.version.clone(),
            target: release.target.clone(),
        };
        match health::run_all(&checks, &facts, deadline).await {
            Ok(()) => {
                self.boot.mark_good(slot)?;
                self.commit(release, slot)
            }
            Err(e) => self.roll_back(release, slot, e.to_string(), AfterRollback::LeaveTrialSlot),
        }
    }

    pub(super) fn commit(&mut self, release: Release, slot: Slot) -> Result<PassResult> {
        self.journal.running = Some(release.clone());
        self.queue_report(&release, slot, ReportOutcome::Committed, None);
        self.set_phase(Phase::Committed { release: release.clone(), slot })?;
        tracing::info!(version = %release.version, %slot, "committed");
        Ok(PassResult::Committed { version: release.version, slot })
    }

    pub(super) fn roll_back(&mut self, release: Release, slot: Slot, reason: String, after: AfterRollback) -> Result<PassResult> {
        tracing::warn!(version = %release.version, %slot, %reason, "rolling back");
        if !self.journal.failed.contains(&release) {
            self.journal.failed.push(release.clone());
        }
        self.queue_report(&release, slot, ReportOutcome::RolledBack, Some(reason.clone()));
        self.set_phase(Phase::RolledBack { release: release.clone(), slot, reason: reason.clone() })?;
        self.boot.cancel_trial()?;
        let result = PassResult::RolledBack { version: release.version, reason };
        if after == AfterRollback::LeaveTrialSlot && self.boot.state()?.active != slot {
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
            slot,
            at: chrono::Utc::now().to_rfc3339(),
        });
    }
}
