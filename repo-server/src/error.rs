//! Server errors: `ServerError` for the library's operations (HTTP answers are
//! `api::ApiError`).

use std::path::PathBuf;

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

    #[error("TLS: {0}")]
    Tls(String),
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
