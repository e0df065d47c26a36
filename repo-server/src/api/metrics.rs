//! `GET /metrics`: the fleet's certificate horizons in Prometheus' text format, for
//! operators (and a scraper with a viewer token) to alert before devices' access
//! lapses: when the device CA's own certificate expires (every device certificate
//! stops chaining then), when each device's newest unrevoked client certificate
//! expires, and how many revoked ones the revocation list names. A device renews at
//! each attested check-in, so a horizon that comes within one check-in interval of now
//! means the device stopped checking in or stopped being renewed (quarantine, revoked
//! credentials, a failing TPM).

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;

use super::{ApiError, AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// Prometheus' text exposition format, version 0.0.4.
const CONTENT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(s): State<AppState>, auth: Auth) -> Result<([(axum::http::header::HeaderName, &'static str); 1], String), ApiError> {
    auth.require_reader()?;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(Option<&str>, i64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (device, value) in samples {
            match device {
                Some(id) => {
                    let _ = writeln!(out, "{name}{{device_id=\"{}\"}} {value}", label_value(id));
                }
                None => {
                    let _ = writeln!(out, "{name} {value}");
                }
            }
        }
    };
    if let Some(ca) = s.device_ca.as_deref() {
        let now = chrono::Utc::now().timestamp();
        gauge(
            "outpost_device_ca_certificate_expiry_timestamp_seconds",
            "When the device CA's certificate expires (Unix seconds); every device certificate stops chaining then.",
            &[(None, ca.ca_not_after())],
        );
        gauge(
            "outpost_device_certificate_lifetime_seconds",
            "How long the device CA's client certificates last ([device_ca] lifetime).",
            &[(None, i64::try_from(ca.settings.lifetime.as_secs()).unwrap_or(i64::MAX))],
        );
        let revoked = s.store.revoked_certificates(now).await?.len();
        gauge(
            "outpost_device_certificates_revoked",
            "Revoked client certificates not expired yet (the serials the revocation list names).",
            &[(None, i64::try_from(revoked).unwrap_or(i64::MAX))],
        );
    }
    let horizons = s.store.certificate_horizons().await?;
    let samples: Vec<(Option<&str>, i64)> = horizons.iter().map(|(id, at)| (Some(id.as_str()), *at)).collect();
    gauge(
        "outpost_device_client_certificate_expiry_timestamp_seconds",
        "When each enrolled device's newest unrevoked client certificate expires (Unix seconds; in the past once it lapsed).",
        &samples,
    );
    Ok(([(CONTENT_TYPE, CONTENT)], out))
}

/// A label value as the text format writes it: backslash, double quote and line feed
/// escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::label_value;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("dev-1"), "dev-1");
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
