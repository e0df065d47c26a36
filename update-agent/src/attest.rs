//! The device side of identity and attestation: enrollment with credential
//! activation, the boot step's measurement and its event log, the agent's own check of
//! its measured state before it installs anything, and attested check-ins.
//!
//! Files in the state directory (all written atomically):
//! - `identity.json`: device id, the AK's public and TPM-wrapped private areas;
//! - `measurements.json`: the event log since the measurement PCR was last reset.

use std::path::{Path, PathBuf};

use outpost_protocol::attest::{
    self, Checkin, CheckinReport, CheckinVerdict, DeviceHealth, EnrollChallenge, EnrollProof, EnrollRequest, Enrolled, EventKind,
    EventLog, MeasurementEvent, NonceGrant, Quote, TpmPublic,
};
use outpost_protocol::report::InstallReport;
use outpost_protocol::slot::Slot;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::config::AgentConfig;
use crate::devicecert::DeviceIdentity;
use crate::error::{AgentError, Result};
use crate::tpm::{AkBlob, Tpm};

/// What the device keeps after enrolling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub device_id: String,
    pub hardware_class: String,
    pub server_url: String,
    pub ak_public: String,
    pub ak_private: String,
    pub enrolled_at: String,
}

impl Identity {
    pub fn path(config: &AgentConfig) -> PathBuf {
        config.state_dir.join("identity.json")
    }

    /// The stored identity, or None before enrollment.
    pub fn load(config: &AgentConfig) -> Result<Option<Self>> {
        let path = Self::path(config);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| AgentError::Corrupt { path, reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::io("read", &path, e)),
        }
    }

    fn ak(&self) -> Result<AkBlob> {
        let bad = |reason: String| AgentError::Corrupt { path: PathBuf::from("identity.json"), reason };
        Ok(AkBlob {
            public: hex::decode(&self.ak_public).map_err(|e| bad(format!("ak_public: {e}")))?,
            private: hex::decode(&self.ak_private).map_err(|e| bad(format!("ak_private: {e}")))?,
        })
    }
}

fn tpm_of(config: &AgentConfig) -> Result<Tpm> {
    let conf = config.tpm.as_ref().ok_or_else(|| AgentError::MissingSection { section: "tpm", hint: " with a tcti" })?;
    Tpm::new(&conf.tcti)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| AgentError::Serialize { what: path.display().to_string(), reason: e.to_string() })?;
    outpost_fsio::write_atomic(path, &bytes).map_err(|e| AgentError::io("write", path, e))
}

/// The most the agent reads of an enrollment, nonce or check-in answer. They are a few
/// KiB (a check-in answer carries this device's director targets metadata); a server
/// that sends more is cut off there instead of filling the device's memory.
pub const MAX_API_ANSWER: u64 = 1 << 20;

/// Answers in the API's error format become errors naming the step. At most
/// [`MAX_API_ANSWER`] bytes are read.
pub(crate) async fn api<T: serde::de::DeserializeOwned>(step: &'static str, mut resp: reqwest::Response) -> Result<T> {
    let status = resp.status();
    let too_large = || AgentError::Api {
        step,
        status: status.as_u16(),
        message: format!("the answer is longer than {MAX_API_ANSWER} bytes (endless data); stopped reading it"),
    };
    if resp.content_length().is_some_and(|l| l > MAX_API_ANSWER) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) =
        resp.chunk().await.map_err(|e| AgentError::Api { step, status: status.as_u16(), message: format!("reading the answer: {e}") })?
    {
        if (body.len() + chunk.len()) as u64 > MAX_API_ANSWER {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let message = outpost_protocol::api::ErrorBody::message_or(&body, |raw| String::from_utf8_lossy(raw).chars().take(300).collect());
        return Err(AgentError::Api { step, status: status.as_u16(), message });
    }
    serde_json::from_slice(&body).map_err(|e| AgentError::Api { step, status: status.as_u16(), message: format!("unexpected answer: {e}") })
}

fn send_err(url: &str) -> impl FnOnce(reqwest::Error) -> AgentError + '_ {
    move |e| AgentError::Fetch { url: url.to_owned(), reason: outpost_protocol::display_chain(&e) }
}

/// Enrolls this device with a one-time token: a new AK under the EK, the server's
/// credential activated in the TPM, and the identity stored.
pub async fn enroll(config: &AgentConfig, token: &str) -> Result<Enrolled> {
    let tpm = tpm_of(config)?;
    let t = tpm.clone();
    let (ek_public, ek_cert, ak) = tokio::task::spawn_blocking(move || -> Result<_> {
        let (ek, cert) = t.endorsement()?;
        Ok((ek, cert, t.create_ak()?))
    })
    .await
    .map_err(|e| AgentError::Task { task: "TPM task", reason: e.to_string() })??;
    // One client for the enrollment calls and the director root fetched after them.
    let fetcher = config.device_fetcher()?;
    let http = fetcher.client();
    let url = format!("{}/api/v1/enroll", config.server_url);
    let req = EnrollRequest {
        token: token.to_owned(),
        hardware_class: config.hardware_class.to_string(),
        ek_public: hex::encode(&ek_public),
        ek_certificate: ek_cert.as_ref().map(hex::encode),
        ak_public: hex::encode(&ak.public),
    };
    let challenge: EnrollChallenge = api("enroll", http.post(&url).timeout(config.http_timeout).json(&req).send().await.map_err(send_err(&url))?).await?;
    let blob = attest::unhex("credential_blob", &challenge.credential_blob, 1024).map_err(|e| AgentError::tuf("enrollment challenge", e))?;
    let secret = attest::unhex("encrypted_secret", &challenge.encrypted_secret, 1024).map_err(|e| AgentError::tuf("enrollment challenge", e))?;
    let (t, a) = (tpm.clone(), ak.clone());
    let activated = tokio::task::spawn_blocking(move || t.activate_credential(&a, &blob, &secret))
        .await
        .map_err(|e| AgentError::Task { task: "TPM task", reason: e.to_string() })??;
    let url = format!("{}/api/v1/enroll/{}", config.server_url, challenge.challenge_id);
    let enrolled: Enrolled =
        api("prove credential", http.post(&url).timeout(config.http_timeout).json(&EnrollProof { secret: hex::encode(activated) }).send().await.map_err(send_err(&url))?).await?;
    if enrolled.device_id != attest::device_id(&ek_public) {
        return Err(AgentError::Api { step: "enroll", status: 200, message: format!("server named the device {}, not its EK-derived id", enrolled.device_id) });
    }
    let identity = Identity {
        device_id: enrolled.device_id.clone(),
        hardware_class: enrolled.hardware_class.clone(),
        server_url: config.server_url.clone(),
        ak_public: hex::encode(&ak.public),
        ak_private: hex::encode(&ak.private),
        enrolled_at: chrono::Utc::now().to_rfc3339(),
    };
    // Whom the director is comes from the image repository's offline keys, not from
    // this (possibly intercepted) answer.
    config.prepare_state()?;
    let mut updater = crate::updater::Updater::for_agent(config, fetcher)?;
    let root = crate::director::sync_root(config, &mut updater).await?;
    let _ = std::fs::remove_file(crate::director::targets_path(config));
    tracing::info!(director_root_version = root.signed.version, "director trusted through the image repository");
    write_json(&Identity::path(config), &identity)?;
    tracing::info!(device_id = %enrolled.device_id, "enrolled");
    Ok(enrolled)
}

fn log_path(config: &AgentConfig) -> PathBuf {
    config.state_dir.join("measurements.json")
}

/// The measurement log, empty when nothing was measured yet.
pub fn load_log(config: &AgentConfig) -> Result<EventLog> {
    let path = log_path(config);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::Corrupt { path, reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EventLog::default()),
        Err(e) => Err(AgentError::io("read", &path, e)),
    }
}

/// The boot step (what the bootloader does on hardware): hashes the booted slot's image,
/// resets the measurement PCR as a platform reset would, extends the digest into it and
/// starts a new event log with that one event. Returns the event.
pub async fn measure_boot(config: &AgentConfig, slot: Slot, slot_path: &Path, length: Option<u64>) -> Result<Option<MeasurementEvent>> {
    let Some(conf) = &config.tpm else { return Ok(None) };
    if conf.boot_event_log.is_some() {
        // Firmware and bootloader measured this boot before the agent ran.
        return Ok(None);
    }
    let tpm = Tpm::new(&conf.tcti)?;
    let pcr = conf.pcr;
    let path = slot_path.to_owned();
    let (digest, length) = tokio::task::spawn_blocking(move || -> Result<_> {
        let (hex_digest, length) = outpost_fsio::hash_file(&path, length).map_err(|e| AgentError::io("hash", &path, e))?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&hex_digest, &mut digest).map_err(|e| AgentError::Attestation(format!("digest: {e}")))?;
        tpm.measure_boot(pcr, &digest)?;
        Ok((digest, length))
    })
    .await
    .map_err(|e| AgentError::Task { task: "TPM task", reason: e.to_string() })??;
    let event = MeasurementEvent {
        pcr,
        sha256: hex::encode(digest),
        event: EventKind::SlotBoot,
        slot,
        length,
        at: chrono::Utc::now().to_rfc3339(),
    };
    write_json(&log_path(config), &EventLog { events: vec![event.clone()] })?;
    tracing::info!(%slot, sha256 = %event.sha256, pcr, "measured boot");
    Ok(Some(event))
}

/// The agent's own check before it installs: the TPM's measurement PCR (through a quote
/// with its own AK when enrolled) must equal the replay of the event log, and the last
/// measured boot must be `expected` (the running release's signed expected
/// measurement). Without a `[tpm]` section there is nothing to check.
pub async fn self_check(config: &AgentConfig, expected: Option<&str>) -> Result<()> {
    let Some(conf) = &config.tpm else { return Ok(()) };
    if conf.boot_event_log.is_some() {
        // The boot chain's log is judged by the server against the releases' golden
        // values; the agent holds no golden values to check it against itself.
        return Ok(());
    }
    let tpm = Tpm::new(&conf.tcti)?;
    let pcr = conf.pcr;
    let log = load_log(config)?;
    let replayed = log.pcr_digest(&[pcr]).map_err(|e| AgentError::Attestation(e.to_string()))?;
    let identity = Identity::load(config)?;
    let quoted: Vec<u8> = match identity {
        Some(id) => {
            let ak = id.ak()?;
            let nonce: [u8; 32] = attest::credential::random_bytes();
            let t = tpm.clone();
            let a = ak.clone();
            let q = tokio::task::spawn_blocking(move || t.quote(&a, &nonce, &[pcr]))
                .await
                .map_err(|e| AgentError::Task { task: "TPM task", reason: e.to_string() })??;
            let ak_pub = TpmPublic::parse(&ak.public, "attestation key").map_err(|e| AgentError::Attestation(e.to_string()))?;
            let quote = Quote::verify(&ak_pub, &q.attest, &q.signature).map_err(|e| AgentError::Attestation(e.to_string()))?;
            if quote.extra_data != nonce {
                return Err(AgentError::Attestation("own quote does not carry the nonce it was asked for".into()));
            }
            quote.pcr_digest
        }
        None => {
            let value = tokio::task::spawn_blocking(move || tpm.read_pcr(pcr)).await.map_err(|e| AgentError::Task { task: "TPM task", reason: e.to_string() })??;
            let mut h = <sha2::Sha256 as sha2::Digest>::new();
            sha2::Digest::update(&mut h, value);
            sha2::Digest::finalize(h).to_vec()
        }
    };
    if quoted != replayed {
        return Err(AgentError::Attestation(format!(
            "TPM PCR {pcr} does not match the measurement log ({} events): refusing to install",
            log.events.len()
        )));
    }
    if let Some(want) = expected {
        match log.booted() {
            Some(e) if e.sha256 == want => {}
            Some(e) => {
                return Err(AgentError::Attestation(format!(
                    "measured boot digest {} of slot {} is not the running release's expected measurement {want}: refusing to install",
                    e.sha256, e.slot
                )))
            }
            None => return Err(AgentError::Attestation("nothing was measured at boot: refusing to install".into())),
        }
    }
    Ok(())
}

/// What the device says in a check-in besides its measurements.
#[derive(Debug, Clone)]
pub struct DeviceState {
    pub slot: Slot,
    pub version: Option<String>,
    /// SHA-256 of the running release's verified SBOM.
    pub sbom_sha256: Option<String>,
    pub health: DeviceHealth,
    pub reports: Vec<InstallReport>,
    /// Integrity incidents not yet delivered (the agent's incident queue).
    pub incidents: Vec<outpost_protocol::incident::IntegrityIncident>,
}

/// One attested check-in: a fresh nonce from the server, a quote over the measurement
/// PCR bound to the whole report, and the server's verdict.
pub async fn checkin(config: &AgentConfig, http: &reqwest::Client, state: &DeviceState, identity: Option<&Arc<DeviceIdentity>>) -> Result<CheckinVerdict> {
    let (url, body) = prepare_checkin(config, http, state, identity).await?;
    send_checkin(config, http, &url, &body).await
}

/// Sends a prepared check-in and returns the server's verdict.
pub async fn send_checkin(config: &AgentConfig, http: &reqwest::Client, url: &str, body: &Checkin) -> Result<CheckinVerdict> {
    let verdict: CheckinVerdict = api("check in", http.post(url).timeout(config.http_timeout).json(body).send().await.map_err(send_err(url))?).await?;
    tracing::info!(verdict = %verdict.verdict, reason = verdict.reason.as_deref().unwrap_or(""), quarantined = verdict.quarantined, "checked in");
    Ok(verdict)
}

/// The first half of a check-in: a nonce from the server and the TPM's quote over the
/// report, with a request for a client certificate when `tls_identity` wants one.
/// Returns the check-in URL and body.
pub async fn prepare_checkin(config: &AgentConfig, http: &reqwest::Client, state: &DeviceState, tls_identity: Option<&Arc<DeviceIdentity>>) -> Result<(String, Checkin)> {
    let identity = Identity::load(config)?.ok_or_else(|| AgentError::NotEnrolled { hint: ": run `outpost-agent enroll --token TOKEN` first" })?;
    let conf = config.tpm.as_ref().ok_or_else(|| AgentError::MissingSection { section: "tpm", hint: " with a tcti" })?;
    let tpm = Tpm::new(&conf.tcti)?;
    let base = format!("{}/api/v1/devices/{}", config.server_url, identity.device_id);
    let url = format!("{base}/nonce");
    // Only this device may ask for its nonces: the request is quoted by its AK.
    let ask = serde_json::to_value(attest::NonceAsk { device_id: identity.device_id.clone(), at: chrono::Utc::now().to_rfc3339() })
        .map_err(|e| AgentError::Serialize { what: "nonce request".into(), reason: e.to_string() })?;
    let qualifying = attest::nonce_request_qualifying_data(&ask).map_err(|e| AgentError::tuf("nonce request", e))?;
    let pcrs: Vec<u32> = match &conf.boot_event_log {
        Some(_) => attest::golden::GOLDEN_PCRS.to_vec(),
        None => vec![conf.pcr],
    };
    let (t, ak, quoted) = (tpm.clone(), identity.ak()?, pcrs.clone());
    let q = tokio::task::spawn_blocking(move || t.quote(&ak, &qualifying, &quoted))
        .await
        .map_err(|e| AgentError::Task { task: "TPM task", reason: e.to_string() })??;
    let req = attest::NonceRequest { request: ask, attest: hex::encode(&q.attest), signature: hex::encode(&q.signature) };
    let grant: NonceGrant = api("get check-in nonce", http.post(&url).timeout(config.http_timeout).json(&req).send().await.map_err(send_err(&url))?).await?;
    // Only a server with a device CA is asked for a certificate (a TPM2_Certify each).
    let asks = |i: &&Arc<DeviceIdentity>| grant.issues_client_certificates && i.wants_certificate(chrono::Utc::now().timestamp());
    let tls_key = match tls_identity.filter(asks) {
        Some(tls_identity) => {
            let (i, ak, id, nonce) = (tls_identity.clone(), identity.ak()?, identity.device_id.clone(), grant.nonce.clone());
            Some(
                tokio::task::spawn_blocking(move || i.proof(&ak, &id, &nonce))
                    .await
                    .map_err(|e| AgentError::Task { task: "TPM task", reason: e.to_string() })??,
            )
        }
        None => None,
    };
    let (log, boot_log) = match &conf.boot_event_log {
        Some(path) => (EventLog::default(), Some(read_boot_log(path)?)),
        None => (load_log(config)?, None),
    };
    let report = CheckinReport {
        device_id: identity.device_id.clone(),
        nonce: grant.nonce,
        slot: state.slot,
        version: state.version.clone(),
        image_sha256: log.booted().map(|e| e.sha256.clone()),
        sbom_sha256: state.sbom_sha256.clone(),
        health: state.health,
        pcr: conf.pcr,
        event_log: log,
        boot_log,
        reports: state.reports.clone(),
        incidents: state.incidents.clone(),
        policy: crate::policy::read_status(config),
        tls_key,
        at: chrono::Utc::now().to_rfc3339(),
    };
    let report = serde_json::to_value(&report).map_err(|e| AgentError::Serialize { what: "report".into(), reason: e.to_string() })?;
    let qualifying = attest::qualifying_data(&report).map_err(|e| AgentError::tuf("check-in report", e))?;
    let ak = identity.ak()?;
    let q = tokio::task::spawn_blocking(move || tpm.quote(&ak, &qualifying, &pcrs))
        .await
        .map_err(|e| AgentError::Task { task: "TPM task", reason: e.to_string() })??;
    let body = Checkin { report, attest: hex::encode(&q.attest), signature: hex::encode(&q.signature) };
    Ok((format!("{base}/checkin"), body))
}

/// The firmware's event log, base64 for the check-in report.
fn read_boot_log(path: &Path) -> Result<String> {
    use base64::Engine;
    let bytes = std::fs::read(path).map_err(|e| AgentError::io("read the firmware's event log", path, e))?;
    if bytes.len() > attest::boot::MAX_BOOT_LOG {
        return Err(AgentError::Attestation(format!("the firmware's event log {} is {} bytes, more than the server accepts", path.display(), bytes.len())));
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}
