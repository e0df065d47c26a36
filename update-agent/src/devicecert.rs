//! The device's TLS client identity: a key that lives in the TPM and a short-lived
//! certificate for it from the server's device CA.
//!
//! The key is made once, after enrollment, inside the TPM under the EK
//! ([`Tpm::create_tls_key`]); the state directory keeps only its public area and its
//! EK-wrapped private area (`tls-key.json`), which no other TPM can load. No private
//! key file exists. A check-in asks for a certificate when the device has none or its
//! certificate is past half its lifetime: it carries the key's TPM2_Certify by the AK
//! (bound to this device and this check-in's nonce), and the answer of an attested
//! check-in carries the certificate (`client-certificate.json`). Handshakes are signed
//! by the TPM ([`TpmKey`], behind rustls' signing-key trait); resumed sessions sign
//! nothing. An expired certificate is not offered: the device goes back to asking for
//! one in its next attested check-in.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use outpost_protocol::attest::tlskey::{self, DeviceCertificate, TlsKeyProof};
use outpost_protocol::attest::TpmPublic;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{AgentError, Result};
use crate::tpm::{AkBlob, Tpm};

/// `tls-key.json`: the TLS key's public and EK-wrapped private areas, hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    public: String,
    private: String,
}

/// The identity, shared by the agent's HTTP client (as its client-certificate
/// resolver) and its check-ins (which renew it).
#[derive(Debug)]
pub struct DeviceIdentity {
    tpm: Tpm,
    key_path: PathBuf,
    cert_path: PathBuf,
    /// The key (None until the first certificate request makes it).
    key: RwLock<Option<Arc<TpmKey>>>,
    /// The certificate in force and what the server said of it.
    current: RwLock<Option<(Arc<CertifiedKey>, DeviceCertificate, i64)>>,
    /// The HTTP client's TLS sessions, emptied when the certificate changes.
    sessions: Arc<Sessions>,
    /// The EK's public area, sent with each certificate request (read from the TPM
    /// once: re-deriving the EK costs tens of milliseconds).
    ek_public: std::sync::Mutex<Option<Vec<u8>>>,
}

impl DeviceIdentity {
    /// The stored identity of the device whose TPM `tcti` reaches and whose state is in
    /// `state_dir`. A stored certificate that is not for the stored key is left unused,
    /// with a warning.
    pub fn load(tcti: &str, state_dir: &std::path::Path) -> Result<Arc<Self>> {
        let id = DeviceIdentity {
            tpm: Tpm::new(tcti)?,
            key_path: state_dir.join("tls-key.json"),
            cert_path: state_dir.join("client-certificate.json"),
            key: RwLock::new(None),
            current: RwLock::new(None),
            sessions: Arc::new(Sessions::new()),
            ek_public: std::sync::Mutex::new(None),
        };
        let key = id.read_key().unwrap_or_else(|e| {
            // A key file that does not load is set aside: the next certificate request
            // makes a new key (nothing else depends on this one).
            let aside = id.key_path.with_extension("json.unusable");
            tracing::warn!(error = %e, aside = %aside.display(), "the TLS key file is unusable; setting it aside");
            let _ = std::fs::rename(&id.key_path, &aside);
            None
        });
        if let Some(key) = key {
            *id.key.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
            match read_json::<DeviceCertificate>(&id.cert_path)? {
                Some(cert) => {
                    if let Err(e) = id.install(&cert) {
                        tracing::warn!(error = %e, "the stored client certificate is not usable; asking for a new one");
                    }
                }
                None => {}
            }
        }
        Ok(Arc::new(id))
    }

    fn read_key(&self) -> Result<Option<Arc<TpmKey>>> {
        let Some(file) = read_json::<KeyFile>(&self.key_path)? else { return Ok(None) };
        let bad = |reason: String| AgentError::Corrupt { path: self.key_path.clone(), reason };
        let blob = AkBlob {
            public: hex::decode(&file.public).map_err(|e| bad(format!("public: {e}")))?,
            private: hex::decode(&file.private).map_err(|e| bad(format!("private: {e}")))?,
        };
        TpmKey::new(self.tpm.clone(), blob).map(|k| Some(Arc::new(k))).map_err(|e| bad(e.to_string()))
    }

    /// The key, made in the TPM now if there is none yet (blocking: TPM commands).
    fn key_or_create(&self) -> Result<Arc<TpmKey>> {
        if let Some(k) = self.key.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(k);
        }
        let blob = self.tpm.create_tls_key()?;
        let key = Arc::new(TpmKey::new(self.tpm.clone(), blob.clone())?);
        let file = KeyFile { public: hex::encode(&blob.public), private: hex::encode(&blob.private) };
        write_json(&self.key_path, &file)?;
        tracing::info!("TLS client key created in the TPM");
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = Some(key.clone());
        Ok(key)
    }

    /// Whether the next check-in should ask for a certificate: there is none, or the
    /// one in force is past half its lifetime (`now`: Unix seconds).
    pub fn wants_certificate(&self, now: i64) -> bool {
        match &*self.current.read().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some((_, cert, not_after)) => {
                let not_before = chrono::DateTime::parse_from_rfc3339(&cert.not_before).map(|t| t.timestamp()).unwrap_or(*not_after);
                now >= not_before + (*not_after - not_before) / 2
            }
        }
    }

    /// The request for a certificate in a check-in with `nonce` of `device_id`: the key
    /// (made now if need be) and its certification by the AK (blocking: TPM commands).
    pub fn proof(&self, ak: &AkBlob, device_id: &str, nonce: &str) -> Result<TlsKeyProof> {
        let key = self.key_or_create()?;
        let q = self.tpm.certify(ak, &key.blob, &tlskey::certify_qualifying_data(device_id, nonce))?;
        // The key's parent, so the server can check the certification's qualified name.
        let ek_public = {
            let mut cached = self.ek_public.lock().unwrap_or_else(|p| p.into_inner());
            match &*cached {
                Some(ek) => ek.clone(),
                None => cached.insert(self.tpm.endorsement()?.0).clone(),
            }
        };
        Ok(TlsKeyProof {
            public: hex::encode(&key.blob.public),
            attest: hex::encode(&q.attest),
            signature: hex::encode(&q.signature),
            ek_public: hex::encode(ek_public),
        })
    }

    /// Puts a certificate from the server in force (and stores it): it must be for this
    /// device's key.
    pub fn install(&self, cert: &DeviceCertificate) -> Result<()> {
        let bad = |reason: String| AgentError::Attestation(format!("client certificate {}: {reason}", cert.serial));
        let key = self.key.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| bad("there is no TLS key in the TPM for it".into()))?;
        let der = CertificateDer::from_pem_slice(cert.certificate.as_bytes()).map_err(|e| bad(format!("not a PEM certificate: {e:?}")))?;
        let certified = CertifiedKey::new(vec![der], key);
        certified.keys_match().map_err(|e| bad(format!("not for this device's TPM key: {e}")))?;
        let not_after = chrono::DateTime::parse_from_rfc3339(&cert.not_after).map_err(|e| bad(format!("not_after {:?}: {e}", cert.not_after)))?.timestamp();
        write_json(&self.cert_path, cert)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some((Arc::new(certified), cert.clone(), not_after));
        self.sessions.clear();
        self.write_metrics(cert, not_after);
        Ok(())
    }

    /// The certificate's expiry for node_exporter's textfile collector
    /// (`client-certificate.prom` beside `metrics.prom`), so operators alert before a
    /// device's access lapses.
    fn write_metrics(&self, cert: &DeviceCertificate, not_after: i64) {
        let mut m = crate::metrics::Exposition::default();
        m.gauge(
            "outpost_agent_client_certificate_expiry_timestamp_seconds",
            "When the device's client certificate expires (Unix seconds).",
            vec![("serial", cert.serial.clone()), ("spiffe_id", cert.spiffe_id.clone())],
            not_after,
        );
        let path = self.cert_path.with_extension("prom");
        if let Err(e) = outpost_fsio::write_atomic(&path, m.encode().as_bytes()) {
            tracing::warn!(error = %e, path = %path.display(), "cannot write the certificate's metrics file");
        }
    }

    /// The session cache the HTTP client that presents this identity must use.
    pub fn sessions(&self) -> Arc<Sessions> {
        self.sessions.clone()
    }

    /// Whether the certificate in force has expired (or is about to) at `now`: the
    /// device had one, so its server issues them.
    pub fn expired(&self, now: i64) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).is_some() && !self.usable(now)
    }

    /// Whether a certificate is in force at `now` (Unix seconds) and will still be
    /// when the server reads the request: not within a tenth of its lifetime (at most
    /// 30 s) of its expiry.
    pub fn usable(&self, now: i64) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|(_, cert, not_after)| {
            let not_before = chrono::DateTime::parse_from_rfc3339(&cert.not_before).map(|t| t.timestamp()).unwrap_or(*not_after);
            let margin = ((*not_after - not_before) / 10).clamp(1, 30);
            now + margin < *not_after
        })
    }

    /// Stops presenting the certificate in force and forgets it.
    pub fn drop_certificate(&self) -> Result<()> {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.sessions.clear();
        for path in [self.cert_path.clone(), self.cert_path.with_extension("prom")] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(AgentError::io("remove", &path, e)),
            }
        }
        Ok(())
    }

    /// The certificate in force: its serial and expiry (Unix seconds).
    pub fn certificate(&self) -> Option<(String, i64)> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(_, c, t)| (c.serial.clone(), *t))
    }
}

impl ResolvesClientCert for DeviceIdentity {
    fn resolve(&self, _root_hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        if !schemes.contains(&SignatureScheme::ECDSA_NISTP256_SHA256) {
            return None;
        }
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        let (certified, _, _) = current.as_ref()?;
        // An expired certificate would fail the handshake (or the request, on a
        // resumed session): go without, as a device that asks for a new one.
        self.usable(chrono::Utc::now().timestamp()).then(|| certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// The client's TLS session cache, emptied whenever the certificate changes. A resumed
/// TLS 1.3 session carries the client certificate of the handshake it resumed, and
/// the server issues new tickets on resumed sessions: without emptying it, a renewed
/// (or dropped) certificate would never reach the server on a reused ticket.
#[derive(Debug)]
pub struct Sessions(RwLock<Arc<rustls::client::ClientSessionMemoryCache>>);

impl Sessions {
    fn new() -> Self {
        Sessions(RwLock::new(Arc::new(rustls::client::ClientSessionMemoryCache::new(64))))
    }
    fn clear(&self) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rustls::client::ClientSessionMemoryCache::new(64));
    }
    fn inner(&self) -> Arc<rustls::client::ClientSessionMemoryCache> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rustls::client::ClientSessionStore for Sessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner().set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner().kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: rustls::client::Tls12ClientSessionValue) {
        self.inner().set_tls12_session(server_name, value)
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner().tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner().remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: rustls::client::Tls13ClientSessionValue) {
        self.inner().insert_tls13_ticket(server_name, value)
    }
    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner().take_tls13_ticket(server_name)
    }
}

/// The TLS key: its public area here, its private area usable only inside the TPM.
#[derive(Debug)]
pub struct TpmKey {
    tpm: Tpm,
    blob: AkBlob,
    spki: Vec<u8>,
}

impl TpmKey {
    fn new(tpm: Tpm, blob: AkBlob) -> Result<Self> {
        let public = TpmPublic::parse(&blob.public, "TLS client key").map_err(|e| AgentError::tuf("TLS client key", e))?;
        public.check_tls_client_key().map_err(|e| AgentError::tuf("TLS client key", e))?;
        let point = public.ecc_point().ok_or_else(|| AgentError::Attestation("TLS client key: not an ECC key".into()))?;
        Ok(TpmKey { tpm, blob, spki: tlskey::p256_spki(&point) })
    }
}

impl SigningKey for TpmKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered.contains(&SignatureScheme::ECDSA_NISTP256_SHA256).then(|| {
            Box::new(TpmSigner { tpm: self.tpm.clone(), blob: self.blob.clone() }) as Box<dyn Signer>
        })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

/// One handshake's signature, made by the TPM (a TPM2_Sign of the SHA-256 digest).
#[derive(Debug)]
struct TpmSigner {
    tpm: Tpm,
    blob: AkBlob,
}

impl Signer for TpmSigner {
    fn sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(message).into();
        let (r, s) = self.tpm.sign_digest(&self.blob, &digest).map_err(|e| rustls::Error::General(format!("TPM signature: {e}")))?;
        Ok(ecdsa_der(&r, &s))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// An ECDSA signature as TLS carries it: DER `SEQUENCE { r INTEGER, s INTEGER }`.
fn ecdsa_der(r: &[u8; 32], s: &[u8; 32]) -> Vec<u8> {
    fn integer(v: &[u8]) -> Vec<u8> {
        let mut v = v;
        while v.len() > 1 && v[0] == 0 && v[1] & 0x80 == 0 {
            v = &v[1..];
        }
        let mut out = vec![0x02];
        if v[0] & 0x80 != 0 {
            out.push(v.len() as u8 + 1);
            out.push(0);
        } else {
            out.push(v.len() as u8);
        }
        out.extend_from_slice(v);
        out
    }
    let (ri, si) = (integer(r), integer(s));
    let mut out = vec![0x30, (ri.len() + si.len()) as u8];
    out.extend(ri);
    out.extend(si);
    out
}

fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| AgentError::Serialize { what: path.display().to_string(), reason: e.to_string() })?;
    outpost_fsio::write_atomic(path, &bytes).map_err(|e| AgentError::io("write", path, e))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| AgentError::Corrupt { path: path.to_owned(), reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io("read", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_signatures_are_der_integers_without_padding_but_the_sign_byte() {
        let mut r = [0u8; 32];
        r[31] = 1;
        let s = [0xffu8; 32];
        let der = ecdsa_der(&r, &s);
        // r = 1 (one byte), s = 0x00ff..ff (33 bytes, a zero so it stays positive).
        assert_eq!(&der[..5], &[0x30, 3 + 35, 0x02, 1, 1]);
        assert_eq!(&der[5..8], &[0x02, 33, 0x00]);
        assert_eq!(der.len(), 2 + 3 + 35);
        let ring_ok = ring_verify_roundtrip();
        assert!(ring_ok);
    }

    /// A DER signature made from ring's fixed-size one verifies with ring's ASN.1
    /// verifier: the encoding is what TLS peers expect.
    fn ring_verify_roundtrip() -> bool {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        (0..32).all(|i| {
            let msg = [i as u8; 40];
            let sig = key.sign(&rng, &msg).unwrap();
            let (mut r, mut s) = ([0u8; 32], [0u8; 32]);
            r.copy_from_slice(&sig.as_ref()[..32]);
            s.copy_from_slice(&sig.as_ref()[32..]);
            ring::signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref()).verify(&msg, &ecdsa_der(&r, &s)).is_ok()
        })
    }
}
