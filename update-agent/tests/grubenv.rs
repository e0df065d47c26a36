//! The GRUB backend's environment block against GRUB's own tool, `grub-editenv`
//! (Debian package grub-common): each side reads what the other wrote.

use std::process::Command;

use outpost_agent::boot::grub::{EnvBlock, GrubBootControl};
use outpost_agent::boot::{BootControl, BootOutcome, Slot};

fn editenv(args: &[&str]) -> String {
    let out = Command::new("grub-editenv").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run grub-editenv ({e}): install it with `apt-get install grub-common` (scripts/setup.sh does)")
    });
    assert!(out.status.success(), "grub-editenv {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn grub_editenv_reads_ours_and_we_read_grub_editenvs() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("grubenv");
    let env_s = env.to_str().unwrap();
    // GRUB's tool creates the block and sets an unrelated variable.
    editenv(&[env_s, "create"]);
    editenv(&[env_s, "set", "saved_entry=debian"]);
    let mut boot = GrubBootControl::open(&env, &dir.path().join("slot-a"), &dir.path().join("slot-b"), &dir.path().join("cmdline")).unwrap();
    boot.set_trial(Slot::B, 3).unwrap();
    let listed = editenv(&[env_s, "list"]);
    for line in ["saved_entry=debian", "outpost_active=A", "outpost_trial=B", "outpost_trial_left=3"] {
        assert!(listed.lines().any(|l| l == line), "grub-editenv list lacks {line}:\n{listed}");
    }
    // What a grub.cfg fragment would do at boot: spend an attempt, record the slot.
    editenv(&[env_s, "set", "outpost_trial_left=2", "outpost_booted=B", "outpost_boot=trial"]);
    let state = boot.state().unwrap();
    assert_eq!(state.trial.map(|t| t.attempts_left), Some(2));
    assert_eq!(state.last_boot, Some(BootOutcome::Trial { slot: Slot::B, attempts_left: 2 }));
    boot.mark_good(Slot::B).unwrap();
    assert!(editenv(&[env_s, "list"]).lines().any(|l| l == "outpost_active=B"));
    assert_eq!(std::fs::metadata(&env).unwrap().len(), 1024);
    let parsed = EnvBlock::parse(&std::fs::read(&env).unwrap(), &env).unwrap();
    assert_eq!(parsed.get("saved_entry"), Some("debian"));
}
