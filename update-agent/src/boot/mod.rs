//! Boot control: which A/B slot is active, which one is on trial, and what the
//! bootloader does at the next boot. One trait, several backends: the file backend
//! (testbeds and tests: slots are files, "reboot" restarts the agent) and GRUB (slots
//! are partitions, GRUB chooses what boots, the machine reboots); U-Boot and RAUC map
//! onto the same operations (see docs/boot-control.md and docs/devices.md).

pub mod file;
pub mod grub;
pub mod reboot;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Result;

pub use outpost_protocol::slot::Slot;

/// A slot staged for a trial boot, with the attempts the bootloader has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub slot: Slot,
    pub attempts_left: u32,
}

/// What the bootloader chose at the last boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootOutcome {
    /// The committed slot booted normally.
    Normal { slot: Slot },
    /// The trial slot booted; it must be confirmed (marked good) or it will not boot again.
    Trial { slot: Slot, attempts_left: u32 },
    /// The trial slot used up its attempts unconfirmed; the committed slot booted instead.
    TrialExhausted { failed: Slot, slot: Slot },
}

impl BootOutcome {
    pub fn booted(&self) -> Slot {
        match *self {
            BootOutcome::Normal { slot } | BootOutcome::Trial { slot, .. } | BootOutcome::TrialExhausted { slot, .. } => slot,
        }
    }
}

/// Boot-control state as the bootloader environment holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    /// The committed slot: boots when no trial is pending.
    pub active: Slot,
    /// A slot to try at the next boot(s).
    pub trial: Option<Trial>,
    /// What the last boot booted.
    pub last_boot: Option<BootOutcome>,
}

impl BootState {
    /// A device that has never updated: slot A active, nothing on trial.
    pub fn fresh() -> Self {
        BootState { active: Slot::A, trial: None, last_boot: None }
    }

    /// The state transitions every backend shares (a bootloader script implements
    /// the same ones; see docs/boot-control.md).
    pub fn with_trial(mut self, slot: Slot, attempts: u32) -> crate::error::Result<Self> {
        if slot == self.active {
            return Err(crate::error::AgentError::BootControl(format!(
                "slot {slot} is the active slot; only the inactive slot can go on trial"
            )));
        }
        self.trial = Some(Trial { slot, attempts_left: attempts.max(1) });
        Ok(self)
    }

    pub fn marked_good(mut self, slot: Slot) -> Self {
        self.active = slot;
        self.trial = None;
        self
    }

    pub fn without_trial(mut self) -> Self {
        self.trial = None;
        self
    }

    /// Power-on: the trial slot while it has attempts (spending one), else the
    /// active slot.
    pub fn booted(mut self) -> (Self, BootOutcome) {
        let outcome = match self.trial {
            Some(Trial { slot, attempts_left }) if attempts_left > 0 => {
                self.trial = Some(Trial { slot, attempts_left: attempts_left - 1 });
                BootOutcome::Trial { slot, attempts_left: attempts_left - 1 }
            }
            Some(Trial { slot, .. }) => {
                self.trial = None;
                BootOutcome::TrialExhausted { failed: slot, slot: self.active }
            }
            None => BootOutcome::Normal { slot: self.active },
        };
        self.last_boot = Some(outcome);
        (self, outcome)
    }
}

/// What "reboot" means for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reboot {
    /// The agent restarts itself in place (the file backend's loopback testbed: no
    /// bootloader runs; the next start runs the boot step).
    ReExec,
    /// The machine reboots and the bootloader chooses the slot.
    Machine,
}

/// The operations an A/B updater needs from a bootloader. Every mutation is atomic:
/// after a power cut the state is the old one or the new one.
pub trait BootControl: Send {
    /// Current state.
    fn state(&self) -> Result<BootState>;
    /// Where the image of `slot` lives (a file, or a block device on hardware).
    fn slot_path(&self, slot: Slot) -> PathBuf;
    /// The dm-verity parameters `slot`'s kernel is given from its next boot on (None:
    /// none). Backends whose slots a kernel does not boot (files) have nowhere to put
    /// them and keep the default.
    fn set_slot_verity(&mut self, slot: Slot, verity: Option<&outpost_protocol::verity::Verity>) -> Result<()> {
        let _ = (slot, verity);
        Ok(())
    }
    /// Boot `slot` on trial at the next boot(s), at most `attempts` times unconfirmed.
    fn set_trial(&mut self, slot: Slot, attempts: u32) -> Result<()>;
    /// Confirm the booted trial slot: it becomes active, the trial ends.
    fn mark_good(&mut self, slot: Slot) -> Result<()>;
    /// Abandon a pending or running trial: the active slot boots next.
    fn cancel_trial(&mut self) -> Result<()>;
    /// What the bootloader did at power-on: the slot it chose, and whether that was a
    /// trial (one attempt spent) or a fallback. Backends whose bootloader runs only
    /// read its record; the file backend plays the bootloader's part.
    fn boot(&mut self) -> Result<BootOutcome>;
    /// How this backend reboots into the slot the bootloader chooses.
    fn reboot_kind(&self) -> Reboot;
}
