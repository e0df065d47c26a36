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
pub mod incidents;
pub mod metrics;
pub mod reports;
pub mod repository;
pub mod rollouts;
pub mod sbom;

pub use error::ApiError;
pub use extract::{ApiJson, Auth, ClientCert};

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
    /// The device CA, when `[device_ca]` is configured.
    pub device_ca: Option<Arc<crate::fleet::deviceca::DeviceCa>>,
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
        .merge(incidents::routes())
        .merge(audit::routes())
        .merge(devices::routes())
        .merge(sbom::routes())
        .merge(rollouts::routes())
        .merge(dashboard::routes())
        .merge(metrics::routes())
        .merge(crate::http::routes().route_layer(axum::middleware::from_fn_with_state(state.clone(), targets_access)))
        .with_state(state)
        .layer(axum::middleware::from_fn(run_to_the_end))
}

/// Runs each request as a task of its own, which the connection waits for. hyper drops
/// a request's future when its client goes away; a handler dropped between a commit
/// and what goes with it (the audit entry, the SBOM index of a publish) would leave
/// the change unrecorded. A request the server began now runs to its end.
async fn run_to_the_end(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::spawn(next.run(req)).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::error!(error = %e, "a request's task failed");
            ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request failed on the server").into_response()
        }
    }
}

/// The repository's target files for devices with a certificate, or callers with an
/// API token, when the device CA says so (`targets_require_client_certificate`).
async fn targets_access(
    axum::extract::State(s): axum::extract::State<AppState>,
    caller: ClientCert,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(ca) = s.device_ca.as_deref().filter(|ca| ca.settings.targets_require_client_certificate) else {
        return next.run(req).await;
    };
    // Metadata and the director's root (a target signed by the image repository)
    // stay public: an enrolling device, without a certificate yet, refreshes them.
    // Release files are what this closes.
    let path = req.uri().path();
    let director_root = path.strip_prefix("/targets/director/").is_some_and(|f| !f.contains('/') && f.ends_with(".root.json"));
    if !path.starts_with("/targets/") || director_root {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let token = <Auth as axum::extract::FromRequestParts<AppState>>::from_request_parts(&mut parts, &s).await;
    if token.is_err() {
        let now = chrono::Utc::now().timestamp();
        if let Err(refusal) = crate::fleet::access::check_target_access(ca, &s.store, caller.0.as_deref(), now).await {
            return ApiError::from(refusal).into_response();
        }
    }
    next.run(axum::extract::Request::from_parts(parts, body)).await
}

async fn healthz() -> Json<outpost_protocol::api::repository::Health> {
    Json(outpost_protocol::api::repository::Health { status: "ok".to_owned() })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use axum::routing::post;
    use tower::ServiceExt;

    use super::*;

    /// A client that goes away once its request has begun does not cut the handler
    /// short (without the layer, dropping the request's future drops the handler).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_runs_to_its_end_when_the_client_goes_away() {
        let finished = Arc::new(AtomicBool::new(false));
        let (began, began_rx) = tokio::sync::oneshot::channel::<()>();
        let began = Arc::new(std::sync::Mutex::new(Some(began)));
        let done = finished.clone();
        let handler = move || async move {
            if let Some(b) = began.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = b.send(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            done.store(true, Ordering::SeqCst);
        };
        let app = Router::new().route("/change", post(handler)).layer(axum::middleware::from_fn(run_to_the_end));
        let request = axum::http::Request::post("/change").body(axum::body::Body::empty()).unwrap_or_else(|e| panic!("{e}"));
        let answer = app.oneshot(request);
        tokio::select! {
            _ = answer => panic!("the handler answered before it began"),
            _ = began_rx => {}
        }
        // The request's future is dropped here, as hyper drops it for a closed connection.
        for _ in 0..50 {
            if finished.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the handler was cut short when its client went away");
    }
}
