//! SBOM search and the deny-list's affected releases and devices (see `fleet::sbom`).

use std::time::Instant;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use outpost_protocol::api::sbom::{AffectedAnswer, SearchAnswer};
use serde::Deserialize;

use super::ApiError;
use super::{AppState, Auth};
use crate::fleet::sbom::{affected_answer, search as sbom_search};

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/sbom/search", get(search)).route("/api/v1/sbom/affected", get(affected))
}

/// The signed deny-list's `affected` entries, each with the releases that carry the
/// component and the devices running them.
async fn affected(State(s): State<AppState>, auth: Auth) -> Result<Json<AffectedAnswer>, ApiError> {
    auth.require_reader()?;
    Ok(Json(affected_answer(&s.repo, &s.store).await?))
}

#[derive(Debug, Deserialize)]
struct SearchQuery {
    q: String,
}

async fn search(State(s): State<AppState>, auth: Auth, Query(q): Query<SearchQuery>) -> Result<Json<SearchAnswer>, ApiError> {
    auth.require_reader()?;
    let query = outpost_sbom::query::Query::parse(&q.q).map_err(|e| ApiError::unprocessable("invalid_query", e.to_string()))?;
    let started = Instant::now();
    let result = sbom_search(&s.repo, &s.store, &query).await?;
    let took = started.elapsed();
    let release_count = result.releases.iter().map(|r| r.target.as_str()).collect::<std::collections::BTreeSet<&str>>().len();
    Ok(Json(SearchAnswer {
        query: q.q,
        release_count,
        device_count: result.devices.len(),
        took_ms: took.as_secs_f64() * 1000.0,
        releases: result.releases,
        devices: result.devices,
    }))
}
