//! `outpost rollout ...`: canary rollouts through the server's operator API, with a
//! live view of the waves (`status --watch`).

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::device_cmd::parse_label;
use crate::error::{Result, SignerError};
use crate::output::Output;
use crate::upload::ServerArgs;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GateArg {
    /// A wave that passes its thresholds after its soak time advances by itself.
    Auto,
    /// A passing wave waits for `outpost rollout advance`.
    Manual,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Define a rollout of a signed release (a draft until `start`, or pass --start).
    Create {
        /// Release version (a signed full-image firmware target of the class).
        #[arg(long)]
        version: String,
        #[arg(long)]
        hardware_class: String,
        /// Only devices with this label (KEY=VALUE; repeat: all must match).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Cumulative percentages of the selected fleet, increasing, the last at most 100.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 10.0, 50.0, 100.0])]
        waves: Vec<f64>,
        /// Fraction of a wave's devices that must be healthy for it to pass.
        #[arg(long, default_value_t = 0.95)]
        success_threshold: f64,
        /// Fraction of a wave's devices failing (rolled back, failed attestation) that
        /// pauses the rollout.
        #[arg(long, default_value_t = 0.05)]
        failure_threshold: f64,
        /// Healthy devices a wave needs before it may pass.
        #[arg(long, default_value_t = 1)]
        min_devices: u32,
        /// How long each wave runs before it may pass (e.g. 30m, 1h, 0s).
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        soak: Duration,
        #[arg(long, value_enum, default_value = "auto")]
        gate: GateArg,
        #[arg(long)]
        name: Option<String>,
        /// Start it right away.
        #[arg(long)]
        start: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Start a draft rollout: wave 0's devices get the release at their next check-in.
    Start {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Stop assigning devices (those already assigned keep their assignment).
    Pause {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Continue a paused rollout in the wave it paused in.
    Resume {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Open the next wave now (a manual gate, or overriding a pause).
    Advance {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Stop all new assignments for good; with --roll-back, devices the rollout reached
    /// are assigned their previous release back.
    Abort {
        id: String,
        #[arg(long)]
        roll_back: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Waves, counters and recent transitions; --watch refreshes until the rollout ends.
    Status {
        id: String,
        #[arg(long)]
        watch: bool,
        /// Refresh interval for --watch.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Also list each assigned device.
        #[arg(long)]
        devices: bool,
        /// Also show how many of the selected devices each wave would expose.
        #[arg(long)]
        plan: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// All rollouts, newest first.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn enc(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The state in words, with the reason for a pause.
fn state_line(r: &Value) -> String {
    let st = &r["state"];
    let name = s(r, "state_name");
    let waves = r.get("waves").and_then(Value::as_array).map(Vec::len).unwrap_or(0);
    match name {
        "running" | "awaiting_approval" | "paused" => {
            let wave = n(st, "wave");
            let mut line = format!("{name} in wave {wave} of {waves}");
            if name == "awaiting_approval" {
                line.push_str(" (passed; `outpost rollout advance` opens the next wave)");
            }
            if let Some(reason) = st.get("reason") {
                match s(reason, "kind") {
                    "failure_threshold" => line.push_str(&format!(
                        ": {} of {} devices failed in waves 0-{} (failure threshold {})",
                        n(reason, "failed"),
                        n(reason, "assigned"),
                        n(reason, "wave"),
                        reason.get("threshold").and_then(Value::as_f64).unwrap_or(0.0)
                    )),
                    "operator" => line.push_str(&format!(": paused by {}", s(reason, "by"))),
                    _ => {}
                }
            }
            line
        }
        "aborted" => format!("aborted by {}{}", s(st, "by"), if st.get("roll_back").and_then(Value::as_bool) == Some(true) { " (rolling back)" } else { "" }),
        other => other.to_owned(),
    }
}

/// The human view of a rollout.
pub fn render(r: &Value) -> String {
    let rel = &r["release"];
    let mut lines = vec![
        format!("rollout {} \"{}\": {}", s(r, "id"), s(r, "name"), state_line(r)),
        format!(
            "release {} ({})  class {}  labels {}  gate {}",
            s(rel, "version"),
            s(rel, "path"),
            s(r, "hardware_class"),
            r.get("labels").map(Value::to_string).unwrap_or_default(),
            s(r, "gate")
        ),
        format!("  {:<5} {:>7} {:>9} {:>11} {:>8} {:>12} {:>12}  gates", "wave", "percent", "assigned", "installing", "healthy", "rolled_back", "attest_fail"),
    ];
    lines[2].push_str("  (counts are cumulative: wave k includes waves 0..k)");
    for w in r.get("waves").and_then(Value::as_array).into_iter().flatten() {
        lines.push(format!(
            "{} {:<5} {:>6}% {:>9} {:>11} {:>8} {:>12} {:>12}  success>={} fail>={} min {} soak {}s",
            if w.get("current").and_then(Value::as_bool) == Some(true) { ">" } else { " " },
            n(w, "wave"),
            w.get("percent").and_then(Value::as_f64).unwrap_or(0.0),
            n(w, "assigned"),
            n(w, "installing"),
            n(w, "healthy"),
            n(w, "rolled_back"),
            n(w, "attestation_failed"),
            w.get("success_threshold").and_then(Value::as_f64).unwrap_or(0.0),
            w.get("failure_threshold").and_then(Value::as_f64).unwrap_or(0.0),
            n(w, "min_devices"),
            n(w, "soak_secs"),
        ));
        if let Some(p) = w.get("planned").and_then(Value::as_u64) {
            if let Some(last) = lines.last_mut() {
                last.push_str(&format!("  (would expose {p} selected device(s))"));
            }
        }
    }
    let events = r.get("events").and_then(Value::as_array).cloned().unwrap_or_default();
    if !events.is_empty() {
        lines.push("transitions:".into());
        for e in events.iter().rev().take(8).rev() {
            let cause = &e["cause"];
            let why = match s(cause, "kind") {
                "operator" => format!("{} by {}", s(cause, "action"), s(cause, "by")),
                "failure_threshold" => format!("failure threshold: {} of {} failed (wave {})", n(cause, "failed"), n(cause, "assigned"), n(cause, "wave")),
                "passed_after_soak" => format!("wave {} passed after its soak: {} of {} healthy", n(cause, "wave"), n(cause, "healthy"), n(cause, "assigned")),
                other => other.to_owned(),
            };
            lines.push(format!("  {}  {} -> {}  {}", s(e, "at"), s(e, "from"), s(e, "to"), why));
        }
    }
    if let Some(devices) = r.get("devices").and_then(Value::as_array) {
        lines.push(format!("devices ({}):", devices.len()));
        for d in devices {
            lines.push(format!("  {:<66} wave {:<2} {:<18} {}", s(d, "device_id"), n(d, "wave"), s(d, "status"), d.get("reason").and_then(Value::as_str).unwrap_or("")));
        }
    }
    lines.join("\n")
}

fn ended(r: &Value) -> bool {
    matches!(s(r, "state_name"), "completed" | "aborted")
}

pub async fn run(cmd: RolloutCommand, out: &Output) -> Result<()> {
    match cmd {
        RolloutCommand::Create {
            version,
            hardware_class,
            labels,
            waves,
            success_threshold,
            failure_threshold,
            min_devices,
            soak,
            gate,
            name,
            start,
            server,
        } => {
            let server = server.require()?;
            let plan: Vec<Value> = waves
                .iter()
                .map(|p| {
                    json!({"percent": p, "success_threshold": success_threshold, "failure_threshold": failure_threshold,
                           "min_devices": min_devices, "soak_secs": soak.as_secs()})
                })
                .collect();
            let labels: std::collections::BTreeMap<String, String> = labels.into_iter().collect();
            let mut body = json!({"version": version, "hardware_class": hardware_class, "labels": labels, "waves": plan,
                                  "gate": match gate { GateArg::Auto => "auto", GateArg::Manual => "manual" }});
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            let mut v = server.post_json("create rollout", "/api/v1/rollouts", &body).await?;
            if start {
                let id = s(&v, "id").to_owned();
                v = server.post_json("start rollout", &format!("/api/v1/rollouts/{}/start", enc(&id)), &json!({})).await?;
            }
            out.emit(&v, &render(&v));
            Ok(())
        }
        RolloutCommand::Start { id, server } => act(server, &id, "start", json!({}), out).await,
        RolloutCommand::Pause { id, server } => act(server, &id, "pause", json!({}), out).await,
        RolloutCommand::Resume { id, server } => act(server, &id, "resume", json!({}), out).await,
        RolloutCommand::Advance { id, server } => act(server, &id, "advance", json!({}), out).await,
        RolloutCommand::Abort { id, roll_back, server } => act(server, &id, "abort", json!({"roll_back": roll_back}), out).await,
        RolloutCommand::Status { id, watch, interval, devices, plan, server } => {
            let server = server.require()?;
            let path = format!("/api/v1/rollouts/{}?devices={devices}&plan={plan}", enc(&id));
            let tty = std::io::stdout().is_terminal() && !out.json;
            loop {
                let v = server.get_json("rollout status", &path).await?;
                if watch && out.json {
                    // One JSON document per refresh, one per line.
                    println!("{}", serde_json::to_string(&v).unwrap_or_default());
                } else if watch && tty {
                    print!("\x1b[2J\x1b[H{}\n\n(refreshing every {}; Ctrl-C to stop)\n", render(&v), humantime::format_duration(interval));
                } else {
                    out.emit(&v, &render(&v));
                }
                if !watch || ended(&v) {
                    return Ok(());
                }
                if !tty && !out.json {
                    println!();
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        RolloutCommand::List { server } => {
            let server = server.require()?;
            let v = server.get_json("rollout list", "/api/v1/rollouts").await?;
            let mut lines = vec![format!("{:<20} {:<10} {:<12} {:<40} name", "id", "version", "class", "state")];
            for r in v.get("rollouts").and_then(Value::as_array).into_iter().flatten() {
                lines.push(format!("{:<20} {:<10} {:<12} {:<40} {}", s(r, "id"), s(&r["release"], "version"), s(r, "hardware_class"), state_line(r), s(r, "name")));
            }
            out.emit(&v, &lines.join("\n"));
            Ok(())
        }
    }
}

async fn act(server: ServerArgs, id: &str, action: &str, body: Value, out: &Output) -> Result<()> {
    let server = server.require()?;
    if id.is_empty() {
        return Err(SignerError::Usage("a rollout id is needed (see `outpost rollout list`)".into()));
    }
    let v = server.post_json(&format!("{action} rollout"), &format!("/api/v1/rollouts/{}/{action}", enc(id)), &body).await?;
    out.emit(&v, &render(&v));
    Ok(())
}
