//! One attested check-in of one simulated device, and the simulated install of what the
//! director assigns it.

use std::collections::BTreeMap;
use std::time::Instant;

use outpost_protocol::attest::{self, Checkin, CheckinReport, CheckinVerdict, DeviceHealth, EventKind, EventLog, MeasurementEvent, NonceGrant};
use outpost_protocol::report::{InstallReport, ReportOutcome};
use serde_json::Value;

use crate::error::{encode_err, key_err, SimError};
use crate::http::post;
use crate::softkeys;
use crate::state::SimDevice;

/// The PCR the simulated boot measures the slot image into.
const PCR: u32 = 23;

/// What one worker saw.
#[derive(Default)]
pub struct Tally {
    pub latency_ms: Vec<f64>,
    pub checkin_ms: Vec<f64>,
    pub attested: usize,
    pub failed_verdicts: usize,
    pub errors: usize,
    pub first_errors: Vec<String>,
    pub assigned: usize,
    pub committed: usize,
    pub rolled_back: usize,
}

impl Tally {
    /// Adds `t`'s counts and samples to this one.
    pub fn merge(&mut self, t: Tally) {
        self.latency_ms.extend(t.latency_ms);
        self.checkin_ms.extend(t.checkin_ms);
        self.attested += t.attested;
        self.failed_verdicts += t.failed_verdicts;
        self.errors += t.errors;
        self.first_errors.extend(t.first_errors);
        self.assigned += t.assigned;
        self.committed += t.committed;
        self.rolled_back += t.rolled_back;
    }
}

/// Whether `device` fails `version` under a failure fraction (stable per device).
fn fails(fraction: f64, version: &str, device: &str) -> bool {
    outpost_protocol::rollout::position(&format!("sim-failure:{version}"), device) < fraction
}

fn ak_key(hex_secret: &str) -> Result<p256::ecdsa::SigningKey, SimError> {
    let bytes = hex::decode(hex_secret).map_err(key_err)?;
    p256::ecdsa::SigningKey::from_slice(&bytes).map_err(key_err)
}

/// One check-in of one device: nonce, quote over the report, verdict, and a simulated
/// install of whatever the director assigns. The nonce comes from `nonce_server`, the
/// report goes to `report_server` (the same server, or two sharing one database).
pub async fn checkin(http: &reqwest::Client, nonce_server: &str, report_server: &str, d: &mut SimDevice, fail: &BTreeMap<String, f64>, t: &mut Tally) -> Result<(), SimError> {
    let started = Instant::now();
    let verdict = attested_checkin(http, nonce_server, report_server, d, started, t).await?;
    d.pending.clear();
    if verdict.verdict == outpost_protocol::attest::Verdict::Attested {
        t.attested += 1;
    } else {
        t.failed_verdicts += 1;
    }
    // The simulated device reads its assignment without verifying it (a real agent
    // verifies it against its pinned director root and the image repository).
    let Some(text) = verdict.director_targets else { return Ok(()) };
    let doc: Value = serde_json::from_str(&text).map_err(SimError::DirectorTargets)?;
    let Some((path, target)) = doc["signed"]["targets"].as_object().and_then(|m| m.iter().next()) else { return Ok(()) };
    simulate_install(d, path, target, fail, t);
    Ok(())
}

/// Asks for a nonce (the request quoted by the software AK, as a TPM's would be),
/// reports the measured boot quoted over the report, and returns the verdict.
async fn attested_checkin(http: &reqwest::Client, nonce_server: &str, report_server: &str, d: &SimDevice, started: Instant, t: &mut Tally) -> Result<CheckinVerdict, SimError> {
    let ak = ak_key(&d.ak)?;
    let ak_public = softkeys::ak_public(ak.verifying_key());
    let ak_name = softkeys::name(&ak_public);
    // The nonce request is quoted by the (software) AK, as a TPM's would be.
    let ask = serde_json::to_value(attest::NonceAsk { device_id: d.device_id.clone(), at: chrono::Utc::now().to_rfc3339() }).map_err(encode_err)?;
    let ask_q = attest::nonce_request_qualifying_data(&ask).map_err(encode_err)?;
    let (a, s) = softkeys::quote(&ak, &ak_name, &ask_q, PCR, &[0u8; 32], started.elapsed().as_millis() as u64);
    let nonce_req = attest::NonceRequest { request: ask, attest: hex::encode(a), signature: hex::encode(s) };
    let grant: NonceGrant = post(http, &format!("{nonce_server}/api/v1/devices/{}/nonce", d.device_id), None, &nonce_req).await?;
    let base = format!("{report_server}/api/v1/devices/{}", d.device_id);
    let log = EventLog {
        events: vec![MeasurementEvent {
            pcr: PCR,
            sha256: d.image_sha256.clone(),
            event: EventKind::SlotBoot,
            slot: d.slot,
            length: 0,
            at: chrono::Utc::now().to_rfc3339(),
        }],
    };
    let pcr_digest = log.pcr_digest(&[PCR]).map_err(encode_err)?;
    let report = CheckinReport {
        device_id: d.device_id.clone(),
        nonce: grant.nonce,
        slot: d.slot,
        version: d.version.clone(),
        image_sha256: Some(d.image_sha256.clone()),
        sbom_sha256: None,
        health: DeviceHealth::Healthy,
        pcr: PCR,
        event_log: log,
        boot_log: None,
        reports: d.pending.clone(),
        incidents: vec![],
        policy: None,
        tls_key: None,
        at: chrono::Utc::now().to_rfc3339(),
    };
    let report = serde_json::to_value(&report).map_err(encode_err)?;
    let qualifying = attest::qualifying_data(&report).map_err(encode_err)?;
    let (a, s) = softkeys::quote(&ak, &ak_name, &qualifying, PCR, &pcr_digest, started.elapsed().as_millis() as u64);
    let body = Checkin { report, attest: hex::encode(a), signature: hex::encode(s) };
    let sent = Instant::now();
    let verdict: CheckinVerdict = post(http, &format!("{base}/checkin"), None, &body).await?;
    t.checkin_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
    t.latency_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    Ok(verdict)
}

/// A simulated install of the assigned target: instantly committed (its digest becomes
/// the measured boot) or rolled back, reported at the next check-in.
fn simulate_install(d: &mut SimDevice, path: &str, target: &Value, fail: &BTreeMap<String, f64>, t: &mut Tally) {
    let version = target["custom"]["version"].as_str().unwrap_or_default().to_owned();
    let sha = target["hashes"]["sha256"].as_str().unwrap_or_default().to_owned();
    if sha == d.image_sha256 || d.failed.contains(&version) || d.version.as_deref() == Some(version.as_str()) {
        return;
    }
    t.assigned += 1;
    let other = d.slot.other();
    let failing = fails(fail.get(&version).copied().unwrap_or(0.0), &version, &d.device_id);
    let outcome = if failing { ReportOutcome::RolledBack } else { ReportOutcome::Committed };
    d.pending.push(InstallReport {
        device_id: d.device_id.clone(),
        hardware_class: d.hardware_class.clone(),
        target: path.to_owned(),
        version: version.clone(),
        outcome,
        reason: failing.then(|| "simulated health check failure".to_owned()),
        slot: other,
        at: chrono::Utc::now().to_rfc3339(),
    });
    if failing {
        t.rolled_back += 1;
        d.failed.push(version);
    } else {
        t.committed += 1;
        d.image_sha256 = sha;
        d.version = Some(version);
        d.slot = other;
    }
}
