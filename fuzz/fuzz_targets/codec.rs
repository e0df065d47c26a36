//! The image decoders (protocol/src/codec.rs): zstd and zstd patches against the
//! current slot, fed with bytes from the network as they arrive, before the image's
//! hash can be checked (it is known only at the end). The sink's limit is the signed
//! length, kept small here (at most 1 MiB) so that a decoder that honours it never
//! needs much memory; what it must not do is allocate beyond what the signed length
//! and the reference justify.
//!
//! Input: a mode byte (bits 0-1: identity, zstd, single-frame patch, windowed patch
//! (protocol/src/wpatch.rs, the reference as its base); bits 2-7: chunk size), a
//! 16-bit limit, a 16-bit reference length, the reference, then the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_fuzz::trace;
use outpost_protocol::codec::{Decode, ImageSink};

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let m = data[0];
    let limit = u64::from(u16::from_be_bytes([data[1], data[2]])) * 16; // up to ~1 MiB
    let ref_len = usize::from(u16::from_be_bytes([data[3], data[4]])).min(data.len() - 5);
    let reference = &data[5..5 + ref_len];
    let stream = &data[5 + ref_len..];
    let chunk = usize::from(m >> 2) * 61 + 1;
    let sink = ImageSink::new(Vec::new(), limit);
    let base = reference.to_vec();
    let decoder = match m & 3 {
        0 => Ok(Decode::identity(sink)),
        1 => Decode::zstd(sink, None),
        2 => Decode::zstd(sink, Some(reference)),
        _ => Ok(Decode::windowed(sink, &base)),
    };
    let Ok(mut d) = decoder else { return };
    for c in stream.chunks(chunk) {
        if let Err(e) = d.feed(c) {
            return trace("feed", &e);
        }
    }
    let finished = d.finish();
    trace("finish", &finished.as_ref().map(|(_, sha, len)| (sha.clone(), *len)));
    if let Ok((out, sha256, len)) = finished {
        assert!(len <= limit, "decoded {len} bytes past the limit {limit}");
        assert_eq!(out.len() as u64, len);
        assert_eq!(sha256, outpost_protocol::hashing::sha256_hex(&out));
    }
});
