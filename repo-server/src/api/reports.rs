//! Install reports: devices that follow no director post theirs unattested; readers
//! list them.

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::routing::post;
use axum::{Json, Router};
use outpost_protocol::api::reports::{Recorded, ReportList};
use serde::Deserialize;

use super::{ApiError, ApiJson, AppState, Auth};
use crate::storage::ReportFilter;

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/reports", post(add_report).get(list_reports).layer(DefaultBodyLimit::max(64 << 10)))
}

/// A device's install outcome. Devices have no credentials until TPM enrollment
/// exists, so this accepts reports without a token; they are validated strictly
/// and only recorded, never acted on.
/// Install outcomes of devices that follow no director (no identity, so nobody can
/// tell who sent them): recorded as unattested and bounded. An enrolled device's
/// outcomes come only inside its attested check-ins.
async fn add_report(State(s): State<AppState>, ApiJson(report): ApiJson<crate::storage::InstallReport>) -> Result<Json<Recorded>, ApiError> {
    report.validate().map_err(|m| ApiError::unprocessable("invalid_report", m))?;
    if !s.store.add_unattested_report(&report).await? {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "device_enrolled",
            format!("device {} is enrolled: its install outcomes count only inside its attested check-ins", report.device_id),
        ));
    }
    tracing::info!(device = %report.device_id, version = %report.version, outcome = report.outcome.as_str(), reason = report.reason.as_deref().unwrap_or(""), "install report");
    Ok(Json(Recorded { recorded: true }))
}

#[derive(Debug, Deserialize)]
struct ReportQuery {
    device: Option<String>,
}

async fn list_reports(State(s): State<AppState>, auth: Auth, Query(q): Query<ReportQuery>) -> Result<Json<ReportList>, ApiError> {
    auth.require_reader()?;
    Ok(Json(ReportList { reports: s.store.recent_reports(q.device.as_deref(), 200, ReportFilter::All).await? }))
}
