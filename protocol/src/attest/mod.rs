//! Device identity and attestation: the messages of enrollment and attested check-ins,
//! the measurement event log and its replay, and the pure checks the server runs on a
//! check-in. The TPM itself is only on the device (`outpost-agent`); everything here
//! works on the bytes it produced.
//!
//! Enrollment: the device sends its EK and AK public areas; the server answers with a
//! credential only a TPM holding both can open (`credential::make_credential`); the
//! device returns the secret. Check-in: the server issues a single-use nonce; the
//! device quotes its measurement PCR with qualifying data
//! `SHA-256("outpost-checkin-v1\0" || canonical JSON of the report)`, so the quote
//! vouches for every field of the report, the nonce included.

pub mod authenticode;
pub mod boot;
pub mod credential;
pub mod eventlog;
pub mod golden;
pub mod policy;
pub mod replay;
#[cfg(test)]
pub(crate) mod testlog;
pub mod tlskey;
pub mod tpm;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::report::InstallReport;
use crate::slot::Slot;
pub use policy::{MeasurementPolicy, Platform, RESETTABLE_PCRS};
pub use tpm::{Quote, TpmPublic};

/// The PCR the testbeds' boot step measures slot images into (resettable from
/// locality 0, like a platform reset would on real hardware; see docs/attestation.md).
pub const DEFAULT_PCR: u32 = 23;

/// Domain separation for check-in qualifying data.
const CHECKIN_DOMAIN: &[u8] = b"outpost-checkin-v1\0";

/// `POST /api/v1/enroll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The one-time enrollment token an operator made.
    pub token: String,
    pub hardware_class: String,
    /// Marshalled `TPMT_PUBLIC` of the endorsement key, hex.
    pub ek_public: String,
    /// DER EK certificate from the TPM's NV index, hex, when the TPM has one.
    #[serde(default)]
    pub ek_certificate: Option<String>,
    /// Marshalled `TPMT_PUBLIC` of the attestation key, hex.
    pub ak_public: String,
}

/// The server's answer: a credential for the device's TPM to activate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollChallenge {
    pub challenge_id: String,
    pub device_id: String,
    /// `TPM2B_ID_OBJECT` contents, hex.
    pub credential_blob: String,
    /// `TPM2B_ENCRYPTED_SECRET` contents, hex.
    pub encrypted_secret: String,
    pub expires_at: String,
}

/// `POST /api/v1/enroll/{challenge_id}`: the activated secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollProof {
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrolled {
    pub device_id: String,
    pub hardware_class: String,
}

/// `POST /api/v1/devices/{id}/nonce`.
/// `POST /api/v1/devices/{id}/nonce`: only the device may ask for its nonces, so the
/// request is a TPM quote by its AK over `{device_id, at}` (domain-separated from
/// check-in quotes). Without it anyone knowing a device id could take every open
/// nonce and lock the device out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonceRequest {
    pub request: serde_json::Value,
    /// Marshalled `TPMS_ATTEST`, hex.
    pub attest: String,
    /// Marshalled `TPMT_SIGNATURE`, hex.
    pub signature: String,
}

/// What a nonce request says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonceAsk {
    pub device_id: String,
    /// When the device asked (RFC 3339); the server accepts requests a few minutes old
    /// at most.
    pub at: String,
}

const NONCE_REQUEST_DOMAIN: &[u8] = b"outpost nonce request v1\0";

/// The quote's qualifying data for a nonce request.
pub fn nonce_request_qualifying_data(request: &serde_json::Value) -> Result<[u8; 32]> {
    let canonical = crate::cjson::to_canonical(request)?;
    let mut h = Sha256::new();
    h.update(NONCE_REQUEST_DOMAIN);
    h.update(&canonical);
    Ok(h.finalize().into())
}

/// A nonce request signed by `ak` for exactly this request.
pub fn verify_nonce_request(ak: &TpmPublic, req: &NonceRequest) -> Result<NonceAsk> {
    let attest = unhex("attest", &req.attest, 4096)?;
    let signature = unhex("signature", &req.signature, 1024)?;
    let quote = Quote::verify(ak, &attest, &signature)?;
    if quote.extra_data != nonce_request_qualifying_data(&req.request)? {
        return Err(Error::Tpm { what: "nonce request".into(), reason: "the quote was made for another request".into() });
    }
    serde_json::from_value(req.request.clone()).map_err(|e| Error::Tpm { what: "nonce request".into(), reason: e.to_string() })
}

/// The answer to a nonce request. Unknown fields are ignored: later servers may say
/// more, and an agent must not stop checking in because they do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NonceGrant {
    pub nonce: String,
    pub expires_at: String,
    /// The server's device CA issues client certificates: the check-in this nonce is
    /// for may ask for one (with its TLS key's certification). Absent from servers
    /// without a device CA, and from servers older than certificates (which refuse a
    /// report that asks): the agent then makes no TLS key and spends no TPM2_Certify.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub issues_client_certificates: bool,
}

/// The device id: derived from the endorsement key, so it names the TPM.
pub fn device_id(ek_public: &[u8]) -> String {
    format!("dev-{}", &hex::encode(Sha256::digest(ek_public))[..32])
}

/// One measurement: `sha256` was extended into `pcr` when `slot` booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasurementEvent {
    pub pcr: u32,
    /// The digest extended into the PCR: the booted slot image's SHA-256, hex.
    pub sha256: String,
    pub event: EventKind,
    pub slot: Slot,
    /// Bytes of the slot image that were hashed.
    pub length: u64,
    pub at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    SlotBoot,
}

impl std::str::FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| format!("{s:?} is not an event type (known: slot_boot)"))
    }
}

/// The measurement log since the measurement PCR was last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLog {
    pub events: Vec<MeasurementEvent>,
}

impl EventLog {
    /// The value `pcr` must hold if this log is complete and true: every event's digest
    /// extended, in order, into a PCR that started at zero.
    pub fn replay(&self, pcr: u32) -> Result<[u8; 32]> {
        let mut value = [0u8; 32];
        for (i, e) in self.events.iter().enumerate().filter(|(_, e)| e.pcr == pcr) {
            let digest = hex::decode(&e.sha256)
                .ok()
                .filter(|d| d.len() == 32)
                .ok_or_else(|| Error::Tpm { what: "event log".into(), reason: format!("event {i}: sha256 {:?} is not 64 hex digits", e.sha256) })?;
            let mut h = Sha256::new();
            h.update(value);
            h.update(&digest);
            value.copy_from_slice(&h.finalize());
        }
        Ok(value)
    }

    /// The quote's `pcrDigest` for these PCRs: SHA-256 over their replayed values in
    /// ascending index order.
    pub fn pcr_digest(&self, pcrs: &[u32]) -> Result<[u8; 32]> {
        let mut sorted = pcrs.to_vec();
        sorted.sort_unstable();
        let mut h = Sha256::new();
        for p in sorted {
            h.update(self.replay(p)?);
        }
        Ok(h.finalize().into())
    }

    /// The digest the last boot measured, if any.
    pub fn booted(&self) -> Option<&MeasurementEvent> {
        self.events.iter().rev().find(|e| e.event == EventKind::SlotBoot)
    }
}

/// How the device's last install left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceHealth {
    /// Running a committed release (or the factory image) with no install under way.
    Healthy,
    /// An install is downloading, verifying or writing the other slot.
    Updating,
    /// Booted into a release on trial, health checks running.
    Trial,
    /// The last release failed and the device went back to the previous slot.
    RolledBack,
}

impl DeviceHealth {
    pub const ALL: [DeviceHealth; 4] = [DeviceHealth::Healthy, DeviceHealth::Updating, DeviceHealth::Trial, DeviceHealth::RolledBack];

    /// The wire (and stored) name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceHealth::Healthy => "healthy",
            DeviceHealth::Updating => "updating",
            DeviceHealth::Trial => "trial",
            DeviceHealth::RolledBack => "rolled_back",
        }
    }
}

/// The server's verdict on one check-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The quote, the event log and the measured images all check out.
    Attested,
    /// Authentic, but the measurements are wrong: the device is quarantined.
    Failed,
}

impl Verdict {
    pub const ALL: [Verdict; 2] = [Verdict::Attested, Verdict::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Attested => "attested",
            Verdict::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device's attestation state: pending until its first check-in, then the verdict
/// of the latest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttestationState {
    Pending,
    Attested,
    Failed,
}

impl AttestationState {
    pub const ALL: [AttestationState; 3] = [AttestationState::Pending, AttestationState::Attested, AttestationState::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            AttestationState::Pending => "pending",
            AttestationState::Attested => "attested",
            AttestationState::Failed => "failed",
        }
    }
}

impl From<Verdict> for AttestationState {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Attested => AttestationState::Attested,
            Verdict::Failed => AttestationState::Failed,
        }
    }
}

/// The report a check-in quote vouches for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckinReport {
    pub device_id: String,
    /// The nonce the server issued, hex.
    pub nonce: String,
    /// The active slot.
    pub slot: Slot,
    /// The release version the device runs, when it knows one.
    pub version: Option<String>,
    /// The image digest of the booted slot, as measured (never anything else).
    pub image_sha256: Option<String>,
    /// SHA-256 of the SBOM of the release the device runs, when it has one.
    #[serde(default)]
    pub sbom_sha256: Option<String>,
    pub health: DeviceHealth,
    pub pcr: u32,
    pub event_log: EventLog,
    /// The firmware's TCG event log (`binary_bios_measurements`), base64: sent by
    /// devices whose boot chain measures (firmware, GRUB), instead of `event_log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_log: Option<String>,
    /// Install outcomes not yet delivered.
    #[serde(default)]
    pub reports: Vec<InstallReport>,
    /// Integrity incidents not yet delivered (left out when none, so a report without
    /// them is quoted as before).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incidents: Vec<crate::incident::IntegrityIncident>,
    /// The network policy in force, when the device enforces one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::PolicyStatus>,
    /// A request for a client certificate: the device's TPM-resident TLS key and its
    /// certification by the AK (sent when the device has no certificate or its
    /// certificate is past half its lifetime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<tlskey::TlsKeyProof>,
    pub at: String,
}

/// `POST /api/v1/devices/{id}/checkin`: the report (any JSON layout; its canonical
/// form is what the quote covers) and the quote over it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkin {
    pub report: serde_json::Value,
    /// Marshalled `TPMS_ATTEST`, hex.
    pub attest: String,
    /// Marshalled `TPMT_SIGNATURE`, hex.
    pub signature: String,
}

/// The server's answer to a check-in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckinVerdict {
    pub device_id: String,
    pub verdict: Verdict,
    pub reason: Option<String>,
    pub quarantined: bool,
    pub at: String,
    /// This device's director targets metadata (signed JSON): the image it should run
    /// now, or none. Absent when the server refused to judge the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub director_targets: Option<String>,
    /// Incidents the check-in carried that were not stored, each with the reason (the
    /// rest of the check-in counted). The agent drops them from its queue: sent again,
    /// they would be refused again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_incidents: Vec<crate::incident::RefusedIncident>,
    /// A client certificate for the device's TPM-resident TLS key: issued only to a
    /// device that asked for one in this check-in, attested and is not quarantined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<tlskey::DeviceCertificate>,
    /// Why the certificate the device asked for was not issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_refused: Option<String>,
}

/// The qualifying data a quote over `report` must carry.
pub fn qualifying_data(report: &serde_json::Value) -> Result<[u8; 32]> {
    let canonical = crate::cjson::to_canonical(report)?;
    let mut h = Sha256::new();
    h.update(CHECKIN_DOMAIN);
    h.update(&canonical);
    Ok(h.finalize().into())
}

/// Authenticity of a check-in: the quote is signed by `ak` and vouches for exactly this
/// report. An error here means the device did not say this; nothing should be recorded
/// against it.
pub fn verify_checkin_quote(ak: &TpmPublic, report: &serde_json::Value, attest: &[u8], signature: &[u8]) -> Result<Quote> {
    let quote = Quote::verify(ak, attest, signature)?;
    if quote.extra_data != qualifying_data(report)? {
        return Err(Error::Tpm {
            what: "quote".into(),
            reason: "qualifying data does not match this report and nonce (a quote made for another check-in)".into(),
        });
    }
    Ok(quote)
}

/// What an authentic check-in says about the device's state: the quoted PCR must be the
/// replay of the event log, and the reported image digest must be the one measured last.
/// Returns the measured digests; `Err` is the attestation failure's reason.
pub fn evaluate_checkin(quote: &Quote, report: &CheckinReport) -> std::result::Result<Vec<String>, String> {
    let pcrs = quote.sha256_pcrs().map_err(|e| e.to_string())?;
    if pcrs != [report.pcr] {
        return Err(format!("quote covers PCRs {pcrs:?}, the report's measurement PCR is {}", report.pcr));
    }
    if let Some(e) = report.event_log.events.iter().find(|e| e.pcr != report.pcr) {
        return Err(format!("event log has an event for PCR {}, not the measurement PCR {}", e.pcr, report.pcr));
    }
    let replayed = report.event_log.pcr_digest(pcrs).map_err(|e| e.to_string())?;
    if quote.pcr_digest != replayed {
        return Err(format!(
            "event log does not replay to the quoted PCR {} ({} events; quoted digest {}, replayed {})",
            report.pcr,
            report.event_log.events.len(),
            hex::encode(&quote.pcr_digest),
            hex::encode(replayed)
        ));
    }
    let booted = report.event_log.booted().map(|e| e.sha256.clone());
    if report.image_sha256 != booted {
        return Err(format!("reported image digest {:?} is not the measured boot digest {:?}", report.image_sha256, booted));
    }
    if report.event_log.events.is_empty() {
        return Err("nothing has been measured since the TPM was reset".into());
    }
    Ok(report.event_log.events.iter().map(|e| e.sha256.clone()).collect())
}

/// Hex decoding with the field named in the error.
pub fn unhex(field: &str, value: &str, max: usize) -> Result<Vec<u8>> {
    let bytes = hex::decode(value).map_err(|e| Error::Tpm { what: field.into(), reason: format!("not hex: {e}") })?;
    if bytes.len() > max {
        return Err(Error::Tpm { what: field.into(), reason: format!("{} bytes, more than {max}", bytes.len()) });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_their_wire_names() {
        let wire = |v: serde_json::Result<serde_json::Value>| v.ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        for h in DeviceHealth::ALL {
            assert_eq!(wire(serde_json::to_value(h)), h.as_str());
        }
        for v in Verdict::ALL {
            assert_eq!(wire(serde_json::to_value(v)), v.as_str());
            assert_eq!(AttestationState::from(v).as_str(), v.as_str());
        }
        for a in AttestationState::ALL {
            assert_eq!(wire(serde_json::to_value(a)), a.as_str());
        }
    }

    fn event(sha: &str) -> MeasurementEvent {
        MeasurementEvent { pcr: 23, sha256: sha.into(), event: EventKind::SlotBoot, slot: Slot::A, length: 1, at: "t".into() }
    }

    #[test]
    fn resettable_pcrs_prove_nothing_outside_testbeds() {
        let e = MeasurementPolicy::new([23], [EventKind::SlotBoot], Platform::BootChain).expect_err("PCR 23 is resettable");
        assert!(e.contains("PCR 23") && e.contains("testbed"), "{e}");
        assert!(MeasurementPolicy::new([16], [EventKind::SlotBoot], Platform::BootChain).is_err());
        assert!(MeasurementPolicy::new([24], [EventKind::SlotBoot], Platform::Testbed).is_err());
        assert!(MeasurementPolicy::new([], [EventKind::SlotBoot], Platform::Testbed).is_err());
        let testbed = MeasurementPolicy::new([23], [EventKind::SlotBoot], Platform::Testbed).expect("a testbed may");
        let mut report = CheckinReport {
            device_id: "d".into(),
            nonce: "n".into(),
            slot: Slot::A,
            version: None,
            image_sha256: None,
            sbom_sha256: None,
            health: DeviceHealth::Healthy,
            pcr: 16,
            event_log: EventLog { events: vec![event("aa")] },
            boot_log: None,
            reports: vec![],
            incidents: vec![],
            policy: None,
            tls_key: None,
            at: "t".into(),
        };
        // The device names PCR 16, the class trusts 23 only.
        assert!(testbed.check(&report).expect_err("other pcr").contains("PCR 16"));
        report.pcr = 23;
        assert!(testbed.check(&report).is_ok());
        let boot_chain = MeasurementPolicy::new([4, 8, 9], [EventKind::SlotBoot], Platform::BootChain).expect("static PCRs");
        assert!(boot_chain.check(&report).expect_err("23 not trusted").contains("software can reset it"));
        // A class judged by the firmware's event log takes neither the agent's own
        // (forgeable) measurements nor a check-in without the log.
        let event_log = MeasurementPolicy::event_log();
        assert!(event_log.check(&report).expect_err("no log").contains("no boot event log"));
        report.boot_log = Some("AAAA".into());
        assert!(event_log.check(&report).expect_err("own events").contains("agent's own measurements"));
        // And a class the agent measures does not judge a log it was never set up for.
        assert!(testbed.check(&report).expect_err("log").contains("not configured to judge one"));
        report.event_log.events.clear();
        assert!(event_log.check(&report).is_ok());
    }

    #[test]
    fn replay_extends_in_order_from_zero() {
        let a = hex::encode(Sha256::digest(b"a"));
        let b = hex::encode(Sha256::digest(b"b"));
        let log = EventLog { events: vec![event(&a), event(&b)] };
        let mut v = [0u8; 32];
        for d in [&a, &b] {
            let mut h = Sha256::new();
            h.update(v);
            h.update(hex::decode(d).unwrap_or_default());
            v.copy_from_slice(&h.finalize());
        }
        assert_eq!(log.replay(23).ok(), Some(v));
        let swapped = EventLog { events: vec![event(&b), event(&a)] };
        assert_ne!(swapped.replay(23).ok(), Some(v));
        assert!(EventLog { events: vec![event("zz")] }.replay(23).is_err());
    }

    #[test]
    fn kdfa_matches_the_tpm_definition_for_one_block() {
        // One block: HMAC(key, 00000001 || label || 00 || u || v || bits).
        use hmac::Mac;
        let mut mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(b"k").unwrap_or_else(|_| unreachable!());
        mac.update(&[0, 0, 0, 1]);
        mac.update(b"STORAGE\0nm");
        mac.update(&128u32.to_be_bytes());
        let want = mac.finalize().into_bytes();
        assert_eq!(credential::kdfa(b"k", "STORAGE", b"nm", b"", 128), want[..16].to_vec());
    }

    #[test]
    fn truncated_structures_name_the_field() {
        let err = TpmPublic::parse(&[0, 0x23, 0, 0x0b, 0, 0], "attestation key").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("attestation key") && err.contains("objectAttributes"), "{err}");
        let err = Quote::parse(&[0xff, 0x54, 0x43, 0x47, 0x80, 0x18, 0, 5]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("qualifiedSigner"), "{err}");
        let err = Quote::parse(&[0, 0, 0, 0]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("magic"), "{err}");
    }
}
