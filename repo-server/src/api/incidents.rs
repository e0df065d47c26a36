//! Integrity incidents (protocol::incident): devices without identity post theirs here,
//! one at a time, unattested and bounded; enrolled devices send theirs inside attested
//! check-ins (fleet::checkin). Readers list them.

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use outpost_protocol::api::reports::{IncidentList, Recorded};
use outpost_protocol::incident::IntegrityIncident;
use serde::Deserialize;

use super::{ApiError, ApiJson, AppState, Auth};
use crate::storage::{ReportFilter, Taken};

/// An incident's JSON is under 1 KiB (its kernel line at most 512 bytes).
const MAX_BODY: usize = 4 << 10;

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/incidents", post(add_incident).get(list_incidents).layer(DefaultBodyLimit::max(MAX_BODY)))
}

/// An incident of a device that follows no director: recorded as unattested (nobody
/// can tell who sent it) and never acted on; a duplicate is accepted and stored once.
async fn add_incident(State(s): State<AppState>, ApiJson(incident): ApiJson<IntegrityIncident>) -> Result<Json<Recorded>, ApiError> {
    incident.validate().map_err(|m| ApiError::unprocessable("invalid_incident", m))?;
    match s.store.add_unattested_incident(&incident).await? {
        Taken::Enrolled => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "device_enrolled",
            format!("device {} is enrolled: its integrity incidents count only inside its attested check-ins", incident.device_id),
        )),
        taken => {
            tracing::warn!(device = %incident.device_id, kind = incident.kind.as_str(), dev = %incident.dev, block = incident.block, duplicate = taken == Taken::Duplicate, "integrity incident (unattested)");
            Ok(Json(Recorded { recorded: true }))
        }
    }
}

#[derive(Debug, Deserialize)]
struct IncidentQuery {
    device: Option<String>,
}

async fn list_incidents(State(s): State<AppState>, auth: Auth, Query(q): Query<IncidentQuery>) -> Result<Json<IncidentList>, ApiError> {
    auth.require_reader()?;
    Ok(Json(IncidentList { incidents: s.store.recent_incidents(q.device.as_deref(), 200, ReportFilter::All).await? }))
}
