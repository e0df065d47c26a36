//! What a transfer is ([`TransferSpec`]) and the files it writes: the partial file of
//! received bytes (or the partition itself, for a target sent as-is into a partition
//! slot) and the decoder's output.

use std::io::{Read, Seek, SeekFrom, Write};

use outpost_protocol::codec::Decode;
use outpost_protocol::hashing::MultiHasher;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::journal::Encoding;
use crate::error::{AgentError, Result};

/// What to fetch and what it must turn into.
pub struct TransferSpec {
    pub url: String,
    /// Signed length and hashes of the fetched target.
    pub length: u64,
    pub hashes: BTreeMap<String, String>,
    pub encoding: Encoding,
    /// For patches: the reference image (the booted slot's content).
    pub reference: Option<Arc<dyn outpost_protocol::wpatch::Base>>,
    /// The image the bytes must decode to.
    pub image_sha256: String,
    pub image_length: u64,
    /// Received bytes (kept for resuming).
    pub partial: PathBuf,
    /// Where the decoded image goes: a staged file, or the inactive slot's partition.
    pub image: PathBuf,
    pub output: Output,
    /// Bytes of `partial` known durable (from the journal).
    pub durable: u64,
}

/// What `TransferSpec::image` is. A partition is the device itself: it is written in
/// place, never created, truncated, renamed or removed; for a target sent as-is it is
/// also where received bytes are kept (`partial` is the partition), so a resumed
/// transfer continues on the partition at the offset last fsynced there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A file in the download directory, written whole, renamed into place when as-is.
    Staged,
    /// The inactive slot's block device.
    Partition,
}

impl TransferSpec {
    /// Whether the target is the image itself (sent as-is, with the image's length and
    /// SHA-256): then the received file becomes the staged image by rename, and no
    /// second copy is ever on disk.
    pub fn is_as_is(&self) -> bool {
        self.encoding == Encoding::Identity
            && self.length == self.image_length
            && self.hashes.get("sha256").is_some_and(|h| h.eq_ignore_ascii_case(&self.image_sha256))
    }
}


/// Opens the partial file, cut back to what is known durable; returns it positioned
/// there, with that offset.
pub(super) fn open_partial(spec: &TransferSpec) -> Result<(std::fs::File, u64)> {
    let mut partial = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&spec.partial)
        .map_err(|e| AgentError::io("open", &spec.partial, e))?;
    let durable = if partial_is_partition(spec) {
        // The partition's bytes past the durable offset are whatever was there: they
        // are written over, never trusted (the whole image is hashed at the end).
        spec.durable.min(spec.length)
    } else {
        let on_disk = partial.metadata().map_err(|e| AgentError::io("stat", &spec.partial, e))?.len();
        let durable = spec.durable.min(on_disk);
        partial.set_len(durable).map_err(|e| AgentError::io("truncate", &spec.partial, e))?;
        durable
    };
    partial.seek(SeekFrom::Start(durable)).map_err(|e| AgentError::io("seek", &spec.partial, e))?;
    Ok((partial, durable))
}

/// Hashes and decodes the complete partial file in one pass (a resumed transfer).
pub(super) fn replay<W: Write>(spec: &TransferSpec, partial: &mut std::fs::File, hasher: &mut MultiHasher, mut decode: Option<&mut Decode<'_, W>>) -> Result<()> {
    partial.seek(SeekFrom::Start(0)).map_err(|e| AgentError::io("seek", &spec.partial, e))?;
    // Exactly the signed length: a partition goes on past the image.
    let mut partial = partial.take(spec.length);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = partial.read(&mut buf).map_err(|e| AgentError::io("read", &spec.partial, e))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
        if let Some(d) = decode.as_mut() {
            d.feed(&buf[..n]).map_err(|e| decode_error(spec, e))?;
        }
    }
}

/// Whether the received bytes are kept on the partition itself (as-is into a partition).
pub(super) fn partial_is_partition(spec: &TransferSpec) -> bool {
    spec.output == Output::Partition && spec.partial == spec.image
}

/// Opens the decoder's output: a staged file is created afresh; a partition is opened
/// for writing in place (never created or truncated).
pub(super) fn open_output(path: &std::path::Path, output: Output) -> Result<std::fs::File> {
    match output {
        Output::Staged => std::fs::File::create(path).map_err(|e| AgentError::io("create", path, e)),
        Output::Partition => std::fs::OpenOptions::new().write(true).open(path).map_err(|e| AgentError::io("open slot partition", path, e)),
    }
}


pub(super) fn decode_error(spec: &TransferSpec, e: std::io::Error) -> AgentError {
    AgentError::ImageMismatch { url: spec.url.clone(), reason: format!("cannot decode ({:?}): {e}", spec.encoding) }
}

