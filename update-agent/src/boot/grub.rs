//! GRUB environment block backend: the boot state lives in a `grubenv` file (the
//! format `grub-editenv` and GRUB's `load_env`/`save_env` use: exactly 1024 bytes,
//! the header line, `name=value` lines, `#` padding), so a `grub.cfg` fragment can
//! choose the slot at boot (docs/boot-control.md). Slots are block devices or files
//! named in the configuration.
//!
//! Variables: `outpost_active`, `outpost_trial`, `outpost_trial_left`,
//! `outpost_booted`, `outpost_boot` (`normal` | `trial` | `exhausted`),
//! `outpost_failed`. Other variables in the block are preserved.
//!
//! GRUB owns the boot: `testbeds/vm/grub.cfg` spends a trial attempt, falls back when
//! they are gone, records what it chose and names the slot on the kernel command line
//! (`outpost.slot=A|B`). The agent only arms, confirms and cancels trials; at power-on
//! it reads GRUB's record and checks it against the kernel command line, which says
//! which root actually booted. It never applies the transition itself.

use std::path::{Path, PathBuf};

use super::{BootControl, BootOutcome, BootState, Slot, Trial};
use crate::error::{AgentError, Result};

const SIZE: usize = 1024;
const HEADER: &str = "# GRUB Environment Block\n";

/// A parsed environment block, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvBlock {
    vars: Vec<(String, String)>,
}

impl EnvBlock {
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let corrupt = |reason: String| AgentError::Corrupt { path: path.to_owned(), reason };
        if bytes.len() != SIZE {
            return Err(corrupt(format!("a GRUB environment block is {SIZE} bytes, this file has {}", bytes.len())));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| corrupt(format!("not text: {e}")))?;
        let body = text.strip_prefix(HEADER).ok_or_else(|| corrupt("missing '# GRUB Environment Block' header".into()))?;
        let mut vars = Vec::new();
        for line in body.split('\n') {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| corrupt(format!("line {line:?} is not name=value")))?;
            vars.push((k.to_owned(), v.to_owned()));
        }
        Ok(EnvBlock { vars })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let plain = |s: &str| s.bytes().all(|b| b.is_ascii_graphic() && b != b'\\' && b != b'=' && b != b'#');
        if !plain(name) || !(value.is_empty() || plain(value)) {
            return Err(AgentError::BootControl(format!("GRUB variable {name}={value:?} needs escaping; only plain ASCII is written")));
        }
        match self.vars.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value.to_owned(),
            None => self.vars.push((name.to_owned(), value.to_owned())),
        }
        Ok(())
    }

    pub fn unset(&mut self, name: &str) {
        self.vars.retain(|(k, _)| k != name);
    }

    /// The 1024-byte block.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = HEADER.as_bytes().to_vec();
        for (k, v) in &self.vars {
            out.extend_from_slice(format!("{k}={v}\n").as_bytes());
        }
        if out.len() > SIZE {
            return Err(AgentError::BootControl(format!("GRUB environment variables need {} bytes; the block holds {SIZE}", out.len())));
        }
        out.resize(SIZE, b'#');
        Ok(out)
    }
}

pub struct GrubBootControl {
    env: PathBuf,
    slots: [PathBuf; 2],
    /// The running kernel's command line (`/proc/cmdline`).
    cmdline: PathBuf,
}

/// The slot the kernel command line says booted (`outpost.slot=A|B`, put there by
/// the grub.cfg that chose it).
pub fn booted_slot(cmdline: &Path) -> Result<Slot> {
    let text = std::fs::read_to_string(cmdline).map_err(|e| AgentError::io("read kernel command line", cmdline, e))?;
    let mut found = None;
    for word in text.split_ascii_whitespace() {
        if let Some(v) = word.strip_prefix("outpost.slot=") {
            if found.is_some() {
                return Err(AgentError::BootControl(format!("the kernel command line ({}) names outpost.slot more than once: {text:?}", cmdline.display())));
            }
            found = Some(parse_slot(Some(v), "outpost.slot", cmdline)?.ok_or_else(|| AgentError::BootControl(format!("outpost.slot is empty on the kernel command line ({})", cmdline.display())))?);
        }
    }
    found.ok_or_else(|| {
        AgentError::BootControl(format!(
            "the kernel command line ({}) does not say which slot booted (no outpost.slot=A|B): this boot did not come from Outpost's grub.cfg",
            cmdline.display()
        ))
    })
}

fn verity_var(s: Slot) -> &'static str {
    match s {
        Slot::A => "outpost_verity_A",
        Slot::B => "outpost_verity_B",
    }
}

fn slot_name(s: Slot) -> &'static str {
    match s {
        Slot::A => "A",
        Slot::B => "B",
    }
}

fn parse_slot(v: Option<&str>, name: &str, path: &Path) -> Result<Option<Slot>> {
    match v {
        None | Some("") => Ok(None),
        Some("A") => Ok(Some(Slot::A)),
        Some("B") => Ok(Some(Slot::B)),
        Some(other) => Err(AgentError::Corrupt { path: path.to_owned(), reason: format!("{name}={other:?} is not A or B") }),
    }
}

impl GrubBootControl {
    /// Opens the environment block at `env` (the image ships it; GRUB reads it at every
    /// boot); `cmdline` is the running kernel's command line (`/proc/cmdline`). A
    /// missing block is an error, never made anew: a fresh one would say slot A is
    /// committed, whichever slot runs.
    pub fn open(env: &Path, slot_a: &Path, slot_b: &Path, cmdline: &Path) -> Result<Self> {
        if !env.exists() {
            return Err(AgentError::BootControl(format!(
                "the GRUB environment block {} is missing: the device's image ships it (grub-editenv FILE create, then set outpost_active); \
                 see docs/devices.md, recovering a device",
                env.display()
            )));
        }
        Ok(GrubBootControl { env: env.to_owned(), slots: [slot_a.to_owned(), slot_b.to_owned()], cmdline: cmdline.to_owned() })
    }

    fn load(&self) -> Result<(BootState, EnvBlock)> {
        let bytes = std::fs::read(&self.env).map_err(|e| AgentError::io("read GRUB environment", &self.env, e))?;
        let block = EnvBlock::parse(&bytes, &self.env)?;
        let p = &self.env;
        let active = parse_slot(block.get("outpost_active"), "outpost_active", p)?.unwrap_or(Slot::A);
        let trial = match parse_slot(block.get("outpost_trial"), "outpost_trial", p)? {
            Some(slot) => {
                let left = block.get("outpost_trial_left").unwrap_or("0");
                let attempts_left = left.parse().map_err(|_| AgentError::Corrupt {
                    path: p.clone(),
                    reason: format!("outpost_trial_left={left:?} is not a number"),
                })?;
                Some(Trial { slot, attempts_left })
            }
            None => None,
        };
        let booted = parse_slot(block.get("outpost_booted"), "outpost_booted", p)?;
        let last_boot = match (block.get("outpost_boot"), booted) {
            (Some("normal"), Some(slot)) => Some(BootOutcome::Normal { slot }),
            (Some("trial"), Some(slot)) => Some(BootOutcome::Trial { slot, attempts_left: trial.map(|t| t.attempts_left).unwrap_or(0) }),
            (Some("exhausted"), Some(slot)) => {
                let failed = parse_slot(block.get("outpost_failed"), "outpost_failed", p)?.unwrap_or(slot.other());
                Some(BootOutcome::TrialExhausted { failed, slot })
            }
            _ => None,
        };
        Ok((BootState { active, trial, last_boot }, block))
    }

    fn save(&self, s: &BootState, mut block: EnvBlock) -> Result<()> {
        block.set("outpost_active", slot_name(s.active))?;
        match s.trial {
            Some(t) => {
                block.set("outpost_trial", slot_name(t.slot))?;
                block.set("outpost_trial_left", &t.attempts_left.to_string())?;
            }
            None => {
                block.set("outpost_trial", "")?;
                block.set("outpost_trial_left", "0")?;
            }
        }
        if let Some(outcome) = s.last_boot {
            block.set("outpost_booted", slot_name(outcome.booted()))?;
            let kind = match outcome {
                BootOutcome::Normal { .. } => "normal",
                BootOutcome::Trial { .. } => "trial",
                BootOutcome::TrialExhausted { failed, .. } => {
                    block.set("outpost_failed", slot_name(failed))?;
                    "exhausted"
                }
            };
            block.set("outpost_boot", kind)?;
        }
        self.write(&block)
    }

    /// Replaces the environment block in one atomic write.
    fn write(&self, block: &EnvBlock) -> Result<()> {
        outpost_fsio::write_atomic(&self.env, &block.to_bytes()?).map_err(|e| AgentError::io("write GRUB environment", &self.env, e))
    }
}

impl BootControl for GrubBootControl {
    fn state(&self) -> Result<BootState> {
        Ok(self.load()?.0)
    }

    fn slot_path(&self, slot: Slot) -> PathBuf {
        match slot {
            Slot::A => self.slots[0].clone(),
            Slot::B => self.slots[1].clone(),
        }
    }

    /// `outpost_verity_A|B` in the block: grub.cfg passes the booted slot's as
    /// `outpost.verity=` on the kernel command line (measured into PCR 8), and the
    /// slot's initrd maps the root through dm-verity with it.
    fn set_slot_verity(&mut self, slot: Slot, verity: Option<&outpost_protocol::verity::Verity>) -> Result<()> {
        let (s, mut block) = self.load()?;
        if slot == s.active {
            return Err(AgentError::BootControl(format!("slot {slot} is the committed slot: its kernel command line is not changed while it is the one that boots")));
        }
        block.set(verity_var(slot), &verity.map(|v| v.arg_value()).unwrap_or_default())?;
        self.write(&block)
    }

    fn set_trial(&mut self, slot: Slot, attempts: u32) -> Result<()> {
        let (s, block) = self.load()?;
        self.save(&s.with_trial(slot, attempts)?, block)
    }

    fn mark_good(&mut self, slot: Slot) -> Result<()> {
        let (s, block) = self.load()?;
        self.save(&s.marked_good(slot), block)
    }

    fn cancel_trial(&mut self) -> Result<()> {
        let (s, block) = self.load()?;
        self.save(&s.without_trial(), block)
    }

    /// GRUB has already chosen, spent the attempt and recorded it; this reads the
    /// record and checks it against the slot the kernel command line names. The agent
    /// may start more than once per boot: a trial confirmed since is the committed slot
    /// running, a trial cancelled since (a rollback waiting for its reboot) is still
    /// the trial. A record that does not describe this boot (a hand-picked entry,
    /// another grub.cfg, an edited block) is an error: guessing could commit a slot
    /// that never passed.
    fn boot(&mut self) -> Result<BootOutcome> {
        let slot = booted_slot(&self.cmdline)?;
        let (s, _) = self.load()?;
        match s.last_boot {
            Some(BootOutcome::Trial { slot: t, .. }) if t == slot && s.active == slot => Ok(BootOutcome::Normal { slot }),
            Some(outcome @ BootOutcome::Trial { slot: t, .. }) if t == slot => Ok(outcome),
            Some(outcome @ BootOutcome::Normal { slot: n }) if n == slot && s.active == slot => Ok(outcome),
            Some(outcome @ BootOutcome::TrialExhausted { slot: n, failed }) if n == slot && s.active == slot && failed != slot => Ok(outcome),
            record => Err(AgentError::BootControl(format!(
                "the kernel command line says slot {slot} booted, but GRUB's record in {} says {record:?} (active {}, trial {:?}): \
                 this boot was not chosen by Outpost's grub.cfg (see docs/devices.md, recovering a device)",
                self.env.display(),
                s.active,
                s.trial
            ))),
        }
    }

    fn reboot_kind(&self) -> super::Reboot {
        super::Reboot::Machine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What testbeds/vm/grub.cfg does at power-on (the VM tests run the real one):
    /// spend an attempt or fall back, record the choice, name the slot on the command line.
    fn grub_boots(env: &Path, cmdline: &Path) -> BootOutcome {
        let b = GrubBootControl { env: env.to_owned(), slots: [PathBuf::new(), PathBuf::new()], cmdline: cmdline.to_owned() };
        let (s, block) = b.load().unwrap();
        let (next, outcome) = s.booted();
        b.save(&next, block).unwrap();
        std::fs::write(cmdline, format!("BOOT_IMAGE=/boot/vmlinuz ro outpost.slot={}\n", outcome.booted())).unwrap();
        outcome
    }

    /// A device as its image ships it: the block with slot A committed.
    fn open(dir: &Path) -> GrubBootControl {
        let env = dir.join("grubenv");
        if !env.exists() {
            let mut block = EnvBlock::default();
            block.set("outpost_active", "A").unwrap();
            std::fs::write(&env, block.to_bytes().unwrap()).unwrap();
        }
        GrubBootControl::open(&env, &dir.join("a"), &dir.join("b"), &dir.join("cmdline")).unwrap()
    }

    #[test]
    fn a_missing_block_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("grubenv");
        let err = GrubBootControl::open(&env, &dir.path().join("a"), &dir.path().join("b"), &dir.path().join("cmdline")).err().unwrap().to_string();
        assert!(err.contains("missing"), "{err}");
        assert!(!env.exists());
    }

    #[test]
    fn block_is_1024_bytes_and_preserves_foreign_variables() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("grubenv");
        let mut block = EnvBlock::default();
        block.set("saved_entry", "debian").unwrap();
        block.set("outpost_active", "A").unwrap();
        std::fs::write(&env, block.to_bytes().unwrap()).unwrap();
        let mut b = open(dir.path());
        b.set_trial(Slot::B, 2).unwrap();
        let bytes = std::fs::read(&env).unwrap();
        assert_eq!(bytes.len(), 1024);
        let parsed = EnvBlock::parse(&bytes, &env).unwrap();
        assert_eq!(parsed.get("saved_entry"), Some("debian"));
        assert_eq!(parsed.get("outpost_trial"), Some("B"));
    }

    #[test]
    fn a_slots_verity_root_goes_into_its_own_variable_and_nowhere_else() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("grubenv");
        let mut b = open(dir.path());
        let v = outpost_protocol::verity::Verity { data_blocks: 65536, salt: "ab".repeat(32), root_hash: "cd".repeat(32) };
        b.set_slot_verity(Slot::B, Some(&v)).unwrap();
        b.set_trial(Slot::B, 2).unwrap();
        let parsed = EnvBlock::parse(&std::fs::read(&env).unwrap(), &env).unwrap();
        assert_eq!(parsed.get("outpost_verity_B"), Some(format!("{},{},65536", "cd".repeat(32), "ab".repeat(32)).as_str()));
        assert_eq!(parsed.get("outpost_verity_A"), None, "the running slot's parameters are not touched");
        assert_eq!(parsed.get("outpost_trial"), Some("B"));
        // A release without verity clears what an earlier image of the slot had.
        b.set_slot_verity(Slot::B, None).unwrap();
        let parsed = EnvBlock::parse(&std::fs::read(&env).unwrap(), &env).unwrap();
        assert_eq!(parsed.get("outpost_verity_B"), Some(""));
        // The committed slot's never changes under it.
        let err = b.set_slot_verity(Slot::A, Some(&v)).unwrap_err().to_string();
        assert!(err.contains("committed slot"), "{err}");
    }

    #[test]
    fn the_agent_reads_what_grub_chose_and_never_spends_an_attempt_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (env, cmdline) = (dir.path().join("grubenv"), dir.path().join("cmdline"));
        let mut b = open(dir.path());
        grub_boots(&env, &cmdline);
        assert_eq!(b.boot().unwrap(), BootOutcome::Normal { slot: Slot::A });
        b.set_trial(Slot::B, 2).unwrap();
        assert_eq!(grub_boots(&env, &cmdline), BootOutcome::Trial { slot: Slot::B, attempts_left: 1 });
        let before = std::fs::read(&env).unwrap();
        // However often the agent starts on this boot, the record and the count stay.
        assert_eq!(b.boot().unwrap(), BootOutcome::Trial { slot: Slot::B, attempts_left: 1 });
        assert_eq!(b.boot().unwrap(), BootOutcome::Trial { slot: Slot::B, attempts_left: 1 });
        assert_eq!(std::fs::read(&env).unwrap(), before);
        b.mark_good(Slot::B).unwrap();
        // Restarted on the same boot after confirming: the committed slot runs.
        assert_eq!(b.boot().unwrap(), BootOutcome::Normal { slot: Slot::B });
        assert_eq!(grub_boots(&env, &cmdline), BootOutcome::Normal { slot: Slot::B });
        assert_eq!(b.boot().unwrap(), BootOutcome::Normal { slot: Slot::B });
        // A trial cancelled on its own boot (a rollback before its reboot) stays a trial.
        b.set_trial(Slot::A, 2).unwrap();
        grub_boots(&env, &cmdline);
        b.cancel_trial().unwrap();
        assert_eq!(b.boot().unwrap(), BootOutcome::Trial { slot: Slot::A, attempts_left: 0 });
    }

    #[test]
    fn an_unconfirmed_trial_falls_back_when_grub_runs_out_of_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let (env, cmdline) = (dir.path().join("grubenv"), dir.path().join("cmdline"));
        let mut b = open(dir.path());
        b.set_trial(Slot::B, 1).unwrap();
        assert_eq!(grub_boots(&env, &cmdline), BootOutcome::Trial { slot: Slot::B, attempts_left: 0 });
        // The trial boot never confirmed (it hung, panicked, or the agent never ran).
        assert_eq!(grub_boots(&env, &cmdline), BootOutcome::TrialExhausted { failed: Slot::B, slot: Slot::A });
        assert_eq!(b.boot().unwrap(), BootOutcome::TrialExhausted { failed: Slot::B, slot: Slot::A });
        assert_eq!(b.state().unwrap().trial, None);
    }

    #[test]
    fn a_record_that_does_not_describe_this_boot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (env, cmdline) = (dir.path().join("grubenv"), dir.path().join("cmdline"));
        let mut b = open(dir.path());
        // No record at all: GRUB did not run Outpost's grub.cfg.
        std::fs::write(&cmdline, "ro outpost.slot=A").unwrap();
        let err = b.boot().unwrap_err().to_string();
        assert!(err.contains("record") && err.contains("slot A"), "{err}");
        // Root edits the block so a normal boot of B looks like the committed slot's,
        // while A is committed: the agent must not take B for committed.
        grub_boots(&env, &cmdline);
        std::fs::write(&cmdline, "ro outpost.slot=B").unwrap();
        let err = b.boot().unwrap_err().to_string();
        assert!(err.contains("slot B booted") && err.contains("active A"), "{err}");
        // A trial record for B while A booted (a hand-picked GRUB entry).
        b.set_trial(Slot::B, 2).unwrap();
        grub_boots(&env, &cmdline);
        std::fs::write(&cmdline, "ro outpost.slot=A").unwrap();
        assert!(b.boot().is_err());
    }

    #[test]
    fn the_command_line_must_name_one_slot() {
        let dir = tempfile::tempdir().unwrap();
        let cmdline = dir.path().join("cmdline");
        for (text, want) in [
            ("root=/dev/vda2 ro", "does not say which slot"),
            ("outpost.slot=C", "not A or B"),
            ("outpost.slot=A outpost.slot=B", "more than once"),
            ("outpost.slot=", "empty"),
        ] {
            std::fs::write(&cmdline, text).unwrap();
            let err = booted_slot(&cmdline).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        std::fs::write(&cmdline, "BOOT_IMAGE=(hd0,gpt3)/boot/vmlinuz outpost.slot=B quiet\n").unwrap();
        assert_eq!(booted_slot(&cmdline).unwrap(), Slot::B);
    }

    #[test]
    fn malformed_blocks_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("grubenv");
        std::fs::write(&env, b"# GRUB Environment Block\noutpost_active=C\n").unwrap();
        let b = GrubBootControl { env: env.clone(), slots: [dir.path().join("a"), dir.path().join("b")], cmdline: dir.path().join("cmdline") };
        let err = b.state().unwrap_err().to_string();
        assert!(err.contains("grubenv") && err.contains("1024"), "{err}");
    }
}
