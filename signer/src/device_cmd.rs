//! `outpost device ...`: one-time enrollment tokens and the fleet's attestation state,
//! through the server's operator API.

use clap::Subcommand;
use outpost_protocol::api::devices::{DeviceDetail, DeviceLabels, DeviceList, LabelsRequest, ListedDevice};
use outpost_protocol::api::tokens::{EnrollmentToken, TokenRequest};
use outpost_protocol::attest::DeviceHealth;

use crate::error::Result;
use crate::output::Output;
use crate::upload::ServerArgs;

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// One-time enrollment tokens (operator token needed).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled devices with version, health and attestation verdict.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// One device: its record, attestation history, the newest attested boot's
    /// measured events beside the golden values they matched, and install reports
    /// (--json: everything, every event).
    Show {
        device_id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Replace a device's labels (rollout selectors match them): KEY=VALUE ...
    Label {
        device_id: String,
        #[arg(value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// KEY=VALUE.
pub fn parse_label(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} must be KEY=VALUE")),
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token that enrolls one device of HARDWARE_CLASS, once, before it expires.
    Create {
        #[arg(long)]
        hardware_class: String,
        /// Lifetime (e.g. 15m, 24h; at most 30 days).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// A label the enrolled device gets (KEY=VALUE; repeat for more).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// A device id as one URL path segment.
pub(crate) fn enc(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn or_dash(v: Option<&str>) -> &str {
    v.unwrap_or("-")
}

/// The device table of `device list`.
fn device_table(list: &DeviceList) -> String {
    let mut lines = vec![format!("{:<36} {:<12} {:<10} {:<5} {:<10} {:<9} reason", "device", "class", "version", "slot", "health", "verdict")];
    for ListedDevice { device: d, vulnerable } in &list.devices {
        let mut verdict = if d.quarantined { "QUARANTINED".to_owned() } else { d.attestation.as_str().to_owned() };
        if !vulnerable.is_empty() {
            verdict.push_str(&format!(" VULNERABLE({})", vulnerable.join(",")));
        }
        lines.push(format!(
            "{:<36} {:<12} {:<10} {:<5} {:<10} {:<9} {}",
            d.device_id,
            d.hardware_class,
            or_dash(d.version.as_deref()),
            or_dash(d.slot.map(outpost_protocol::slot::Slot::as_str)),
            or_dash(d.health.map(DeviceHealth::as_str)),
            verdict,
            d.attestation_reason.as_deref().unwrap_or("")
        ));
    }
    lines.join("\n")
}

pub async fn run(cmd: DeviceCommand, out: &Output) -> Result<()> {
    match cmd {
        DeviceCommand::Token(TokenCommand::Create { hardware_class, ttl, labels, server }) => {
            let body = TokenRequest { hardware_class, ttl: Some(ttl), labels: labels.into_iter().collect() };
            let t: EnrollmentToken = server.require()?.post_json("enrollment token", "/api/v1/device-tokens", &body).await?;
            out.emit(&t, &format!("{}\n(enrolls one {} device; expires {})", t.token, t.hardware_class, t.expires_at));
        }
        DeviceCommand::List { server } => {
            let list: DeviceList = server.require()?.get_json("device list", "/api/v1/devices").await?;
            out.emit(&list, &device_table(&list));
        }
        DeviceCommand::Label { device_id, labels, server } => {
            let body = LabelsRequest { labels: labels.into_iter().collect() };
            let path = format!("/api/v1/devices/{}/labels", enc(&device_id));
            let v: DeviceLabels = server.require()?.send_json(reqwest::Method::PUT, "device labels", &path, &body).await?;
            out.emit(&v, &format!("{device_id}: {}", serde_json::to_string(&v.labels).unwrap_or_default()));
        }
        DeviceCommand::Show { device_id, server } => {
            let v: DeviceDetail = server.require()?.get_json("device", &format!("/api/v1/devices/{}", enc(&device_id))).await?;
            out.emit(&v, &crate::device_show::detail_text(&v));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_device_table_flags_quarantine_and_vulnerable_releases() -> Result<(), serde_json::Error> {
        let list: DeviceList = serde_json::from_value(json!({"devices": [{
            "device_id": "d1", "hardware_class": "gw", "has_ek_certificate": false, "enrolled_at": "t", "last_checkin_at": null,
            "slot": null, "version": null, "image_sha256": null, "sbom_sha256": null, "health": "rolled_back", "attestation": "failed",
            "attestation_reason": "unknown image", "attested_at": null, "quarantined": true, "labels": {}, "policy": null, "vulnerable": ["CVE-1"]
        }]}))?;
        let table = device_table(&list);
        let row = table.lines().nth(1).unwrap_or_default();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["d1", "gw", "-", "-", "rolled_back", "QUARANTINED", "VULNERABLE(CVE-1)", "unknown", "image"]);
        Ok(())
    }
}
