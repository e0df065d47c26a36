//! Slot writing: the verified image copied into the inactive slot, made durable and
//! read back; and the slot/file hashing and free-space checks the install steps share.

use std::io::Write;
use std::path::Path;

use super::journal::{Phase, Release};
use super::Installer;
use crate::boot::Slot;
use crate::error::{AgentError, Result};

impl Installer {
    /// Writes the staged image into the inactive slot, makes it durable and reads it
    /// back against the signed digest. Journals `Writing`; returns the slot.
    pub(super) fn write_inactive_slot(&mut self, release: &Release, image_path: &Path) -> Result<Slot> {
        let active = self.boot.state()?.active;
        let slot = active.other();
        if self.booted == Some(slot) {
            // The boot environment and the running kernel disagree (a lost or edited
            // environment block): the "inactive" slot is the mounted root.
            return Err(AgentError::BootControl(format!(
                "refusing to write slot {slot}: the system runs from it, while the boot environment says slot {active} is committed (docs/devices.md, recovering a device)"
            )));
        }
        self.set_phase(Phase::Writing { release: release.clone(), slot })?;
        let slot_path = self.boot.slot_path(slot);
        let kind = SlotKind::of(&slot_path)?;
        match kind {
            SlotKind::Partition { size } if size < release.length => {
                return Err(AgentError::NoSpace { path: slot_path, needed: release.length, available: size });
            }
            SlotKind::Partition { .. } => {}
            SlotKind::File => {
                let current = std::fs::metadata(&slot_path).map(|m| m.len()).unwrap_or(0);
                if let Some(dir) = slot_path.parent() {
                    check_space(dir, release.length.saturating_sub(current))?;
                }
            }
        }
        if let Err(e) = write_slot(image_path, &slot_path, kind) {
            // The inactive slot holds nothing worth keeping now; a file slot gives its
            // space back so the boot environment can still be written.
            if kind == SlotKind::File {
                if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&slot_path) {
                    let _ = f.set_len(0);
                }
            }
            return Err(e);
        }
        let (sha, len) = hash_file(&slot_path, Some(release.length))?;
        if sha != release.sha256 || len != release.length {
            // Not the staged image's fault (it verified just now): the slot did not keep
            // what was written. The next pass starts again from a fresh download.
            let _ = std::fs::remove_file(image_path);
            return Err(AgentError::ImageMismatch {
                url: slot_path.display().to_string(),
                reason: format!("slot {slot} reads back {len} bytes with sha256 {sha} after writing {}", release.sha256),
            });
        }
        Ok(slot)
    }
}

/// SHA-256 and length of a slot's (or file's) first `length` bytes: see [`outpost_fsio::hash_file`].
pub(super) fn hash_file(path: &Path, length: Option<u64>) -> Result<(String, u64)> {
    outpost_fsio::hash_file(path, length).map_err(|e| AgentError::io("hash", path, e))
}

/// Where a slot's image goes: a file (testbeds), or a partition whose size bounds the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotKind {
    File,
    Partition { size: u64 },
}

impl SlotKind {
    pub(super) fn of(path: &Path) -> Result<Self> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => {
                let mut dev = std::fs::File::open(path).map_err(|e| AgentError::io("open slot", path, e))?;
                let size = dev.seek(SeekFrom::End(0)).map_err(|e| AgentError::io("size of slot partition", path, e))?;
                Ok(SlotKind::Partition { size })
            }
            Ok(m) if !m.is_file() => Err(AgentError::BootControl(format!("slot {} is neither a regular file nor a block device", path.display()))),
            _ => Ok(SlotKind::File),
        }
    }
}

/// Copies the verified image into the (inactive) slot and makes it durable. A
/// partition is written in place (never truncated: it is the device).
fn write_slot(image: &Path, slot: &Path, kind: SlotKind) -> Result<()> {
    let mut src = std::fs::File::open(image).map_err(|e| AgentError::io("open", image, e))?;
    let dst = match kind {
        SlotKind::File => std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(slot),
        // O_EXCL on a block device: refused (EBUSY) while it is mounted.
        SlotKind::Partition { .. } => {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_EXCL).open(slot)
        }
    }
    .map_err(|e| AgentError::io("open slot", slot, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, dst);
    std::io::copy(&mut src, &mut out).map_err(|e| AgentError::io("write slot", slot, e))?;
    out.flush().map_err(|e| AgentError::io("write slot", slot, e))?;
    let dst = out.into_inner().map_err(|e| AgentError::io("write slot", slot, e.into_error()))?;
    dst.sync_all().map_err(|e| AgentError::io("fsync slot", slot, e))
}

pub(super) fn check_space(dir: &Path, needed: u64) -> Result<()> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| AgentError::io("statvfs", dir, std::io::Error::from(e)))?;
    let available = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    if available < needed {
        return Err(AgentError::NoSpace { path: dir.to_owned(), needed, available });
    }
    Ok(())
}
