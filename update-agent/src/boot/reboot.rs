//! A real reboot, for backends whose bootloader chooses the slot: systemd is asked for
//! an orderly one (services stop, file systems are unmounted and synced), and reboot(2)
//! forces it when systemd is absent or does not take the machine down.

use std::time::Duration;

use crate::error::AgentError;

/// How long systemd has to stop this service before the reboot is forced.
const ORDERLY_GRACE: Duration = Duration::from_secs(120);

/// Reboots the machine. Returns only with the error that prevented it.
pub fn machine() -> AgentError {
    nix::unistd::sync();
    match std::process::Command::new("systemctl").arg("reboot").status() {
        Ok(status) if status.success() => {
            tracing::info!("systemd is rebooting the machine");
            // systemd stops this service (SIGTERM) on the way down.
            std::thread::sleep(ORDERLY_GRACE);
            tracing::warn!(grace_secs = ORDERLY_GRACE.as_secs(), "systemd did not reboot the machine in time; forcing the reboot");
        }
        Ok(status) => tracing::warn!(%status, "systemctl reboot failed; rebooting directly"),
        Err(e) => tracing::warn!(error = %e, "cannot run systemctl; rebooting directly"),
    }
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(e) => AgentError::BootControl(format!("cannot reboot the machine: reboot(2) failed: {e}")),
    }
}
