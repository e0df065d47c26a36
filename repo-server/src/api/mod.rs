//! The HTTP API, the server's top layer: the router merge, the state handlers share,
//! extractors ([`extract`]), error answers ([`error`]) and one module per resource.
//! Handlers parse and answer; the domain modules (`fleet`, `director`, `repository`)
//! decide; `storage` persists. Nothing imports this module.

use std::sync::Arc;

use axum::extract::FromRef;
use axum::routing::get;
use axum::{Json, Router};

use crate::repository::Repository;
use crate::storage::Store;

pub mod audit;
pub mod dashboard;
pub mod devices;
pub mod error;
pub mod extract;
pub mod reports;
pub mod repository;
pub mod rollouts;
pub mod sbom;

pub use error::ApiError;
pub use extract::{ApiJson, Auth};

#[derive(Clone)]
pub struct AppState {
    pub repo: Arc<Repository>,
    pub store: Arc<Store>,
    pub max_upload_bytes: u64,
    pub nonce_lifetime: std::time::Duration,
    pub challenge_lifetime: std::time::Duration,
    /// CAs that EK certificates must chain to.
    pub ek_cas: Arc<crate::ekcert::EkCaStore>,
    /// Enrollment without an EK certificate chain (an explicit opt-in).
    pub accept_uncertified_eks: bool,
    /// Measurement policy per hardware class ("*": every other class).
    pub measurement: Arc<std::collections::BTreeMap<String, outpost_protocol::attest::MeasurementPolicy>>,
    /// The director key and root.
    pub director: Arc<crate::director::Director>,
}

impl FromRef<AppState> for Arc<Repository> {
    fn from_ref(s: &AppState) -> Self {
        s.repo.clone()
    }
}

/// The whole application router.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .merge(repository::routes())
        .merge(reports::routes())
        .merge(audit::routes())
        .merge(devices::routes())
        .merge(sbom::routes())
        .merge(rollouts::routes())
        .merge(dashboard::routes())
        .merge(crate::http::routes())
        .with_state(state)
}

async fn healthz() -> Json<outpost_protocol::api::repository::Health> {
    Json(outpost_protocol::api::repository::Health { status: "ok".to_owned() })
}
