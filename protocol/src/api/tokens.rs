//! `POST /api/v1/device-tokens`: a one-time enrollment token.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /api/v1/device-tokens` body: a token for one device of `hardware_class`,
/// valid for `ttl` (e.g. "24h", the default, at most 30 days).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub hardware_class: String,
    pub ttl: Option<String>,
    /// Labels the enrolled device gets (rollout selectors match them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A new enrollment token: it enrolls one device of `hardware_class`, once, before
/// `expires_at` (RFC 3339), and the device gets `labels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub token: String,
    pub hardware_class: String,
    pub labels: BTreeMap<String, String>,
    pub expires_at: String,
}

/// `GET /api/v1/whoami`: the caller's token name and role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami {
    pub name: String,
    /// "operator", "viewer" or "pipeline".
    pub role: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_token_answer_round_trips() {
        let t: EnrollmentToken = crate::api::round_trip(json!({
            "token": "ot_0123", "hardware_class": "gw", "labels": {"site": "lab"}, "expires_at": "2026-12-06T06:00:00+00:00"
        }));
        assert_eq!(t.labels.get("site").map(String::as_str), Some("lab"));
        let r: TokenRequest = crate::api::round_trip(json!({"hardware_class": "gw", "ttl": "15m", "labels": {}}));
        assert_eq!(r.ttl.as_deref(), Some("15m"));
        assert!(serde_json::from_value::<TokenRequest>(json!({"hardware_class": "gw", "tll": "1h"})).is_err());
        let w: Whoami = crate::api::round_trip(json!({"name": "ops", "role": "operator"}));
        assert_eq!(w.role, "operator");
    }
}
