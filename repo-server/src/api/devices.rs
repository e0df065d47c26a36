//! Devices: one-time enrollment tokens (operators), enrollment by credential
//! activation, nonces and attested check-ins (see `fleet`), and the admin view of
//! devices and verdicts.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_protocol::attest::{Checkin, CheckinVerdict, EnrollChallenge, EnrollProof, EnrollRequest, Enrolled, NonceGrant, NonceRequest};
use outpost_protocol::api::devices::{CertificatesRevoked, DeviceDetail, DeviceLabels, DeviceList, LabelsRequest, ListedDevice, RevokeCertificates};
use outpost_protocol::api::tokens::{EnrollmentToken, TokenRequest};

use super::{ApiError, ApiJson, AppState, Auth, ClientCert};
use crate::fleet::access::{self, DeviceRoute};
use crate::fleet::checkin::CheckinContext;
use crate::fleet::enroll::{self, EnrollPolicy};
use crate::storage::{ReportFilter, TokenRole};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/device-tokens", post(create_token))
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/enroll/{challenge}", post(prove))
        .route("/api/v1/devices", get(list))
        .route("/api/v1/devices/{id}", get(show))
        .route("/api/v1/devices/{id}/labels", axum::routing::put(set_labels))
        .route("/api/v1/devices/{id}/nonce", post(nonce))
        .route("/api/v1/devices/{id}/checkin", post(checkin))
        .route("/api/v1/devices/{id}/certificates/revoke", post(revoke_certificates))
        .route("/api/v1/devices/{id}/certificates/allow", post(allow_certificates))
        .route("/api/v1/device-ca/crl", get(crl))
}

fn device_ca(s: &AppState) -> Result<&crate::fleet::deviceca::DeviceCa, ApiError> {
    s.device_ca.as_deref().ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no_device_ca", "this server has no device CA ([device_ca])"))
}

/// Revokes a device's client certificates and blocks new ones (operators): its access
/// ends now, not at expiry.
async fn revoke_certificates(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RevokeCertificates>,
) -> Result<Json<CertificatesRevoked>, ApiError> {
    auth.require(TokenRole::Operator)?;
    device_ca(&s)?;
    if body.reason.trim().is_empty() || body.reason.len() > 500 {
        return Err(ApiError::unprocessable("invalid_reason", "reason: 1 to 500 characters"));
    }
    if s.store.device(&id).await?.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_device", format!("no device {id:?}")));
    }
    let revoked = s.store.revoke_certificates(&id, &auth.0.name, &body.reason, now()).await?;
    let answer = CertificatesRevoked { device_id: id, revoked };
    s.store.log(&auth.0.name, "device_certificates_revoked", &serde_json::json!({"device_id": answer.device_id, "revoked": revoked, "reason": body.reason})).await?;
    Ok(Json(answer))
}

/// Lets a revoked device get certificates again (operators).
async fn allow_certificates(State(s): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    auth.require(TokenRole::Operator)?;
    device_ca(&s)?;
    if !s.store.allow_certificates(&id).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_revoked", format!("device {id:?} is not revoked")));
    }
    s.store.log(&auth.0.name, "device_certificates_allowed", &serde_json::json!({"device_id": id})).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The device CA's signed revocation list (DER): the unexpired certificates it
/// revoked, valid for one certificate lifetime. Public: it is signed.
async fn crl(State(s): State<AppState>) -> Result<([(axum::http::header::HeaderName, &'static str); 1], Vec<u8>), ApiError> {
    let ca = device_ca(&s)?;
    let at = chrono::Utc::now();
    let revoked = s.store.revoked_certificates(at.timestamp()).await?;
    let next = at + chrono::Duration::from_std(ca.settings.lifetime).unwrap_or(chrono::Duration::hours(1));
    // The CRL number grows with time: a later list has a larger one.
    let number = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    let der = ca.crl(&revoked, number, at, next)?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/pkix-crl")], der))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn create_token(State(s): State<AppState>, auth: Auth, ApiJson(body): ApiJson<TokenRequest>) -> Result<Json<EnrollmentToken>, ApiError> {
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
    crate::fleet::check_labels(&body.labels).map_err(|m| ApiError::unprocessable("invalid_labels", m))?;
    Ok(Json(enroll::create_token(&s.store, &class, &body.labels, ttl, &auth.0.name, now()).await?))
}

async fn enroll(State(s): State<AppState>, ApiJson(req): ApiJson<EnrollRequest>) -> Result<Json<EnrollChallenge>, ApiError> {
    let policy = EnrollPolicy { ek_cas: &s.ek_cas, accept_uncertified_eks: s.accept_uncertified_eks, challenge_lifetime: s.challenge_lifetime };
    Ok(Json(enroll::enroll(&s.store, &policy, &req, now()).await?))
}

async fn prove(State(s): State<AppState>, Path(challenge): Path<String>, ApiJson(proof): ApiJson<EnrollProof>) -> Result<Json<Enrolled>, ApiError> {
    Ok(Json(enroll::prove(&s.store, &challenge, &proof, now()).await?))
}

/// Devices, each flagged with the deny-list entries affecting the release it runs.
async fn list(State(s): State<AppState>, auth: Auth) -> Result<Json<DeviceList>, ApiError> {
    auth.require_reader()?;
    let mut vulnerable = crate::fleet::sbom::vulnerable_devices(&s.repo, &s.store).await?;
    let devices = s
        .store
        .devices()
        .await?
        .into_iter()
        .map(|device| ListedDevice { vulnerable: vulnerable.remove(&device.device_id).unwrap_or_default(), device })
        .collect();
    Ok(Json(DeviceList { devices }))
}

async fn show(State(s): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<DeviceDetail>, ApiError> {
    auth.require_reader()?;
    let record = s.store.device(&id).await?.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_device", format!("no device {id:?}")))?;
    let attestations = s.store.attestations(&id, 50).await?;
    // Only what the device itself said, in attested check-ins.
    let reports = s.store.recent_reports(Some(&id), 50, ReportFilter::AttestedOnly).await?;
    let incidents = s.store.recent_incidents(Some(&id), 50, ReportFilter::AttestedOnly).await?;
    let vulnerable = crate::fleet::sbom::vulnerable_devices(&s.repo, &s.store).await?.remove(&id).unwrap_or_default();
    let certificates = s.store.device_certificates(&id, 10).await?;
    Ok(Json(DeviceDetail { device: record.device, vulnerable, attestations, reports, incidents, certificates }))
}

/// Replaces a device's labels (operators).
async fn set_labels(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<LabelsRequest>,
) -> Result<Json<DeviceLabels>, ApiError> {
    auth.require(TokenRole::Operator)?;
    crate::fleet::check_labels(&body.labels).map_err(|m| ApiError::unprocessable("invalid_labels", m))?;
    if !s.store.set_device_labels(&id, &body.labels).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_device", format!("no device {id:?}")));
    }
    let answer = DeviceLabels { device_id: id, labels: body.labels };
    s.store.log(&auth.0.name, "device_labels", &answer).await?;
    Ok(Json(answer))
}

async fn nonce(State(s): State<AppState>, caller: ClientCert, Path(id): Path<String>, ApiJson(req): ApiJson<NonceRequest>) -> Result<Json<NonceGrant>, ApiError> {
    access::check(s.device_ca.as_deref(), &s.store, caller.0.as_deref(), &id, DeviceRoute::Nonce, now()).await?;
    let mut grant = enroll::nonce(&s.store, &id, &req, s.nonce_lifetime, chrono::Utc::now()).await?;
    grant.issues_client_certificates = s.device_ca.is_some();
    Ok(Json(grant))
}

async fn checkin(State(s): State<AppState>, caller: ClientCert, Path(id): Path<String>, ApiJson(body): ApiJson<Checkin>) -> Result<Json<CheckinVerdict>, ApiError> {
    let route = DeviceRoute::Checkin { asks_for_certificate: body.report.get("tls_key").is_some_and(|k| !k.is_null()) };
    access::check(s.device_ca.as_deref(), &s.store, caller.0.as_deref(), &id, route, now()).await?;
    let bootstrap = caller.0.is_none() && s.device_ca.as_deref().is_some_and(|ca| ca.settings.require_client_certificate);
    let cx = CheckinContext { store: &s.store, repo: &s.repo, director: &s.director, measurement: &s.measurement, device_ca: s.device_ca.as_deref() };
    Ok(Json(crate::fleet::checkin::checkin(&cx, &id, &body, chrono::Utc::now(), bootstrap).await?))
}
