//! Quotes (protocol/src/attest/tpm.rs): a marshalled `TPMS_ATTEST` and
//! `TPMT_SIGNATURE` from every check-in, verified with the device's AK (a
//! `TPMT_PUBLIC` it registered). Input: AK, attest and signature separated by
//! `\n---\n`; the attest part is also parsed on its own (the signature check would
//! otherwise stop the fuzzer before the parser).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_fuzz::{parts, trace};
use outpost_protocol::attest::{Quote, TpmPublic};

fuzz_target!(|data: &[u8]| {
    let docs = parts(data, 3);
    let attest = docs.get(1).copied().unwrap_or(data);
    if let Ok(q) = Quote::parse(attest) {
        if let Ok(pcrs) = q.sha256_pcrs() {
            assert!(!pcrs.is_empty());
        }
    }
    if let [ak, attest, signature] = docs.as_slice() {
        if let Ok(ak) = TpmPublic::parse(ak, "attestation key") {
            trace("verify", &Quote::verify(&ak, attest, signature));
        }
    }
});
