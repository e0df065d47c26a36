//! The operator API for rollouts (create, start, pause, resume, advance, abort,
//! status) with every action in the audit log.

use std::collections::BTreeMap;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_protocol::api::rollouts::{ActionRequest, CreateRollout, RolloutList, RolloutView, WaveRequest, WaveView};
use outpost_protocol::rollout::{validate_waves, Event, State as RolloutState, Transition, WaveSpec};
use serde::{Deserialize, Serialize};

use super::ApiError;
use super::{ApiJson, AppState, Auth};
use crate::storage::{ActionOutcome, RolloutRecord};
use crate::storage::TokenRole;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/rollouts", post(create).get(list))
        .route("/api/v1/rollouts/{id}", get(show))
        .route("/api/v1/rollouts/{id}/{action}", post(act))
}

fn waves_of(body: &[WaveRequest]) -> Result<Vec<WaveSpec>, String> {
    let mut out = Vec::new();
    for (i, w) in body.iter().enumerate() {
        if w.soak_secs < 0 {
            return Err(format!("waves[{i}].soak_secs {} must be 0 or more", w.soak_secs));
        }
        if w.min_devices < 0 || w.min_devices > u32::MAX as i64 {
            return Err(format!("waves[{i}].min_devices {} must be 0 or more", w.min_devices));
        }
        if !w.percent.is_finite() || w.percent <= 0.0 || w.percent > 100.0 {
            return Err(format!("waves[{i}].percent {} must be above 0 and at most 100", w.percent));
        }
        out.push(WaveSpec {
            percent: w.percent,
            success_threshold: w.success_threshold,
            failure_threshold: w.failure_threshold,
            min_devices: w.min_devices as u32,
            soak_secs: w.soak_secs as u64,
        });
    }
    validate_waves(&out).map_err(|e| e.to_string().replace("cannot build metadata: ", ""))?;
    Ok(out)
}

/// Refuses to expose a release the signed deny-list affects.
async fn vulnerability_gate(s: &AppState, release_path: &str) -> Result<(), ApiError> {
    let hits = crate::fleet::sbom::denied(&s.repo, &s.store, release_path).await?;
    if hits.is_empty() {
        Ok(())
    } else {
        Err(ApiError::conflict(
            "release_affected",
            format!("release {release_path} is affected by the signed deny-list ({}); it cannot be rolled out", hits.join(", ")),
        ))
    }
}

async fn create(State(s): State<AppState>, auth: Auth, ApiJson(body): ApiJson<CreateRollout>) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    auth.require(TokenRole::Operator)?;
    let class: outpost_protocol::release::HardwareClass =
        body.hardware_class.parse().map_err(|e: outpost_protocol::Error| ApiError::unprocessable("invalid_hardware_class", format!("hardware_class: {e}")))?;
    crate::fleet::check_labels(&body.labels).map_err(|m| ApiError::unprocessable("invalid_labels", m))?;
    let waves = waves_of(&body.waves).map_err(|m| ApiError::unprocessable("invalid_waves", m))?;
    let name = body.name.clone().unwrap_or_else(|| format!("{} {}", class.as_str(), body.version));
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::unprocessable("invalid_name", "name must be 1-128 characters"));
    }
    let releases = s.repo.firmware_releases(class.as_str()).await;
    let release = releases.iter().find(|r| r.version == body.version).cloned().ok_or_else(|| {
        ApiError::unprocessable("unknown_release", format!("version: no signed full-image release {} for hardware class {}", body.version, class.as_str()))
    })?;
    vulnerability_gate(&s, &release.path).await?;
    let id = format!("ro_{}", hex::encode(outpost_protocol::attest::credential::random_bytes::<8>()));
    let record = RolloutRecord {
        id: id.clone(),
        name,
        hardware_class: class.as_str().to_owned(),
        labels: body.labels,
        release,
        waves,
        gate: body.gate,
        state: RolloutState::Draft,
        created_by: auth.0.name.clone(),
        created_at: chrono::Utc::now().to_rfc3339(),
    };
    s.store.create_rollout(&record).await?;
    let detail = RolloutCreated { rollout: &id, release: &record.release.path, version: &record.release.version, waves: &record.waves, labels: &record.labels };
    s.store.log(&auth.0.name, "rollout_create", &detail).await?;
    tracing::info!(rollout = %id, release = %record.release.path, by = %auth.0.name, "rollout created");
    Ok((StatusCode::CREATED, Json(view(&s, &record, ViewDetail::default()).await?)))
}

/// The audit log's detail of a new rollout.
#[derive(Serialize)]
struct RolloutCreated<'a> {
    rollout: &'a str,
    release: &'a str,
    version: &'a str,
    waves: &'a [WaveSpec],
    labels: &'a BTreeMap<String, String>,
}

/// How many of the enrolled devices the rollout selects (class, labels, not
/// quarantined) fall into each wave (not cumulative): what each wave would expose.
async fn plan(s: &AppState, r: &RolloutRecord) -> Result<Vec<u32>, ApiError> {
    let mut per_wave = vec![0u32; r.waves.len()];
    for d in s.store.devices().await? {
        if d.hardware_class != r.hardware_class || d.quarantined || !r.labels.iter().all(|(k, v)| d.labels.get(k) == Some(v)) {
            continue;
        }
        if let Some(w) = outpost_protocol::rollout::wave_of(&r.waves, &r.id, &d.device_id) {
            per_wave[w] += 1;
        }
    }
    Ok(per_wave)
}

/// A rollout with its waves' counters and transition history, and what `detail` asks
/// for besides.
async fn view(s: &AppState, r: &RolloutRecord, detail: ViewDetail) -> Result<RolloutView, ApiError> {
    let (counters, events) = s.store.rollout_progress(&r.id).await?;
    let current = match &r.state {
        RolloutState::Running { wave, .. } | RolloutState::AwaitingApproval { wave, .. } | RolloutState::Paused { wave, .. } => Some(*wave),
        _ => None,
    };
    let planned = if detail.plan { Some(plan(s, r).await?) } else { None };
    let waves = r
        .waves
        .iter()
        .zip(&counters)
        .enumerate()
        .map(|(i, (w, c))| WaveView {
            wave: i,
            percent: w.percent,
            success_threshold: w.success_threshold,
            failure_threshold: w.failure_threshold,
            min_devices: w.min_devices,
            soak_secs: w.soak_secs,
            current: current == Some(i),
            assigned: c.assigned,
            installing: c.installing,
            healthy: c.healthy,
            rolled_back: c.rolled_back,
            attestation_failed: c.attestation_failed,
            planned: planned.as_ref().and_then(|p| p.get(i).copied()),
        })
        .collect();
    let devices = if detail.devices { Some(s.store.rollout_assignments(&r.id).await?) } else { None };
    Ok(RolloutView {
        id: r.id.clone(),
        name: r.name.clone(),
        hardware_class: r.hardware_class.clone(),
        labels: r.labels.clone(),
        release: r.release.clone(),
        gate: r.gate,
        state: r.state.clone(),
        state_name: r.state.name().to_owned(),
        created_by: r.created_by.clone(),
        created_at: r.created_at.clone(),
        waves,
        events,
        devices,
    })
}

async fn list(State(s): State<AppState>, auth: Auth) -> Result<Json<RolloutList>, ApiError> {
    auth.require_reader()?;
    let all = s.store.rollouts().await?;
    let mut rollouts = Vec::with_capacity(all.len());
    for r in &all {
        rollouts.push(view(&s, r, ViewDetail::default()).await?);
    }
    Ok(Json(RolloutList { rollouts }))
}

/// What a rollout's view shows besides its waves and events (`?devices=&plan=`).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct ViewDetail {
    /// Also list the assigned devices.
    #[serde(default)]
    devices: bool,
    /// Also count, per wave, the selected devices it would expose.
    #[serde(default)]
    plan: bool,
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_rollout", format!("no rollout {id:?}"))
}

async fn show(State(s): State<AppState>, auth: Auth, UrlPath(id): UrlPath<String>, Query(detail): Query<ViewDetail>) -> Result<Json<RolloutView>, ApiError> {
    auth.require_reader()?;
    let r = s.store.rollout(&id).await?.ok_or_else(|| not_found(&id))?;
    Ok(Json(view(&s, &r, detail).await?))
}

/// An action's optional body: empty, or the protocol's [`ActionRequest`].
fn act_body(bytes: &[u8]) -> Result<ActionRequest, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ActionRequest::default());
    }
    serde_json::from_slice(bytes).map_err(|e| format!("the body must be empty or {{\"roll_back\": true|false}}: {e}"))
}

/// The audit log's detail of a rollout action.
#[derive(Serialize)]
struct RolloutActed<'a> {
    rollout: &'a str,
    roll_back: bool,
    transition: &'a Option<Transition>,
}

async fn act(
    State(s): State<AppState>,
    auth: Auth,
    UrlPath((id, action)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<RolloutView>, ApiError> {
    auth.require(TokenRole::Operator)?;
    let roll_back = act_body(&body).map_err(|m| ApiError::unprocessable("invalid_body", m))?.roll_back.unwrap_or(false);
    let by = auth.0.name.clone();
    let event = match action.as_str() {
        "start" => Event::Start { by: by.clone() },
        "pause" => Event::Pause { by: by.clone() },
        "resume" => Event::Resume { by: by.clone() },
        "advance" => Event::Advance { by: by.clone() },
        "abort" => Event::Abort { by: by.clone(), roll_back },
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_action",
                format!("no rollout action {other:?} (start, pause, resume, advance, abort)"),
            ))
        }
    };
    if matches!(event, Event::Start { .. } | Event::Resume { .. } | Event::Advance { .. }) {
        let r = s.store.rollout(&id).await?.ok_or_else(|| not_found(&id))?;
        vulnerability_gate(&s, &r.release.path).await?;
    }
    let now = chrono::Utc::now().timestamp();
    match s.store.rollout_action(&id, event, now).await? {
        ActionOutcome::NotFound => Err(not_found(&id)),
        ActionOutcome::Refused(why) => Err(ApiError::conflict("invalid_transition", why)),
        ActionOutcome::Done(record, t) => {
            s.store.log(&by, &format!("rollout_{action}"), &RolloutActed { rollout: &id, roll_back, transition: &t }).await?;
            tracing::info!(rollout = %id, %action, by = %by, state = record.state.name(), "rollout action");
            Ok(Json(view(&s, &record, ViewDetail::default()).await?))
        }
    }
}

