//! The body of every refusal: `{"code": "...", "message": "..."}`.

use serde::{Deserialize, Serialize};

/// What the server answers with a non-2xx status: a stable machine-readable code and a
/// message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    /// The error body in `bytes`, or None when they are not one (a proxy's HTML page,
    /// a truncated answer).
    pub fn parse(bytes: &[u8]) -> Option<ErrorBody> {
        serde_json::from_slice(bytes).ok()
    }

    /// The message of the error body in `bytes`, else `fallback` of the raw bytes.
    pub fn message_or(bytes: &[u8], fallback: impl FnOnce(&[u8]) -> String) -> String {
        Self::parse(bytes).map(|b| b.message).unwrap_or_else(|| fallback(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_error_body_round_trips_and_falls_back_to_the_raw_text() {
        let b: ErrorBody = crate::api::round_trip(json!({"code": "unknown_rollout", "message": "no rollout \"x\""}));
        assert_eq!(b.code, "unknown_rollout");
        assert_eq!(ErrorBody::message_or(br#"{"code":"c","message":"m"}"#, |_| "raw".into()), "m");
        assert_eq!(ErrorBody::message_or(b"<html>bad gateway</html>", |b| String::from_utf8_lossy(b).into_owned()), "<html>bad gateway</html>");
        assert_eq!(ErrorBody::parse(br#"{"message":"no code"}"#), None);
    }
}
