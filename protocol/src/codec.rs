//! Image encodings: turning received bytes into the image while they arrive (as-is,
//! zstd, or a zstd patch against a reference image, `--patch-from` style), and making
//! such patches on the pipeline side. Output goes to a sink that hashes and writes
//! it; the caller owns any files.

use std::io::{self, Write};

use sha2::{Digest, Sha256};
use zstd::stream::raw::{Decoder as RawDecoder, InBuffer, Operation, OutBuffer};

/// The staged image: written sequentially and hashed as written.
pub struct ImageSink<W: Write> {
    out: W,
    hasher: Sha256,
    written: u64,
    limit: u64,
}

impl<W: Write> ImageSink<W> {
    /// `limit` is the signed image length: a stream that decodes to more is refused
    /// at once (decompression bomb), not after filling the disk.
    pub fn new(out: W, limit: u64) -> Self {
        ImageSink { out, hasher: Sha256::new(), written: 0, limit }
    }

    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.written += data.len() as u64;
        if self.written > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("decoded image is larger than its signed length {}", self.limit),
            ));
        }
        self.hasher.update(data);
        self.out.write_all(data)
    }

    pub fn finish(mut self) -> io::Result<(W, String, u64)> {
        self.out.flush()?;
        Ok((self.out, hex::encode(self.hasher.finalize()), self.written))
    }
}

enum Mode<'p> {
    Identity,
    Zstd { dec: RawDecoder<'p>, buf: Vec<u8>, frame_done: bool },
}

/// Feeds received bytes through the decoder into an [`ImageSink`].
pub struct Decode<'p, W: Write> {
    mode: Mode<'p>,
    sink: ImageSink<W>,
}

impl<'p, W: Write> Decode<'p, W> {
    pub fn identity(sink: ImageSink<W>) -> Self {
        Decode { mode: Mode::Identity, sink }
    }

    /// zstd; with `reference`, a patch against it (the reference must outlive the decode).
    pub fn zstd(sink: ImageSink<W>, reference: Option<&'p [u8]>) -> io::Result<Self> {
        let mut dec = match reference {
            Some(r) => RawDecoder::with_ref_prefix(r)?,
            None => RawDecoder::new()?,
        };
        // Patches use a long window (the whole reference image), but never longer than
        // the signed length and the reference justify (see `max_window_log`).
        let window_log = max_window_log(sink.limit, reference.map_or(0, <[u8]>::len));
        dec.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(window_log))?;
        Ok(Decode { mode: Mode::Zstd { dec, buf: vec![0u8; 1 << 17], frame_done: false }, sink })
    }

    pub fn feed(&mut self, input: &[u8]) -> io::Result<()> {
        match &mut self.mode {
            Mode::Identity => self.sink.put(input),
            Mode::Zstd { dec, buf, frame_done } => {
                let mut inb = InBuffer::around(input);
                loop {
                    if *frame_done && inb.pos() < input.len() {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "data after the end of the zstd frame"));
                    }
                    let mut outb = OutBuffer::around(&mut buf[..]);
                    let hint = dec.run(&mut inb, &mut outb)?;
                    let produced = outb.pos();
                    if hint == 0 {
                        *frame_done = true;
                    }
                    let full = produced == buf.len();
                    self.sink.put(&buf[..produced])?;
                    if inb.pos() >= input.len() && !full {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Ends the stream: a zstd stream must have ended its frame.
    pub fn finish(self) -> io::Result<(W, String, u64)> {
        if let Mode::Zstd { frame_done: false, .. } = self.mode {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "zstd stream is truncated (frame not complete)"));
        }
        self.sink.finish()
    }
}

/// Makes a zstd patch of `new` against `reference` (long window, as
/// `zstd --patch-from`), for the pipeline side. At level 19 and above the match
/// search is widened (longer target length, a chain table as large as the window),
/// which on filesystem images of changed Debian packages makes patches smaller
/// than xdelta3's (docs/benchmarks.md) at the cost of compression time and memory
/// proportional to the image; decoding cost does not change.
pub fn make_patch(reference: &[u8], new: &[u8], level: i32) -> io::Result<Vec<u8>> {
    use zstd::stream::raw::Encoder as RawEncoder;
    use zstd::zstd_safe::CParameter;
    let mut enc = RawEncoder::with_ref_prefix(level, reference)?;
    let window = window_log_for(reference.len().max(new.len()));
    enc.set_parameter(CParameter::WindowLog(window))?;
    enc.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
    if level >= 19 {
        enc.set_parameter(CParameter::TargetLength(4096))?;
        enc.set_parameter(CParameter::ChainLog(window.min(30)))?;
    }
    enc.set_pledged_src_size(Some(new.len() as u64))?;
    let mut out = Vec::with_capacity(new.len() / 8 + 1024);
    let mut buf = vec![0u8; 1 << 17];
    let mut inb = InBuffer::around(new);
    while inb.pos() < new.len() {
        let mut outb = OutBuffer::around(&mut buf[..]);
        enc.run(&mut inb, &mut outb)?;
        let n = outb.pos();
        out.extend_from_slice(&buf[..n]);
    }
    loop {
        let mut outb = OutBuffer::around(&mut buf[..]);
        let remaining = enc.finish(&mut outb, true)?;
        let n = outb.pos();
        out.extend_from_slice(&buf[..n]);
        if remaining == 0 {
            break;
        }
    }
    Ok(out)
}

/// Windows up to 2^27 bytes (128 MiB) are always accepted: `zstd --long` and
/// `outpost release publish --zstd` (level 19 with long-distance matching, size not
/// pledged) declare 2^27 whatever the image size.
pub const MIN_WINDOW_LOG_MAX: u32 = 27;

/// The largest window (as a log2) a frame decoding to at most `limit` bytes against a
/// reference of `reference_len` bytes may declare. zstd allocates the window when it
/// reads the frame header, before one byte of the image can be verified: with a fixed
/// limit of 2^31, ten bytes declaring a 2 GiB window made the device allocate 2 GiB
/// for an image signed as 64 bytes (found by fuzz/fuzz_targets/codec.rs). A frame
/// never needs to reach further back than its whole output and the reference before
/// it, so that bounds the window, above [`MIN_WINDOW_LOG_MAX`].
pub fn max_window_log(limit: u64, reference_len: usize) -> u32 {
    let need = usize::try_from(limit.saturating_add(reference_len as u64)).unwrap_or(usize::MAX);
    window_log_for(need).max(MIN_WINDOW_LOG_MAX)
}

/// Window log covering `len` bytes (at least 2^20, at most 2^31).
pub fn window_log_for(len: usize) -> u32 {
    let mut log = 20u32;
    while log < 31 && (1usize << log) < len {
        log += 1;
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decode<'_, Vec<u8>>, data: &[u8], chunk: usize) {
        for c in data.chunks(chunk) {
            d.feed(c).unwrap();
        }
    }

    #[test]
    fn zstd_roundtrip_in_small_chunks() {
        let image: Vec<u8> = (0..300_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let compressed = zstd::encode_all(&image[..], 3).unwrap();
        let mut d = Decode::zstd(ImageSink::new(Vec::new(), image.len() as u64), None).unwrap();
        decode_all(&mut d, &compressed, 777);
        let (out, sha, len) = d.finish().unwrap();
        assert_eq!(out, image);
        assert_eq!(len, image.len() as u64);
        assert_eq!(sha, hex::encode(Sha256::digest(&image)));
    }

    #[test]
    fn patch_reconstructs_and_is_small() {
        let base: Vec<u8> = (0..2_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut new = base.clone();
        new[1000..1100].fill(7);
        new.extend_from_slice(b"appended tail");
        let patch = make_patch(&base, &new, 19).unwrap();
        assert!(patch.len() < 10_000, "patch is {} bytes", patch.len());
        let mut d = Decode::zstd(ImageSink::new(Vec::new(), new.len() as u64), Some(&base)).unwrap();
        decode_all(&mut d, &patch, 4096);
        assert_eq!(d.finish().unwrap().0, new);
    }

    /// A zstd frame header declaring a window of 2^`log` bytes (no content size), then
    /// one raw block of one byte.
    fn frame_with_window(log: u8) -> Vec<u8> {
        vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, (log - 10) << 3, 0x09, 0x00, 0x00, b'A']
    }

    /// Found by fuzz/fuzz_targets/codec.rs: ten bytes declaring a 2 GiB window made
    /// the decoder allocate 2 GiB for an image signed as 64 bytes, before any byte
    /// could be verified.
    #[test]
    fn a_window_larger_than_the_signed_length_justifies_is_refused() {
        let mut d = Decode::zstd(ImageSink::new(Vec::new(), 64), None).unwrap();
        let err = d.feed(&frame_with_window(31)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.to_lowercase().contains("memory") || err.to_lowercase().contains("window"), "2 GiB window accepted: {err:?}");
        // A large signed image (or a large reference) may use a window that large.
        assert_eq!(max_window_log(1 << 31, 0), 31);
        assert_eq!(max_window_log(1 << 29, 1 << 29), 30);
        // The window `zstd --long` and `release publish --zstd` declare still decodes.
        let mut d = Decode::zstd(ImageSink::new(Vec::new(), 64), None).unwrap();
        d.feed(&frame_with_window(27)).unwrap();
        assert_eq!(d.finish().unwrap().0, b"A");
    }

    #[test]
    fn truncated_and_oversized_streams_are_refused() {
        let image = vec![42u8; 100_000];
        let compressed = zstd::encode_all(&image[..], 3).unwrap();
        let mut d = Decode::zstd(ImageSink::new(Vec::new(), image.len() as u64), None).unwrap();
        d.feed(&compressed[..compressed.len() - 5]).unwrap();
        assert!(d.finish().is_err(), "truncated stream accepted");
        let mut small = Decode::zstd(ImageSink::new(Vec::new(), 1000), None).unwrap();
        assert!(small.feed(&compressed).is_err(), "decoded past the signed length");
        let mut garbage = Decode::zstd(ImageSink::new(Vec::new(), 1000), None).unwrap();
        assert!(garbage.feed(b"this is not zstd at all").is_err());
    }
}
