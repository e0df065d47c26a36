//! Command-line interface of `outpost-agent`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::AgentConfig;
use crate::error::Result;
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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Refresh signed metadata, then download and verify the newest firmware for this
    /// device's hardware class.
    Update,
    /// The TUF conformance client contract (init / refresh / download).
    TufClient(TufClientArgs),
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::TufClient(args) => crate::tuf_client::run(args).await,
        Command::Update => {
            let config = AgentConfig::load(&cli.config)?;
            let report = crate::update::run(&config).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                println!(
                    "verified metadata: root v{}, timestamp v{}, snapshot v{}",
                    report.root_version, report.timestamp_version, report.snapshot_version
                );
                println!(
                    "firmware {} for {} (signed by role {}): {} bytes, sha256 {}",
                    report.version, report.hardware_class, report.signed_by_role, report.length, report.sha256
                );
                println!("expected measurement: sha256 {}", report.expected_measurement);
                println!(
                    "{} {}",
                    if report.already_present { "already present and verified:" } else { "downloaded and verified:" },
                    report.path.display()
                );
            }
            Ok(())
        }
    }
}
