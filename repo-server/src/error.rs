//! Server errors: `ServerError` for the library's operations, `ApiError` for HTTP
//! answers (a status, a stable code, and a message naming what is wrong).

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("configuration {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("database: {0}")]
    Db(Box<dyn std::error::Error + Send + Sync>),

    #[error("{context}: {source}")]
    Protocol {
        context: String,
        #[source]
        source: outpost_protocol::Error,
    },

    #[error("repository state: {0}")]
    State(String),
}

impl From<rusqlite::Error> for ServerError {
    fn from(e: rusqlite::Error) -> Self {
        ServerError::Db(Box::new(e))
    }
}

impl From<sqlx::Error> for ServerError {
    fn from(e: sqlx::Error) -> Self {
        ServerError::Db(Box::new(e))
    }
}

impl ServerError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ServerError::Io { op, path: path.into(), source }
    }
    pub(crate) fn proto(context: impl Into<String>, source: outpost_protocol::Error) -> Self {
        ServerError::Protocol { context: context.into(), source }
    }
}

/// An HTTP error answer: `{"code": "...", "message": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        // Internal details are logged once here and shown to clients generically.
        tracing::error!(error = %e, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error; see server logs")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({"code": self.code, "message": self.message}))).into_response()
    }
}
