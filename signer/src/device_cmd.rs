//! `outpost device ...`: one-time enrollment tokens and the fleet's attestation state,
//! through the server's operator API.

use clap::Subcommand;
use serde_json::{json, Value};

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
    /// One device: its record, attestation history and install reports.
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

fn s(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned()
}

pub async fn run(cmd: DeviceCommand, out: &Output) -> Result<()> {
    match cmd {
        DeviceCommand::Token(TokenCommand::Create { hardware_class, ttl, labels, server }) => {
            let server = server.require()?;
            let labels: std::collections::BTreeMap<String, String> = labels.into_iter().collect();
            let v = server
                .post_json("enrollment token", "/api/v1/device-tokens", &json!({"hardware_class": hardware_class, "ttl": ttl, "labels": labels}))
                .await?;
            out.emit(&v, &format!("{}\n(enrolls one {} device; expires {})", s(&v, "token"), s(&v, "hardware_class"), s(&v, "expires_at")));
            Ok(())
        }
        DeviceCommand::List { server } => {
            let server = server.require()?;
            let v = server.get_json("device list", "/api/v1/devices").await?;
            let mut lines = vec![format!("{:<36} {:<12} {:<10} {:<5} {:<10} {:<9} reason", "device", "class", "version", "slot", "health", "verdict")];
            for d in v.get("devices").and_then(Value::as_array).into_iter().flatten() {
                let mut verdict = if d.get("quarantined").and_then(Value::as_bool) == Some(true) { "QUARANTINED".to_owned() } else { s(d, "attestation") };
                let vulnerable: Vec<&str> = d.get("vulnerable").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
                if !vulnerable.is_empty() {
                    verdict.push_str(&format!(" VULNERABLE({})", vulnerable.join(",")));
                }
                lines.push(format!(
                    "{:<36} {:<12} {:<10} {:<5} {:<10} {:<9} {}",
                    s(d, "device_id"),
                    s(d, "hardware_class"),
                    s(d, "version"),
                    s(d, "slot"),
                    s(d, "health"),
                    verdict,
                    d.get("attestation_reason").and_then(Value::as_str).unwrap_or("")
                ));
            }
            out.emit(&v, &lines.join("\n"));
            Ok(())
        }
        DeviceCommand::Label { device_id, labels, server } => {
            let server = server.require()?;
            let labels: std::collections::BTreeMap<String, String> = labels.into_iter().collect();
            let path = format!("/api/v1/devices/{}/labels", percent_encoding::utf8_percent_encode(&device_id, percent_encoding::NON_ALPHANUMERIC));
            let v = server.send_json(reqwest::Method::PUT, "device labels", &path, &json!({"labels": labels})).await?;
            out.emit(&v, &format!("{device_id}: {}", v.get("labels").map(Value::to_string).unwrap_or_default()));
            Ok(())
        }
        DeviceCommand::Show { device_id, server } => {
            let server = server.require()?;
            let path = format!("/api/v1/devices/{}", percent_encoding::utf8_percent_encode(&device_id, percent_encoding::NON_ALPHANUMERIC));
            let v = server.get_json("device", &path).await?;
            let human = serde_json::to_string_pretty(&v).unwrap_or_default();
            out.emit(&v, &human);
            Ok(())
        }
    }
}
