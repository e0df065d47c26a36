//! The TCG crypto-agile event log a device sends with its quote
//! (protocol/src/attest/eventlog.rs `EventLog::parse`, replay.rs, golden.rs): bytes
//! root on the device chooses. Parsing must not panic or read past the input; a parsed
//! log must replay to the quote of its own replay; matching against golden values must
//! name an event of the log or nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::attest::eventlog::EventLog;
use outpost_protocol::attest::golden::{GoldenFile, GoldenValues};
use outpost_protocol::attest::replay::{pcr_digest, QuotedLog};
use outpost_protocol::attest::tpm::{PcrBank, Quote, ALG_SHA256};
use outpost_protocol::Error;

fuzz_target!(|data: &[u8]| {
    let Ok(log) = EventLog::parse(data) else { return };
    let mut last = 0;
    for e in &log.events {
        assert!(e.record > last && e.offset < data.len() && e.pcr <= 23);
        last = e.record;
    }
    let Ok(values) = log.replay_sha256() else { return };
    let pcrs = vec![0, 4, 7, 8, 9];
    let quote = Quote {
        extra_data: vec![],
        clock: 0,
        reset_count: 0,
        restart_count: 0,
        firmware_version: 0,
        selection: vec![PcrBank { hash: ALG_SHA256, pcrs: pcrs.clone() }],
        pcr_digest: pcr_digest(&values, &pcrs).to_vec(),
    };
    let quoted = QuotedLog::check(&log, &quote).expect("a log replays to the quote of its own replay");
    let file = |name: &str| GoldenFile { name: name.into(), sha256: "00".repeat(32) };
    let golden = GoldenValues {
        bootloaders: vec![file("grubx64.efi")],
        kernel: file("vmlinuz"),
        initrd: file("initrd.img"),
        kernel_cmdlines: vec!["/vmlinuz ro".into()],
        boot_files: vec![],
    };
    if let Err(Error::Golden(m)) = golden.check(&quoted) {
        if let Some(r) = m.record {
            assert!(log.events.iter().any(|e| e.record == r && e.pcr == m.pcr), "names an event the log has");
        }
    }
});
