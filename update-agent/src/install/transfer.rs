//! Downloading a release's bytes so that an interruption costs almost nothing: the
//! received bytes are kept in a partial file, fsynced at checkpoints whose offset is
//! journaled, and a restart resumes with an HTTP Range request from the last durable
//! offset. Dropped connections are retried with exponential backoff and jitter; an
//! optional bandwidth cap paces the transfer. While bytes arrive they are hashed
//! (the signed TUF hashes of the target) and decoded (zstd, or zstd patch) into the
//! staged image, which is hashed too. Nothing is trusted until both digests match the
//! signed metadata. A resumed transfer does not replay what an earlier run kept: it
//! hashes and decodes the whole file once, when it is complete (see [`sink_worker`]). A target sent as-is, whose signed SHA-256 is the image's, is
//! written and hashed once: once verified, the partial file becomes the staged image.

use std::io::{Seek, SeekFrom, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_protocol::hashing::MultiHasher;

use outpost_protocol::codec::{Decode, ImageSink};
use super::journal::Encoding;
use super::partial::{decode_error, open_output, open_partial, partial_is_partition, replay};
pub use super::partial::{Output, TransferSpec};
use crate::error::{AgentError, Result};
use crate::fetch::Fetcher;

#[derive(Debug, Clone)]
pub struct TransferOptions {
    pub retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Bytes per second, if capped.
    pub bandwidth: Option<u64>,
    /// fsync and journal the partial file every this many bytes.
    pub checkpoint_every: u64,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            retries: 5,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            bandwidth: None,
            checkpoint_every: 4 << 20,
        }
    }
}

/// What a transfer did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TransferStats {
    /// Bytes already on disk when this run started (not downloaded again).
    pub resumed_from: u64,
    /// Bytes received over the network in this run.
    pub received: u64,
    /// Network attempts (1 = no retry).
    pub attempts: u32,
}

enum Msg {
    Chunk(Bytes),
    /// The server ignored the Range request: start over from byte 0.
    Restart,
}

enum Ack {
    Durable(u64),
}

/// Runs a transfer to completion or error. `checkpoint` is called with each new
/// durable offset (to journal it).
pub async fn run(
    fetcher: &Fetcher,
    spec: TransferSpec,
    opts: &TransferOptions,
    mut checkpoint: impl FnMut(u64) -> Result<()>,
) -> Result<TransferStats> {
    let run = Run { url: spec.url.clone(), length: spec.length, opts, started: Instant::now() };
    let (sink, mut received) = Sink::start(spec, opts.checkpoint_every).await?;
    let mut stats = TransferStats { resumed_from: received, ..Default::default() };
    let mut failure: Option<AgentError> = None;
    while received < run.length {
        stats.attempts += 1;
        if stats.attempts > 1 {
            let delay = backoff(opts, stats.attempts - 1);
            tracing::warn!(url = %run.url, attempt = stats.attempts, offset = received, ?delay, "retrying download");
            tokio::time::sleep(delay).await;
        }
        let mut resp = match fetcher.start_at(&run.url, received).await {
            Ok(r) => r,
            Err(e) if retryable(&e) && stats.attempts <= opts.retries => continue,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        if received > 0 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            tracing::warn!(url = %run.url, "server ignored the Range request; starting over");
            if sink.tx.send(Msg::Restart).is_err() {
                break;
            }
            received = 0;
        }
        match run.receive(&mut resp, &sink, &mut received, &mut stats, &mut checkpoint).await? {
            Attempt::Ended => {}
            Attempt::Interrupted => continue,
            Attempt::Stop(f) => {
                failure = f;
                break;
            }
        }
        if received < run.length && stats.attempts > opts.retries {
            failure = Some(AgentError::Truncated { url: run.url.clone(), got: received, expected: run.length });
            break;
        }
    }
    sink.finish(failure, &mut checkpoint).await?;
    Ok(stats)
}

/// What one transfer is about, for its attempts.
struct Run<'o> {
    url: String,
    length: u64,
    opts: &'o TransferOptions,
    started: Instant,
}

/// How one attempt's answer ended.
enum Attempt {
    /// The answer ended (complete, or short: the caller decides).
    Ended,
    /// The connection broke in a way worth retrying.
    Interrupted,
    /// Give up: with the error, or none when the worker failed (its error is the one).
    Stop(Option<AgentError>),
}

impl Run<'_> {
    /// Passes one answer's chunks to the sink (paced to the bandwidth cap) and journals
    /// the durable offsets the sink reports.
    async fn receive(
        &self,
        resp: &mut crate::fetch::Body,
        sink: &Sink,
        received: &mut u64,
        stats: &mut TransferStats,
        checkpoint: &mut impl FnMut(u64) -> Result<()>,
    ) -> Result<Attempt> {
        loop {
            while let Ok(Ack::Durable(d)) = sink.acks.try_recv() {
                checkpoint(d)?;
            }
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    *received += chunk.len() as u64;
                    stats.received += chunk.len() as u64;
                    if *received > self.length {
                        return Ok(Attempt::Stop(Some(AgentError::TooLarge { url: self.url.clone(), limit: self.length })));
                    }
                    if sink.tx.send(Msg::Chunk(chunk)).is_err() {
                        return Ok(Attempt::Stop(None)); // the worker failed; its error is reported
                    }
                    if let Some(rate) = self.opts.bandwidth {
                        let due = Duration::from_secs_f64(stats.received as f64 / rate.max(1) as f64);
                        let spent = self.started.elapsed();
                        if due > spent {
                            tokio::time::sleep(due - spent).await;
                        }
                    }
                }
                Ok(None) => return Ok(Attempt::Ended),
                Err(e) if retryable(&e) && stats.attempts <= self.opts.retries => {
                    tracing::warn!(url = %self.url, error = %e, offset = *received, "download interrupted");
                    return Ok(Attempt::Interrupted);
                }
                Err(e) => return Ok(Attempt::Stop(Some(e))),
            }
        }
    }
}

/// The blocking worker that owns the files (see [`sink_worker`]) and its channels.
struct Sink {
    tx: mpsc::SyncSender<Msg>,
    acks: mpsc::Receiver<Ack>,
    worker: tokio::task::JoinHandle<Result<()>>,
}

impl Sink {
    /// Starts the worker; returns it with the offset it resumes from.
    async fn start(spec: TransferSpec, checkpoint_every: u64) -> Result<(Self, u64)> {
        // Chunks from hyper reach ~400 KiB on a fast link: a short queue bounds the
        // bytes in flight (32 of them could hold ~13 MiB).
        let (tx, rx) = mpsc::sync_channel::<Msg>(4);
        let (ack_tx, acks) = mpsc::channel::<Ack>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<u64>>();
        let worker = tokio::task::spawn_blocking(move || sink_worker(spec, rx, ack_tx, ready_tx, checkpoint_every));
        match ready_rx.await {
            Ok(Ok(offset)) => Ok((Sink { tx, acks, worker }, offset)),
            Ok(Err(e)) => {
                drop(tx);
                let _ = worker.await;
                Err(e)
            }
            Err(_) => Err(match worker.await {
                Ok(Err(e)) => e,
                _ => AgentError::Task { task: "transfer worker", reason: "stopped before starting".into() },
            }),
        }
    }

    /// Ends the stream, waits for the worker's verdict and journals its last durable
    /// offsets. The receiving side's `failure` comes first, then the worker's error.
    async fn finish(self, failure: Option<AgentError>, checkpoint: &mut impl FnMut(u64) -> Result<()>) -> Result<()> {
        let Sink { tx, acks, worker } = self;
        drop(tx);
        let result = worker.await.map_err(|e| AgentError::Task { task: "transfer worker", reason: e.to_string() })?;
        while let Ok(Ack::Durable(d)) = acks.try_recv() {
            checkpoint(d)?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        result
    }
}

fn retryable(e: &AgentError) -> bool {
    match e {
        AgentError::Fetch { .. } | AgentError::Timeout { .. } | AgentError::SlowRetrieval { .. } => true,
        AgentError::HttpStatus { status, .. } => *status >= 500 || *status == 408 || *status == 429,
        _ => false,
    }
}

fn backoff(opts: &TransferOptions, retry: u32) -> Duration {
    let exp = opts.backoff_base.saturating_mul(1u32 << retry.min(16)).min(opts.backoff_max);
    let mut r = [0u8; 4];
    let _ = getrandom::getrandom(&mut r);
    // Full jitter between half and all of the exponential delay.
    let frac = 0.5 + 0.5 * (u32::from_le_bytes(r) as f64 / u32::MAX as f64);
    exp.mul_f64(frac)
}

/// Owns the files: appends received bytes, hashes, decodes into the staged image,
/// fsyncs checkpoints, verifies at the end. Failure removes the partial file when its
/// content cannot be right (a hash mismatch), so the next try starts clean.
///
/// A transfer that starts from byte 0 hashes and decodes its bytes as they arrive. One
/// that resumes what an earlier run left in the partial file does neither until the
/// file is complete: it appends, then reads the file once, hashing and decoding it.
/// (Replaying the kept, still unverified bytes at every start made a server that cut
/// each attempt short of its end cost a full decode, and a rewrite of the staged image,
/// per check interval: CPU and flash wear without bound. Now a start costs a seek, and
/// each byte is decoded once per completed download.)
///
/// A target sent as-is whose signed SHA-256 is the image's is its own staged image:
/// nothing is decoded or hashed a second time, and once verified the partial file is
/// renamed to the image (half the disk writes and hashing of a decoded transfer).
fn sink_worker(
    spec: TransferSpec,
    rx: mpsc::Receiver<Msg>,
    acks: mpsc::Sender<Ack>,
    ready: tokio::sync::oneshot::Sender<Result<u64>>,
    checkpoint_every: u64,
) -> Result<()> {
    let reference = spec.reference.clone();
    let what = format!("download {}", spec.url);
    let as_is = spec.is_as_is();
    let new_hasher = || MultiHasher::for_expected(&spec.hashes, &what).map_err(|e| AgentError::tuf(what.clone(), e));
    // The decoder into a separate staged image, for targets that are not the image as-is.
    let start_decode = || -> Result<Option<Decode<'_, std::io::BufWriter<std::fs::File>>>> {
        if as_is {
            return Ok(None);
        }
        let image = open_output(&spec.image, spec.output)?;
        let sink = ImageSink::new(std::io::BufWriter::with_capacity(1 << 20, image), spec.image_length);
        new_decode(spec.encoding, sink, reference.as_deref())
            .map(Some)
            .map_err(|e| AgentError::io("start decoder for", &spec.image, e))
    };
    // Hashing and decoding while the bytes arrive: from byte 0 only.
    type Streaming<'a> = (MultiHasher, Option<Decode<'a, std::io::BufWriter<std::fs::File>>>);
    let setup = || -> Result<(std::fs::File, Option<Streaming<'_>>, u64)> {
        let (partial, durable) = open_partial(&spec)?;
        let streaming = if durable == 0 { Some((new_hasher()?, start_decode()?)) } else { None };
        Ok((partial, streaming, durable))
    };
    let (mut partial, mut streaming, durable) = match setup() {
        Ok(v) => v,
        Err(e) => {
            let msg = e.to_string();
            let _ = ready.send(Err(AgentError::Task { task: "transfer worker", reason: msg }));
            return Err(e);
        }
    };
    let _ = ready.send(Ok(durable));
    let mut written = durable;
    let mut last_sync = durable;
    for msg in rx {
        match msg {
            Msg::Chunk(chunk) => {
                append(&spec, &mut partial, streaming.as_mut(), &chunk)?;
                written += chunk.len() as u64;
                if written - last_sync >= checkpoint_every {
                    partial.sync_data().map_err(|e| AgentError::io("fsync", &spec.partial, e))?;
                    last_sync = written;
                    let _ = acks.send(Ack::Durable(written));
                }
            }
            Msg::Restart => {
                if !partial_is_partition(&spec) {
                    partial.set_len(0).map_err(|e| AgentError::io("truncate", &spec.partial, e))?;
                }
                partial.seek(SeekFrom::Start(0)).map_err(|e| AgentError::io("seek", &spec.partial, e))?;
                streaming = Some((new_hasher()?, start_decode()?));
                written = 0;
                last_sync = 0;
                let _ = acks.send(Ack::Durable(0));
            }
        }
    }
    partial.sync_data().map_err(|e| AgentError::io("fsync", &spec.partial, e))?;
    let _ = acks.send(Ack::Durable(written));
    if written != spec.length {
        // Incomplete: keep the partial file for the next attempt.
        return Ok(());
    }
    let (hasher, decode) = match streaming {
        Some(s) => s,
        None => {
            // Resumed: the one pass over the complete file.
            let (mut hasher, mut decode) = (new_hasher()?, start_decode()?);
            replay(&spec, &mut partial, &mut hasher, decode.as_mut())?;
            (hasher, decode)
        }
    };
    stage_image(&spec, partial, hasher, decode, &acks, &what)
}

/// Appends a received chunk to the partial file, hashing and decoding it when the
/// transfer streams (started from byte 0).
fn append<W: Write>(spec: &TransferSpec, partial: &mut std::fs::File, streaming: Option<&mut (MultiHasher, Option<Decode<'_, W>>)>, chunk: &[u8]) -> Result<()> {
    partial.write_all(chunk).map_err(|e| AgentError::io("write", &spec.partial, e))?;
    if let Some((hasher, decode)) = streaming {
        hasher.update(chunk);
        if let Some(d) = decode.as_mut() {
            d.feed(chunk).map_err(|e| decode_error(spec, e))?;
        }
    }
    Ok(())
}

/// Verifies the complete transfer against its signed hashes (bytes that do not verify
/// are removed), then makes it the staged image: renamed into place when it is the
/// image as-is, else the decoder's output made durable and checked against the signed
/// image digest.
fn stage_image(
    spec: &TransferSpec,
    partial: std::fs::File,
    hasher: MultiHasher,
    decode: Option<Decode<'_, std::io::BufWriter<std::fs::File>>>,
    acks: &mpsc::Sender<Ack>,
    what: &str,
) -> Result<()> {
    if let Err(e) = hasher.verify(&spec.hashes, what) {
        if !partial_is_partition(spec) {
            let _ = std::fs::remove_file(&spec.partial);
        }
        let _ = acks.send(Ack::Durable(0));
        return Err(AgentError::tuf(format!("verify {}", spec.url), e));
    }
    let Some(decode) = decode else {
        // Verified against the signed sha256, which is the image's: the bytes are the image.
        if partial_is_partition(spec) {
            // Already in place on the partition: flush the device (the caller reads
            // it back against the signed digest before arming the trial).
            return partial.sync_all().map_err(|e| AgentError::io("fsync", &spec.image, e));
        }
        drop(partial);
        std::fs::rename(&spec.partial, &spec.image).map_err(|e| AgentError::io("rename to the staged image", &spec.partial, e))?;
        if let Some(dir) = spec.image.parent() {
            outpost_fsio::sync_dir(dir).map_err(|e| AgentError::io("fsync", dir, e))?;
        }
        return Ok(());
    };
    let (out, sha, len) = decode.finish().map_err(|e| decode_error(spec, e))?;
    let file = out.into_inner().map_err(|e| AgentError::io("write", &spec.image, e.into_error()))?;
    file.sync_all().map_err(|e| AgentError::io("fsync", &spec.image, e))?;
    if len != spec.image_length || sha != spec.image_sha256 {
        return Err(AgentError::ImageMismatch {
            url: spec.url.clone(),
            reason: format!("decoded image is {len} bytes with sha256 {sha}; signed: {} bytes, sha256 {}", spec.image_length, spec.image_sha256),
        });
    }
    Ok(())
}

fn new_decode<'p, W: Write>(encoding: Encoding, sink: ImageSink<W>, reference: Option<&'p dyn outpost_protocol::wpatch::Base>) -> std::io::Result<Decode<'p, W>> {
    match encoding {
        Encoding::Identity => Ok(Decode::identity(sink)),
        Encoding::Zstd => Decode::zstd(sink, None),
        Encoding::ZstdPatch => match reference {
            Some(r) => Ok(Decode::windowed(sink, r)),
            None => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a patch needs its reference image")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use outpost_protocol::hashing::sha256_hex;

    /// Runs the sink worker over `chunks` (the bytes on the wire) as a transfer signed as
    /// `sent` that must become an image with `image_sha256`; returns its result, the
    /// directory and the spec.
    fn sink(sent: &[u8], image_sha256: &str, chunks: &[&[u8]]) -> (Result<()>, tempfile::TempDir, TransferSpec) {
        let dir = tempfile::tempdir().unwrap();
        let spec = || TransferSpec {
            url: "http://127.0.0.1/targets/fw.img".into(),
            length: sent.len() as u64,
            hashes: BTreeMap::from([("sha256".to_owned(), sha256_hex(sent))]),
            encoding: Encoding::Identity,
            reference: None,
            image_sha256: image_sha256.to_owned(),
            image_length: sent.len() as u64,
            partial: dir.path().join("fw.img.partial"),
            image: dir.path().join("fw.img.image"),
            output: Output::Staged,
            durable: 0,
        };
        let (tx, rx) = mpsc::sync_channel(chunks.len() + 1);
        for c in chunks {
            tx.send(Msg::Chunk(Bytes::copy_from_slice(c))).unwrap();
        }
        drop(tx);
        let (acks, _acks_rx) = mpsc::channel();
        let (ready, _ready_rx) = tokio::sync::oneshot::channel();
        let result = sink_worker(spec(), rx, acks, ready, 1 << 20);
        let kept = spec();
        (result, dir, kept)
    }

    #[test]
    fn an_as_is_target_becomes_the_staged_image_by_rename() {
        let image: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let (result, _dir, spec) = sink(&image, &sha256_hex(&image), &[&image[..1_000_000], &image[1_000_000..]]);
        result.unwrap();
        assert!(!spec.partial.exists(), "the verified partial file is the staged image now");
        assert_eq!(std::fs::read(&spec.image).unwrap(), image);
    }

    #[test]
    fn as_is_bytes_that_do_not_verify_leave_nothing() {
        let image = vec![7u8; 100_000];
        let mut wrong = image.clone();
        wrong[50_000] = 8;
        // Signed hashes of `image`, bytes of `wrong` on the wire.
        let (result, _dir, spec) = sink(&image, &sha256_hex(&image), &[&wrong]);
        let err = result.unwrap_err();
        assert!(matches!(err, AgentError::Tuf { .. }), "{err}");
        assert!(!spec.partial.exists() && !spec.image.exists());
    }

    #[test]
    fn a_target_whose_hash_is_not_the_image_measurement_is_refused() {
        // Signed as-is, but the release says the image is something else: decoded and
        // checked as before, and refused.
        let image = vec![1u8; 10_000];
        let (result, _dir, spec) = sink(&image, &sha256_hex(b"another image"), &[&image]);
        let err = result.unwrap_err();
        assert!(matches!(err, AgentError::ImageMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&sha256_hex(b"another image")), "{err}");
        assert!(spec.partial.exists(), "the partial file is removed by the caller, not the worker");
    }

    /// A zstd target of which `kept` bytes are in the partial file from an earlier run;
    /// this run receives `chunks`. Returns the result and the spec.
    fn resumed_zstd(image: &[u8], kept: usize, chunks: &[&[u8]], dir: &std::path::Path) -> (Result<()>, TransferSpec) {
        let sent = zstd::encode_all(image, 3).unwrap();
        let spec = || TransferSpec {
            url: "http://127.0.0.1/targets/fw.img.zst".into(),
            length: sent.len() as u64,
            hashes: BTreeMap::from([("sha256".to_owned(), sha256_hex(&sent))]),
            encoding: Encoding::Zstd,
            reference: None,
            image_sha256: sha256_hex(image),
            image_length: image.len() as u64,
            partial: dir.join("fw.img.zst.partial"),
            image: dir.join("fw.img.image"),
            output: Output::Staged,
            durable: kept as u64,
        };
        std::fs::write(&spec().partial, &sent[..kept]).unwrap();
        let (tx, rx) = mpsc::sync_channel(chunks.len() + 1);
        for c in chunks {
            tx.send(Msg::Chunk(Bytes::copy_from_slice(c))).unwrap();
        }
        drop(tx);
        let (acks, _acks_rx) = mpsc::channel();
        let (ready, _ready_rx) = tokio::sync::oneshot::channel();
        (sink_worker(spec(), rx, acks, ready, 1 << 20), spec())
    }

    /// As-is into a partition (a regular file stands in: the worker never looks at the
    /// type): received bytes land on the "partition" at the durable offset, bytes past
    /// the image stay, and bytes that do not verify never remove or truncate it.
    #[test]
    fn as_is_into_a_partition_writes_in_place_and_never_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("partition");
        let image = text(3_000_000);
        std::fs::write(&part, vec![0xeeu8; 4_000_000]).unwrap();
        let run = |chunks: &[&[u8]], durable: u64, signed: &[u8]| {
            let spec = TransferSpec {
                url: "http://127.0.0.1/targets/fw.img".into(),
                length: signed.len() as u64,
                hashes: BTreeMap::from([("sha256".to_owned(), sha256_hex(signed))]),
                encoding: Encoding::Identity,
                reference: None,
                image_sha256: sha256_hex(signed),
                image_length: signed.len() as u64,
                partial: part.clone(),
                image: part.clone(),
                output: Output::Partition,
                durable,
            };
            let (tx, rx) = mpsc::sync_channel(chunks.len() + 1);
            for c in chunks {
                tx.send(Msg::Chunk(Bytes::copy_from_slice(c))).unwrap();
            }
            drop(tx);
            let (acks, _acks_rx) = mpsc::channel();
            let (ready, _ready_rx) = tokio::sync::oneshot::channel();
            sink_worker(spec, rx, acks, ready, 1 << 20)
        };
        // A first run cut short, then a resume from 1,000,000.
        run(&[&image[..1_000_000]], 0, &image).unwrap();
        run(&[&image[1_000_000..]], 1_000_000, &image).unwrap();
        let on_disk = std::fs::read(&part).unwrap();
        assert_eq!(on_disk.len(), 4_000_000, "the partition was truncated");
        assert!(on_disk[..image.len()] == image[..] && on_disk[image.len()..].iter().all(|&b| b == 0xee));
        // Wrong bytes: refused, and the partition is still there, whole.
        let mut wrong = image.clone();
        wrong[10] ^= 1;
        let err = run(&[&wrong], 0, &image).unwrap_err();
        assert!(matches!(err, AgentError::Tuf { .. }), "{err}");
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 4_000_000);
    }

    fn text(len: usize) -> Vec<u8> {
        (0..len).map(|i| b"outpost firmware "[i % 17]).collect()
    }

    /// A start that resumes kept bytes and is cut short again decodes nothing and
    /// writes no staged image: the kept bytes wait for the rest.
    #[test]
    fn a_resumed_start_does_not_decode_the_kept_bytes_again() {
        let dir = tempfile::tempdir().unwrap();
        let image = text(2_000_000);
        let sent_len = zstd::encode_all(&image[..], 3).unwrap().len();
        let (result, spec) = resumed_zstd(&image, sent_len / 2, &[], dir.path());
        result.unwrap();
        assert!(!spec.image.exists(), "a resumed, incomplete transfer must not decode into the staged image");
        assert_eq!(std::fs::metadata(&spec.partial).unwrap().len(), (sent_len / 2) as u64);
    }

    /// Completed after a resume: one pass over the whole file verifies and decodes it.
    #[test]
    fn a_resumed_transfer_is_verified_and_decoded_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let image = text(2_000_000);
        let sent = zstd::encode_all(&image[..], 3).unwrap();
        let half = sent.len() / 2;
        let (result, spec) = resumed_zstd(&image, half, &[&sent[half..half + 10], &sent[half + 10..]], dir.path());
        result.unwrap();
        assert_eq!(std::fs::read(&spec.image).unwrap(), image);
        // Kept bytes that are not what the server signs are caught at the end.
        let dir = tempfile::tempdir().unwrap();
        let mut wrong = sent.clone();
        wrong[half + 100] ^= 0xff;
        let (result, _) = resumed_zstd(&image, half, &[&wrong[half..]], dir.path());
        let err = result.unwrap_err();
        assert!(matches!(err, AgentError::Tuf { .. } | AgentError::ImageMismatch { .. }), "{err}");
    }
}
