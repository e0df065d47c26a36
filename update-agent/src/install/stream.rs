//! A partition slot is written while the image downloads: no staged copy on the
//! (small) data partition. A target sent as-is is received straight onto the
//! partition, and resumed there from the offset last fsynced to it; a compressed
//! target is kept in the partial file (it is smaller) while the decoder writes the
//! partition. Exactly the signed length is verified, the device is flushed, and the
//! slot is read back from the device against the signed digest before the caller
//! arms the trial. Until then the journal says `Downloading { into: slot }` and the
//! boot environment is untouched: a power cut at any point leaves the active slot
//! booting, and the half-written inactive partition is never booted.

use std::path::Path;

use super::download::Dest;
use super::journal::{Phase, Release};
use super::select::Candidate;
use super::slot::hash_file;
use super::Installer;
use crate::boot::Slot;
use crate::error::{AgentError, Result};
use crate::updater::Updater;

impl Installer {
    /// Streams the release into the inactive `slot` (the partition at `path`, `size`
    /// bytes) and reads it back against the signed digest.
    pub(super) async fn stream_into_partition(&mut self, updater: &Updater, cand: &Candidate, release: &Release, slot: Slot, path: &Path, size: u64) -> Result<()> {
        if size < release.length {
            // Refused before a byte is written: the partition cannot hold the image.
            return Err(AgentError::SlotTooSmall { path: path.to_owned(), needed: release.length, size });
        }
        let downloads = self.config.download_dir();
        std::fs::create_dir_all(&downloads).map_err(|e| AgentError::io("create", &downloads, e))?;
        self.clean_downloads(None);
        self.download(updater, cand, release, &Dest::Partition { slot, path: path.to_owned() }).await?;
        drop_cached(path, release.length);
        let (sha, len) = hash_file(path, Some(release.length))?;
        if len != release.length || !sha.eq_ignore_ascii_case(&release.sha256) {
            // Verified while written, yet the device does not give it back: start over.
            if let Phase::Downloading { durable, .. } = &mut self.journal.phase {
                *durable = 0;
                self.journal_file.store(&self.journal)?;
            }
            return Err(AgentError::ImageMismatch {
                url: path.display().to_string(),
                reason: format!("slot {slot} reads back {len} bytes with sha256 {sha} after writing {} (signed)", release.sha256),
            });
        }
        tracing::info!(slot = %slot, partition = %path.display(), length = release.length, "image streamed into the partition, flushed and read back");
        Ok(())
    }
}

/// Drops the partition's cached pages of the image (flushed already), so the read-back
/// comes from the device, not from the page cache the writes filled.
fn drop_cached(path: &Path, length: u64) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    use std::os::fd::AsRawFd;
    let Ok(dev) = std::fs::File::open(path) else { return };
    let len = i64::try_from(length).unwrap_or(i64::MAX);
    if let Err(e) = posix_fadvise(dev.as_raw_fd(), 0, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
        tracing::warn!(partition = %path.display(), error = %e, "cannot drop cached pages before the read-back");
    }
}
