//! A real reboot, for backends whose bootloader chooses the slot: systemd is asked for
//! an orderly one (services stop, file systems are unmounted and synced), and reboot(2)
//! reboots directly when systemd is absent or refuses.

use crate::error::AgentError;

/// The exit status when systemd has taken over the reboot (EX_TEMPFAIL).
pub const REBOOTING: i32 = 75;

/// Reboots the machine. Returns only with the error that prevented it.
pub fn machine() -> AgentError {
    nix::unistd::sync();
    match std::process::Command::new("systemctl").arg("reboot").status() {
        Ok(status) if status.success() => {
            // The reboot job is queued: systemd stops the services (this one too) and
            // reboots. Everything this process must keep is journaled already, so it
            // leaves now rather than hold up the shutdown until it is killed. Not with
            // success: should the reboot never happen, Restart=on-failure starts the
            // agent again, and its boot step asks for the reboot again.
            tracing::info!("systemd is rebooting the machine");
            std::process::exit(REBOOTING);
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
