//! The attested check-in, on the agent's side of the install: the device's state comes
//! from the install journal, the server's verdict (quarantine) and the director
//! assignment it carries go back to the installer in memory.

use outpost_protocol::attest::{CheckinVerdict, DeviceHealth};

use crate::attest::DeviceState;
use crate::boot::Slot;
use crate::error::Result;
use crate::fetch::Fetcher;
use crate::install::journal::{Journal, Phase};
use crate::install::Installer;

/// What the device tells the server about itself: the active slot, the running release
/// and how the install stands, with the queued install reports (which the quote then
/// vouches for).
pub fn device_state(journal: &Journal, active: Slot) -> DeviceState {
    let health = match &journal.phase {
        Phase::Idle | Phase::Committed { .. } => DeviceHealth::Healthy,
        Phase::Downloading { .. } | Phase::Verified { .. } | Phase::Writing { .. } | Phase::Installed { .. } => DeviceHealth::Updating,
        Phase::TrialBoot { .. } => DeviceHealth::Trial,
        Phase::RolledBack { .. } => DeviceHealth::RolledBack,
    };
    DeviceState {
        slot: active,
        version: journal.running.as_ref().map(|r| r.version.clone()),
        sbom_sha256: journal.running.as_ref().and_then(|r| r.sbom_sha256.clone()),
        health,
        reports: journal.pending_reports.clone(),
    }
}

/// An attested check-in over `fetcher`'s client with the device's state. The reports
/// it carried leave the journal's queue; the verdict's quarantine and the director
/// targets (verified under the pinned director root) are handed to `installer` for
/// its next install step. Returns None when the device is not enrolled.
pub async fn checkin(installer: &mut Installer, fetcher: &Fetcher) -> Result<Option<CheckinVerdict>> {
    installer.take_up_enrollment()?;
    if !installer.attesting() {
        return Ok(None);
    }
    let state = device_state(installer.journal(), installer.active_slot()?);
    let config = installer.config().clone();
    let verdict = crate::attest::checkin(&config, fetcher.client(), &state).await?;
    installer.reports_sent(state.reports.len())?;
    installer.set_quarantine(verdict.quarantined.then(|| verdict.reason.clone().unwrap_or_else(|| "attestation failed".into())));
    if let (Some(text), Some(root)) = (&verdict.director_targets, crate::director::pinned(&config)?) {
        let view = crate::director::accept(&config, &root, &config.device_id, text, chrono::Utc::now())?;
        match &view.assignment {
            Some(a) => tracing::info!(version = %a.custom.version, rollout = %a.custom.rollout_id, wave = a.custom.wave, rollback = a.custom.rollback, director_version = view.version, "director assignment"),
            None => tracing::info!(director_version = view.version, "director assigns nothing new"),
        }
        installer.hand_director_targets(text.clone());
    }
    Ok(Some(verdict))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_state_names_the_journal_phase_as_health() {
        let idle = device_state(&Journal::default(), Slot::B);
        assert_eq!((idle.slot, idle.health, idle.version, idle.reports.len()), (Slot::B, DeviceHealth::Healthy, None, 0));
    }
}
