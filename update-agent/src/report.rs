//! Install reports for devices that do not attest: POSTed to the server one by one,
//! in order. (Enrolled devices send them inside attested check-ins instead.)

use std::time::Duration;

use outpost_protocol::report::InstallReport;

/// Sends `reports` in order to `server_url`'s report endpoint and returns how many the
/// server accepted: sending stops at the first refusal or failure, so what was not
/// accepted stays queued with the caller.
pub async fn send(http: &reqwest::Client, server_url: &str, timeout: Duration, reports: &[InstallReport]) -> usize {
    let url = format!("{server_url}/api/v1/reports");
    let mut sent = 0;
    for report in reports {
        let res = tokio::time::timeout(timeout, http.post(&url).json(report).send()).await;
        match res {
            Ok(Ok(r)) if r.status().is_success() => sent += 1,
            Ok(Ok(r)) => {
                tracing::warn!(status = %r.status(), "server refused install report");
                break;
            }
            _ => {
                tracing::warn!("server unreachable; install reports stay queued");
                break;
            }
        }
    }
    sent
}
