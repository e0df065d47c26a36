//! The device's TLS client key: created inside its TPM, never outside it, and proven
//! to the server to live in the same TPM as the attestation key before the server's
//! device CA certifies it.
//!
//! The proof travels inside an attested check-in report (so the check-in's quote
//! vouches for it too): the key's `TPMT_PUBLIC` and a TPM2_Certify of the key signed by
//! the attestation key, whose qualifying data is
//! `SHA-256("outpost-tls-key-v1\0" || device id || "\0" || the check-in's nonce)`: fresh
//! for this check-in, and this device's. A certification can only be made by the TPM
//! that holds the attestation key, for an object loaded in it (the TPM refuses to
//! certify a public area loaded from outside with TPM2_LoadExternal: it has no
//! authValue for it). Its qualified name must be that of a child of the device's EK
//! (the EK's public area travels with the proof; its digest is the device id), so the
//! key is the one the agent made under the enrolled EK, not another object of that
//! TPM; with `fixedTPM` and `sensitiveDataOrigin` set on it (checked here), the TPM
//! made it and it cannot leave.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::tpm::{Certification, TpmPublic};
use crate::error::{Error, Result};

/// Domain separation for the certification's qualifying data.
const TLS_KEY_DOMAIN: &[u8] = b"outpost-tls-key-v1\0";

/// TPM_RH_ENDORSEMENT, the EK's hierarchy: a permanent handle's Name (and qualified
/// name) is the handle itself.
const TPM_RH_ENDORSEMENT: u32 = 0x4000_000B;

/// The qualified name of `child` made under the endorsement hierarchy's primary key
/// `ek` (TPM 2.0 Part 1, "Qualified Name"): QN(EK) = nameAlg || H(TPM_RH_ENDORSEMENT ||
/// Name(EK)), QN(child) = nameAlg || H(QN(EK) || Name(child)), H = SHA-256 (the name
/// algorithm of both, checked).
pub fn qualified_name_under_ek(ek: &TpmPublic, child: &TpmPublic) -> Result<Vec<u8>> {
    for (what, key) in [("endorsement key", ek), ("TLS client key", child)] {
        if key.name_alg != super::tpm::ALG_SHA256 {
            return Err(Error::Tpm { what: what.into(), reason: format!("name algorithm 0x{:04x} is not SHA-256", key.name_alg) });
        }
    }
    let chain = |parent: &[u8], name: &[u8]| {
        let mut qn = super::tpm::ALG_SHA256.to_be_bytes().to_vec();
        qn.extend_from_slice(&Sha256::new().chain_update(parent).chain_update(name).finalize());
        qn
    };
    let ek_qn = chain(&TPM_RH_ENDORSEMENT.to_be_bytes(), &ek.name());
    Ok(chain(&ek_qn, &child.name()))
}

/// The device's request for a client certificate, in its check-in report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsKeyProof {
    /// The key's marshalled `TPMT_PUBLIC`, hex.
    pub public: String,
    /// Marshalled `TPMS_ATTEST` of TPM2_Certify over the key, signed by the AK, hex.
    pub attest: String,
    /// Marshalled `TPMT_SIGNATURE` of that certification, hex.
    pub signature: String,
    /// The EK's marshalled `TPMT_PUBLIC`, hex: the key's parent. Its digest is the
    /// device id ([`super::device_id`]).
    pub ek_public: String,
}

/// A client certificate the server's device CA issued, in a check-in answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCertificate {
    /// The certificate, PEM.
    pub certificate: String,
    /// The device CA's certificate, PEM (what the server checks client certificates
    /// against; peers of the device check them against it too).
    pub ca_certificate: String,
    /// The serial number, hex.
    pub serial: String,
    /// The URI SAN: `spiffe://<trust domain>/device/<device id>`.
    pub spiffe_id: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
}

/// The qualifying data a certification for `device_id`'s check-in with `nonce` carries.
pub fn certify_qualifying_data(device_id: &str, nonce: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TLS_KEY_DOMAIN);
    h.update(device_id.as_bytes());
    h.update([0]);
    h.update(nonce.as_bytes());
    h.finalize().into()
}

/// The SPIFFE ID of a device in a trust domain.
pub fn spiffe_id(trust_domain: &str, device_id: &str) -> String {
    format!("spiffe://{trust_domain}/device/{device_id}")
}

/// The device id a SPIFFE ID of `trust_domain` names, if it names a device.
pub fn device_of_spiffe_id<'a>(trust_domain: &str, uri: &'a str) -> Option<&'a str> {
    let rest = uri.strip_prefix("spiffe://")?.strip_prefix(trust_domain)?.strip_prefix("/device/")?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// A key the server may certify: its public area, and its SubjectPublicKeyInfo (DER).
#[derive(Debug, Clone)]
pub struct ResidentKey {
    pub public: TpmPublic,
    pub spki_der: Vec<u8>,
}

/// Checks a device's proof that its TLS client key lives in the TPM that holds `ak`:
/// the certification is signed by `ak`, made for this device's check-in with `nonce`,
/// names exactly this public area made under this device's EK, and the key is one
/// Outpost certifies (a non-exportable ECDSA P-256 signing key,
/// [`TpmPublic::check_tls_client_key`]).
pub fn verify_tls_key(ak: &TpmPublic, device_id: &str, nonce: &str, proof: &TlsKeyProof) -> Result<ResidentKey> {
    let public_bytes = super::unhex("tls_key.public", &proof.public, 1024)?;
    let attest = super::unhex("tls_key.attest", &proof.attest, 4096)?;
    let signature = super::unhex("tls_key.signature", &proof.signature, 1024)?;
    let public = TpmPublic::parse(&public_bytes, "TLS client key")?;
    public.check_tls_client_key()?;
    let certification = Certification::verify(ak, &attest, &signature)?;
    if certification.extra_data != certify_qualifying_data(device_id, nonce) {
        return Err(Error::Tpm {
            what: "key certification".into(),
            reason: "qualifying data is not this device's for this check-in's nonce (a certification made for another check-in or device)".into(),
        });
    }
    if certification.name != public.name() {
        return Err(Error::Tpm {
            what: "key certification".into(),
            reason: "certifies another object than the TLS client key sent with it".into(),
        });
    }
    let ek_bytes = super::unhex("tls_key.ek_public", &proof.ek_public, 2048)?;
    if super::device_id(&ek_bytes) != device_id {
        return Err(Error::Tpm { what: "TLS client key".into(), reason: "the endorsement key sent with it is not this device's (its digest names another device)".into() });
    }
    let ek = TpmPublic::parse(&ek_bytes, "endorsement key")?;
    if certification.qualified_name != qualified_name_under_ek(&ek, &public)? {
        return Err(Error::Tpm {
            what: "key certification".into(),
            reason: "the key is not a child of this device's endorsement key (its qualified name differs): a key loaded from outside the TPM, or made under another parent, is not certified".into(),
        });
    }
    let point = public.ecc_point().ok_or_else(|| Error::Tpm { what: "TLS client key".into(), reason: "is not an ECC key".into() })?;
    Ok(ResidentKey { public, spki_der: p256_spki(&point) })
}

/// The DER SubjectPublicKeyInfo of a P-256 public key given as its uncompressed point.
pub fn p256_spki(point: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) point }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01,
        0x07, 0x03, 0x42, 0x00,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(point);
    der
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_name_one_device_of_one_trust_domain() {
        let id = spiffe_id("fleet.example", "dev-1");
        assert_eq!(id, "spiffe://fleet.example/device/dev-1");
        assert_eq!(device_of_spiffe_id("fleet.example", &id), Some("dev-1"));
        // Another trust domain, a longer domain with the same start, a path below the
        // device, no device at all: none of them names a device here.
        assert_eq!(device_of_spiffe_id("other.example", &id), None);
        assert_eq!(device_of_spiffe_id("fleet.example", "spiffe://fleet.example.evil/device/dev-1"), None);
        assert_eq!(device_of_spiffe_id("fleet.example", "spiffe://fleet.example/device/dev-1/x"), None);
        assert_eq!(device_of_spiffe_id("fleet.example", "spiffe://fleet.example/device/"), None);
        assert_eq!(device_of_spiffe_id("fleet.example", "https://fleet.example/device/dev-1"), None);
    }

    #[test]
    fn certification_data_binds_device_and_nonce() {
        let a = certify_qualifying_data("dev-1", "00ff");
        assert_ne!(a, certify_qualifying_data("dev-2", "00ff"));
        assert_ne!(a, certify_qualifying_data("dev-1", "00fe"));
        // The separator keeps "dev-1"+"0" and "dev-10"+"" apart.
        assert_ne!(certify_qualifying_data("dev-1", "0"), certify_qualifying_data("dev-10", ""));
    }

    /// A marshalled TPMT_PUBLIC of an ECDSA-SHA256 P-256 key with `attributes` and
    /// `auth_policy`.
    fn p256_public(attributes: u32, auth_policy: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(0x0023u16.to_be_bytes()); // ECC
        b.extend(0x000bu16.to_be_bytes()); // nameAlg SHA-256
        b.extend(attributes.to_be_bytes());
        b.extend((auth_policy.len() as u16).to_be_bytes());
        b.extend(auth_policy);
        b.extend(0x0010u16.to_be_bytes()); // symmetric NULL
        b.extend([0x00, 0x18, 0x00, 0x0b]); // ECDSA, SHA-256
        b.extend(0x0003u16.to_be_bytes()); // NIST P-256
        b.extend(0x0010u16.to_be_bytes()); // kdf NULL
        for _ in 0..2 {
            b.extend(32u16.to_be_bytes());
            b.extend([7u8; 32]);
        }
        b
    }

    /// What an attacker could certify with the device's real AK: a public area of a key
    /// made in software, loaded alone (TPM2_LoadExternal) claiming fixedTPM and friends,
    /// authorized for TPM2_Certify by a policy of its own. Such a key must carry a policy
    /// (it has no auth value in the TPM), and Outpost certifies only keys without one.
    #[test]
    fn a_key_with_a_policy_or_admin_by_policy_is_not_a_tls_key() {
        use crate::attest::tpm::{attr, TpmPublic};
        let good = attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN | attr::USER_WITH_AUTH | attr::SIGN;
        let check = |a: u32, p: &[u8]| TpmPublic::parse(&p256_public(a, p), "TLS client key").unwrap().check_tls_client_key().map_err(|e| e.to_string());
        assert_eq!(check(good, &[]), Ok(()));
        assert!(check(good, &[1u8; 32]).unwrap_err().contains("authorization policy"));
        assert!(check(good | attr::ADMIN_WITH_POLICY, &[]).unwrap_err().contains("adminWithPolicy"));
        assert!(check(good | attr::RESTRICTED, &[]).unwrap_err().contains("restricted"));
        assert!(check(good | attr::DECRYPT, &[]).unwrap_err().contains("decrypt"));
        assert!(check(good & !attr::FIXED_TPM, &[]).unwrap_err().contains("fixedTPM"));
        assert!(check(good & !attr::SENSITIVE_DATA_ORIGIN, &[]).unwrap_err().contains("sensitiveDataOrigin"));
    }

    #[test]
    fn the_spki_of_a_p256_point_parses_as_one() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let der = p256_spki(&point);
        assert_eq!(der.len(), 91);
        assert_eq!(der[1] as usize, der.len() - 2);
    }
}
