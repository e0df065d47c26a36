//! Command-line interface of `outpost-agent`.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::agent::{Agent, Output};
use crate::mode::{Format, Passes};
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::install::PassResult;
use crate::tuf_client::TufClientArgs;

#[derive(Debug, Parser)]
#[command(name = "outpost-agent", version, about = "Outpost device agent: verifies and downloads signed firmware over TUF")]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, default_value = "warn", env = "OUTPOST_LOG")]
    pub log_level: String,
    /// Print results as JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Agent configuration file (see docs/examples/agent.toml).
    #[arg(long, short, default_value = "/etc/outpost/agent.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The daemons (`run`, `policy run`, `policy enforce`) get a multi-threaded
    /// runtime: a policy swap runs synchronously for tens of milliseconds and must not
    /// hold up check-ins, downloads or the metrics endpoint. The one-shot commands run
    /// on one thread (blocking work still goes to the blocking pool): a download's
    /// received chunks then go from the connection to the hasher without a hop
    /// between runtime threads (measured on 2 cores: about 7 % faster and 0.15 s less
    /// CPU per GiB).
    pub fn long_running(&self) -> bool {
        matches!(
            self.command,
            Command::Run { .. } | Command::Policy(PolicyCommand::Run { .. }) | Command::Policy(PolicyCommand::Enforce { .. })
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Refresh signed metadata, then download and verify the newest firmware for this
    /// device's hardware class.
    Update,
    /// The TUF conformance client contract (init / refresh / download).
    TufClient(TufClientArgs),
    /// The device daemon: boot (bootloader step), finish or undo any install in
    /// progress, then check for and install updates into the inactive slot.
    Run {
        /// Stop after one update check (and the installs and reboots it leads to).
        #[arg(long)]
        once: bool,
    },
    /// Enroll this device with the server: EK and a new attestation key from the TPM,
    /// proven resident together by credential activation.
    Enroll {
        /// One-time enrollment token (`outpost device token create`).
        #[arg(long, env = "OUTPOST_ENROLL_TOKEN")]
        token: String,
    },
    /// One attested check-in (nonce, quote over the measurement PCR, event log, state)
    /// and the server's verdict.
    Checkin,
    /// Network policy: check a bundle, show what the daemon enforces, or enforce a
    /// local bundle in the foreground.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Other devices' client certificates, checked with no server: against the device
    /// CA of this device's own certificate and the revocation list it cached online.
    #[command(subcommand)]
    Peer(PeerCommand),
}

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Whether a peer's certificate (PEM) is one the device CA issued, unexpired, not
    /// revoked as of the cached list, and which device it names. Exit status 1 if not.
    Check {
        #[arg(long)]
        certificate: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a bundle file; errors name the scope, rule and field.
    Check { file: PathBuf },
    /// What the daemon enforces (its last status: version, profile, counters).
    Status,
    /// Only the policy part of the daemon: fetch signed bundles through TUF every
    /// policy.check_interval, enforce them, fall back to the essential profile when
    /// they expire, serve /metrics. For devices whose images another tool updates.
    Run {
        /// One fetch-and-enforce step, then exit (enforcement stays pinned).
        #[arg(long)]
        once: bool,
    },
    /// Enforce a local bundle file until SIGINT/SIGTERM (SIGHUP re-reads it), for
    /// trying a bundle on a device: no signature is checked here, the daemon
    /// enforces only bundles signed by the `policy` role. Enforcement is pinned in
    /// bpffs and stays after the command ends, as the daemon's does; `policy detach`
    /// removes it.
    Enforce {
        file: PathBuf,
        /// Where workload cgroup paths start (default: the cgroup v2 mount).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Serve Prometheus `/metrics` here, e.g. 127.0.0.1:9101.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Where programs, maps and links are pinned (default /sys/fs/bpf/outpost).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// End network-policy enforcement: unpin every program link and map under the pin
    /// directory, so nothing filters any more. The only way enforcement ends (agent
    /// exits, crashes and upgrades keep it); stop the agent first, or it keeps its
    /// links until it exits. Logged.
    Detach {
        /// The pin directory (default: the config's policy.pin_dir, else
        /// /sys/fs/bpf/outpost).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

pub async fn run(cli: Cli) -> Result<()> {
    let format = Format::from_json_flag(cli.json);
    match cli.command {
        Command::Policy(PolicyCommand::Check { file }) => policy_check(&file, format),
        Command::Policy(PolicyCommand::Status) => policy_status(&AgentConfig::load(&cli.config)?),
        Command::Policy(PolicyCommand::Run { once }) => crate::policy::run_daemon(&AgentConfig::load(&cli.config)?, Passes::from_once_flag(once)).await,
        Command::Policy(PolicyCommand::Enforce { file, cgroup_root, metrics_listen, pin_dir }) => {
            let pin_dir = pin_dir.unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PIN_DIR));
            crate::policy::enforce_local(&file, crate::danger::UnsignedPolicy, cgroup_root, metrics_listen, &pin_dir, format).await
        }
        Command::Policy(PolicyCommand::Detach { pin_dir }) => policy_detach(pin_dir, &cli.config, format),
        Command::TufClient(args) => crate::tuf_client::run(args).await,
        Command::Run { once } => {
            let config = AgentConfig::load(&cli.config)?;
            Agent::start(config, Printer { format }).await?.run(Passes::from_once_flag(once)).await
        }
        Command::Enroll { token } => enroll(&AgentConfig::load(&cli.config)?, &token, format).await,
        Command::Checkin => checkin(&AgentConfig::load(&cli.config)?, format).await,
        Command::Update => update(&AgentConfig::load(&cli.config)?, format).await,
        Command::Peer(PeerCommand::Check { certificate }) => peer_check(&AgentConfig::load(&cli.config)?, &certificate, format),
    }
}

fn peer_check(config: &AgentConfig, certificate: &Path, format: Format) -> Result<()> {
    let v = crate::peers::check(&config.state_dir, certificate)?;
    if format == Format::Json {
        println!("{}", serde_json::to_string(&v).unwrap_or_default());
    } else {
        let who = v.device_id.as_deref().unwrap_or("(no device)");
        let list = v.revocation_list.as_ref().map(|l| format!("revocation list of {}{}", l.this_update, if l.stale { " (stale: past its next update)" } else { "" }));
        match &v.reason {
            None => println!("trusted: device {who}, serial {}; {}", v.serial, list.unwrap_or_default()),
            Some(why) => println!("not trusted: {why}; device {who}, serial {}; {}", v.serial, list.unwrap_or_default()),
        }
    }
    if v.trusted { Ok(()) } else { Err(AgentError::Attestation(format!("peer certificate {}: {}", certificate.display(), v.reason.unwrap_or_default()))) }
}

fn policy_check(file: &Path, format: Format) -> Result<()> {
    let bytes = std::fs::read(file).map_err(|e| AgentError::io("read", file, e))?;
    let b = outpost_protocol::policy::PolicyBundle::parse(&bytes).map_err(|e| AgentError::Policy(format!("{}: {e}", file.display())))?;
    if format == Format::Json {
        println!("{}", serde_json::json!({"valid": true, "name": b.name, "version": b.version, "rules": b.profile.rule_count(), "essential_rules": b.essential.rule_count()}));
    } else {
        println!("{}: valid; {} v{}, {} rule(s), essential profile {} rule(s)", file.display(), b.name, b.version, b.profile.rule_count(), b.essential.rule_count());
    }
    Ok(())
}

fn policy_status(config: &AgentConfig) -> Result<()> {
    match crate::policy::read_status(config) {
        Some(s) => {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            Ok(())
        }
        None => Err(AgentError::NoPolicyEnforced),
    }
}

fn policy_detach(pin_dir: Option<PathBuf>, config: &Path, format: Format) -> Result<()> {
    let pin_dir = match pin_dir {
        Some(d) => d,
        // A config that exists must load: detaching the default directory
        // instead of the configured one would leave enforcement in place.
        None if config.exists() => AgentConfig::load(config)?.policy.map(|p| p.pin_dir).unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PIN_DIR)),
        None => PathBuf::from(crate::config::DEFAULT_PIN_DIR),
    };
    crate::policy::detach(&pin_dir, format)
}

async fn enroll(config: &AgentConfig, token: &str, format: Format) -> Result<()> {
    std::fs::create_dir_all(&config.state_dir).map_err(|e| AgentError::io("create", &config.state_dir, e))?;
    let enrolled = crate::attest::enroll(config, token).await?;
    if format == Format::Json {
        println!("{}", serde_json::to_string(&enrolled).unwrap_or_default());
    } else {
        println!("enrolled as {} (hardware class {})", enrolled.device_id, enrolled.hardware_class);
    }
    Ok(())
}

async fn checkin(config: &AgentConfig, format: Format) -> Result<()> {
    let fetcher = config.device_fetcher()?;
    let mut installer = crate::install::Installer::open(config, fetcher.clone())?;
    // The queued incidents go with it; the pstore records are the daemon's to read.
    let mut incidents = crate::incidents::Incidents::open(installer.config())?;
    match crate::agent::checkin::checkin(&mut installer, &mut incidents, &fetcher).await? {
        Some(v) => {
            Printer { format }.verdict(&v);
            Ok(())
        }
        None => Err(AgentError::NotEnrolled { hint: " (or no [tpm] section): nothing to check in with" }),
    }
}

async fn update(config: &AgentConfig, format: Format) -> Result<()> {
    let report = crate::update::run(config).await?;
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
        return Ok(());
    }
    println!("verified metadata: root v{}, timestamp v{}, snapshot v{}", report.root_version, report.timestamp_version, report.snapshot_version);
    println!(
        "firmware {} for {} (signed by role {}): {} bytes, sha256 {}",
        report.version, report.hardware_class, report.signed_by_role, report.length, report.sha256
    );
    println!("expected measurement: sha256 {}", report.expected_measurement);
    println!("{} {}", if report.already_present { "already present and verified:" } else { "downloaded and verified:" }, report.path.display());
    Ok(())
}

/// The daemon's results on stdout: text, or one JSON object a line with `--json`.
struct Printer {
    format: Format,
}

impl Output for Printer {
    fn pass(&self, result: &PassResult) {
        emit(self.format, result)
    }

    fn verdict(&self, verdict: &outpost_protocol::attest::CheckinVerdict) {
        emit_verdict(self.format, verdict)
    }
}

fn emit(format: Format, result: &PassResult) {
    if format == Format::Json {
        println!("{}", serde_json::to_string(result).unwrap_or_default());
        return;
    }
    match result {
        PassResult::UpToDate { version } => println!("up to date ({})", version.as_deref().unwrap_or("no release installed")),
        PassResult::SkippedFailedRelease { version } => println!("release {version} was rolled back on this device; waiting for a newer one"),
        PassResult::Committed { version, slot } => println!("committed {version} in slot {slot}"),
        PassResult::RolledBack { version, reason } => println!("rolled back {version}: {reason}"),
        PassResult::NoAssignment { version } => {
            println!("no new assignment from the director; staying on {}", version.as_deref().unwrap_or("the installed image"))
        }
        PassResult::Quarantined { reason } => println!("quarantined by the server, not installing: {reason}"),
        PassResult::RefusedVulnerable { version, advisories } => {
            println!("release {version} is affected by the signed deny-list, not installing: {}", advisories.join("; "))
        }
    }
}

fn emit_verdict(format: Format, v: &outpost_protocol::attest::CheckinVerdict) {
    if format == Format::Json {
        println!("{}", serde_json::to_string(v).unwrap_or_default());
    } else if v.verdict == outpost_protocol::attest::Verdict::Attested {
        println!("check-in attested ({})", v.device_id);
    } else {
        println!("check-in {}: {}{}", v.verdict, v.reason.as_deref().unwrap_or(""), if v.quarantined { " (quarantined)" } else { "" });
    }
}
