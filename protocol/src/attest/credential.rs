//! The software half of TPM credential activation (TPM 2.0 Part 1, "Credential
//! Protection"; Part 3, TPM2_MakeCredential): the server wraps a random secret so that
//! only the TPM holding the endorsement key *and* a loaded object with the given Name
//! (the attestation key) can recover it with TPM2_ActivateCredential.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rsa::rand_core::{CryptoRng, RngCore};
use sha2::Sha256;

use super::tpm::{PublicKey, TpmPublic};
use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// A wrapped credential: `TPM2B_ID_OBJECT` and `TPM2B_ENCRYPTED_SECRET` contents.
#[derive(Debug, Clone)]
pub struct MadeCredential {
    pub credential_blob: Vec<u8>,
    pub encrypted_secret: Vec<u8>,
}

/// The operating system's CSPRNG in the `rand_core` traits the RSA crate wants.
pub struct OsRng;

impl RngCore for OsRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        // getrandom only fails when the OS has no entropy source at all.
        if let Err(e) = getrandom::getrandom(dest) {
            panic!("operating system randomness unavailable: {e}");
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rsa::rand_core::Error> {
        getrandom::getrandom(dest).map_err(|e| rsa::rand_core::Error::new(e.to_string()))
    }
}

impl CryptoRng for OsRng {}

/// KDFa (SP 800-108 counter mode with HMAC-SHA256) as the TPM defines it; `label`
/// is used with its terminating zero byte.
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(&counter.to_be_bytes());
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// TPM2_MakeCredential for an RSA-2048 EK (checked with `check_endorsement_key`):
/// `credential` is the secret (at most 32 bytes), `object_name` the AK's Name.
pub fn make_credential(ek: &TpmPublic, object_name: &[u8], credential: &[u8]) -> Result<MadeCredential> {
    ek.check_endorsement_key()?;
    if credential.is_empty() || credential.len() > 32 {
        return Err(Error::Tpm { what: "credential".into(), reason: format!("{} bytes; must be 1-32", credential.len()) });
    }
    let PublicKey::Rsa { modulus, exponent, .. } = &ek.key else {
        return Err(Error::Tpm { what: "endorsement key".into(), reason: "is not an RSA key".into() });
    };
    let e = if *exponent == 0 { 65537 } else { *exponent };
    let public = rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(modulus), rsa::BigUint::from(e))
        .map_err(|e| Error::Tpm { what: "endorsement key".into(), reason: format!("unusable RSA key: {e}") })?;
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    // The seed goes to the EK with OAEP, labelled "IDENTITY".
    let encrypted_secret = public
        .encrypt(&mut OsRng, rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0"), &seed)
        .map_err(|e| Error::Tpm { what: "endorsement key".into(), reason: format!("OAEP encryption failed: {e}") })?;
    // Inner: the credential as a TPM2B_DIGEST, AES-128-CFB with a zero IV under a key
    // bound to the AK's Name.
    let sym_key = kdfa(&seed, "STORAGE", object_name, &[], 128);
    let mut enc_identity = (credential.len() as u16).to_be_bytes().to_vec();
    enc_identity.extend_from_slice(credential);
    cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(&sym_key, &[0u8; 16])
        .expect("AES-128 key and IV sizes are fixed")
        .encrypt(&mut enc_identity);
    // Outer: an HMAC over the encrypted identity and the Name.
    let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&hmac_key).expect("HMAC takes keys of any length");
    mac.update(&enc_identity);
    mac.update(object_name);
    let outer = mac.finalize().into_bytes();
    let mut credential_blob = (outer.len() as u16).to_be_bytes().to_vec();
    credential_blob.extend_from_slice(&outer);
    credential_blob.extend_from_slice(&enc_identity);
    Ok(MadeCredential { credential_blob, encrypted_secret })
}

/// A fresh random value from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    OsRng.fill_bytes(&mut b);
    b
}
