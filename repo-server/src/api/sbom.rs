//! SBOM search and the deny-list's affected releases and devices (see `fleet::sbom`).

use std::time::Instant;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::ApiError;
use super::{AppState, Auth};
use crate::fleet::sbom::{affected_entries, search as sbom_search};

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/sbom/search", get(search)).route("/api/v1/sbom/affected", get(affected))
}





/// The signed deny-list's `affected` entries, each with the releases that carry the
/// component and the devices running them.
async fn affected(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    auth.require_reader()?;
    let target = outpost_sbom::denylist::DENYLIST_TARGET;
    let Some((sha, found)) = affected_entries(&s.repo, &s.store).await? else {
        return Ok(Json(json!({"denylist": null, "entries": []})));
    };
    let entries: Vec<Value> = found.into_iter().map(|(e, f)| json!({"entry": e, "releases": f.releases, "devices": f.devices})).collect();
    Ok(Json(json!({"denylist": {"target": target, "sha256": sha}, "entries": entries})))
}

#[derive(Debug, Deserialize)]
struct SearchQuery {
    q: String,
}

async fn search(State(s): State<AppState>, auth: Auth, Query(q): Query<SearchQuery>) -> Result<Json<Value>, ApiError> {
    auth.require_reader()?;
    let query = outpost_sbom::query::Query::parse(&q.q).map_err(|e| ApiError::unprocessable("invalid_query", e.to_string()))?;
    let started = Instant::now();
    let result = sbom_search(&s.repo, &s.store, &query).await?;
    let took = started.elapsed();
    let releases: std::collections::BTreeSet<&str> = result.releases.iter().map(|r| r.target.as_str()).collect();
    Ok(Json(json!({
        "query": q.q,
        "release_count": releases.len(),
        "device_count": result.devices.len(),
        "took_ms": took.as_secs_f64() * 1000.0,
        "releases": result.releases,
        "devices": result.devices,
    })))
}
