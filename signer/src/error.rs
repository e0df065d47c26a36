//! The signer's one error type: each variant names the operation and what it was on.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SignerError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Protocol {
        context: String,
        #[source]
        source: outpost_protocol::Error,
    },

    #[error("role {role} needs {threshold} signature(s) from its keys {keyids:?}; the keys given provide {have}. Pass more of its private keys with --key/--sign-key")]
    NotEnoughKeys { role: String, threshold: u64, have: usize, keyids: Vec<String> },

    #[error("repository {dir}: {reason}")]
    Repo { dir: PathBuf, reason: String },

    #[error("server refused {what}: HTTP {status}: {message}")]
    Server { what: String, status: u16, message: String },

    #[error("{url}: {reason}")]
    Http { url: String, reason: String },

    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = SignerError> = std::result::Result<T, E>;

impl SignerError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SignerError::Io { op, path: path.into(), source }
    }

    pub(crate) fn proto(context: impl Into<String>, source: outpost_protocol::Error) -> Self {
        SignerError::Protocol { context: context.into(), source }
    }
}
