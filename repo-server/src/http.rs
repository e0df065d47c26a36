//! The static TUF repository over HTTP: metadata files and target files (with
//! Range). Any router state that gives the repository serves them.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRef, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::repository::Repository;

/// The routes of the static repository.
pub fn routes<S>() -> Router<S>
where
    Arc<Repository>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    let metadata = Router::new()
        .route("/metadata/{*name}", get(metadata_file))
        .layer(middleware::from_fn(metadata_cache_headers));
    let targets = Router::new().route("/targets/{*path}", get(target_file));
    metadata.merge(targets)
}

/// Unversioned metadata (timestamp.json, root.json...) must be revalidated; versioned
/// files never change.
async fn metadata_cache_headers(req: Request, next: Next) -> Response {
    let name = req.uri().path().rsplit('/').next().unwrap_or_default();
    let value = match crate::repository::journal::MetadataName::of(name) {
        crate::repository::journal::MetadataName::Versioned => crate::targetfiles::IMMUTABLE,
        crate::repository::journal::MetadataName::Current => "no-cache",
    };
    let mut resp = next.run(req).await;
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
async fn metadata_file(State(repo): State<Arc<Repository>>, axum::extract::Path(name): axum::extract::Path<String>, req: Request) -> Response {
    let file = outpost_protocol::tuf::quote_role(&name);
    if file.is_empty() || file == "." || file == ".." {
        return axum::response::IntoResponse::into_response(axum::http::StatusCode::NOT_FOUND);
    }
    match ServeFile::new(repo.metadata_dir().join(file)).oneshot(req).await {
        Ok(resp) => resp.map(Body::new),
        Err(never) => match never {},
    }
}

/// Target files (see [`crate::targetfiles`]); `get` answers `HEAD` too.
async fn target_file(
    State(repo): State<Arc<Repository>>,
    method: axum::http::Method,
    headers: axum::http::HeaderMap,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    crate::targetfiles::serve(repo.targets_dir().to_owned(), path, method, headers).await
}

