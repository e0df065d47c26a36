//! Sigstore interoperability: beside each firmware image and SBOM, `release publish`
//! writes a signature in cosign's `sign-blob` format (`FILE.sig`: the base64 signature
//! over the file's bytes) and a Sigstore bundle (`FILE.sigstore.json`, v0.3, key-based:
//! a public-key hint, the SHA-256 digest and the signature; no transparency-log entry,
//! since pipelines sign offline), made with the pipeline's ed25519 key through the
//! `sigstore` crate. The public key goes beside them as PEM, so anyone can check a
//! downloaded image with standard Sigstore tooling (`cosign verify-blob --key`).
//! `outpost verify-blob` checks them too.
//!
//! TUF stays the trust decision for Outpost devices: these signatures are for people
//! outside Outpost. The `sigstore` crate (0.14) does not verify Rekor inclusion evidence,
//! and nothing here uploads to Rekor.

use std::path::{Path, PathBuf};

use base64::Engine;
use outpost_protocol::keys::SigningKey;
use serde_json::json;
use sha2::{Digest, Sha256};
use sigstore::crypto::signing_key::ed25519::Ed25519Keys;
use sigstore::crypto::signing_key::KeyPair;

use crate::error::{Result, SignerError};

const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

fn sig_err(op: &'static str) -> impl FnOnce(sigstore::errors::SigstoreError) -> SignerError {
    move |e| SignerError::Sigstore { op, source: Box::new(e) }
}

fn keys_of(key: &SigningKey) -> Result<Ed25519Keys> {
    Ed25519Keys::from_pkcs8_der(&key.pkcs8_der()).map_err(sig_err("load the signing key"))
}

/// The PEM public key of `key` (what `cosign verify-blob --key` takes).
pub fn public_pem(key: &SigningKey) -> Result<String> {
    keys_of(key)?.public_key_to_pem().map_err(sig_err("export the public key"))
}

/// What was written for one file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub signature: PathBuf,
    pub bundle: PathBuf,
}

/// A Sigstore signature made by [`sign_file`], not yet written, with the SHA-256 and
/// length of the bytes it covers.
#[derive(Debug, Clone)]
pub struct Signed {
    signature: [u8; 64],
    sha256: [u8; 32],
    pub length: u64,
}

impl Signed {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// Signs `file` with pure Ed25519 (what `cosign sign-blob` makes with an ed25519 key).
/// The file is read twice in chunks, never held in memory (Ed25519 hashes the message
/// twice). With `expected_sha256` (hex, the hash the TUF metadata lists for a file
/// hashed earlier), what was signed must hash to it: the Sigstore signature covers
/// exactly the bytes the release's metadata names, or there is none. Without it, the
/// signature's own SHA-256 and length are the ones to put in the metadata.
pub fn sign_file(key: &SigningKey, file: &Path, expected_sha256: Option<&str>) -> Result<Signed> {
    let what = file.display().to_string();
    let signed = key.sign_reader(&what, || std::fs::File::open(file)).map_err(|e| match e {
        outpost_protocol::Error::Read { source, .. } => SignerError::io("read", file, source),
        e => SignerError::proto("sigstore signature", e),
    })?;
    let signed = Signed { signature: signed.signature, sha256: signed.sha256, length: signed.length };
    if let Some(expected) = expected_sha256.filter(|e| *e != signed.sha256_hex()) {
        return Err(SignerError::verify(
            what,
            format!("changed since it was hashed for the release metadata (sha256 {expected} then, {} now); nothing signed", signed.sha256_hex()),
        ));
    }
    Ok(signed)
}

/// Writes `<out>.sig` (cosign's `sign-blob` format: the base64 signature) and
/// `<out>.sigstore.json` (the bundle) for a signature of `key` (`out` without extension).
pub fn write_signature(key: &SigningKey, signed: &Signed, out: &Path) -> Result<Written> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let sig_b64 = b64.encode(signed.signature);
    let public_der = keys_of(key)?.public_key_to_der().map_err(sig_err("export the public key"))?;
    let bundle = json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": b64.encode(Sha256::digest(&public_der))}},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": b64.encode(signed.sha256)},
            "signature": sig_b64,
        },
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SignerError::io("create", dir, e))?;
    }
    let sig_path = PathBuf::from(format!("{}.sig", out.display()));
    let bundle_path = PathBuf::from(format!("{}.sigstore.json", out.display()));
    crate::localrepo::write_atomic(&sig_path, sig_b64.as_bytes())?;
    let text = serde_json::to_vec_pretty(&bundle).map_err(SignerError::encode("Sigstore bundle"))?;
    crate::localrepo::write_atomic(&bundle_path, &text)?;
    Ok(Written { signature: sig_path, bundle: bundle_path })
}

/// An ed25519 signature from base64 text (whitespace ignored); errors name `origin`.
fn decode_signature(text: &[u8], origin: &Path) -> Result<ed25519_dalek::Signature> {
    let trimmed: Vec<u8> = text.iter().copied().filter(|c| !c.is_ascii_whitespace()).collect();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&trimmed)
        .map_err(|e| SignerError::input(origin.display(), format!("the signature is not base64: {e}")))?;
    ed25519_dalek::Signature::from_slice(&raw)
        .map_err(|_| SignerError::input(origin.display(), format!("the signature is {} bytes, an ed25519 signature is 64", raw.len())))
}

/// A Sigstore bundle's message digest (base64 SHA-256) and signature.
fn read_bundle(b: &Path) -> Result<(String, ed25519_dalek::Signature)> {
    let text = std::fs::read(b).map_err(|e| SignerError::io("read", b, e))?;
    let doc: serde_json::Value = serde_json::from_slice(&text).map_err(|e| SignerError::input(b.display(), format!("not JSON: {e}")))?;
    if doc["mediaType"].as_str() != Some(BUNDLE_MEDIA_TYPE) {
        return Err(SignerError::input(b.display(), format!("mediaType is not {BUNDLE_MEDIA_TYPE}")));
    }
    let digest = doc["messageSignature"]["messageDigest"]["digest"]
        .as_str()
        .ok_or_else(|| SignerError::input(b.display(), "no messageSignature.messageDigest.digest"))?
        .to_owned();
    let sig = doc["messageSignature"]["signature"]
        .as_str()
        .ok_or_else(|| SignerError::input(b.display(), "no messageSignature.signature"))?;
    Ok((digest, decode_signature(sig.as_bytes(), b)?))
}

/// Checks `file` against a cosign `sign-blob` signature and/or a Sigstore bundle with
/// the PEM public key (read from `key_file`, which errors name), reading the file once
/// in chunks (never whole into memory). Errors say which check failed.
pub fn verify_file(public_pem: &[u8], key_file: &Path, file: &Path, signature: Option<&Path>, bundle: Option<&Path>) -> Result<()> {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    if signature.is_none() && bundle.is_none() {
        return Err(SignerError::Usage("pass --signature FILE.sig and/or --bundle FILE.sigstore.json".into()));
    }
    let key = std::str::from_utf8(public_pem)
        .ok()
        .and_then(|pem| ed25519_dalek::VerifyingKey::from_public_key_pem(pem).ok())
        .ok_or_else(|| SignerError::input(key_file.display(), "not an ed25519 PEM public key (SubjectPublicKeyInfo)"))?;
    let not_verified =
        |origin: &Path, e: ed25519_dalek::SignatureError| SignerError::verify(origin.display(), format!("signature does not verify for {}: {e}", file.display()));
    let verifier = |sig: &ed25519_dalek::Signature, origin: &Path| -> Result<ed25519_dalek::StreamVerifier> {
        key.verify_stream(sig).map_err(|e| not_verified(origin, e))
    };
    let sig_signature = match signature {
        Some(sig) => Some((sig, decode_signature(&std::fs::read(sig).map_err(|e| SignerError::io("read", sig, e))?, sig)?)),
        None => None,
    };
    let bundle_signature = match bundle {
        Some(b) => {
            let (digest, s) = read_bundle(b)?;
            Some((b, digest, s))
        }
        None => None,
    };
    let mut sig_check = match &sig_signature {
        Some((sig, s)) => Some((*sig, verifier(s, sig)?)),
        None => None,
    };
    // A bundle made with the .sig (as `release publish` writes them) carries the same
    // signature: verifying it once covers both.
    let mut bundle_check = match &bundle_signature {
        Some((b, _, s)) if sig_signature.as_ref().is_none_or(|(_, other)| other != s) => Some((*b, verifier(s, b)?)),
        _ => None,
    };
    let input = std::fs::File::open(file).map_err(|e| SignerError::io("open", file, e))?;
    // The SHA-256 is only needed for the bundle's digest.
    let mut sha256 = bundle_signature.as_ref().map(|_| Sha256::new());
    outpost_protocol::hashing::for_each_chunk(input, |chunk| {
        if let Some(h) = sha256.as_mut() {
            h.update(chunk);
        }
        for (_, v) in sig_check.iter_mut().chain(bundle_check.iter_mut()) {
            v.update(chunk);
        }
    })
    .map_err(|e| SignerError::io("read", file, e))?;
    if let Some((sig, v)) = sig_check {
        v.finalize_and_verify().map_err(|e| not_verified(sig, e))?;
    }
    if let Some((b, digest, _)) = bundle_signature {
        if Some(digest) != sha256.map(|h| base64::engine::general_purpose::STANDARD.encode(h.finalize())) {
            return Err(SignerError::verify(b.display(), format!("the bundle's digest is not the SHA-256 of {}", file.display())));
        }
    }
    if let Some((b, v)) = bundle_check {
        v.finalize_and_verify().map_err(|e| not_verified(b, e))?;
    }
    Ok(())
}

/// `outpost verify-blob`: check a file against the Sigstore signature and/or bundle
/// `release publish` wrote beside it.
#[derive(Debug, clap::Args)]
pub struct VerifyBlobArgs {
    /// PEM public key (REPO/sigstore/<keyid>.pub.pem).
    #[arg(long)]
    pub key: PathBuf,
    /// cosign sign-blob signature (FILE.sig).
    #[arg(long)]
    pub signature: Option<PathBuf>,
    /// Sigstore bundle (FILE.sigstore.json).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    pub file: PathBuf,
}

pub fn run(a: VerifyBlobArgs, out: &crate::output::Output) -> Result<()> {
    let pem = std::fs::read(&a.key).map_err(|e| SignerError::io("read", &a.key, e))?;
    verify_file(&pem, &a.key, &a.file, a.signature.as_deref(), a.bundle.as_deref())?;
    out.emit(&json!({"verified": true, "file": a.file}), &format!("verified {}", a.file.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the tests' PEM keys would have been read from, for error messages.
    const KEY_PEM: &str = "key.pub.pem";

    fn sha_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn signs_a_large_file_in_chunks_and_verifies_it_the_same_way() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let image: Vec<u8> = (0..(3usize << 20) + 5).map(|i| (i % 251) as u8).collect();
        let file = dir.path().join("fw.img");
        std::fs::write(&file, &image).unwrap();
        let signed = sign_file(&key, &file, Some(&sha_hex(&image))).unwrap();
        assert_eq!((signed.sha256_hex(), signed.length), (sha_hex(&image), image.len() as u64));
        let written = write_signature(&key, &signed, &dir.path().join("sig/fw.img")).unwrap();
        // cosign's sign-blob format: the base64 pure-Ed25519 signature over the whole file.
        let b64 = base64::engine::general_purpose::STANDARD;
        let sig_text = std::fs::read_to_string(&written.signature).unwrap();
        assert_eq!(hex::encode(b64.decode(&sig_text).unwrap()), key.sign_hex(&image));
        let pem = public_pem(&key).unwrap();
        verify_file(pem.as_bytes(), Path::new(KEY_PEM), &file, Some(&written.signature), Some(&written.bundle)).unwrap();

        let mut tampered = image.clone();
        tampered[2 << 20] ^= 1;
        let bad = dir.path().join("tampered.img");
        std::fs::write(&bad, &tampered).unwrap();
        let err = verify_file(pem.as_bytes(), Path::new(KEY_PEM), &bad, Some(&written.signature), None).unwrap_err().to_string();
        assert!(err.contains("signature does not verify for"), "{err}");
        let err = verify_file(pem.as_bytes(), Path::new(KEY_PEM), &bad, None, Some(&written.bundle)).unwrap_err().to_string();
        assert!(err.contains("the bundle's digest is not the SHA-256 of"), "{err}");
        let other = SigningKey::generate().unwrap();
        let err = verify_file(public_pem(&other).unwrap().as_bytes(), Path::new(KEY_PEM), &file, Some(&written.signature), None).unwrap_err().to_string();
        assert!(err.contains("signature does not verify for"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_what_the_metadata_lists_gets_no_signature() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let file = dir.path().join("fw.img");
        std::fs::write(&file, b"new bytes").unwrap();
        let err = sign_file(&key, &file, Some(&sha_hex(b"old bytes"))).unwrap_err().to_string();
        assert!(err.contains("changed since it was hashed for the release metadata") && err.ends_with("nothing signed"), "{err}");
        let err = sign_file(&key, &dir.path().join("missing.img"), None).unwrap_err().to_string();
        assert!(err.contains("missing.img"), "{err}");
    }

    #[test]
    fn malformed_signatures_and_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let pem = public_pem(&key).unwrap();
        let file = dir.path().join("fw.img");
        std::fs::write(&file, b"image").unwrap();
        let sig = dir.path().join("fw.img.sig");
        std::fs::write(&sig, "not base64!").unwrap();
        let err = verify_file(pem.as_bytes(), Path::new(KEY_PEM), &file, Some(&sig), None).unwrap_err().to_string();
        assert!(err.contains("the signature is not base64"), "{err}");
        std::fs::write(&sig, base64::engine::general_purpose::STANDARD.encode([7u8; 10])).unwrap();
        let err = verify_file(pem.as_bytes(), Path::new(KEY_PEM), &file, Some(&sig), None).unwrap_err().to_string();
        assert!(err.contains("the signature is 10 bytes, an ed25519 signature is 64"), "{err}");
        let err = verify_file(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", Path::new(KEY_PEM), &file, Some(&sig), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an ed25519 PEM public key"), "{err}");
        assert!(err.starts_with(KEY_PEM), "the error names the key file: {err}");
    }
}
