//! SIMULATION ONLY: software keys in place of a TPM, for the fleet simulator.
//!
//! A simulated device has an RSA-2048 "endorsement key" and an ECC P-256 "attestation
//! key" in memory and produces the same TPM 2.0 wire structures a real TPM would
//! (`TPMT_PUBLIC`, `TPMS_ATTEST` quotes, `TPMT_SIGNATURE`, credential activation), so
//! the server runs its real enrollment and check-in code against it. Nothing here
//! protects a key: it is the simulator's one shortcut, and it never runs in the agent.
//!
//! RSA key generation is slow (tens of milliseconds each), so simulated devices share a
//! small pool of RSA keys and differ in the EK's `authPolicy` bytes: every device still
//! has its own EK public area, hence its own device id.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use outpost_protocol::attest::credential::kdfa;
use outpost_protocol::attest::tpm::{attr, ALG_AES, ALG_CFB, ALG_ECC, ALG_ECDSA, ALG_NULL, ALG_RSA, ALG_SHA256, ECC_NIST_P256};
use p256::ecdsa::signature::Signer;
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

fn sized(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn pad32(v: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    out
}

/// The marshalled `TPMT_PUBLIC` of an RSA-2048 storage EK (TCG default template shape).
pub fn ek_public(key: &rsa::RsaPublicKey, auth_policy: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(320);
    p.extend_from_slice(&ALG_RSA.to_be_bytes());
    p.extend_from_slice(&ALG_SHA256.to_be_bytes());
    let attrs = attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN | attr::ADMIN_WITH_POLICY | attr::RESTRICTED | attr::DECRYPT;
    p.extend_from_slice(&attrs.to_be_bytes());
    sized(&mut p, auth_policy);
    p.extend_from_slice(&ALG_AES.to_be_bytes());
    p.extend_from_slice(&128u16.to_be_bytes());
    p.extend_from_slice(&ALG_CFB.to_be_bytes());
    p.extend_from_slice(&ALG_NULL.to_be_bytes());
    p.extend_from_slice(&2048u16.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes());
    let mut modulus = key.n().to_bytes_be();
    while modulus.len() < 256 {
        modulus.insert(0, 0);
    }
    sized(&mut p, &modulus);
    p
}

/// The marshalled `TPMT_PUBLIC` of a restricted ECDSA-SHA256 P-256 signing key.
pub fn ak_public(key: &p256::ecdsa::VerifyingKey) -> Vec<u8> {
    let point = key.to_encoded_point(false);
    let mut p = Vec::with_capacity(96);
    p.extend_from_slice(&ALG_ECC.to_be_bytes());
    p.extend_from_slice(&ALG_SHA256.to_be_bytes());
    let attrs = attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN | attr::USER_WITH_AUTH | attr::RESTRICTED | attr::SIGN;
    p.extend_from_slice(&attrs.to_be_bytes());
    sized(&mut p, &[]);
    p.extend_from_slice(&ALG_NULL.to_be_bytes());
    p.extend_from_slice(&ALG_ECDSA.to_be_bytes());
    p.extend_from_slice(&ALG_SHA256.to_be_bytes());
    p.extend_from_slice(&ECC_NIST_P256.to_be_bytes());
    p.extend_from_slice(&ALG_NULL.to_be_bytes());
    sized(&mut p, point.x().map(|x| x.as_slice()).unwrap_or_default());
    sized(&mut p, point.y().map(|y| y.as_slice()).unwrap_or_default());
    p
}

/// The TPM Name of a public area (SHA-256).
pub fn name(public: &[u8]) -> Vec<u8> {
    let mut n = ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(&Sha256::digest(public));
    n
}

/// TPM2_ActivateCredential in software: recovers the secret the server wrapped for
/// the EK and the object named `object_name`, checking the integrity HMAC first.
pub fn activate_credential(ek: &rsa::RsaPrivateKey, object_name: &[u8], blob: &[u8], encrypted_secret: &[u8]) -> Result<Vec<u8>, String> {
    let seed = ek
        .decrypt(rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0"), encrypted_secret)
        .map_err(|e| format!("encrypted secret: {e}"))?;
    if blob.len() < 2 {
        return Err("credential blob too short".into());
    }
    let hmac_len = u16::from_be_bytes([blob[0], blob[1]]) as usize;
    let (outer, enc) = blob[2..].split_at_checked(hmac_len).ok_or("credential blob too short")?;
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&kdfa(&seed, "INTEGRITY", &[], &[], 256)).map_err(|e| e.to_string())?;
    mac.update(enc);
    mac.update(object_name);
    mac.verify_slice(outer).map_err(|_| "credential integrity check failed (wrong EK or object name)".to_owned())?;
    let mut identity = enc.to_vec();
    cfb_mode::Decryptor::<aes::Aes128>::new_from_slices(&kdfa(&seed, "STORAGE", object_name, &[], 128), &[0u8; 16])
        .map_err(|e| e.to_string())?
        .decrypt(&mut identity);
    if identity.len() < 2 {
        return Err("credential too short".into());
    }
    let len = u16::from_be_bytes([identity[0], identity[1]]) as usize;
    identity.get(2..2 + len).map(<[u8]>::to_vec).ok_or_else(|| "credential length is wrong".to_owned())
}

/// A quote over one SHA-256 PCR holding `pcr_digest_input` (the PCR value), with
/// `qualifying` as extraData, signed by the AK: (`TPMS_ATTEST`, `TPMT_SIGNATURE`).
pub fn quote(ak: &p256::ecdsa::SigningKey, ak_name: &[u8], qualifying: &[u8], pcr: u32, pcr_digest: &[u8], clock: u64) -> (Vec<u8>, Vec<u8>) {
    let mut a = Vec::with_capacity(160);
    a.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
    a.extend_from_slice(&TPM_ST_ATTEST_QUOTE.to_be_bytes());
    sized(&mut a, ak_name);
    sized(&mut a, qualifying);
    a.extend_from_slice(&clock.to_be_bytes());
    a.extend_from_slice(&1u32.to_be_bytes());
    a.extend_from_slice(&0u32.to_be_bytes());
    a.push(1);
    a.extend_from_slice(&0u64.to_be_bytes());
    a.extend_from_slice(&1u32.to_be_bytes());
    a.extend_from_slice(&ALG_SHA256.to_be_bytes());
    a.push(3);
    let mut bits = [0u8; 3];
    bits[(pcr / 8) as usize] |= 1 << (pcr % 8);
    a.extend_from_slice(&bits);
    sized(&mut a, pcr_digest);
    let sig: p256::ecdsa::Signature = ak.sign(&a);
    let (r, s) = sig.split_bytes();
    let mut t = Vec::with_capacity(72);
    t.extend_from_slice(&ALG_ECDSA.to_be_bytes());
    t.extend_from_slice(&ALG_SHA256.to_be_bytes());
    sized(&mut t, &pad32(&r));
    sized(&mut t, &pad32(&s));
    (a, t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::attest::tpm::{Quote, TpmPublic};

    #[test]
    fn the_servers_parsers_and_credential_maker_accept_these_structures() {
        let ek = rsa::RsaPrivateKey::new(&mut outpost_protocol::attest::credential::OsRng, 2048).unwrap_or_else(|e| panic!("{e}"));
        let ek_pub = ek_public(&ek.to_public_key(), b"device-1");
        let parsed_ek = TpmPublic::parse(&ek_pub, "endorsement key").unwrap_or_else(|e| panic!("{e}"));
        parsed_ek.check_endorsement_key().unwrap_or_else(|e| panic!("{e}"));
        let ak = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        let ak_pub = ak_public(ak.verifying_key());
        let parsed_ak = TpmPublic::parse(&ak_pub, "attestation key").unwrap_or_else(|e| panic!("{e}"));
        parsed_ak.check_attestation_key().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed_ak.name(), name(&ak_pub));
        let made = outpost_protocol::attest::credential::make_credential(&parsed_ek, &parsed_ak.name(), b"0123456789abcdef0123456789abcdef")
            .unwrap_or_else(|e| panic!("{e}"));
        let got = activate_credential(&ek, &name(&ak_pub), &made.credential_blob, &made.encrypted_secret).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, b"0123456789abcdef0123456789abcdef");
        assert!(activate_credential(&ek, &name(b"other"), &made.credential_blob, &made.encrypted_secret).is_err());
        let (attest, sig) = quote(&ak, &name(&ak_pub), &[9u8; 32], 23, &[1u8; 32], 42);
        let q = Quote::verify(&parsed_ak, &attest, &sig).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((q.extra_data.clone(), q.sha256_pcrs().map(<[u32]>::to_vec).ok()), (vec![9u8; 32], Some(vec![23])));
    }
}
