//! Devices: one-time enrollment tokens (operators), enrollment by credential
//! activation, nonces and attested check-ins (see `fleet`), and the admin view of
//! devices and verdicts.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_protocol::attest::{Checkin, CheckinVerdict, EnrollChallenge, EnrollProof, EnrollRequest, Enrolled, NonceGrant, NonceRequest};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiJson, AppState, Auth};
use crate::fleet::checkin::CheckinContext;
use crate::fleet::enroll::{self, EnrollPolicy};
use crate::storage::TokenRole;

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
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    hardware_class: String,
    /// Lifetime, e.g. "24h" (default) or "15m".
    ttl: Option<String>,
    /// Labels the enrolled device gets (rollout selectors match them).
    #[serde(default)]
    labels: BTreeMap<String, String>,
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
async fn list(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    auth.require_reader()?;
    let vulnerable = crate::fleet::sbom::vulnerable_devices(&s.repo, &s.store).await?;
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
    let vulnerable = crate::fleet::sbom::vulnerable_devices(&s.repo, &s.store).await?.remove(&id).unwrap_or_default();
    Ok(Json(json!({"device": device, "vulnerable": vulnerable, "attestations": history, "reports": reports})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelsBody {
    labels: BTreeMap<String, String>,
}

/// Replaces a device's labels (operators).
async fn set_labels(State(s): State<AppState>, auth: Auth, Path(id): Path<String>, ApiJson(body): ApiJson<LabelsBody>) -> Result<Json<Value>, ApiError> {
    auth.require(TokenRole::Operator)?;
    crate::fleet::check_labels(&body.labels).map_err(|m| ApiError::unprocessable("invalid_labels", m))?;
    if !s.store.set_device_labels(&id, &body.labels).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_device", format!("no device {id:?}")));
    }
    s.store.log(&auth.0.name, "device_labels", &json!({"device_id": id, "labels": body.labels})).await?;
    Ok(Json(json!({"device_id": id, "labels": body.labels})))
}

async fn nonce(State(s): State<AppState>, Path(id): Path<String>, ApiJson(req): ApiJson<NonceRequest>) -> Result<Json<NonceGrant>, ApiError> {
    Ok(Json(enroll::nonce(&s.store, &id, &req, s.nonce_lifetime, chrono::Utc::now()).await?))
}

async fn checkin(State(s): State<AppState>, Path(id): Path<String>, ApiJson(body): ApiJson<Checkin>) -> Result<Json<CheckinVerdict>, ApiError> {
    let cx = CheckinContext { store: &s.store, repo: &s.repo, director: &s.director, measurement: &s.measurement };
    Ok(Json(crate::fleet::checkin::checkin(&cx, &id, &body, chrono::Utc::now()).await?))
}
