//! TUF keys: the public key objects found in `root` and delegations, key ids, and
//! ed25519 signing keys held by pipelines (offline) and the server (online roles).

use std::collections::BTreeMap;

use ed25519_dalek::{Signer as _, Verifier as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cjson::to_canonical;
use crate::error::{Error, Result};

/// Key type and scheme names as the TUF specification spells them.
pub const ED25519: &str = "ed25519";

/// A public key as it appears in metadata. Unknown fields are kept so that a key
/// written by another implementation keeps its key id when we re-serialize it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicKey {
    pub keytype: String,
    pub scheme: String,
    pub keyval: KeyVal,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyVal {
    pub public: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl PublicKey {
    pub fn ed25519(public: &[u8; 32]) -> Self {
        PublicKey {
            keytype: ED25519.into(),
            scheme: ED25519.into(),
            keyval: KeyVal { public: hex::encode(public), extra: BTreeMap::new() },
            extra: BTreeMap::new(),
        }
    }

    /// The TUF key id: hex SHA-256 of the canonical JSON of the public key object.
    pub fn key_id(&self) -> Result<String> {
        let value = serde_json::to_value(self).map_err(|e| Error::Key(e.to_string()))?;
        Ok(hex::encode(Sha256::digest(to_canonical(&value)?)))
    }

    /// Verifies `sig_hex` over `message`. Returns `false` for a bad signature and for
    /// key types this implementation does not support (such keys never count toward
    /// a threshold). Supported: ed25519; ECDSA P-256/P-384 with SHA-256/384 (DER
    /// signatures, PEM public keys); RSA-PSS and PKCS#1 v1.5 with SHA-256 (PEM).
    pub fn verify(&self, message: &[u8], sig_hex: &str) -> bool {
        let Ok(sig) = hex::decode(sig_hex) else { return false };
        let public = &self.keyval.public;
        match (self.keytype.as_str(), self.scheme.as_str()) {
            (ED25519, ED25519) => verify_ed25519(public, message, &sig),
            ("ecdsa" | "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256") => verify_p256(public, message, &sig),
            ("ecdsa" | "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp384") => verify_p384(public, message, &sig),
            ("rsa", "rsassa-pss-sha256") => verify_rsa(public, message, &sig, RsaPadding::Pss),
            ("rsa", "rsa-pkcs1v15-sha256") => verify_rsa(public, message, &sig, RsaPadding::Pkcs1v15),
            _ => false,
        }
    }
}

fn verify_ed25519(public_hex: &str, message: &[u8], sig: &[u8]) -> bool {
    let Ok(pk_bytes) = hex::decode(public_hex) else { return false };
    let Ok(pk_arr) = <[u8; 32]>::try_from(pk_bytes.as_slice()) else { return false };
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(&pk_arr) else { return false };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else { return false };
    vk.verify(message, &sig).is_ok()
}

fn verify_p256(pem: &str, message: &[u8], sig: &[u8]) -> bool {
    use p256::pkcs8::DecodePublicKey;
    let Ok(vk) = p256::ecdsa::VerifyingKey::from_public_key_pem(pem) else { return false };
    let Ok(sig) = p256::ecdsa::Signature::from_der(sig) else { return false };
    p256::ecdsa::signature::Verifier::verify(&vk, message, &sig).is_ok()
}

fn verify_p384(pem: &str, message: &[u8], sig: &[u8]) -> bool {
    use p384::pkcs8::DecodePublicKey;
    let Ok(vk) = p384::ecdsa::VerifyingKey::from_public_key_pem(pem) else { return false };
    let Ok(sig) = p384::ecdsa::Signature::from_der(sig) else { return false };
    p384::ecdsa::signature::Verifier::verify(&vk, message, &sig).is_ok()
}

enum RsaPadding {
    Pss,
    Pkcs1v15,
}

fn verify_rsa(pem: &str, message: &[u8], sig: &[u8], padding: RsaPadding) -> bool {
    use rsa::pkcs8::DecodePublicKey;
    use sha2::Digest as _;
    let Ok(key) = rsa::RsaPublicKey::from_public_key_pem(pem) else { return false };
    let hashed = Sha256::digest(message);
    match padding {
        // Salt length is not fixed by the scheme name; accept the digest length
        // (what signers use) or the maximum.
        RsaPadding::Pss => {
            key.verify(rsa::Pss::new_with_salt::<Sha256>(32), &hashed, sig).is_ok()
                || key.verify(rsa::Pss::new::<Sha256>(), &hashed, sig).is_ok()
        }
        RsaPadding::Pkcs1v15 => key.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &hashed, sig).is_ok(),
    }
}

/// An ed25519 private key. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct SigningKey {
    inner: ed25519_dalek::SigningKey,
    public: PublicKey,
    key_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// The on-disk key file: the public key object plus, for private key files, the seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub keytype: String,
    pub scheme: String,
    pub keyval: KeyFileVal,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFileVal {
    pub public: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private: Option<String>,
}

impl SigningKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| Error::Key(format!("no randomness: {e}")))?;
        Self::from_seed(&seed)
    }

    pub fn from_seed(seed: &[u8; 32]) -> Result<Self> {
        let inner = ed25519_dalek::SigningKey::from_bytes(seed);
        let public = PublicKey::ed25519(inner.verifying_key().as_bytes());
        let key_id = public.key_id()?;
        Ok(SigningKey { inner, public, key_id })
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The private key as PKCS#8 v1 DER (RFC 8410), for other signing libraries.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        let mut der = vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
        der.extend_from_slice(self.inner.as_bytes());
        der
    }

    /// Hex signature over `message`.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.inner.sign(message).to_bytes())
    }

    pub fn to_key_file(&self) -> KeyFile {
        KeyFile {
            keytype: ED25519.into(),
            scheme: ED25519.into(),
            keyval: KeyFileVal {
                public: self.public.keyval.public.clone(),
                private: Some(hex::encode(self.inner.to_bytes())),
            },
        }
    }
}

/// A key file read from disk: either a signing key or only a public key.
#[derive(Debug, Clone)]
pub enum LoadedKey {
    Private(SigningKey),
    Public(PublicKey),
}

impl LoadedKey {
    /// Parses a key file's bytes; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let file: KeyFile = serde_json::from_slice(bytes)
            .map_err(|e| Error::Key(format!("{origin}: not an Outpost key file: {e}")))?;
        if file.keytype != ED25519 || file.scheme != ED25519 {
            return Err(Error::Key(format!(
                "{origin}: key type {}/{} is not supported (only ed25519)",
                file.keytype, file.scheme
            )));
        }
        match file.keyval.private {
            Some(private) => {
                let seed = hex::decode(private.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                    .ok_or_else(|| Error::Key(format!("{origin}: private key is not 32 hex bytes")))?;
                let key = SigningKey::from_seed(&seed)?;
                if key.public.keyval.public != file.keyval.public.trim() {
                    return Err(Error::Key(format!("{origin}: public key does not match private key")));
                }
                Ok(LoadedKey::Private(key))
            }
            None => {
                let pk = hex::decode(file.keyval.public.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                    .ok_or_else(|| Error::Key(format!("{origin}: public key is not 32 hex bytes")))?;
                Ok(LoadedKey::Public(PublicKey::ed25519(&pk)))
            }
        }
    }

    pub fn public(&self) -> &PublicKey {
        match self {
            LoadedKey::Private(k) => k.public(),
            LoadedKey::Public(p) => p,
        }
    }

    pub fn key_id(&self) -> Result<String> {
        match self {
            LoadedKey::Private(k) => Ok(k.key_id().to_owned()),
            LoadedKey::Public(p) => p.key_id(),
        }
    }

    pub fn signing(&self) -> Option<&SigningKey> {
        match self {
            LoadedKey::Private(k) => Some(k),
            LoadedKey::Public(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_roundtrip_and_key_file() {
        let k = SigningKey::generate().unwrap();
        let sig = k.sign_hex(b"hello");
        assert!(k.public().verify(b"hello", &sig));
        assert!(!k.public().verify(b"hellO", &sig));
        let bytes = serde_json::to_vec(&k.to_key_file()).unwrap();
        let loaded = LoadedKey::from_bytes(&bytes, "test").unwrap();
        assert_eq!(loaded.key_id().unwrap(), k.key_id());
        assert!(loaded.signing().is_some());
    }

    #[test]
    fn unsupported_key_types_never_verify() {
        let k = SigningKey::generate().unwrap();
        let mut p = k.public().clone();
        p.keytype = "rsa".into();
        assert!(!p.verify(b"x", &k.sign_hex(b"x")));
    }
}
