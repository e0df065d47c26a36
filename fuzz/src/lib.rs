//! What the fuzz targets share: splitting one input into several documents, a fixed
//! clock, and signing fuzzed metadata bodies with a key made at start-up, so that the
//! fuzzer reaches the checks behind signature verification (versions, expiry, meta
//! hashes, delegations) and not only the envelope parser.
//!
//! The signing key is generated from the operating system's randomness once per
//! process and never written anywhere; seed files name it by placeholders: `@K@` is
//! replaced by its key id, `@P@` by its public key (hex). A crash found with one key
//! reproduces with any other, since the harness signs whatever body the input holds.

use std::sync::OnceLock;

use chrono::{DateTime, TimeZone, Utc};
use outpost_protocol::cjson::to_canonical;
use outpost_protocol::keys::SigningKey;
use serde_json::Value;

/// Separates the documents of one input (a root, then a timestamp, ...).
pub const SEPARATOR: &[u8] = b"\n---\n";

/// Splits `data` on [`SEPARATOR`], at most `max` parts (the last one keeps the rest).
pub fn parts(data: &[u8], max: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < max {
        match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// The reference time of every target: 2030-01-01T00:00:00Z (seeds expire in 2031).
pub fn now() -> DateTime<Utc> {
    match Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0) {
        chrono::LocalResult::Single(t) => t,
        _ => unreachable!("2030-01-01T00:00:00Z is a valid UTC time"),
    }
}

/// The harness's signing key (ed25519, generated once per process).
pub fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| match SigningKey::generate() {
        Ok(k) => k,
        Err(e) => panic!("cannot generate the harness key: {e}"),
    })
}

/// `text` with the placeholders `@K@` (key id) and `@P@` (public key hex) filled in.
pub fn fill(text: &[u8]) -> Vec<u8> {
    let k = key();
    let mut out = Vec::with_capacity(text.len() + 64);
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(b"@K@") {
            out.extend_from_slice(k.key_id().as_bytes());
            i += 3;
        } else if text[i..].starts_with(b"@P@") {
            out.extend_from_slice(k.public().keyval.public.as_bytes());
            i += 3;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

/// A signed envelope around `body` (JSON after [`fill`]), signed by [`key`] over its
/// canonical form; `None` when the body is not JSON or has no canonical form (then the
/// caller feeds the raw bytes instead).
pub fn sign_body(body: &[u8]) -> Option<Vec<u8>> {
    let value: Value = serde_json::from_slice(&fill(body)).ok()?;
    let canonical = to_canonical(&value).ok()?;
    let k = key();
    let env = serde_json::json!({
        "signatures": [{"keyid": k.key_id(), "sig": k.sign_hex(&canonical)}],
        "signed": value,
    });
    serde_json::to_vec(&env).ok()
}

/// The first byte as a mode selector and the rest.
pub fn mode(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, data),
    }
}

/// With `OUTPOST_FUZZ_TRACE=1` in the environment, prints what each step of a target
/// made of an input (run a target binary on one file to see how deep a seed reaches).
pub fn trace(what: &str, outcome: &dyn std::fmt::Debug) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("OUTPOST_FUZZ_TRACE").is_some()) {
        eprintln!("[trace] {what}: {outcome:?}");
    }
}
