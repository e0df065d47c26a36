//! Health checks after a trial boot: a command with a timeout, an HTTP GET expecting
//! 2xx, or "this service stays up N seconds". Checks come from the agent's config and
//! from the release's signed metadata; all must pass before the trial deadline.

use std::time::Duration;

use outpost_protocol::release::HealthCheck;
use outpost_protocol::slot::Slot;
use tokio::process::Command;

use crate::error::{AgentError, Result};

/// Facts about the trial boot, exported to check commands as environment variables
/// (`OUTPOST_SLOT`, `OUTPOST_SLOT_PATH`, `OUTPOST_VERSION`, `OUTPOST_TARGET`).
#[derive(Debug, Clone)]
pub struct BootFacts {
    pub slot: Slot,
    pub slot_path: String,
    pub version: String,
    pub target: String,
}

fn name(check: &HealthCheck) -> String {
    match check {
        HealthCheck::Command { run, .. } => format!("command `{run}`"),
        HealthCheck::Http { url, .. } => format!("http {url}"),
        HealthCheck::StaysUp { run, seconds } => format!("`{run}` stays up {seconds}s"),
    }
}

fn command(run: &str, facts: &BootFacts) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(run)
        .env("OUTPOST_SLOT", facts.slot.as_str())
        .env("OUTPOST_SLOT_PATH", &facts.slot_path)
        .env("OUTPOST_VERSION", &facts.version)
        .env("OUTPOST_TARGET", &facts.target)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

async fn run_one(check: &HealthCheck, facts: &BootFacts, http: &reqwest::Client) -> Result<()> {
    let fail = |reason: String| AgentError::Health { check: name(check), reason };
    match check {
        HealthCheck::Command { run, timeout_secs } => {
            let child = command(run, facts).output();
            let out = tokio::time::timeout(Duration::from_secs(*timeout_secs), child)
                .await
                .map_err(|_| fail(format!("no exit within {timeout_secs}s")))?
                .map_err(|e| fail(format!("cannot start: {e}")))?;
            if out.status.success() {
                Ok(())
            } else {
                let stderr = String::from_utf8_lossy(&out.stderr);
                Err(fail(format!("{} {}", out.status, stderr.trim())))
            }
        }
        HealthCheck::Http { url, timeout_secs } => {
            let resp = tokio::time::timeout(Duration::from_secs(*timeout_secs), http.get(url).send())
                .await
                .map_err(|_| fail(format!("no answer within {timeout_secs}s")))?
                .map_err(|e| fail(outpost_protocol::display_chain(&e)))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(fail(format!("HTTP {}", resp.status())))
            }
        }
        HealthCheck::StaysUp { run, seconds } => {
            let mut child = command(run, facts).spawn().map_err(|e| fail(format!("cannot start: {e}")))?;
            match tokio::time::timeout(Duration::from_secs(*seconds), child.wait()).await {
                Err(_) => {
                    let _ = child.kill().await;
                    Ok(())
                }
                Ok(status) => Err(fail(format!(
                    "exited after less than {seconds}s ({})",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
                ))),
            }
        }
    }
}

/// Runs every check in order; the first failure, or the deadline, decides.
pub async fn run_all(checks: &[HealthCheck], facts: &BootFacts, deadline: Duration) -> Result<()> {
    // Its own client, not the agent's shared one: these checks call services on the
    // device itself (the release's own health endpoints) under the check's timeout,
    // not the server under the retrieval limits (connect timeout = stall limit) the
    // shared client is built with; and they run in the trial boot, before anything
    // talks to the server.
    // The system's trust store (on a device without one, plain-HTTP endpoints only).
    let http = crate::tls::client(reqwest::Client::builder(), None, None)
        .map_err(|e| AgentError::Health { check: "http client".into(), reason: e.to_string() })?;
    let all = async {
        for check in checks {
            run_one(check, facts, &http).await?;
            tracing::info!(check = %name(check), "health check passed");
        }
        Ok(())
    };
    tokio::time::timeout(deadline, all).await.map_err(|_| AgentError::Health {
        check: "trial deadline".into(),
        reason: format!("health checks did not all pass within {deadline:?}"),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> BootFacts {
        BootFacts { slot: Slot::B, slot_path: "/nonexistent".into(), version: "2.0.0".into(), target: "t".into() }
    }

    #[tokio::test]
    async fn command_checks_pass_fail_and_see_the_boot_facts() {
        let ok = HealthCheck::Command { run: "test \"$OUTPOST_VERSION\" = 2.0.0 && test \"$OUTPOST_SLOT\" = B".into(), timeout_secs: 5 };
        run_all(&[ok], &facts(), Duration::from_secs(10)).await.unwrap();
        let bad = HealthCheck::Command { run: "echo broken >&2; exit 3".into(), timeout_secs: 5 };
        let err = run_all(&[bad], &facts(), Duration::from_secs(10)).await.unwrap_err().to_string();
        assert!(err.contains("broken") && err.contains("exit status: 3"), "{err}");
    }

    #[tokio::test]
    async fn timeouts_and_stays_up() {
        let slow = HealthCheck::Command { run: "sleep 5".into(), timeout_secs: 1 };
        assert!(run_all(&[slow], &facts(), Duration::from_secs(10)).await.is_err());
        let up = HealthCheck::StaysUp { run: "sleep 5".into(), seconds: 1 };
        run_all(&[up], &facts(), Duration::from_secs(10)).await.unwrap();
        let dies = HealthCheck::StaysUp { run: "exit 0".into(), seconds: 2 };
        assert!(run_all(&[dies], &facts(), Duration::from_secs(10)).await.is_err());
        let deadline = HealthCheck::StaysUp { run: "sleep 5".into(), seconds: 3 };
        let err = run_all(&[deadline], &facts(), Duration::from_secs(1)).await.unwrap_err().to_string();
        assert!(err.contains("trial deadline"), "{err}");
    }
}
