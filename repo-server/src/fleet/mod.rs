//! The fleet: enrollment ([`enroll`]), attested check-ins ([`checkin`]) and the SBOM
//! index and deny-list views ([`sbom`]). The domain layer between the API handlers and
//! the store: handlers parse and answer, these decide, the store persists.

pub mod access;
pub mod checkin;
pub mod deviceca;
pub mod enroll;
pub mod sbom;

use std::collections::BTreeMap;

use crate::error::ServerError;
use crate::storage::{EnrollRefusal, NonceRefusal};

/// Why the fleet refuses a request: each kind has its answer in the API.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The request names something malformed (422).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The caller did not prove who it is (401).
    #[error("{message}")]
    Unauthenticated { code: &'static str, message: String },
    /// The caller may not do this (403).
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// No such device or challenge (404).
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// Too many outstanding requests (429).
    #[error("{message}")]
    TooMany { code: &'static str, message: String },
    /// An enrollment step the store refused.
    #[error("enrollment refused: {0:?}")]
    Enroll(EnrollRefusal),
    /// A check-in nonce the store refused.
    #[error("nonce refused: {0:?}")]
    Nonce(NonceRefusal),
    #[error(transparent)]
    Internal(#[from] ServerError),
}

impl Refusal {
    pub(crate) fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Refusal::Invalid { code, message: message.into() }
    }
    pub(crate) fn unauthenticated(code: &'static str, message: impl Into<String>) -> Self {
        Refusal::Unauthenticated { code, message: message.into() }
    }
    pub(crate) fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Refusal::Forbidden { code, message: message.into() }
    }
    pub(crate) fn unknown_device(id: &str) -> Self {
        Refusal::NotFound { code: "unknown_device", message: format!("no enrolled device {id:?}") }
    }
}

fn label_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
}

/// Labels: keys and values of 1-64 characters from [A-Za-z0-9-_.:/]; at most 32.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > 32 {
        return Err(format!("labels: at most 32, got {}", labels.len()));
    }
    for (k, v) in labels {
        if !label_ok(k) {
            return Err(format!("labels: key {k:?} must be 1-64 characters of letters, digits and -_.:/"));
        }
        if !label_ok(v) {
            return Err(format!("labels.{k}: value {v:?} must be 1-64 characters of letters, digits and -_.:/"));
        }
    }
    Ok(())
}

/// A Unix time (seconds) as RFC 3339.
pub(crate) fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).map(|t| t.to_rfc3339()).unwrap_or_default()
}

/// A Unix time in milliseconds as RFC 3339.
pub(crate) fn rfc3339_ms(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms).map(|t| t.to_rfc3339()).unwrap_or_default()
}
