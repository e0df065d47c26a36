//! Attested check-ins.
//!
//! A check-in is refused outright (nothing recorded against the device) when it is
//! not provably from the device: bad signature, a quote for another report, an unknown,
//! foreign, used or expired nonce. An authentic check-in whose measurements are wrong
//! (event log does not replay to the quoted PCR, a measured image no signed release
//! expects) is recorded as a failed attestation, which quarantines the device. The
//! nonce, the verdict and the director's decision commit together.

use std::collections::BTreeMap;

use outpost_protocol::api::devices::BootEvents;
use outpost_protocol::attest::{self, AttestationState, Checkin, CheckinReport, CheckinVerdict, MeasurementPolicy, Platform, TpmPublic, Verdict};
use outpost_protocol::director::FirmwareRelease;
use outpost_protocol::incident::RefusedIncident;
use serde_json::json;

use super::Refusal;
use crate::director::{self, DeviceFacts, Director, Outcome};
use crate::error::ServerError;
use crate::repository::Repository;
use crate::storage::{CheckinRecord, Judged, Store};

/// What a check-in is judged and answered with.
pub struct CheckinContext<'a> {
    pub store: &'a Store,
    pub repo: &'a Repository,
    pub director: &'a Director,
    /// Measurement policy per hardware class ("*": every other class).
    pub measurement: &'a BTreeMap<String, MeasurementPolicy>,
    /// The device CA, which certifies the TLS keys attested devices ask it to.
    pub device_ca: Option<&'a super::deviceca::DeviceCa>,
}

/// The release a boot-chain measurement matched: what the device runs, as measured,
/// and the boot's events beside the golden values they matched.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MeasuredRelease {
    version: String,
    image_sha256: String,
    events: BootEvents,
}

/// What a check-in is judged against.
struct Signed<'a> {
    /// Image digest → target, for classes the agent measures.
    expected: &'a BTreeMap<String, String>,
    /// The class's releases (with their golden values), for classes the boot chain measures.
    releases: &'a [FirmwareRelease],
}

/// The pure part of a check-in's verdict given an authentic quote: the class's
/// measurement policy (which PCRs and events prove the slot), the log, the reported
/// digest and the signed releases' expected measurements or golden boot values. For a
/// boot-chain class, returns the release the boot matched.
fn judge(quote: &attest::Quote, report: &CheckinReport, policy: Option<&MeasurementPolicy>, signed: &Signed<'_>, class: &str) -> Result<Option<MeasuredRelease>, String> {
    let policy = policy.ok_or_else(|| {
        format!("hardware class {class} has no measurement policy (attestation.classes): nothing this device measures proves which image booted")
    })?;
    policy.check(report).map_err(|e| format!("hardware class {class}: {e}"))?;
    if policy.platform() == Platform::EventLog {
        return judge_boot_chain(quote, report, signed.releases, class).map(Some);
    }
    let expected = signed.expected;
    let measured = attest::evaluate_checkin(quote, report)?;
    for (digest, event) in measured.iter().zip(&report.event_log.events) {
        if !expected.contains_key(digest) {
            return Err(format!(
                "measured image {digest} (slot {}) is not the expected measurement of any signed release for hardware class {class}",
                event.slot
            ));
        }
    }
    Ok(None)
}

/// A boot-chain class: the event log replays to the quote and matches one release's
/// golden values (a digest the device reports must be that release's: attest::boot).
/// The release's image digest is what its device records (the decoded image's, the
/// same as an agent measurement), never the digest of an encoded target file.
fn judge_boot_chain(quote: &attest::Quote, report: &CheckinReport, releases: &[FirmwareRelease], class: &str) -> Result<MeasuredRelease, String> {
    let log = attest::boot::decode_boot_log(report.boot_log.as_deref().unwrap_or_default())?;
    let candidates: Vec<attest::boot::Candidate<'_>> = releases
        .iter()
        .filter_map(|r| r.golden.as_ref().map(|golden| attest::boot::Candidate { version: &r.version, image_sha256: &r.measurement, golden }))
        .collect();
    let claim = attest::boot::Claim { version: report.version.as_deref(), image_sha256: report.image_sha256.as_deref() };
    let matched = attest::boot::judge_boot_log(&log, quote, &candidates, claim).map_err(|e| format!("hardware class {class}: {e}"))?;
    let release = &candidates[matched.release];
    // The events shown are the matcher's, from the log that replayed to this quote:
    // never anything else the device reported.
    let events = BootEvents::bounded(&matched.events);
    Ok(MeasuredRelease { version: release.version.to_owned(), image_sha256: release.image_sha256.to_owned(), events })
}

/// Checks that the quote is this device's, over exactly this report, and reads the
/// report.
/// The quote, the report (with only the incidents that are valid and this device's)
/// and the incidents refused.
fn authentic(ak: &TpmPublic, id: &str, body: &Checkin) -> Result<(attest::Quote, CheckinReport, Vec<RefusedIncident>), Refusal> {
    let bad_quote = |e: outpost_protocol::Error| Refusal::invalid("invalid_quote", e.to_string());
    let attest_bytes = attest::unhex("attest", &body.attest, 4096).map_err(bad_quote)?;
    let signature = attest::unhex("signature", &body.signature, 1024).map_err(bad_quote)?;
    let quote = attest::verify_checkin_quote(ak, &body.report, &attest_bytes, &signature).map_err(|e| {
        tracing::warn!(device = %id, error = %e, "check-in quote refused");
        Refusal::unauthenticated("quote_refused", format!("{e}"))
    })?;
    let report: CheckinReport = serde_json::from_value(body.report.clone()).map_err(|e| Refusal::invalid("invalid_report", format!("report: {e}")))?;
    if report.device_id != id {
        return Err(Refusal::invalid("invalid_report", format!("report is for device {:?}, not {id:?}", report.device_id)));
    }
    for r in &report.reports {
        r.validate().map_err(|m| Refusal::invalid("invalid_report", format!("install report: {m}")))?;
        if r.device_id != id {
            return Err(Refusal::invalid("invalid_report", format!("install report names device {:?}, not {id:?}", r.device_id)));
        }
    }
    let (kept, refused) = outpost_protocol::incident::sort_out(id, &report.incidents).map_err(|m| Refusal::invalid("invalid_incident", m))?;
    for r in &refused {
        tracing::warn!(device = %id, reason = %r.reason, "integrity incident refused; the rest of the check-in counts");
    }
    let report = CheckinReport { incidents: kept, ..report };
    Ok((quote, report, refused))
}

/// One check-in of device `id` at `now`: authenticity, the verdict, the director's
/// decision and the signed director targets.
/// `bootstrap`: the caller presented no client certificate where the device CA
/// requires one (see [`bootstrap`]).
pub async fn checkin(cx: &CheckinContext<'_>, id: &str, body: &Checkin, now: chrono::DateTime<chrono::Utc>, bootstrap: bool) -> Result<CheckinVerdict, Refusal> {
    let device = cx.store.device(id).await?.ok_or_else(|| Refusal::unknown_device(id))?;
    let ak = TpmPublic::parse(&device.ak_public, "attestation key").map_err(|e| ServerError::State(format!("stored AK of {id}: {e}")))?;
    let (quote, report, refused_incidents) = authentic(&ak, id, body)?;
    if bootstrap { self::bootstrap(cx, &ak, id, &report).await?; }
    let class = device.hardware_class.as_str();
    let (expected, releases) = (cx.repo.expected_measurements(class).await, cx.repo.firmware_releases(class).await);
    let policy = cx.measurement.get(class).or_else(|| cx.measurement.get("*"));
    let outcome = judge(&quote, &report, policy, &Signed { expected: &expected, releases: &releases }, class);
    let (judged, measured) = match outcome {
        Ok(Some(m)) => (Judged::Attested { boot_events: Some(m.events) }, Some((m.version, m.image_sha256))),
        Ok(None) => (Judged::Attested { boot_events: None }, None),
        Err(reason) => (Judged::Failed { reason }, None),
    };
    let (verdict, reason) = (judged.verdict(), judged.reason().map(str::to_owned));
    // What the device runs: the release its boot chain measured, else what it reports
    // (which its own measurement vouched for, in a testbed).
    let (version, image_sha256) = match measured {
        Some((version, image_sha256)) => (Some(version), Some(image_sha256)),
        None => (report.version.clone(), report.image_sha256.clone()),
    };
    let record = CheckinRecord {
        device_id: id.to_owned(),
        judged,
        slot: report.slot,
        version: version.clone(),
        image_sha256: image_sha256.clone(),
        sbom_sha256: report.sbom_sha256.clone(),
        health: report.health,
        reports: report.reports.clone(),
        incidents: report.incidents.clone(),
        policy: report.policy.as_ref().and_then(|p| serde_json::to_string(p).ok()),
    };
    let facts = DeviceFacts {
        device_id: id.to_owned(),
        hardware_class: class.to_owned(),
        attested: verdict == Verdict::Attested,
        image_sha256,
        version,
        health: report.health,
        reports: report.reports.clone(),
    };
    let now_ms = now.timestamp_millis();
    let decide = director::decider(facts, releases, now_ms.div_euclid(1000));
    let decision = match cx.store.checkin(&report.nonce, record, class, decide, now_ms).await? {
        Ok(d) => Outcome::new(d),
        Err(r) => {
            tracing::warn!(device = %id, refusal = ?r, "check-in nonce refused");
            return Err(Refusal::Nonce(r));
        }
    };
    director::log_transitions(cx.store, &decision.transitions).await;
    let director_targets = cx.director.sign(id, decision.director_version, decision.assignment.as_ref(), now)?;
    if device.attestation != AttestationState::from(verdict) {
        // Entering or leaving quarantine is an audited event.
        let action = if verdict == Verdict::Failed { "device_quarantine" } else { "device_attested" };
        cx.store.log("server", action, &json!({"device_id": id, "reason": reason})).await?;
    }
    for r in &refused_incidents {
        // Not a device's own words about its slot: an edited queue, or an agent this
        // server does not agree with. Operators see it beside the device's other events.
        cx.store.log("server", "integrity_incident_refused", &json!({"device_id": id, "reason": r.reason})).await?;
    }
    match reason.as_deref() {
        Some(r) => tracing::warn!(device = %id, reason = r, "attestation failed; device quarantined"),
        None => tracing::info!(device = %id, version = report.version.as_deref().unwrap_or(""), "attested check-in"),
    }
    let (client_certificate, certificate_refused) = certificate(cx, &ak, id, &report, verdict, now).await?;
    Ok(CheckinVerdict {
        client_certificate,
        certificate_refused,
        device_id: id.to_owned(),
        verdict,
        reason,
        quarantined: verdict == Verdict::Failed,
        at: chrono::Utc::now().to_rfc3339(),
        director_targets: Some(director_targets),
        refused_incidents,
    })
}

/// The client certificate a check-in asked for, or why it is not issued (neither when
/// it asked for none): issued only to an attested device, for a key the device's TPM
/// certified with its AK for this check-in.
async fn certificate(
    cx: &CheckinContext<'_>,
    ak: &TpmPublic,
    id: &str,
    report: &CheckinReport,
    verdict: Verdict,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Option<outpost_protocol::attest::tlskey::DeviceCertificate>, Option<String>), ServerError> {
    let refuse = |why: String| {
        tracing::warn!(device = %id, reason = %why, "client certificate not issued");
        Ok((None, Some(why)))
    };
    let Some(proof) = &report.tls_key else { return Ok((None, None)) };
    let Some(ca) = cx.device_ca else { return refuse("this server issues no client certificates (no [device_ca])".into()) };
    if verdict != Verdict::Attested {
        return refuse("not issued: the device is quarantined (its attestation failed)".into());
    }
    if let Some(why) = cx.store.certificates_blocked(id).await? {
        return refuse(format!("not issued: {why}"));
    }
    let key = match attest::tlskey::verify_tls_key(ak, id, &report.nonce, proof) {
        Ok(k) => k,
        Err(e) => return refuse(format!("not issued: {e}")),
    };
    let point = key.public.ecc_point().ok_or_else(|| ServerError::State("a checked TLS key without an ECC point".into()))?;
    // A device CA past its certificate's end issues nothing; the check-in stands.
    let issued = match ca.issue(id, &point, now) {
        Ok(issued) => issued,
        Err(e) => return refuse(format!("not issued: {e}")),
    };
    cx.store.record_certificate(&issued.answer.serial, id, &now.to_rfc3339(), issued.not_after).await?;
    tracing::info!(device = %id, serial = %issued.answer.serial, not_after = %issued.answer.not_after, "client certificate issued");
    Ok((Some(issued.answer), None))
}

/// A check-in without the client certificate the device CA requires is let in only to
/// get one: before anything is recorded, its TLS key's certification must verify (so
/// it is this device's TPM asking, for this check-in), and the device must not be one
/// an operator revoked (whose access ends at once, check-ins included).
async fn bootstrap(cx: &CheckinContext<'_>, ak: &TpmPublic, id: &str, report: &CheckinReport) -> Result<(), Refusal> {
    let proof = report.tls_key.as_ref().ok_or_else(|| {
        Refusal::unauthenticated("client_certificate_required", format!("device {id:?}: a check-in without a client certificate must ask for one"))
    })?;
    attest::tlskey::verify_tls_key(ak, id, &report.nonce, proof).map_err(|e| {
        Refusal::unauthenticated("invalid_tls_key", format!("a check-in without a client certificate must carry its TLS key's certification: {e}"))
    })?;
    match cx.store.certificates_blocked(id).await? {
        Some(why) => Err(Refusal::forbidden("certificate_revoked", why)),
        None => Ok(()),
    }
}
