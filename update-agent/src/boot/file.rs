//! The file-backed A/B backend: `slot-a.img`, `slot-b.img` and `bootenv.json` in one
//! directory. `bootenv.json` plays the bootloader environment and is replaced
//! atomically (write temp, fsync, rename, fsync the directory).

use std::path::{Path, PathBuf};

use super::{BootControl, BootOutcome, BootState, Slot};
use crate::error::{AgentError, Result};

pub struct FileBootControl {
    dir: PathBuf,
}

const ENV: &str = "bootenv.json";

impl FileBootControl {
    /// Opens `dir`, creating an empty environment (slot A active) the first time.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io("create", dir, e))?;
        let me = FileBootControl { dir: dir.to_owned() };
        if !dir.join(ENV).exists() {
            me.save(&BootState::fresh())?;
        }
        for slot in [Slot::A, Slot::B] {
            let p = me.slot_path(slot);
            if !p.exists() {
                std::fs::File::create(&p).map_err(|e| AgentError::io("create slot", &p, e))?;
            }
        }
        Ok(me)
    }

    fn save(&self, state: &BootState) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| AgentError::Serialize { what: "boot environment".into(), reason: e.to_string() })?;
        let p = self.dir.join(ENV);
        outpost_fsio::write_atomic(&p, &bytes).map_err(|e| AgentError::io("write boot environment", &p, e))
    }
}

impl BootControl for FileBootControl {
    fn state(&self) -> Result<BootState> {
        let p = self.dir.join(ENV);
        let bytes = std::fs::read(&p).map_err(|e| AgentError::io("read boot environment", &p, e))?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Corrupt { path: p, reason: e.to_string() })
    }

    fn slot_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(match slot {
            Slot::A => "slot-a.img",
            Slot::B => "slot-b.img",
        })
    }

    fn set_trial(&mut self, slot: Slot, attempts: u32) -> Result<()> {
        let s = self.state()?.with_trial(slot, attempts)?;
        self.save(&s)
    }

    fn mark_good(&mut self, slot: Slot) -> Result<()> {
        let s = self.state()?.marked_good(slot);
        self.save(&s)
    }

    fn cancel_trial(&mut self) -> Result<()> {
        let s = self.state()?.without_trial();
        self.save(&s)
    }

    fn boot(&mut self) -> Result<BootOutcome> {
        let (s, outcome) = self.state()?.booted();
        self.save(&s)?;
        Ok(outcome)
    }

    fn reboot_kind(&self) -> super::Reboot {
        super::Reboot::ReExec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trial_boots_then_exhausts_back_to_active() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = FileBootControl::open(dir.path()).unwrap();
        assert_eq!(b.boot().unwrap(), BootOutcome::Normal { slot: Slot::A });
        assert!(b.set_trial(Slot::A, 1).is_err(), "the active slot cannot go on trial");
        b.set_trial(Slot::B, 2).unwrap();
        assert_eq!(b.boot().unwrap(), BootOutcome::Trial { slot: Slot::B, attempts_left: 1 });
        assert_eq!(b.boot().unwrap(), BootOutcome::Trial { slot: Slot::B, attempts_left: 0 });
        assert_eq!(b.boot().unwrap(), BootOutcome::TrialExhausted { failed: Slot::B, slot: Slot::A });
        assert_eq!(b.boot().unwrap(), BootOutcome::Normal { slot: Slot::A });
        assert_eq!(b.state().unwrap().active, Slot::A);
    }

    #[test]
    fn mark_good_commits_the_trial_slot() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = FileBootControl::open(dir.path()).unwrap();
        b.set_trial(Slot::B, 1).unwrap();
        assert_eq!(b.boot().unwrap().booted(), Slot::B);
        b.mark_good(Slot::B).unwrap();
        assert_eq!(b.boot().unwrap(), BootOutcome::Normal { slot: Slot::B });
        // Reopening keeps the state.
        let b2 = FileBootControl::open(dir.path()).unwrap();
        assert_eq!(b2.state().unwrap().active, Slot::B);
    }

    #[test]
    fn corrupt_environment_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBootControl::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(ENV), b"{ not json").unwrap();
        let err = b.state().unwrap_err().to_string();
        assert!(err.contains("bootenv.json"), "{err}");
    }
}
