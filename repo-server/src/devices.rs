//! Devices: one-time enrollment tokens (operators), enrollment by credential
//! activation, attested check-ins, and the admin view of devices and verdicts.
//!
//! A check-in is refused outright (nothing recorded against the device) when it is
//! not provably from the device: bad signature, a quote for another report, an unknown,
//! foreign, used or expired nonce. An authentic check-in whose measurements are wrong
//! (event log does not replay to the quoted PCR, a measured image no signed release
//! expects) is recorded as a failed attestation, which quarantines the device.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_protocol::attest::{
    self, AttestationState, Checkin, CheckinReport, CheckinVerdict, EnrollChallenge, EnrollProof, EnrollRequest, Enrolled, NonceGrant, TpmPublic,
    Verdict,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ServerError};
use crate::http::{ApiJson, AppState, Auth};
use crate::storage::{CheckinRecord, EnrollRefusal, NewChallenge, NonceRefusal, TokenRole};

pub fn api() -> Router<AppState> {
    Router::new()
        .route("/api/v1/device-tokens", post(create_token))
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/enroll/{challenge}", post(prove))
        .route("/api/v1/devices", get(list))
        .route("/api/v1/devices/{id}", get(show))
        .route("/api/v1/devices/{id}/labels", axum::routing::put(set_labels))
        .route("/api/v1/devices/{id}/nonce", post(nonce))
        .route("/api/v1/devices/{id}/checkin", post(checkin))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Nonce lifetimes are short (seconds): they are kept in milliseconds, so rounding
/// to whole seconds never shortens them.
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rfc3339_ms(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms).map(|t| t.to_rfc3339()).unwrap_or_default()
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).map(|t| t.to_rfc3339()).unwrap_or_default()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    hardware_class: String,
    /// Lifetime, e.g. "24h" (default) or "15m".
    ttl: Option<String>,
    /// Labels the enrolled device gets (rollout selectors match them).
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

async fn create_token(State(s): State<AppState>, auth: Auth, ApiJson(body): ApiJson<TokenBody>) -> Result<Json<Value>, ApiError> {
    auth.require(TokenRole::Operator)?;
    let class: outpost_protocol::release::HardwareClass =
        body.hardware_class.parse().map_err(|e: outpost_protocol::Error| ApiError::unprocessable("invalid_hardware_class", e.to_string()))?;
    let ttl = match &body.ttl {
        None => std::time::Duration::from_secs(86400),
        Some(t) => humantime::parse_duration(t).map_err(|e| ApiError::unprocessable("invalid_ttl", format!("ttl {t:?}: {e}")))?,
    };
    if ttl.is_zero() || ttl > std::time::Duration::from_secs(30 * 86400) {
        return Err(ApiError::unprocessable("invalid_ttl", "ttl must be more than 0s and at most 30 days"));
    }
    crate::rollouts::check_labels(&body.labels).map_err(|m| ApiError::unprocessable("invalid_labels", m))?;
    let expires = now() + ttl.as_secs().max(1) as i64;
    let token = s.store.create_enrollment_token(class.as_str(), &body.labels, &auth.0.name, expires).await?;
    s.store.log(
        &auth.0.name,
        "device_token_create",
        &json!({"hardware_class": class.as_str(), "labels": body.labels, "expires_at": rfc3339(expires)}),
    ).await?;
    Ok(Json(json!({"token": token, "hardware_class": class.as_str(), "labels": body.labels, "expires_at": rfc3339(expires)})))
}

fn refusal(r: EnrollRefusal) -> ApiError {
    match r {
        EnrollRefusal::UnknownToken => ApiError::unauthorized("unknown enrollment token"),
        EnrollRefusal::TokenUsed => ApiError::conflict("token_used", "enrollment token was already used"),
        EnrollRefusal::TokenExpired(at) => ApiError::new(StatusCode::UNAUTHORIZED, "token_expired", format!("enrollment token expired at {}", rfc3339(at))),
        EnrollRefusal::WrongClass { token } => {
            ApiError::forbidden(format!("enrollment token is for hardware class {token:?}, not the class this device claims"))
        }
        EnrollRefusal::UnknownChallenge => ApiError::new(StatusCode::NOT_FOUND, "unknown_challenge", "no such enrollment challenge"),
        EnrollRefusal::ChallengeClosed(state) => ApiError::conflict("challenge_closed", format!("enrollment challenge is already {}", state.as_str())),
        EnrollRefusal::ChallengeExpired => ApiError::new(StatusCode::GONE, "challenge_expired", "enrollment challenge expired; enroll again"),
        EnrollRefusal::WrongSecret => ApiError::forbidden(
            "credential activation failed: the secret does not match, so the attestation key is not resident in the TPM of this endorsement key",
        ),
    }
}

fn tpm_bad(code: &'static str) -> impl FnOnce(outpost_protocol::Error) -> ApiError {
    move |e| ApiError::unprocessable(code, e.to_string())
}

async fn enroll(State(s): State<AppState>, ApiJson(req): ApiJson<EnrollRequest>) -> Result<Json<EnrollChallenge>, ApiError> {
    let class: outpost_protocol::release::HardwareClass =
        req.hardware_class.parse().map_err(|e: outpost_protocol::Error| ApiError::unprocessable("invalid_hardware_class", e.to_string()))?;
    // The token first: without a valid one, no certificate checks and no RSA work.
    s.store.check_enrollment_token(&req.token, class.as_str(), now()).await?.map_err(refusal)?;
    let ek_bytes = attest::unhex("ek_public", &req.ek_public, 1024).map_err(tpm_bad("invalid_ek"))?;
    let ak_bytes = attest::unhex("ak_public", &req.ak_public, 1024).map_err(tpm_bad("invalid_ak"))?;
    let ek_cert = match &req.ek_certificate {
        Some(c) => Some(attest::unhex("ek_certificate", c, 8192).map_err(tpm_bad("invalid_ek_certificate"))?),
        None => None,
    };
    let ek = TpmPublic::parse(&ek_bytes, "endorsement key").map_err(tpm_bad("invalid_ek"))?;
    ek.check_endorsement_key().map_err(tpm_bad("invalid_ek"))?;
    let ak = TpmPublic::parse(&ak_bytes, "attestation key").map_err(tpm_bad("invalid_ak"))?;
    ak.check_attestation_key().map_err(tpm_bad("invalid_ak"))?;
    if s.ek_cas.is_empty() && !s.accept_uncertified_eks {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "no_ek_ca",
            "this server trusts no TPM maker yet: the operator must configure attestation.ek_ca_certificates \
             (or, for software TPMs, attestation.accept_uncertified_eks = true)",
        ));
    }
    if !s.ek_cas.is_empty() {
        let cert = ek_cert.as_deref().ok_or_else(|| {
            ApiError::new(StatusCode::FORBIDDEN, "ek_certificate_required", "this server requires an EK certificate from a trusted TPM manufacturer; the device sent none")
        })?;
        s.ek_cas.verify(cert, &ek, x509_parser::time::ASN1Time::now()).map_err(|reason| {
            tracing::warn!(%reason, "EK certificate refused");
            ApiError::new(StatusCode::FORBIDDEN, "ek_certificate_refused", format!("EK certificate refused: {reason}"))
        })?;
    }
    let secret: [u8; 32] = attest::credential::random_bytes();
    let made = attest::credential::make_credential(&ek, &ak.name(), &secret).map_err(tpm_bad("invalid_ek"))?;
    let id = hex::encode(attest::credential::random_bytes::<16>());
    let device_id = attest::device_id(&ek_bytes);
    let expires = now() + s.challenge_lifetime.as_secs().max(1) as i64;
    let secret_sha256 = hex::encode(Sha256::digest(secret));
    let challenge = NewChallenge {
        id: &id,
        token: &req.token,
        device_id: &device_id,
        hardware_class: class.as_str(),
        ek_public: &ek_bytes,
        ek_certificate: ek_cert.as_deref(),
        ak_public: &ak_bytes,
        secret_sha256: &secret_sha256,
        expires_at: expires,
    };
    s.store.open_challenge(&challenge, now()).await?.map_err(refusal)?;
    tracing::info!(%device_id, class = class.as_str(), challenge = %id, "enrollment challenge issued");
    Ok(Json(EnrollChallenge {
        challenge_id: id,
        device_id,
        credential_blob: hex::encode(made.credential_blob),
        encrypted_secret: hex::encode(made.encrypted_secret),
        expires_at: rfc3339(expires),
    }))
}

async fn prove(State(s): State<AppState>, Path(challenge): Path<String>, ApiJson(proof): ApiJson<EnrollProof>) -> Result<Json<Enrolled>, ApiError> {
    let secret = attest::unhex("secret", &proof.secret, 64).map_err(tpm_bad("invalid_secret"))?;
    let digest = hex::encode(Sha256::digest(&secret));
    match s.store.complete_challenge(&challenge, &digest, now()).await? {
        Ok((device_id, hardware_class)) => {
            s.store.log(&format!("device:{device_id}"), "device_enroll", &json!({"device_id": device_id, "hardware_class": hardware_class})).await?;
            tracing::info!(%device_id, %hardware_class, "device enrolled");
            Ok(Json(Enrolled { device_id, hardware_class }))
        }
        Err(r) => {
            tracing::warn!(%challenge, refusal = ?r, "enrollment proof refused");
            Err(refusal(r))
        }
    }
}

/// Devices, each flagged with the deny-list entries affecting the release it runs.
async fn list(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    auth.require_reader()?;
    let vulnerable = crate::sbomindex::vulnerable_devices(&s).await?;
    let devices: Vec<Value> = s
        .store
        .devices().await?
        .into_iter()
        .map(|d| {
            let ids = vulnerable.get(&d.device_id).cloned().unwrap_or_default();
            let mut v = serde_json::to_value(&d).unwrap_or(Value::Null);
            v["vulnerable"] = json!(ids);
            v
        })
        .collect();
    Ok(Json(json!({"devices": devices})))
}

async fn show(State(s): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    auth.require_reader()?;
    let device = s.store.device(&id).await?.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_device", format!("no device {id:?}")))?;
    let history = s.store.attestations(&id, 50).await?;
    // Only what the device itself said, in attested check-ins.
    let reports = s.store.recent_reports(Some(&id), 50, true).await?;
    let vulnerable = crate::sbomindex::vulnerable_devices(&s).await?.remove(&id).unwrap_or_default();
    Ok(Json(json!({"device": device, "vulnerable": vulnerable, "attestations": history, "reports": reports})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelsBody {
    labels: std::collections::BTreeMap<String, String>,
}

/// Replaces a device's labels (operators).
async fn set_labels(State(s): State<AppState>, auth: Auth, Path(id): Path<String>, ApiJson(body): ApiJson<LabelsBody>) -> Result<Json<Value>, ApiError> {
    auth.require(TokenRole::Operator)?;
    crate::rollouts::check_labels(&body.labels).map_err(|m| ApiError::unprocessable("invalid_labels", m))?;
    if !s.store.set_device_labels(&id, &body.labels).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_device", format!("no device {id:?}")));
    }
    s.store.log(&auth.0.name, "device_labels", &json!({"device_id": id, "labels": body.labels})).await?;
    Ok(Json(json!({"device_id": id, "labels": body.labels})))
}

/// How far a nonce request's `at` may be from the server's clock.
const NONCE_REQUEST_SKEW: chrono::Duration = chrono::Duration::minutes(5);

async fn nonce(State(s): State<AppState>, Path(id): Path<String>, ApiJson(req): ApiJson<attest::NonceRequest>) -> Result<Json<NonceGrant>, ApiError> {
    let unknown = || ApiError::new(StatusCode::NOT_FOUND, "unknown_device", format!("no enrolled device {id:?}"));
    let device = s.store.device(&id).await?.ok_or_else(unknown)?;
    let ak = TpmPublic::parse(&device.ak_public, "attestation key").map_err(|e| ServerError::State(format!("stored AK of {id}: {e}")))?;
    // Only the device may take its nonces: the request is quoted by its AK.
    let ask = attest::verify_nonce_request(&ak, &req).map_err(|e| {
        tracing::warn!(device = %id, error = %e, "nonce request refused");
        ApiError::new(StatusCode::UNAUTHORIZED, "nonce_request_refused", format!("nonce request not signed by this device's attestation key: {e}"))
    })?;
    if ask.device_id != id {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "nonce_request_refused", format!("nonce request is for device {:?}, not {id:?}", ask.device_id)));
    }
    let at = chrono::DateTime::parse_from_rfc3339(&ask.at)
        .map_err(|e| ApiError::unprocessable("invalid_request", format!("at {:?}: {e}", ask.at)))?
        .with_timezone(&chrono::Utc);
    if (chrono::Utc::now() - at).abs() > NONCE_REQUEST_SKEW {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "nonce_request_stale",
            format!("nonce request made at {} is more than {} minutes from the server's clock (a replay, or a clock to fix)", ask.at, NONCE_REQUEST_SKEW.num_minutes()),
        ));
    }
    let issued = now_ms();
    let expires = issued + s.nonce_lifetime.as_millis().max(1) as i64;
    let nonce = match s.store.issue_nonce(&id, expires, issued).await? {
        crate::storage::NonceIssue::Issued(n) => n,
        crate::storage::NonceIssue::UnknownDevice => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_device", format!("no enrolled device {id:?}")));
        }
        crate::storage::NonceIssue::TooMany => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_nonces",
                format!("device {id:?} already has {} unused nonces; use one or wait for them to expire", crate::storage::MAX_OPEN_NONCES),
            ));
        }
    };
    Ok(Json(NonceGrant { nonce, expires_at: rfc3339_ms(expires) }))
}

/// The pure part of a check-in's verdict given an authentic quote: the class's
/// measurement policy (which PCRs and events prove the slot), the log, the reported
/// digest and the signed releases' expected measurements.
fn judge(
    quote: &attest::Quote,
    report: &CheckinReport,
    policy: Option<&attest::MeasurementPolicy>,
    expected: &std::collections::BTreeMap<String, String>,
    class: &str,
) -> Result<(), String> {
    let policy = policy.ok_or_else(|| {
        format!("hardware class {class} has no measurement policy (attestation.classes): nothing this device measures proves which image booted")
    })?;
    policy.check(report).map_err(|e| format!("hardware class {class}: {e}"))?;
    let measured = attest::evaluate_checkin(quote, report)?;
    for (digest, event) in measured.iter().zip(&report.event_log.events) {
        if !expected.contains_key(digest) {
            return Err(format!(
                "measured image {digest} (slot {}) is not the expected measurement of any signed release for hardware class {class}",
                event.slot
            ));
        }
    }
    Ok(())
}

async fn checkin(State(s): State<AppState>, Path(id): Path<String>, ApiJson(body): ApiJson<Checkin>) -> Result<Json<CheckinVerdict>, ApiError> {
    let device = s.store.device(&id).await?.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_device", format!("no enrolled device {id:?}")))?;
    let ak = TpmPublic::parse(&device.ak_public, "attestation key").map_err(|e| ServerError::State(format!("stored AK of {id}: {e}")))?;
    let attest_bytes = attest::unhex("attest", &body.attest, 4096).map_err(tpm_bad("invalid_quote"))?;
    let signature = attest::unhex("signature", &body.signature, 1024).map_err(tpm_bad("invalid_quote"))?;
    // Authenticity first: only this device's AK, over exactly this report.
    let quote = match attest::verify_checkin_quote(&ak, &body.report, &attest_bytes, &signature) {
        Ok(q) => q,
        Err(e) => {
            tracing::warn!(device = %id, error = %e, "check-in quote refused");
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "quote_refused", format!("{e}")));
        }
    };
    let report: CheckinReport = serde_json::from_value(body.report.clone()).map_err(|e| ApiError::unprocessable("invalid_report", format!("report: {e}")))?;
    if report.device_id != id {
        return Err(ApiError::unprocessable("invalid_report", format!("report is for device {:?}, not {id:?}", report.device_id)));
    }
    for r in &report.reports {
        r.validate().map_err(|m| ApiError::unprocessable("invalid_report", format!("install report: {m}")))?;
        if r.device_id != id {
            return Err(ApiError::unprocessable("invalid_report", format!("install report names device {:?}, not {id:?}", r.device_id)));
        }
    }
    let expected = s.repo.expected_measurements(&device.hardware_class).await;
    let policy = s.measurement.get(&device.hardware_class).or_else(|| s.measurement.get("*"));
    let outcome = judge(&quote, &report, policy, &expected, &device.hardware_class);
    let (verdict, reason) = match &outcome {
        Ok(()) => (Verdict::Attested, None),
        Err(reason) => (Verdict::Failed, Some(reason.as_str())),
    };
    // The director: feedback to rollouts, then what this device should run now. The
    // nonce, the verdict and the director's decision commit together.
    let releases = s.repo.firmware_releases(&device.hardware_class).await;
    let record = CheckinRecord {
        device_id: &id,
        verdict,
        reason,
        slot: &report.slot,
        version: report.version.as_deref(),
        image_sha256: report.image_sha256.as_deref(),
        sbom_sha256: report.sbom_sha256.as_deref(),
        health: report.health,
        reports: &report.reports,
        policy: report.policy.as_ref().and_then(|p| serde_json::to_string(p).ok()),
    };
    let facts = crate::director::DeviceFacts {
        device_id: &id,
        hardware_class: &device.hardware_class,
        attested: verdict == Verdict::Attested,
        image_sha256: report.image_sha256.as_deref(),
        version: report.version.as_deref(),
        health: report.health,
        reports: &report.reports,
    };
    let now_ms = now_ms();
    let decide = crate::director::decider(&facts, &releases, now_ms.div_euclid(1000));
    let decision = match s.store.checkin(&report.nonce, &record, &device.hardware_class, decide, now_ms).await? {
        Ok(d) => crate::director::Outcome::new(d),
        Err(r) => {
            tracing::warn!(device = %id, refusal = ?r, "check-in nonce refused");
            return Err(match r {
                NonceRefusal::Unknown => ApiError::new(StatusCode::UNAUTHORIZED, "unknown_nonce", "nonce was not issued by this server"),
                NonceRefusal::OtherDevice => ApiError::new(StatusCode::UNAUTHORIZED, "foreign_nonce", "nonce was issued to another device"),
                NonceRefusal::Used => ApiError::conflict("nonce_used", "nonce was already used: a replayed check-in"),
                NonceRefusal::Expired(at) => ApiError::new(StatusCode::UNAUTHORIZED, "nonce_expired", format!("nonce expired at {}", rfc3339_ms(at))),
            });
        }
    };
    crate::director::log_transitions(&s.store, &decision.transitions).await;
    let director_targets = s.director.sign(&id, decision.director_version, decision.assignment.as_ref(), chrono::Utc::now())?;
    if device.attestation != AttestationState::from(verdict) {
        // Entering or leaving quarantine is an audited event.
        s.store.log("server", if verdict == Verdict::Failed { "device_quarantine" } else { "device_attested" }, &json!({"device_id": id, "reason": reason})).await?;
    }
    match reason {
        Some(r) => tracing::warn!(device = %id, reason = r, "attestation failed; device quarantined"),
        None => tracing::info!(device = %id, version = report.version.as_deref().unwrap_or(""), "attested check-in"),
    }
    Ok(Json(CheckinVerdict {
        device_id: id,
        verdict,
        reason: reason.map(str::to_owned),
        quarantined: verdict == Verdict::Failed,
        at: chrono::Utc::now().to_rfc3339(),
        director_targets: Some(director_targets),
    }))
}
