//! `outpost rollout ...`: canary rollouts through the server's operator API, with a
//! live view of the waves (`status --watch`).

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use outpost_protocol::api::rollouts::{ActionRequest, CreateRollout, RolloutList, RolloutView, WaveRequest, WaveView};
use outpost_protocol::rollout::{Cause, Gate, PauseReason, State};

use crate::device_cmd::{enc, parse_label};
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

impl From<GateArg> for Gate {
    fn from(g: GateArg) -> Gate {
        match g {
            GateArg::Auto => Gate::Auto,
            GateArg::Manual => Gate::Manual,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Define a rollout of a signed release (a draft until `start`, or pass --start).
    Create(CreateArgs),
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
    Status(StatusArgs),
    /// All rollouts, newest first.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Release version (a signed full-image firmware target of the class).
    #[arg(long)]
    pub version: String,
    #[arg(long)]
    pub hardware_class: String,
    /// Only devices with this label (KEY=VALUE; repeat: all must match).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Cumulative percentages of the selected fleet, increasing, the last at most 100.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 10.0, 50.0, 100.0])]
    pub waves: Vec<f64>,
    /// Fraction of a wave's devices that must be healthy for it to pass.
    #[arg(long, default_value_t = 0.95)]
    pub success_threshold: f64,
    /// Fraction of a wave's devices failing (rolled back, failed attestation) that
    /// pauses the rollout.
    #[arg(long, default_value_t = 0.05)]
    pub failure_threshold: f64,
    /// Healthy devices a wave needs before it may pass.
    #[arg(long, default_value_t = 1)]
    pub min_devices: u32,
    /// How long each wave runs before it may pass (e.g. 30m, 1h, 0s).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub soak: Duration,
    #[arg(long, value_enum, default_value = "auto")]
    pub gate: GateArg,
    #[arg(long)]
    pub name: Option<String>,
    /// Start it right away.
    #[arg(long)]
    pub start: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub id: String,
    #[arg(long)]
    pub watch: bool,
    /// Refresh interval for --watch.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Also list each assigned device.
    #[arg(long)]
    pub devices: bool,
    /// Also show how many of the selected devices each wave would expose.
    #[arg(long)]
    pub plan: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

fn gate_name(g: Gate) -> &'static str {
    match g {
        Gate::Auto => "auto",
        Gate::Manual => "manual",
    }
}

/// The state in words, with the reason for a pause.
fn state_line(r: &RolloutView) -> String {
    let name = r.state.name();
    match &r.state {
        State::Running { wave, .. } | State::AwaitingApproval { wave, .. } | State::Paused { wave, .. } => {
            let mut line = format!("{name} in wave {wave} of {}", r.waves.len());
            if let State::AwaitingApproval { .. } = r.state {
                line.push_str(" (passed; `outpost rollout advance` opens the next wave)");
            }
            match &r.state {
                State::Paused { reason: PauseReason::FailureThreshold { wave, failed, assigned, threshold }, .. } => line.push_str(&format!(
                    ": {failed} of {assigned} devices failed in waves 0-{wave} (failure threshold {threshold})"
                )),
                State::Paused { reason: PauseReason::Operator { by }, .. } => line.push_str(&format!(": paused by {by}")),
                _ => {}
            }
            line
        }
        State::Aborted { by, roll_back, .. } => format!("aborted by {by}{}", if *roll_back { " (rolling back)" } else { "" }),
        State::Draft | State::Completed { .. } => name.to_owned(),
    }
}

fn wave_line(w: &WaveView) -> String {
    let mut line = format!(
        "{} {:<5} {:>6}% {:>9} {:>11} {:>8} {:>12} {:>12}  success>={} fail>={} min {} soak {}s",
        if w.current { ">" } else { " " },
        w.wave,
        w.percent,
        w.assigned,
        w.installing,
        w.healthy,
        w.rolled_back,
        w.attestation_failed,
        w.success_threshold,
        w.failure_threshold,
        w.min_devices,
        w.soak_secs,
    );
    if let Some(p) = w.planned {
        line.push_str(&format!("  (would expose {p} selected device(s))"));
    }
    line
}

fn cause_text(cause: &Cause) -> String {
    match cause {
        Cause::Operator { by, action } => format!("{action} by {by}"),
        Cause::FailureThreshold { wave, failed, assigned } => format!("failure threshold: {failed} of {assigned} failed (wave {wave})"),
        Cause::PassedAfterSoak { wave, healthy, assigned } => format!("wave {wave} passed after its soak: {healthy} of {assigned} healthy"),
    }
}

/// The human view of a rollout.
pub fn render(r: &RolloutView) -> String {
    let rel = &r.release;
    let mut lines = vec![
        format!("rollout {} \"{}\": {}", r.id, r.name, state_line(r)),
        format!(
            "release {} ({})  class {}  labels {}  gate {}",
            rel.version,
            rel.path,
            r.hardware_class,
            serde_json::to_string(&r.labels).unwrap_or_default(),
            gate_name(r.gate)
        ),
        format!("  {:<5} {:>7} {:>9} {:>11} {:>8} {:>12} {:>12}  gates", "wave", "percent", "assigned", "installing", "healthy", "rolled_back", "attest_fail"),
    ];
    lines[2].push_str("  (counts are cumulative: wave k includes waves 0..k)");
    lines.extend(r.waves.iter().map(wave_line));
    if !r.events.is_empty() {
        lines.push("transitions:".into());
        for e in r.events.iter().rev().take(8).rev() {
            lines.push(format!("  {}  {} -> {}  {}", e.at, e.from, e.to, cause_text(&e.cause)));
        }
    }
    if let Some(devices) = &r.devices {
        lines.push(format!("devices ({}):", devices.len()));
        for d in devices {
            lines.push(format!("  {:<66} wave {:<2} {:<18} {}", d.device_id, d.wave, d.status.as_str(), d.reason.as_deref().unwrap_or("")));
        }
    }
    lines.join("\n")
}

pub async fn run(cmd: RolloutCommand, out: &Output) -> Result<()> {
    match cmd {
        RolloutCommand::Create(a) => create(a, out).await,
        RolloutCommand::Start { id, server } => act(server, &id, "start", ActionRequest::default(), out).await,
        RolloutCommand::Pause { id, server } => act(server, &id, "pause", ActionRequest::default(), out).await,
        RolloutCommand::Resume { id, server } => act(server, &id, "resume", ActionRequest::default(), out).await,
        RolloutCommand::Advance { id, server } => act(server, &id, "advance", ActionRequest::default(), out).await,
        RolloutCommand::Abort { id, roll_back, server } => act(server, &id, "abort", ActionRequest { roll_back: Some(roll_back) }, out).await,
        RolloutCommand::Status(a) => status(a, out).await,
        RolloutCommand::List { server } => {
            let list: RolloutList = server.require()?.get_json("rollout list", "/api/v1/rollouts").await?;
            let mut lines = vec![format!("{:<20} {:<10} {:<12} {:<40} name", "id", "version", "class", "state")];
            for r in &list.rollouts {
                lines.push(format!("{:<20} {:<10} {:<12} {:<40} {}", r.id, r.release.version, r.hardware_class, state_line(r), r.name));
            }
            out.emit(&list, &lines.join("\n"));
            Ok(())
        }
    }
}

async fn create(a: CreateArgs, out: &Output) -> Result<()> {
    let server = a.server.require()?;
    let wave = |percent: f64| WaveRequest {
        percent,
        success_threshold: a.success_threshold,
        failure_threshold: a.failure_threshold,
        min_devices: i64::from(a.min_devices),
        soak_secs: i64::try_from(a.soak.as_secs()).unwrap_or(i64::MAX),
    };
    let body = CreateRollout {
        name: a.name.clone(),
        version: a.version.clone(),
        hardware_class: a.hardware_class.clone(),
        labels: a.labels.iter().cloned().collect(),
        waves: a.waves.iter().map(|p| wave(*p)).collect(),
        gate: a.gate.into(),
    };
    let mut v: RolloutView = server.post_json("create rollout", "/api/v1/rollouts", &body).await?;
    if a.start {
        v = server.post_json("start rollout", &format!("/api/v1/rollouts/{}/start", enc(&v.id)), &ActionRequest::default()).await?;
    }
    out.emit(&v, &render(&v));
    Ok(())
}

async fn status(a: StatusArgs, out: &Output) -> Result<()> {
    let server = a.server.require()?;
    let path = format!("/api/v1/rollouts/{}?devices={}&plan={}", enc(&a.id), a.devices, a.plan);
    let tty = std::io::stdout().is_terminal() && !out.json;
    loop {
        let v: RolloutView = server.get_json("rollout status", &path).await?;
        if a.watch && out.json {
            // One JSON document per refresh, one per line.
            println!("{}", crate::output::compact(&v));
        } else if a.watch && tty {
            print!("\x1b[2J\x1b[H{}\n\n(refreshing every {}; Ctrl-C to stop)\n", render(&v), humantime::format_duration(a.interval));
        } else {
            out.emit(&v, &render(&v));
        }
        if !a.watch || v.ended() {
            return Ok(());
        }
        if !tty && !out.json {
            println!();
        }
        tokio::select! {
            _ = tokio::time::sleep(a.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn act(server: ServerArgs, id: &str, action: &str, body: ActionRequest, out: &Output) -> Result<()> {
    let server = server.require()?;
    if id.is_empty() {
        return Err(SignerError::Usage("a rollout id is needed (see `outpost rollout list`)".into()));
    }
    let v: RolloutView = server.post_json(&format!("{action} rollout"), &format!("/api/v1/rollouts/{}/{action}", enc(id)), &body).await?;
    out.emit(&v, &render(&v));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(state: serde_json::Value, state_name: &str) -> Result<RolloutView, serde_json::Error> {
        serde_json::from_value(json!({
            "id": "ro_1", "name": "gw 1.2.0", "hardware_class": "gw", "labels": {"ring": "canary"},
            "release": {"path": "firmware/gw/1.2.0/fw.img", "length": 1, "sha256": "ab", "version": "1.2.0", "measurement": "ab", "sbom_sha256": null},
            "gate": "manual", "state": state, "state_name": state_name, "created_by": "ops", "created_at": "t",
            "waves": [{"wave": 0, "percent": 50.0, "success_threshold": 0.95, "failure_threshold": 0.05, "min_devices": 1, "soak_secs": 0,
                       "current": true, "assigned": 2, "installing": 0, "healthy": 1, "rolled_back": 1, "attestation_failed": 0, "planned": 4}],
            "events": [{"at": "t1", "from": "running", "to": "paused", "cause": {"kind": "failure_threshold", "wave": 0, "failed": 1, "assigned": 2}}],
            "devices": [{"device_id": "d1", "wave": 0, "status": "rolled_back", "reason": "health", "assigned_at": "t0", "updated_at": "t1"}]
        }))
    }

    #[test]
    fn a_paused_rollout_reads_with_its_reason_counters_and_devices() -> Result<(), serde_json::Error> {
        let paused = json!({"state": "paused", "wave": 0, "wave_started_at": 1,
                            "reason": {"kind": "failure_threshold", "wave": 0, "failed": 1, "assigned": 2, "threshold": 0.05}});
        let text = render(&view(paused, "paused")?);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "rollout ro_1 \"gw 1.2.0\": paused in wave 0 of 1: 1 of 2 devices failed in waves 0-0 (failure threshold 0.05)");
        assert_eq!(lines[1], "release 1.2.0 (firmware/gw/1.2.0/fw.img)  class gw  labels {\"ring\":\"canary\"}  gate manual");
        assert!(lines[3].starts_with("> 0         50%         2           0        1            1            0  success>=0.95 fail>=0.05 min 1 soak 0s"), "{}", lines[3]);
        assert!(lines[3].ends_with("(would expose 4 selected device(s))"), "{}", lines[3]);
        assert_eq!(lines[5], "  t1  running -> paused  failure threshold: 1 of 2 failed (wave 0)");
        assert!(lines[7].contains("d1") && lines[7].contains("rolled_back") && lines[7].ends_with("health"), "{}", lines[7]);
        Ok(())
    }

    #[test]
    fn other_states_read_in_words() -> Result<(), serde_json::Error> {
        let aborted = view(json!({"state": "aborted", "at": 2, "by": "ops", "roll_back": true}), "aborted")?;
        assert_eq!(state_line(&aborted), "aborted by ops (rolling back)");
        assert!(aborted.ended());
        let waiting = view(json!({"state": "awaiting_approval", "wave": 0, "wave_started_at": 1}), "awaiting_approval")?;
        assert_eq!(state_line(&waiting), "awaiting_approval in wave 0 of 1 (passed; `outpost rollout advance` opens the next wave)");
        assert_eq!(state_line(&view(json!({"state": "draft"}), "draft")?), "draft");
        Ok(())
    }
}
