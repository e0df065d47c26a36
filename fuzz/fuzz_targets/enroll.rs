//! Enrollment bodies, both ways (protocol/src/attest): `POST /api/v1/enroll` as the
//! server reads it from anyone holding a token (hex EK/AK public areas, an EK
//! certificate, then the credential it makes), and the answers the agent reads from
//! the server or whoever sits on the path (challenge with credential blob and
//! encrypted secret, bounded as the agent bounds them; the director root it pins).
//! The credential blob itself is opened by the TPM, not parsed in Rust.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::attest::credential::make_credential;
use outpost_protocol::attest::{unhex, EnrollChallenge, EnrollProof, EnrollRequest, Enrolled, NonceAsk, NonceGrant, NonceRequest, TpmPublic};
use outpost_protocol::release::HardwareClass;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<EnrollRequest>(data) {
        let _ = req.hardware_class.parse::<HardwareClass>();
        let ek = unhex("ek_public", &req.ek_public, 1024).ok().and_then(|b| TpmPublic::parse(&b, "endorsement key").ok());
        let ak = unhex("ak_public", &req.ak_public, 1024).ok().and_then(|b| TpmPublic::parse(&b, "attestation key").ok());
        if let Some(c) = &req.ek_certificate {
            let _ = unhex("ek_certificate", c, 8192);
        }
        if let (Some(ek), Some(ak)) = (ek, ak) {
            if ek.check_endorsement_key().is_ok() && ak.check_attestation_key().is_ok() {
                let _ = make_credential(&ek, &ak.name(), &[1u8; 32]);
            }
        }
    }
    if let Ok(ch) = serde_json::from_slice::<EnrollChallenge>(data) {
        let _ = unhex("credential_blob", &ch.credential_blob, 1024);
        let _ = unhex("encrypted_secret", &ch.encrypted_secret, 1024);
    }
    if let Ok(p) = serde_json::from_slice::<EnrollProof>(data) {
        let _ = unhex("secret", &p.secret, 64);
    }
    let _ = serde_json::from_slice::<Enrolled>(data);
    if let Ok(r) = serde_json::from_slice::<NonceRequest>(data) {
        let _ = outpost_protocol::attest::nonce_request_qualifying_data(&r.request);
        let _ = serde_json::from_value::<NonceAsk>(r.request);
    }
    let _ = serde_json::from_slice::<NonceGrant>(data);
});
