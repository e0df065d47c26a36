//! The measurement event log a device sends with each check-in (protocol/src/attest
//! `EventLog`: JSON events, replayed into the PCR value the quote must show): the
//! testbeds' agent-made PCR 23 log. The TCG binary log of a boot-chain measurement is
//! fuzzed by `tcg_event_log.rs`. Input: the log, then (after `\n---\n`) a JSON array of PCR indices.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_fuzz::parts;
use outpost_protocol::attest::EventLog;

fuzz_target!(|data: &[u8]| {
    let docs = parts(data, 2);
    let Ok(log) = serde_json::from_slice::<EventLog>(docs[0]) else { return };
    let pcrs: Vec<u32> = docs.get(1).and_then(|p| serde_json::from_slice(p).ok()).unwrap_or_else(|| vec![23]);
    let pcrs = &pcrs[..pcrs.len().min(64)];
    for p in pcrs {
        let _ = log.replay(*p);
    }
    let _ = log.pcr_digest(pcrs);
    if let Some(booted) = log.booted() {
        assert!(log.events.contains(booted));
    }
});
