//! `TPMT_PUBLIC` (protocol/src/attest/tpm.rs `TpmPublic::parse`): the EK and AK public
//! areas any holder of an enrollment token sends, and the credential the server then
//! makes for that EK (`credential::make_credential`: RSA-OAEP to a modulus the device
//! chose, KDFa, AES-CFB, HMAC over the AK's Name).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::attest::credential::make_credential;
use outpost_protocol::attest::TpmPublic;

fuzz_target!(|data: &[u8]| {
    let Ok(public) = TpmPublic::parse(data, "fuzzed public area") else { return };
    let name = public.name();
    assert_eq!(name.len(), 34, "a SHA-256 Name is the algorithm id and 32 bytes");
    if let Some(point) = public.ecc_point() {
        assert_eq!(point.len(), 65, "uncompressed P-256 point");
    }
    let _ = public.check_attestation_key();
    if public.check_endorsement_key().is_ok() {
        if let Ok(made) = make_credential(&public, &name, &[7u8; 32]) {
            assert_eq!(made.encrypted_secret.len(), 256, "OAEP to an RSA-2048 EK");
            assert_eq!(made.credential_blob.len(), 2 + 32 + 2 + 32, "integrity HMAC and encrypted identity");
        }
    }
});
