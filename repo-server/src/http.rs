//! HTTP surface: the static TUF repository (metadata, targets with Range), the
//! pipeline API, and `/healthz`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Query, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::error::{ApiError, ServerError};
use crate::repository::{PublishError, Repository};
use crate::storage::{Principal, Store, TokenRole};

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

/// The whole application router.
pub fn app(state: AppState) -> Router {
    let metadata = Router::new()
        .route("/metadata/{*name}", get(metadata_file))
        .layer(middleware::from_fn(metadata_cache_headers));
    let targets = Router::new().route("/targets/{*path}", get(target_file));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(repository_api())
        .merge(crate::devices::api())
        .merge(crate::sbomindex::api())
        .merge(crate::rollouts::api())
        .merge(crate::dashboard::api())
        .merge(metadata)
        .merge(targets)
        .with_state(state)
}

fn repository_api() -> Router<AppState> {
    Router::new()
        .route("/api/v1/repository", get(status))
        .route("/api/v1/targets", post(upload_target).layer(DefaultBodyLimit::disable()))
        .route("/api/v1/publish", post(publish).layer(DefaultBodyLimit::max(256 << 20)))
        .route("/api/v1/log", get(log))
        .route("/api/v1/reports", post(add_report).get(list_reports).layer(DefaultBodyLimit::max(64 << 10)))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Unversioned metadata (timestamp.json, root.json...) must be revalidated; versioned
/// files never change.
async fn metadata_cache_headers(req: Request, next: Next) -> Response {
    let versioned = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .is_some_and(|name| name.split('.').next().is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())));
    let mut resp = next.run(req).await;
    let value = if versioned { crate::targetfiles::IMMUTABLE } else { "no-cache" };
    if resp.status().is_success() {
        resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(value));
    }
    resp
}

/// A metadata file. Clients URL-quote role names (`3.rpi4%20boards.json`, TUF 5.6.7.2),
/// and the repository stores each file under its quoted name (a role name may hold `/`
/// or anything else a file name cannot), so the path is decoded (by `Path`) and quoted
/// again into the one flat file name it stands for. Serving the directory as it is
/// would decode the URL and look for `3.rpi4 boards.json`: every role whose name needs
/// quoting was a 404 to every client (tests/tough_interop.rs found it).
async fn metadata_file(State(s): State<AppState>, axum::extract::Path(name): axum::extract::Path<String>, req: Request) -> Response {
    let file = outpost_protocol::tuf::quote_role(&name);
    if file.is_empty() || file == "." || file == ".." {
        return axum::response::IntoResponse::into_response(axum::http::StatusCode::NOT_FOUND);
    }
    match ServeFile::new(s.repo.metadata_dir().join(file)).oneshot(req).await {
        Ok(resp) => resp.map(Body::new),
        Err(never) => match never {},
    }
}

/// Target files (see [`crate::targetfiles`]); `get` answers `HEAD` too.
async fn target_file(
    State(s): State<AppState>,
    method: axum::http::Method,
    headers: axum::http::HeaderMap,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    crate::targetfiles::serve(s.repo.targets_dir().to_owned(), path, method, headers).await
}

/// A bearer token's principal.
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> header"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("Authorization header must be 'Bearer <token>'"))?;
        match state.store.authenticate(token.trim()).await? {
            Some(p) => Ok(Auth(p)),
            None => Err(ApiError::unauthorized("unknown API token")),
        }
    }
}

impl Auth {
    pub(crate) fn require(&self, role: TokenRole) -> Result<(), ApiError> {
        self.require_any(&[role])
    }

    /// Passes when the token has one of `roles`.
    pub(crate) fn require_any(&self, roles: &[TokenRole]) -> Result<(), ApiError> {
        if roles.contains(&self.0.role) {
            Ok(())
        } else {
            let want: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Err(ApiError::forbidden(format!("this needs a {} token; {:?} is a {} token", want.join(" or "), self.0.name, self.0.role.as_str())))
        }
    }

    /// Reading fleet state (devices, rollouts, audit, SBOM search): operators and viewers.
    pub(crate) fn require_reader(&self) -> Result<(), ApiError> {
        self.require_any(&[TokenRole::Operator, TokenRole::Viewer])
    }
}

/// JSON body extractor that answers malformed bodies in the API's error format.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(ApiError::new(rejection.status(), "invalid_body", rejection.body_text())),
        }
    }
}

async fn status(State(s): State<AppState>, _auth: Auth) -> Json<Value> {
    Json(serde_json::to_value(s.repo.status().await).unwrap_or(Value::Null))
}

async fn log(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    auth.require_any(&[TokenRole::Operator, TokenRole::Viewer, TokenRole::Pipeline])?;
    Ok(Json(json!({"entries": s.store.recent_log(100).await?})))
}

/// A device's install outcome. Devices have no credentials until TPM enrollment
/// exists, so this accepts reports without a token; they are validated strictly
/// and only recorded, never acted on.
/// Install outcomes of devices that follow no director (no identity, so nobody can
/// tell who sent them): recorded as unattested and bounded. An enrolled device's
/// outcomes come only inside its attested check-ins.
async fn add_report(State(s): State<AppState>, ApiJson(report): ApiJson<crate::storage::InstallReport>) -> Result<Json<Value>, ApiError> {
    report.validate().map_err(|m| ApiError::unprocessable("invalid_report", m))?;
    if !s.store.add_unattested_report(&report).await? {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "device_enrolled",
            format!("device {} is enrolled: its install outcomes count only inside its attested check-ins", report.device_id),
        ));
    }
    tracing::info!(device = %report.device_id, version = %report.version, outcome = report.outcome.as_str(), reason = report.reason.as_deref().unwrap_or(""), "install report");
    Ok(Json(json!({"recorded": true})))
}

#[derive(Debug, Deserialize)]
struct ReportQuery {
    device: Option<String>,
}

async fn list_reports(State(s): State<AppState>, auth: Auth, Query(q): Query<ReportQuery>) -> Result<Json<Value>, ApiError> {
    auth.require_reader()?;
    Ok(Json(json!({"reports": s.store.recent_reports(q.device.as_deref(), 200, false).await?})))
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    path: Option<String>,
}

/// Streams one target file into staging, hashing as it arrives. The file becomes
/// visible only when signed metadata naming its sha256 is published.
async fn upload_target(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    auth.require(TokenRole::Pipeline)?;
    let dir = s.repo.staging_dir().to_owned();
    let mut rnd = [0u8; 8];
    getrandom::getrandom(&mut rnd).map_err(|e| ServerError::State(e.to_string()))?;
    let tmp = dir.join(format!("upload-{}.part", hex::encode(rnd)));
    let result = async {
        let file = tokio::fs::File::create(&tmp).await.map_err(|e| ServerError::io("create", &tmp, e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut length: u64 = 0;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request("upload_interrupted", format!("upload body broke off after {length} bytes: {e}")))?;
            length += chunk.len() as u64;
            if length > s.max_upload_bytes {
                return Err(ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("target is larger than max_upload_bytes ({})", s.max_upload_bytes),
                ));
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(|e| ServerError::io("write", &tmp, e))?;
        }
        out.flush().await.map_err(|e| ServerError::io("write", &tmp, e))?;
        out.get_ref().sync_all().await.map_err(|e| ServerError::io("fsync", &tmp, e))?;
        let sha256 = hex::encode(hasher.finalize());
        let dest = dir.join(&sha256);
        tokio::fs::rename(&tmp, &dest).await.map_err(|e| ServerError::io("rename", &dest, e))?;
        Ok::<_, ApiError>((sha256, length))
    }
    .await;
    match result {
        Ok((sha256, length)) => {
            tracing::info!(path = q.path.as_deref().unwrap_or(""), %sha256, length, by = %auth.0.name, "target uploaded to staging");
            Ok(Json(json!({"sha256": sha256, "length": length})))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    #[serde(default)]
    roots: Vec<Value>,
    #[serde(default)]
    roles: BTreeMap<String, Value>,
}

async fn publish(State(s): State<AppState>, auth: Auth, ApiJson(body): ApiJson<PublishBody>) -> Result<Json<Value>, ApiError> {
    auth.require(TokenRole::Pipeline)?;
    match s.repo.publish(&body.roots, &body.roles, chrono::Utc::now()).await {
        Ok(outcome) => {
            let v = serde_json::to_value(&outcome).unwrap_or(Value::Null);
            s.store.log(&auth.0.name, "publish", &v).await?;
            crate::sbomindex::index_release_sboms(&s.repo, &s.store).await;
            tracing::info!(by = %auth.0.name, roles = ?outcome.roles, snapshot = outcome.snapshot_version, "published");
            Ok(Json(v))
        }
        Err(PublishError::Refused { code, message }) => {
            tracing::warn!(by = %auth.0.name, code, %message, "publish refused");
            Err(ApiError::unprocessable(code, message))
        }
        Err(PublishError::Internal(e)) => Err(e.into()),
    }
}
