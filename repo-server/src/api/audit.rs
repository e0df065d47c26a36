//! The audit log, for readers (`/api/v1/audit`) and pipelines (`/api/v1/log`).

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use outpost_protocol::api::reports::AuditLog;
use serde::Deserialize;

use super::{ApiError, AppState, Auth};
use crate::storage::TokenRole;

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/audit", get(audit)).route("/api/v1/log", get(log))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<u32>,
}

async fn audit(State(s): State<AppState>, auth: Auth, Query(q): Query<AuditQuery>) -> Result<Json<AuditLog>, ApiError> {
    auth.require_reader()?;
    Ok(Json(AuditLog { entries: s.store.recent_log(q.limit.unwrap_or(200).min(5000)).await? }))
}

async fn log(State(s): State<AppState>, auth: Auth) -> Result<Json<AuditLog>, ApiError> {
    auth.require_any(&[TokenRole::Operator, TokenRole::Viewer, TokenRole::Pipeline])?;
    Ok(Json(AuditLog { entries: s.store.recent_log(100).await? }))
}
