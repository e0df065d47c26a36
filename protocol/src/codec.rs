//! Image encodings: turning received bytes into the image while they arrive (as-is,
//! zstd, or a zstd patch against a reference image, `--patch-from` style), and making
//! such patches on the pipeline side. Output goes to a sink that hashes and writes
//! it; the caller owns any files.
//!
//! The bytes decoded are not verified yet while they arrive, so the decoder takes
//! nothing from them on trust: the frame header is read first, and a frame that asks
//! for a larger window than the signed sizes justify ([`window_log_limit`]), or says it
//! decodes to more than the signed image length, is refused before the decoder
//! allocates anything for it.

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

    /// The signed image length: the most this sink accepts.
    pub fn limit(&self) -> u64 {
        self.limit
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
    Zstd {
        dec: RawDecoder<'p>,
        buf: Vec<u8>,
        frame_done: bool,
        /// The first bytes, kept until the frame header in them is read and checked.
        header: Option<Vec<u8>>,
        window_log_limit: u32,
    },
    /// A windowed patch ([`crate::wpatch`]) against a base read by positional reads.
    Windowed(crate::wpatch::Windowed<'p>),
}

/// The smallest window-log limit: 2^27 bytes (128 MiB), the window zstd's
/// long-distance mode uses by default, and so what `outpost release publish --zstd`
/// writes into its frames.
pub const MIN_WINDOW_LOG_LIMIT: u32 = 27;

/// The largest window (as a power of two) a frame may ask for when it decodes to the
/// signed `image_len` bytes, for a patch against a reference of `reference_len` bytes:
/// 2^27, and more only when the signed image (or the reference) is larger, since a
/// window never needs to exceed what it can refer to. So the memory a device gives
/// the decoder follows signed metadata, never the unverified bytes.
pub fn window_log_limit(image_len: u64, reference_len: Option<u64>) -> u32 {
    let covers = image_len.max(reference_len.unwrap_or(0));
    window_log_for(usize::try_from(covers).unwrap_or(usize::MAX)).max(MIN_WINDOW_LOG_LIMIT)
}

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// The longest zstd frame header: magic, descriptor, window, 4-byte dictionary id,
/// 8-byte content size.
const MAX_FRAME_HEADER: usize = 4 + 1 + 1 + 4 + 8;

/// What a zstd frame header declares (RFC 8878, section 3.1.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The window the decoder must keep, in bytes.
    pub window_size: u64,
    /// The decoded size, when the frame says it.
    pub content_size: Option<u64>,
}

/// Reads the frame header at the start of `data`: `Ok(None)` while more bytes are
/// needed, an error when `data` does not start a zstd frame.
pub fn parse_frame_header(data: &[u8]) -> io::Result<Option<FrameHeader>> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if data.len() >= 4 {
        let magic = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        if magic != ZSTD_MAGIC {
            return Err(bad(format!("not a zstd frame (magic number {magic:#010x})")));
        }
    }
    let Some(&descriptor) = data.get(4) else { return Ok(None) };
    if descriptor & 0x08 != 0 {
        return Err(bad("zstd frame header has its reserved bit set".into()));
    }
    let single_segment = descriptor & 0x20 != 0;
    let dict_len = [0usize, 1, 2, 4][usize::from(descriptor & 0x03)];
    let size_len = match descriptor >> 6 {
        0 => usize::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let window_len = usize::from(!single_segment);
    let len = 5 + window_len + dict_len + size_len;
    if data.len() < len {
        return Ok(None);
    }
    let window = (!single_segment).then(|| {
        let w = data[5];
        let base = 1u64 << (10 + u32::from(w >> 3));
        base + (base / 8) * u64::from(w & 0x07)
    });
    let at = 5 + window_len + dict_len;
    let field = &data[at..at + size_len];
    let content_size = match size_len {
        0 => None,
        1 => Some(u64::from(field[0])),
        2 => Some(u64::from(u16::from_le_bytes([field[0], field[1]])) + 256),
        4 => Some(u64::from(u32::from_le_bytes([field[0], field[1], field[2], field[3]]))),
        _ => Some(u64::from_le_bytes([field[0], field[1], field[2], field[3], field[4], field[5], field[6], field[7]])),
    };
    // A single-segment frame's window is its content (which it then always states).
    let window_size = window.or(content_size).unwrap_or(0);
    Ok(Some(FrameHeader { window_size, content_size }))
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

    /// zstd; with `reference`, a patch against it (the reference must outlive the
    /// decode). The window a frame may ask for is [`window_log_limit`] of the sink's
    /// signed length and the reference's length.
    pub fn zstd(sink: ImageSink<W>, reference: Option<&'p [u8]>) -> io::Result<Self> {
        let window_log_limit = window_log_limit(sink.limit, reference.map(|r| r.len() as u64));
        let mut dec = match reference {
            Some(r) => RawDecoder::with_ref_prefix(r)?,
            None => RawDecoder::new()?,
        };
        // Patches use a long window (the whole reference image); the decoder itself
        // refuses more than the limit too, should a frame get past the header check.
        dec.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(window_log_limit))?;
        Ok(Decode {
            mode: Mode::Zstd { dec, buf: vec![0u8; 1 << 17], frame_done: false, header: Some(Vec::new()), window_log_limit },
            sink,
        })
    }

    /// A windowed patch ([`crate::wpatch`]) against `base`: bounded memory, whatever
    /// the image size.
    pub fn windowed(sink: ImageSink<W>, base: &'p dyn crate::wpatch::Base) -> Self {
        Decode { mode: Mode::Windowed(crate::wpatch::Windowed::new(base)), sink }
    }

    pub fn feed(&mut self, input: &[u8]) -> io::Result<()> {
        match &mut self.mode {
            Mode::Identity => self.sink.put(input),
            Mode::Windowed(w) => {
                let (limit, sink) = (self.sink.limit, &mut self.sink);
                w.feed(input, limit, &mut |d: &[u8]| sink.put(d))
            }
            Mode::Zstd { dec, buf, frame_done, header, window_log_limit } => {
                let Some(pending) = header else {
                    return run_zstd(dec, buf, frame_done, &mut self.sink, input);
                };
                let take = input.len().min(MAX_FRAME_HEADER - pending.len());
                pending.extend_from_slice(&input[..take]);
                let Some(h) = parse_frame_header(pending)? else { return Ok(()) };
                let allowed = 1u64 << *window_log_limit;
                if h.window_size > allowed {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the zstd frame asks for a window of {} bytes; the limit for this image is {allowed} bytes (window log {}): refused before allocating it",
                            h.window_size, *window_log_limit
                        ),
                    ));
                }
                if let Some(size) = h.content_size.filter(|&n| n > self.sink.limit) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the zstd frame says it decodes to {size} bytes, more than the signed image length {}", self.sink.limit),
                    ));
                }
                let first = std::mem::take(pending);
                *header = None;
                run_zstd(dec, buf, frame_done, &mut self.sink, &first)?;
                run_zstd(dec, buf, frame_done, &mut self.sink, &input[take..])
            }
        }
    }

    /// Ends the stream: a zstd stream must have ended its frame.
    pub fn finish(self) -> io::Result<(W, String, u64)> {
        if let Mode::Zstd { frame_done: false, .. } = self.mode {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "zstd stream is truncated (frame not complete)"));
        }
        if let Mode::Windowed(w) = &self.mode {
            if !w.complete() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "windowed patch is truncated (image not complete)"));
            }
        }
        self.sink.finish()
    }
}

/// Runs `input` through the decoder into the sink.
fn run_zstd<W: Write>(dec: &mut RawDecoder<'_>, buf: &mut [u8], frame_done: &mut bool, sink: &mut ImageSink<W>, input: &[u8]) -> io::Result<()> {
    if input.is_empty() {
        return Ok(());
    }
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
        sink.put(&buf[..produced])?;
        if inb.pos() >= input.len() && !full {
            return Ok(());
        }
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
        assert_eq!(window_log_limit(1 << 31, None), 31);
        assert_eq!(window_log_limit(1 << 29, Some(1 << 29)), 29);
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

    /// A frame header (no content size) asking for a window of 2^31 bytes.
    fn two_gib_window_frame() -> Vec<u8> {
        let mut f = ZSTD_MAGIC.to_le_bytes().to_vec();
        f.push(0x00); // descriptor: no content size, not single segment, no dictionary
        f.push((31 - 10) << 3); // window descriptor: 2^31
        // A raw, last block of 4 bytes: what a decoder would start to fill its window with.
        f.extend_from_slice(&[0x21, 0x00, 0x00]);
        f.extend_from_slice(b"data");
        f
    }

    #[test]
    fn window_limits_follow_the_signed_sizes() {
        assert_eq!(window_log_limit(1 << 20, None), 27);
        assert_eq!(window_log_limit((1 << 30) - 5, None), 30);
        assert_eq!(window_log_limit(10 << 20, Some(600 << 20)), 30);
        assert_eq!(window_log_limit(u64::MAX, None), 31);
    }

    #[test]
    fn frame_headers_are_read_as_written() {
        let image = vec![9u8; 300_000];
        // The stream encoder of `release publish --zstd` (level 19, long distance
        // matching, no pledged size): a 2^27 window, no content size.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
        enc.long_distance_matching(true).unwrap();
        std::io::Write::write_all(&mut enc, &image).unwrap();
        let published = enc.finish().unwrap();
        let h = parse_frame_header(&published).unwrap().unwrap();
        assert_eq!(h, FrameHeader { window_size: 1 << 27, content_size: None });
        // One-shot compression states the size; a small frame is single-segment.
        let h = parse_frame_header(&zstd::bulk::compress(&image, 3).unwrap()).unwrap().unwrap();
        assert_eq!(h.content_size, Some(image.len() as u64));
        assert!(h.window_size >= image.len() as u64);
        // Too short to tell yet; not zstd at all.
        assert_eq!(parse_frame_header(&published[..5]).unwrap(), None);
        assert!(parse_frame_header(b"PK\x03\x04 zip").unwrap_err().to_string().contains("not a zstd frame"));
        assert_eq!(parse_frame_header(&two_gib_window_frame()).unwrap().unwrap().window_size, 1 << 31);
    }

    #[test]
    fn a_frame_asking_for_a_two_gib_window_is_refused_at_its_header() {
        let frame = two_gib_window_frame();
        let mut d = Decode::zstd(ImageSink::new(Vec::new(), 1 << 20), None).unwrap();
        // Byte by byte: nothing is refused before the header is complete, and the
        // header's last byte is refused, before the decoder saw any of it.
        for b in &frame[..5] {
            d.feed(std::slice::from_ref(b)).unwrap();
        }
        let err = d.feed(&frame[5..]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("window of 2147483648 bytes") && msg.contains("134217728 bytes (window log 27)"), "{msg}");
        // A patch against a 600 MiB reference may use a 1 GiB window, not 2 GiB.
        let reference = vec![0u8; 1];
        let mut d = Decode::zstd(ImageSink::new(Vec::new(), 600 << 20), Some(&reference)).unwrap();
        assert!(d.feed(&frame).unwrap_err().to_string().contains("window log 30"));
    }

    #[test]
    fn a_frame_announcing_more_than_the_signed_length_is_refused_at_its_header() {
        let image = vec![1u8; 5000];
        let compressed = zstd::bulk::compress(&image, 3).unwrap();
        let mut d = Decode::zstd(ImageSink::new(Vec::new(), 4999), None).unwrap();
        let msg = d.feed(&compressed).unwrap_err().to_string();
        assert!(msg.contains("decodes to 5000 bytes, more than the signed image length 4999"), "{msg}");
    }

    #[test]
    fn a_header_split_over_many_feeds_decodes() {
        let image: Vec<u8> = (0..50_000u32).map(|i| (i % 97) as u8).collect();
        let compressed = zstd::encode_all(&image[..], 3).unwrap();
        let mut d = Decode::zstd(ImageSink::new(Vec::new(), image.len() as u64), None).unwrap();
        decode_all(&mut d, &compressed[..40], 1);
        decode_all(&mut d, &compressed[40..], 4096);
        assert_eq!(d.finish().unwrap().0, image);
    }
}
