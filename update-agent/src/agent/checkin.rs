//! The attested check-in, on the agent's side of the install: the device's state comes
//! from the install journal, the server's verdict (quarantine) and the director
//! assignment it carries go back to the installer in memory.

use outpost_protocol::attest::{CheckinVerdict, DeviceHealth};
use outpost_protocol::incident::IntegrityIncident;

use crate::attest::DeviceState;
use crate::boot::Slot;
use crate::error::{AgentError, Result};
use crate::config::BootBackend;
use crate::fetch::Fetcher;
use crate::incidents::{Context, Incidents};
use crate::install::journal::{Journal, Phase};
use crate::install::Installer;

/// What the device tells the server about itself: the active slot, the running release
/// and how the install stands, with the queued install reports (which the quote then
/// vouches for).
pub fn device_state(journal: &Journal, active: Slot, incidents: Vec<IntegrityIncident>) -> DeviceState {
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
        incidents,
    }
}

/// What the agent puts beside a kernel line of an earlier boot: its identity, the
/// kernel's names of the slot partitions, and the slot and release running now (a
/// dm-verity restart boots the committed slot again, the one that was running).
pub fn incident_context(installer: &Installer) -> Context {
    let config = installer.config();
    let slots = match &config.install.boot_backend {
        BootBackend::Grub { slot_a, slot_b, .. } => [(Slot::A, slot_a), (Slot::B, slot_b)]
            .into_iter()
            .filter_map(|(s, path)| crate::incidents::dev_name(path).map(|d| (s, d)))
            .collect(),
        BootBackend::File => Vec::new(),
    };
    let running = match (installer.active_slot(), &installer.journal().running) {
        (Ok(slot), Some(r)) => Some((slot, r.version.clone())),
        _ => None,
    };
    Context { device_id: config.device_id.clone(), hardware_class: config.hardware_class.to_string(), slots, running }
}

/// An attested check-in over `fetcher`'s client with the device's state. The reports
/// and incidents it carried leave their queues (incidents the server refused too, with
/// a warning naming why); the verdict's quarantine and the director
/// targets (verified under the pinned director root) are handed to `installer` for
/// its next install step. Returns None when the device is not enrolled.
pub async fn checkin(installer: &mut Installer, incidents: &mut Incidents, fetcher: &Fetcher) -> Result<Option<CheckinVerdict>> {
    installer.take_up_enrollment()?;
    if !installer.attesting() {
        return Ok(None);
    }
    incidents.name_device(&installer.config().device_id)?;
    let state = device_state(installer.journal(), installer.active_slot()?, incidents.batch());
    let config = installer.config().clone();
    let verdict = match crate::attest::checkin(&config, fetcher.client(), &state, fetcher.identity()).await {
        Ok(v) => v,
        Err(e) => {
            // The server refuses the certificate this device presented (revoked, not
            // this device's, expired by the server's clock): drop it, so the next
            // check-in goes the TPM-proven way and asks for a new one.
            if let (AgentError::Api { status: 401 | 403, message, .. }, Some(identity)) = (&e, fetcher.identity()) {
                // (The server's certificate refusals name the certificate they refuse.)
                if message.starts_with("the client certificate (serial") && identity.usable(chrono::Utc::now().timestamp()) {
                    tracing::warn!(reason = %message, "the server refuses this device's client certificate; dropping it");
                    identity.drop_certificate()?;
                }
            }
            return Err(e);
        }
    };
    renew(fetcher, &verdict);
    if fetcher.identity().is_some() {
        // While online: the device CA's revocation list, for offline checks of peers.
        if let Err(e) = crate::peers::refresh(fetcher, &config.server_url, &config.state_dir).await {
            tracing::warn!(error = %outpost_protocol::display_chain(&e), "could not refresh the device CA's revocation list; the cached one stays");
        }
    }
    installer.reports_sent(state.reports.len())?;
    incidents.sent(state.incidents.len())?;
    for r in &verdict.refused_incidents {
        tracing::warn!(reason = %r.reason, "the server refused a queued integrity incident; dropped from the queue (sent again it would be refused again)");
    }
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

/// Puts the client certificate a check-in brought in force (later handshakes present
/// it), or says why the server issued none.
fn renew(fetcher: &Fetcher, verdict: &CheckinVerdict) {
    let Some(identity) = fetcher.identity() else { return };
    if let Some(cert) = &verdict.client_certificate {
        match identity.install(cert) {
            Ok(()) => tracing::info!(serial = %cert.serial, spiffe_id = %cert.spiffe_id, not_after = %cert.not_after, "client certificate renewed"),
            Err(e) => tracing::error!(error = %e, "the server's client certificate is not usable"),
        }
    }
    if let Some(why) = &verdict.certificate_refused {
        tracing::warn!(reason = %why, "the server issued no client certificate");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_state_names_the_journal_phase_as_health() {
        let idle = device_state(&Journal::default(), Slot::B, Vec::new());
        assert_eq!((idle.slot, idle.health, idle.version, idle.reports.len()), (Slot::B, DeviceHealth::Healthy, None, 0));
    }
}
