//! Check-in bodies (`POST /api/v1/devices/{id}/checkin`) as the server reads them
//! before and after the quote's signature: the qualifying data over the report's
//! canonical form, the bounded hex of attest and signature, the quote structure, the
//! typed report with its install reports, and the evaluation of the event log against
//! the quote (`evaluate_checkin`). The signature check itself needs the device's AK
//! and is fuzzed in `tpm_quote`; here the quote is parsed without it to reach the
//! rest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_fuzz::trace;
use outpost_protocol::attest::{evaluate_checkin, qualifying_data, unhex, Checkin, CheckinReport, CheckinVerdict, Quote};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<CheckinVerdict>(data) {
        let _ = v.director_targets.map(|t| t.len());
    }
    let Ok(body) = serde_json::from_slice::<Checkin>(data) else { return };
    let _ = qualifying_data(&body.report);
    let quote = unhex("attest", &body.attest, 4096).ok().and_then(|b| Quote::parse(&b).ok());
    let _ = unhex("signature", &body.signature, 1024);
    let Ok(report) = serde_json::from_value::<CheckinReport>(body.report) else { return };
    for r in &report.reports {
        let _ = r.validate();
    }
    if let Some(p) = &report.policy {
        let _ = serde_json::to_string(p);
    }
    if let Some(q) = quote {
        let evaluated = evaluate_checkin(&q, &report);
        trace("evaluate_checkin", &evaluated);
        if let Ok(measured) = evaluated {
            assert_eq!(measured.len(), report.event_log.events.len());
        }
    }
});
