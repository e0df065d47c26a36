//! The web dashboard: one static page (HTML, CSS, JS compiled into the binary) that
//! reads the admin API with the operator's or viewer's token, and `whoami` for it.

use axum::extract::State;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use outpost_protocol::api::tokens::Whoami;

use super::ApiError;
use super::{AppState, Auth};

const INDEX: &str = include_str!("../dashboard/index.html");
const APP_JS: &str = include_str!("../dashboard/app.js");
const STYLE: &str = include_str!("../dashboard/style.css");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard", get(|| async { page("text/html; charset=utf-8", INDEX) }))
        .route("/dashboard/app.js", get(|| async { page("text/javascript; charset=utf-8", APP_JS) }))
        .route("/dashboard/style.css", get(|| async { page("text/css; charset=utf-8", STYLE) }))
        .route("/api/v1/whoami", get(whoami))
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Only this server's own files run; nothing is framed or cached across versions.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The token's name and role (the dashboard shows operator actions only to operators).
async fn whoami(State(_s): State<AppState>, auth: Auth) -> Result<Json<Whoami>, ApiError> {
    Ok(Json(Whoami { name: auth.0.name, role: auth.0.role.as_str().to_owned() }))
}
