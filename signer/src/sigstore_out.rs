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
use sigstore::crypto::{CosignVerificationKey, Signature, SigningScheme};

use crate::error::{Result, SignerError};

const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

fn sig_err(what: &str) -> impl FnOnce(sigstore::errors::SigstoreError) -> SignerError + '_ {
    move |e| SignerError::Usage(format!("sigstore: {what}: {e}"))
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

/// Signs `file` and writes `<out>.sig` and `<out>.sigstore.json` (`out` without extension).
pub fn sign_file(key: &SigningKey, file: &Path, out: &Path) -> Result<Written> {
    let bytes = std::fs::read(file).map_err(|e| SignerError::io("read", file, e))?;
    let signer = keys_of(key)?.to_sigstore_signer().map_err(sig_err("make a signer"))?;
    let signature = signer.sign(&bytes).map_err(sig_err("sign"))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let sig_b64 = b64.encode(&signature);
    let digest = Sha256::digest(&bytes);
    let public_der = keys_of(key)?.public_key_to_der().map_err(sig_err("export the public key"))?;
    let bundle = json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": b64.encode(Sha256::digest(&public_der))}},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": b64.encode(digest)},
            "signature": sig_b64,
        },
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SignerError::io("create", dir, e))?;
    }
    let sig_path = PathBuf::from(format!("{}.sig", out.display()));
    let bundle_path = PathBuf::from(format!("{}.sigstore.json", out.display()));
    crate::localrepo::write_atomic(&sig_path, sig_b64.as_bytes())?;
    let text = serde_json::to_vec_pretty(&bundle).map_err(|e| SignerError::Usage(format!("bundle: {e}")))?;
    crate::localrepo::write_atomic(&bundle_path, &text)?;
    Ok(Written { signature: sig_path, bundle: bundle_path })
}

/// Checks `file` against a cosign `sign-blob` signature and/or a Sigstore bundle with
/// the PEM public key. Errors say which check failed.
pub fn verify_file(public_pem: &[u8], file: &Path, signature: Option<&Path>, bundle: Option<&Path>) -> Result<()> {
    if signature.is_none() && bundle.is_none() {
        return Err(SignerError::Usage("pass --signature FILE.sig and/or --bundle FILE.sigstore.json".into()));
    }
    let key = CosignVerificationKey::from_pem(public_pem, &SigningScheme::ED25519).map_err(sig_err("read the public key"))?;
    let bytes = std::fs::read(file).map_err(|e| SignerError::io("read", file, e))?;
    if let Some(sig) = signature {
        let text = std::fs::read(sig).map_err(|e| SignerError::io("read", sig, e))?;
        let trimmed: Vec<u8> = text.iter().copied().filter(|c| !c.is_ascii_whitespace()).collect();
        key.verify_signature(Signature::Base64Encoded(&trimmed), &bytes)
            .map_err(|e| SignerError::Usage(format!("{}: signature does not verify for {}: {e}", sig.display(), file.display())))?;
    }
    if let Some(b) = bundle {
        let text = std::fs::read(b).map_err(|e| SignerError::io("read", b, e))?;
        let doc: serde_json::Value = serde_json::from_slice(&text).map_err(|e| SignerError::Usage(format!("{}: not JSON: {e}", b.display())))?;
        if doc["mediaType"].as_str() != Some(BUNDLE_MEDIA_TYPE) {
            return Err(SignerError::Usage(format!("{}: mediaType is not {BUNDLE_MEDIA_TYPE}", b.display())));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let want = b64.encode(Sha256::digest(&bytes));
        if doc["messageSignature"]["messageDigest"]["digest"].as_str() != Some(want.as_str()) {
            return Err(SignerError::Usage(format!("{}: the bundle's digest is not the SHA-256 of {}", b.display(), file.display())));
        }
        let sig = doc["messageSignature"]["signature"]
            .as_str()
            .ok_or_else(|| SignerError::Usage(format!("{}: no messageSignature.signature", b.display())))?;
        key.verify_signature(Signature::Base64Encoded(sig.as_bytes()), &bytes)
            .map_err(|e| SignerError::Usage(format!("{}: bundle signature does not verify for {}: {e}", b.display(), file.display())))?;
    }
    Ok(())
}
