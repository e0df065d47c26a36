//! Windowed patches: a delta whose application needs bounded memory, whatever the
//! image size. A single zstd `--patch-from` frame refers to its whole reference, so
//! the device had to hold the whole base image (and a window as large) in memory.
//! Here the new image is cut into regions of [`REGION`] bytes; each region is its own
//! zstd frame, compressed against a window of the base (by default the same offset
//! ± [`MARGIN`]), which the decoder reads by positional reads from wherever the base
//! lives (the active partition). The decoder holds one base window, one compressed
//! frame and one decoded region at a time: at most [`MAX_WINDOW`] + 2 × [`MAX_REGION`]
//! bytes, checked against the region headers before anything is read or allocated.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! "OPWPTCH1"  image_len: u64
//! per region, in image order:
//!   window_start: u64  window_len: u64  region_len: u64  frame_len: u64  frame
//! ```
//!
//! A region with `frame_len` 0 is a copy: its bytes are the window's (then as long as
//! the region).
//!
//! A region header only says where the window is: an encoder may choose it by any rule
//! (a better matcher can place windows where the region's content moved), the decoder
//! does not change.

use std::io;

pub const MAGIC: &[u8; 8] = b"OPWPTCH1";
/// Bytes of the new image per region (what [`make`] writes).
pub const REGION: u64 = 2 << 20;
/// How far before and after its region a window of the base reaches (what [`make`] writes).
pub const MARGIN: u64 = 4 << 20;
/// The largest region a decoder accepts.
pub const MAX_REGION: u64 = 4 << 20;
/// The largest base window a decoder accepts.
pub const MAX_WINDOW: u64 = 16 << 20;
const HEADER: usize = 16;
const REGION_HEADER: usize = 32;

/// Where the base image is read from, by positional reads.
pub trait Base: Send + Sync {
    fn len(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Base for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| bad("offset out of range".into()))?;
        let src = self.get(start..start + buf.len()).ok_or_else(|| bad("read past the end of the base".into()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// The base's first `len` bytes in a file or block device (the active slot).
pub struct FileBase {
    pub file: std::fs::File,
    pub len: u64,
}

impl Base for FileBase {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if offset + buf.len() as u64 > self.len {
            return Err(bad("read past the end of the base".into()));
        }
        self.file.read_exact_at(buf, offset)
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Makes a windowed patch of `new` against `base` at zstd `level` (19 and above widen
/// the match search, as the single-frame `codec::make_patch` does).
pub fn make(base: &[u8], new: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let regions: Vec<(usize, usize)> = (0..new.len()).step_by(REGION as usize).map(|s| (s, (s + REGION as usize).min(new.len()))).collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(regions.len().max(1));
    let per = regions.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<io::Result<Vec<u8>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = regions.chunks(per).map(|chunk| scope.spawn(move || encode_regions(base, new, chunk, level))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("patch worker panicked")))).collect()
    });
    let mut out = Vec::with_capacity(new.len() / 8 + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(new.len() as u64).to_le_bytes());
    for part in parts {
        out.extend_from_slice(&part?);
    }
    Ok(out)
}

/// Encodes consecutive regions (one worker's share), each with its header.
fn encode_regions(base: &[u8], new: &[u8], regions: &[(usize, usize)], level: i32) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for &(s, e) in regions {
        let ws = s.saturating_sub(MARGIN as usize).min(base.len());
        let we = (e + MARGIN as usize).min(base.len());
        if base.get(s..e) == Some(&new[s..e]) {
            // Unchanged at the same offset: a copy, no frame (a frame costs a few bytes
            // per 128 KiB block even when it only refers back).
            for v in [s as u64, (e - s) as u64, (e - s) as u64, 0] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            continue;
        }
        let window = &base[ws..we];
        let frame = encode_region(window, &new[s..e], level)?;
        for v in [ws as u64, window.len() as u64, (e - s) as u64, frame.len() as u64] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&frame);
    }
    Ok(out)
}

/// One region's frame against its base window (a ref prefix, as `--patch-from`).
fn encode_region(window: &[u8], region: &[u8], level: i32) -> io::Result<Vec<u8>> {
    use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};
    use zstd::zstd_safe::CParameter;
    let mut enc = Encoder::with_ref_prefix(level, window)?;
    // A window covering the base window and the region (at least 2^20 bytes).
    let covers = (window.len() + region.len()).max(1 << 20);
    let log = usize::BITS - (covers - 1).leading_zeros();
    enc.set_parameter(CParameter::WindowLog(log))?;
    // The match finder's tables keep only recent positions at low levels: long-distance
    // matching finds the window's content wherever it is.
    enc.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
    if level >= 19 {
        enc.set_parameter(CParameter::TargetLength(4096))?;
        enc.set_parameter(CParameter::ChainLog(log.min(30)))?;
    }
    enc.set_pledged_src_size(Some(region.len() as u64))?;
    let mut frame = Vec::with_capacity(region.len() / 4 + 1024);
    let mut buf = vec![0u8; 1 << 17];
    let mut inb = InBuffer::around(region);
    while inb.pos() < region.len() {
        let mut outb = OutBuffer::around(&mut buf[..]);
        enc.run(&mut inb, &mut outb)?;
        let n = outb.pos();
        frame.extend_from_slice(&buf[..n]);
    }
    loop {
        let mut outb = OutBuffer::around(&mut buf[..]);
        let remaining = enc.finish(&mut outb, true)?;
        let n = outb.pos();
        frame.extend_from_slice(&buf[..n]);
        if remaining == 0 {
            return Ok(frame);
        }
    }
}

/// What the decoder waits for.
enum Want {
    Header,
    RegionHeader,
    Frame { window_start: u64, window_len: u64, region_len: u64, frame_len: u64 },
}

/// Applies a windowed patch as its bytes arrive, into an [`ImageSink`].
pub struct Windowed<'b> {
    base: &'b dyn Base,
    want: Want,
    pending: Vec<u8>,
    image_len: u64,
    decoded: u64,
    window: Vec<u8>,
    out: Vec<u8>,
}

impl<'b> Windowed<'b> {
    pub fn new(base: &'b dyn Base) -> Self {
        Windowed { base, want: Want::Header, pending: Vec::new(), image_len: 0, decoded: 0, window: Vec::new(), out: Vec::new() }
    }

    fn need(&self) -> usize {
        match self.want {
            Want::Header => HEADER,
            Want::RegionHeader => REGION_HEADER,
            Want::Frame { frame_len, .. } => frame_len as usize,
        }
    }

    /// Takes the next patch bytes; decoded regions go to `put`. `limit` is the signed
    /// image length, which the patch may not exceed.
    pub fn feed(&mut self, mut input: &[u8], limit: u64, put: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        while !input.is_empty() {
            let take = (self.need() - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() == self.need() {
                self.step(limit, put)?;
            }
        }
        Ok(())
    }

    /// Acts on a complete header or frame in `pending`.
    fn step(&mut self, limit: u64, put: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let p = std::mem::take(&mut self.pending);
        let u = |i: usize| u64::from_le_bytes(p[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        match self.want {
            Want::Header => {
                if &p[..8] != MAGIC {
                    return Err(bad("not a windowed patch (bad magic)".into()));
                }
                self.image_len = u(1);
                if self.image_len > limit {
                    return Err(bad(format!("the patch says it decodes to {} bytes, more than the signed image length {limit}", self.image_len)));
                }
                self.want = Want::RegionHeader;
            }
            Want::RegionHeader => {
                let (window_start, window_len, region_len, frame_len) = (u(0), u(1), u(2), u(3));
                self.check_region(window_start, window_len, region_len, frame_len)?;
                if frame_len == 0 {
                    // A copy: the region is the window's bytes as they are.
                    if window_len != region_len {
                        return Err(bad(format!("region at {}: a copy of {window_len} bytes for a {region_len}-byte region", self.decoded)));
                    }
                    self.window.resize(window_len as usize, 0);
                    self.base.read_at(&mut self.window, window_start)?;
                    put(&self.window)?;
                    self.decoded += region_len;
                } else {
                    self.want = Want::Frame { window_start, window_len, region_len, frame_len };
                }
            }
            Want::Frame { window_start, window_len, region_len, .. } => {
                self.window.resize(window_len as usize, 0);
                self.base.read_at(&mut self.window, window_start)?;
                self.out.clear();
                self.out.reserve_exact(region_len as usize);
                let mut dctx = zstd::zstd_safe::DCtx::create();
                dctx.ref_prefix(&self.window).map_err(|c| bad(format!("zstd: {}", zstd::zstd_safe::get_error_name(c))))?;
                let n = dctx.decompress(&mut self.out, &p).map_err(|c| bad(format!("region at {}: zstd: {}", self.decoded, zstd::zstd_safe::get_error_name(c))))?;
                if n as u64 != region_len {
                    return Err(bad(format!("region at {} decodes to {n} bytes; its header says {region_len}", self.decoded)));
                }
                put(&self.out)?;
                self.decoded += region_len;
                self.want = Want::RegionHeader;
            }
        }
        self.pending = p;
        self.pending.clear();
        Ok(())
    }

    /// Refuses a region header whose sizes exceed the limits or the base, before any
    /// read or allocation.
    fn check_region(&self, window_start: u64, window_len: u64, region_len: u64, frame_len: u64) -> io::Result<()> {
        if region_len == 0 || region_len > MAX_REGION || self.decoded + region_len > self.image_len {
            return Err(bad(format!("region at {} of {region_len} bytes: regions are 1..={MAX_REGION} bytes within the image's {}", self.decoded, self.image_len)));
        }
        if window_len > MAX_WINDOW || window_start.checked_add(window_len).is_none_or(|end| end > self.base.len()) {
            return Err(bad(format!("region at {}: base window {window_start}+{window_len} exceeds {MAX_WINDOW} bytes or the base's {}", self.decoded, self.base.len())));
        }
        if frame_len > zstd::zstd_safe::compress_bound(MAX_REGION as usize) as u64 {
            return Err(bad(format!("region at {}: a {frame_len}-byte frame is larger than any region compresses to", self.decoded)));
        }
        Ok(())
    }

    /// Whether the whole image was decoded (the last region ended it).
    pub fn complete(&self) -> bool {
        matches!(self.want, Want::RegionHeader) && self.pending.is_empty() && self.decoded == self.image_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn image(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len).map(|_| { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (x >> 56) as u8 }).collect()
    }

    fn apply(base: &Vec<u8>, patch: &[u8], limit: u64, chunk: usize) -> io::Result<(Vec<u8>, String)> {
        let mut out = Vec::new();
        let mut d = Windowed::new(base);
        for c in patch.chunks(chunk) {
            d.feed(c, limit, &mut |b: &[u8]| {
                out.extend_from_slice(b);
                Ok(())
            })?;
        }
        if !d.complete() {
            return Err(bad("incomplete".into()));
        }
        let sha = hex::encode(Sha256::digest(&out));
        Ok((out, sha))
    }

    #[test]
    fn roundtrip_with_shifted_and_changed_content() {
        let base = image(1, 9 << 20);
        // The new image: a shift by 3 KiB, a changed stretch, and a longer tail.
        let mut new = vec![7u8; 3000];
        new.extend_from_slice(&base[..5 << 20]);
        new[(2 << 20)..(2 << 20) + 50_000].copy_from_slice(&image(2, 50_000));
        new.extend_from_slice(&base[(5 << 20) + 10..]);
        new.extend_from_slice(&image(3, 1 << 20));
        let patch = make(&base, &new, 3).unwrap();
        assert!(patch.len() < (1 << 20) + 200_000, "patch is {} bytes", patch.len());
        let (out, sha) = apply(&base, &patch, new.len() as u64, 7777).unwrap();
        assert!(out == new);
        assert_eq!(sha, hex::encode(Sha256::digest(&new)));
    }

    #[test]
    fn unchanged_regions_are_copies() {
        let base = image(6, 8 << 20);
        let mut new = base.clone();
        new[5 << 20] ^= 1;
        let patch = make(&base, &new, 3).unwrap();
        // Three copies (32-byte headers) and one frame for the changed region.
        assert!(patch.len() < 2000, "patch is {} bytes", patch.len());
        assert!(apply(&base, &patch, new.len() as u64, 100).unwrap().0 == new);
        // A copy whose length disagrees with its region is refused.
        let mut bad_copy = patch.clone();
        bad_copy[HEADER + 8..HEADER + 16].copy_from_slice(&5u64.to_le_bytes());
        assert!(apply(&base, &bad_copy, new.len() as u64, 100).is_err());
    }

    #[test]
    fn oversized_or_out_of_base_headers_are_refused_before_reading() {
        let base = image(4, 1 << 20);
        let new = image(5, 100_000);
        let patch = make(&base, &new, 3).unwrap();
        // The image length beyond the signed length.
        let err = apply(&base, &patch, 99_999, 1 << 16).unwrap_err();
        assert!(err.to_string().contains("signed image length"), "{err}");
        // A window past the end of the base.
        let mut bad_window = patch.clone();
        bad_window[HEADER..HEADER + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let err = apply(&base, &bad_window, new.len() as u64, 1 << 16).unwrap_err();
        assert!(err.to_string().contains("base window"), "{err}");
        // A region larger than the limit.
        let mut big = patch.clone();
        big[HEADER + 16..HEADER + 24].copy_from_slice(&(MAX_REGION + 1).to_le_bytes());
        let err = apply(&base, &big, new.len() as u64, 1 << 16).unwrap_err();
        assert!(err.to_string().contains("regions are"), "{err}");
        // A truncated patch is incomplete.
        assert!(apply(&base, &patch[..patch.len() - 1], new.len() as u64, 1 << 16).is_err());
    }
}
