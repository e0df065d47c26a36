//! The download stage: a staged image kept across restarts is checked again; else the
//! release is fetched (by delta when the active slot is the patch's base, else the
//! full target) through [`super::transfer`], journaling each durable offset. Downloads
//! no journal entry owns are removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_protocol::release::Encoding;
use outpost_protocol::tuf::quote_file_name;
use outpost_protocol::wpatch::{Base, FileBase};

use super::journal::{JournalFile, Phase, Release, Transfer};
use super::select::Candidate;
use super::slot::{check_space, hash_file};
use super::slot::SlotKind;
use super::transfer::{self, Output, TransferOptions, TransferSpec, TransferStats};
use crate::boot::Slot;
use super::Installer;
use crate::error::{AgentError, Result};
use crate::updater::{TargetInfo, Updater};

impl Installer {
    /// Stages the release's verified image under the download directory and returns its
    /// path: the one staged before a restart when it still verifies, else downloaded
    /// (by delta when it can). Journals `Verified`.
    pub(super) async fn stage(&mut self, updater: &Updater, cand: &Candidate, release: &Release) -> Result<PathBuf> {
        let downloads = self.config.download_dir();
        std::fs::create_dir_all(&downloads).map_err(|e| AgentError::io("create", &downloads, e))?;
        let image_path = downloads.join(format!("{}.image", quote_file_name(&release.target)));
        self.clean_downloads(Some(&image_path));
        let resumed = matches!(&self.journal.phase, Phase::Verified { release: r } | Phase::Writing { release: r, .. } if r == release) && image_path.exists();
        // A staged image verified before a restart is checked again before it is
        // written: bytes that rotted (or were changed) since are discarded and fetched
        // again, never written over and over.
        let resumed = resumed && {
            let (sha, len) = hash_file(&image_path, None)?;
            let intact = len == release.length && sha.eq_ignore_ascii_case(&release.sha256);
            if !intact {
                tracing::warn!(target = %release.target, "the staged image no longer verifies: discarding it and fetching it again");
                std::fs::remove_file(&image_path).map_err(|e| AgentError::io("remove", &image_path, e))?;
            }
            intact
        };
        if !resumed {
            if self.staged_before_power_cut(release, &image_path)? {
                tracing::info!(target = %release.target, "the staged image from before the restart verifies: not downloading it again");
            } else {
                self.download(updater, cand, release, &Dest::Staged(image_path.clone())).await?;
            }
            self.set_phase(Phase::Verified { release: release.clone() })?;
        }
        Ok(image_path)
    }

    /// Removes what no journal entry owns from the download directory: staged images and
    /// partial transfers of releases given up on (a crash, a newer assignment) would
    /// otherwise stay forever. `keep` is the staged image of the release at hand.
    pub(super) fn clean_downloads(&self, keep: Option<&Path>) {
        let dir = self.config.download_dir();
        let mut owned: Vec<PathBuf> = keep.into_iter().map(Path::to_owned).collect();
        if let Phase::Downloading { transfer, .. } = &self.journal.phase {
            owned.push(self.partial_path(transfer));
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for path in entries.flatten().map(|e| e.path()) {
            let ours = path.extension().is_some_and(|x| x == "image" || x == "partial");
            if ours && !owned.contains(&path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!(file = %path.display(), "removed a download no install needs any more"),
                    Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot remove a stale download"),
                }
            }
        }
    }

    /// Where the received bytes of `transfer` are kept (for resuming).
    fn partial_path(&self, transfer: &Transfer) -> PathBuf {
        self.config.download_dir().join(format!("{}.partial", quote_file_name(&transfer.target)))
    }

    /// Whether a power cut fell after the transfer of `release` finished (its partial
    /// file renamed to, or decoded into, the staged image and then removed) and before
    /// the journal said `Verified`: the journal still says `Downloading`, the partial
    /// file is gone and the staged image is there. The image's own length and SHA-256
    /// decide; anything else is downloaded again.
    fn staged_before_power_cut(&self, release: &Release, image_path: &Path) -> Result<bool> {
        let Phase::Downloading { release: r, transfer, into: None, .. } = &self.journal.phase else { return Ok(false) };
        let partial = self.partial_path(transfer);
        if r != release || partial.exists() || !image_path.exists() {
            return Ok(false);
        }
        let (sha256, length) = hash_file(image_path, None)?;
        Ok(length == release.length && sha256.eq_ignore_ascii_case(&release.sha256))
    }

    /// Fetches the release into `dest`: by delta when the active slot is the patch's
    /// base, falling back to the full target.
    pub(super) async fn download(&mut self, updater: &Updater, cand: &Candidate, release: &Release, dest: &Dest) -> Result<TransferStats> {
        let active_slot = self.boot.slot_path(self.boot.state()?.active);
        for (delta, custom) in &cand.deltas {
            let Some(base) = &custom.delta_base else { continue };
            let reference: Arc<dyn Base> = match self.reference_if_digest(&active_slot, &base.sha256)? {
                Some(r) => Arc::new(r),
                None => continue,
            };
            let transfer = Transfer { target: delta.path.clone(), encoding: Encoding::ZstdPatch, length: delta.file.length };
            match self.fetch(updater, release, &transfer, &delta.file.hashes, Some(reference), dest).await {
                Ok(stats) => return Ok(stats),
                Err(e) => tracing::warn!(error = %e, delta = %delta.path, "delta update failed; falling back to the full image"),
            }
        }
        let encoding = match cand.custom.encoding {
            Encoding::Zstd => Encoding::Zstd,
            _ => Encoding::Identity,
        };
        let transfer = Transfer { target: cand.full.path.clone(), encoding, length: cand.full.file.length };
        self.fetch(updater, release, &transfer, &cand.full.file.hashes, None, dest).await
    }

    /// The active slot as the delta reference, if its image's sha256 is `want`: read
    /// by positional reads while the patch is applied, never into memory. A partition
    /// is longer than its image: its first bytes are the image, as many as the running
    /// release (which the journal says it holds) is long.
    fn reference_if_digest(&self, active: &Path, want: &str) -> Result<Option<FileBase>> {
        let length = match SlotKind::of(active)? {
            SlotKind::File => None,
            SlotKind::Partition { .. } => match &self.journal.running {
                Some(r) if r.sha256.eq_ignore_ascii_case(want) => Some(r.length),
                _ => return Ok(None),
            },
        };
        read_if_digest(active, length, want)
    }

    /// What to fetch for `transfer` and where it goes: for a target sent as-is into a
    /// partition, the partition is where received bytes go (no copy on the data
    /// partition); otherwise they are kept in the partial file.
    #[allow(clippy::too_many_arguments)]
    fn transfer_spec(
        &self,
        updater: &Updater,
        release: &Release,
        transfer: &Transfer,
        hashes: &BTreeMap<String, String>,
        reference: Option<Arc<dyn Base>>,
        dest: &Dest,
        durable: u64,
    ) -> Result<TransferSpec> {
        let (image, output) = match dest {
            Dest::Staged(p) => (p.clone(), Output::Staged),
            Dest::Partition { path, .. } => (path.clone(), Output::Partition),
        };
        let info = TargetInfo { path: transfer.target.clone(), file: outpost_protocol::tuf::TargetFile {
            length: transfer.length, hashes: hashes.clone(), custom: None, extra: Default::default() }, role: String::new() };
        let url = updater.target_url(&info, &format!("{}/targets/", self.config.server_url))?;
        let mut spec = TransferSpec {
            url,
            length: transfer.length,
            hashes: hashes.clone(),
            encoding: transfer.encoding,
            reference,
            image_sha256: release.sha256.clone(),
            image_length: release.length,
            partial: self.partial_path(transfer),
            image,
            output,
            durable,
        };
        if output == Output::Partition && spec.is_as_is() {
            spec.partial = spec.image.clone();
        }
        Ok(spec)
    }

    async fn fetch(
        &mut self,
        updater: &Updater,
        release: &Release,
        transfer: &Transfer,
        hashes: &BTreeMap<String, String>,
        reference: Option<Arc<dyn Base>>,
        dest: &Dest,
    ) -> Result<TransferStats> {
        let downloads = self.config.download_dir();
        let into = match dest {
            Dest::Staged(_) => None,
            Dest::Partition { slot, .. } => Some(*slot),
        };
        let durable = match &self.journal.phase {
            Phase::Downloading { release: r, transfer: t, durable, into: i } if r == release && t == transfer && *i == into => *durable,
            _ => 0,
        };
        let spec = self.transfer_spec(updater, release, transfer, hashes, reference, dest, durable)?;
        let (output, partial, image_path) = (spec.output, spec.partial.clone(), spec.image.clone());
        let kept_on_partition = output == Output::Partition && partial == image_path;
        // What is still to come, plus the decoded image beside it unless the target
        // is the image as-is (then the received file is renamed into place) or the
        // image goes into a partition.
        let to_receive = transfer.length - durable.min(transfer.length);
        let needed = match output {
            _ if kept_on_partition => 0,
            Output::Partition => to_receive,
            Output::Staged if spec.is_as_is() => to_receive,
            Output::Staged => to_receive + release.length,
        };
        check_space(&downloads, needed)?;
        self.set_phase(Phase::Downloading { release: release.clone(), transfer: transfer.clone(), durable, into })?;
        let opts = TransferOptions { retries: self.config.install.retries, bandwidth: self.config.install.bandwidth_limit, ..Default::default() };
        let journal_file = JournalFile::new(self.journal_file.path());
        let mut journal = self.journal.clone();
        let metrics = self.config.state_dir.join("metrics.prom");
        let total = transfer.length;
        let result = transfer::run(&self.fetcher, spec, &opts, |d| {
            if let Phase::Downloading { durable, .. } = &mut journal.phase {
                *durable = d;
            }
            tracing::info!(received = d, total, "download progress (durable)");
            super::write_metrics_file(&metrics, &journal, Some((d, total)));
            journal_file.store(&journal)
        })
        .await;
        self.journal = journal;
        match result {
            Ok(stats) => {
                tracing::info!(target = %transfer.target, resumed_from = stats.resumed_from, received = stats.received, attempts = stats.attempts, "download verified");
                if !kept_on_partition {
                    let _ = std::fs::remove_file(&partial);
                }
                Ok(stats)
            }
            Err(e) => {
                if matches!(e, AgentError::Tuf { .. } | AgentError::ImageMismatch { .. } | AgentError::TooLarge { .. }) {
                    // The bytes can never verify: nothing of them is kept (a partition
                    // is the device: it stays, and is written over from byte 0).
                    if !kept_on_partition {
                        let _ = std::fs::remove_file(&partial);
                    }
                    if output == Output::Staged {
                        let _ = std::fs::remove_file(&image_path);
                    }
                    if let Phase::Downloading { durable, .. } = &mut self.journal.phase {
                        *durable = 0;
                        self.journal_file.store(&self.journal)?;
                    }
                }
                Err(e)
            }
        }
    }
}

/// Where a download's image goes.
pub(super) enum Dest {
    /// A staged image file in the download directory (file slots).
    Staged(PathBuf),
    /// The inactive slot's partition, written in place while the bytes arrive.
    Partition { slot: Slot, path: PathBuf },
}

/// The file (its first `length` bytes, when given) as a patch base if their sha256 is
/// `want`: hashed in a streaming pass, then opened for positional reads.
fn read_if_digest(path: &Path, length: Option<u64>, want: &str) -> Result<Option<FileBase>> {
    let (sha, len) = hash_file(path, length)?;
    if !sha.eq_ignore_ascii_case(want) || length.is_some_and(|l| l != len) {
        return Ok(None);
    }
    let file = std::fs::File::open(path).map_err(|e| AgentError::io("open", path, e))?;
    Ok(Some(FileBase { file, len }))
}
