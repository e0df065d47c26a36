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

    /// The key itself, independent of how it is written down: the raw Ed25519 point,
    /// the SEC1 compressed point of an ECDSA key, the modulus and exponent of an RSA
    /// key. Two key ids whose entries decode to the same material are one key, and
    /// count once toward a threshold. `None` for a key this implementation cannot
    /// read (such a key never verifies a signature either).
    pub fn material(&self) -> Option<Vec<u8>> {
        let public = &self.keyval.public;
        match self.keytype.as_str() {
            ED25519 => {
                let bytes = hex::decode(public).ok()?;
                (bytes.len() == 32).then(|| [b"ed25519:".as_slice(), &bytes].concat())
            }
            "ecdsa" | "ecdsa-sha2-nistp256" | "ecdsa-sha2-nistp384" => {
                use p256::pkcs8::DecodePublicKey as _;
                if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_pem(public) {
                    return Some([b"p256:".as_slice(), k.to_encoded_point(true).as_bytes()].concat());
                }
                let k = p384::ecdsa::VerifyingKey::from_public_key_pem(public).ok()?;
                Some([b"p384:".as_slice(), k.to_encoded_point(true).as_bytes()].concat())
            }
            "rsa" => {
                use rsa::pkcs8::DecodePublicKey as _;
                use rsa::traits::PublicKeyParts as _;
                let k = rsa::RsaPublicKey::from_public_key_pem(public).ok()?;
                Some([b"rsa:".as_slice(), &k.n().to_bytes_be(), b":", &k.e().to_bytes_be()].concat())
            }
            _ => None,
        }
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

/// What [`SigningKey::sign_reader`] gives: the signature and the SHA-256 and length of
/// the bytes it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderSignature {
    pub signature: [u8; 64],
    pub sha256: [u8; 32],
    pub length: u64,
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

    /// Pure Ed25519 (RFC 8032: the signature [`Self::sign_hex`] gives over the whole
    /// message) over a message too large to hold in memory. Ed25519 hashes the message
    /// twice, once for the nonce and once for the challenge, so `open` is called twice
    /// and each reader is read to its end in 1 MiB chunks; `what` names the message in
    /// errors.
    ///
    /// If the two passes read different bytes (the file changed while it was signed), no
    /// signature comes out: a nonce taken from one message with a challenge over
    /// another is not a valid signature, and two such signatures sharing a nonce would
    /// give the private key away.
    pub fn sign_reader<R: std::io::Read>(&self, what: &str, open: impl Fn() -> std::io::Result<R>) -> Result<ReaderSignature> {
        use std::cell::RefCell;
        let passes: RefCell<Vec<([u8; 32], u64)>> = RefCell::new(Vec::with_capacity(2));
        let failure: RefCell<Option<Error>> = RefCell::new(None);
        let read_pass = |h: &mut sha2::Sha512| -> Result<([u8; 32], u64)> {
            let read_err = |source| Error::Read { what: what.to_owned(), source };
            let mut sha256 = Sha256::new();
            let length = crate::hashing::for_each_chunk(open().map_err(read_err)?, |chunk| {
                h.update(chunk);
                sha256.update(chunk);
            })
            .map_err(read_err)?;
            Ok((sha256.finalize().into(), length))
        };
        let feed = |h: &mut sha2::Sha512| -> std::result::Result<(), ed25519_dalek::SignatureError> {
            let pass = read_pass(h).and_then(|pass| match passes.borrow().first() {
                Some(first) if *first != pass => Err(Error::Integrity {
                    what: what.to_owned(),
                    reason: format!(
                        "changed while it was being signed ({} bytes, sha256 {} in the first pass; {} bytes, sha256 {} in the second); nothing was signed",
                        first.1,
                        hex::encode(first.0),
                        pass.1,
                        hex::encode(pass.0)
                    ),
                }),
                _ => Ok(pass),
            });
            match pass {
                Ok(pass) => {
                    passes.borrow_mut().push(pass);
                    Ok(())
                }
                Err(e) => {
                    *failure.borrow_mut() = Some(e);
                    Err(ed25519_dalek::SignatureError::new())
                }
            }
        };
        let expanded = ed25519_dalek::hazmat::ExpandedSecretKey::from(self.inner.as_bytes());
        let signed = ed25519_dalek::hazmat::raw_sign_byupdate::<sha2::Sha512, _>(&expanded, feed, &self.inner.verifying_key());
        match (signed, passes.into_inner().as_slice()) {
            (Ok(signature), [(sha256, length), _]) => Ok(ReaderSignature { signature: signature.to_bytes(), sha256: *sha256, length: *length }),
            (Ok(_), _) => Err(Error::Key(format!("{what}: signing did not read the message twice"))),
            (Err(e), _) => Err(failure.into_inner().unwrap_or_else(|| Error::Key(format!("{what}: ed25519 signing failed: {e}")))),
        }
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
    fn reader_signature_is_the_ed25519_signature_of_the_whole_message() {
        let k = SigningKey::generate().unwrap();
        for len in [0usize, 1, 4096, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 7] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
            let got = k.sign_reader("msg", || Ok(std::io::Cursor::new(msg.clone()))).unwrap();
            assert_eq!(hex::encode(got.signature), k.sign_hex(&msg), "length {len}");
            assert!(k.public().verify(&msg, &hex::encode(got.signature)));
            assert_eq!(got.sha256.as_slice(), Sha256::digest(&msg).as_slice());
            assert_eq!(got.length, len as u64);
        }
    }

    #[test]
    fn reader_that_changes_between_passes_gets_no_signature() {
        let k = SigningKey::generate().unwrap();
        let calls = std::cell::Cell::new(0);
        let err = k
            .sign_reader("fw.img", || {
                calls.set(calls.get() + 1);
                let mut msg = vec![5u8; 3 << 20];
                if calls.get() == 2 {
                    msg[2 << 20] = 6;
                }
                Ok(std::io::Cursor::new(msg))
            })
            .unwrap_err();
        assert_eq!(calls.get(), 2);
        let text = err.to_string();
        assert!(matches!(err, Error::Integrity { .. }), "{text}");
        assert!(text.starts_with("fw.img: changed while it was being signed") && text.contains("nothing was signed"), "{text}");
    }

    #[test]
    fn reader_errors_name_the_message_and_sign_nothing() {
        struct Broken(usize);
        impl std::io::Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("disk on fire"));
                }
                let n = self.0.min(buf.len());
                self.0 -= n;
                buf[..n].fill(1);
                Ok(n)
            }
        }
        let k = SigningKey::generate().unwrap();
        let err = k.sign_reader("fw.img", || Ok(Broken(5000))).unwrap_err();
        assert!(matches!(err, Error::Read { .. }));
        assert_eq!(err.to_string(), "read fw.img: disk on fire");
        let err = k.sign_reader("gone.img", || Err::<Broken, _>(std::io::Error::from(std::io::ErrorKind::NotFound))).unwrap_err();
        assert!(err.to_string().starts_with("read gone.img: "), "{err}");
    }

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
