//! The command line: one subcommand per module (`enroll`, `run`), each with its `Args`.

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::enroll::{self, EnrollArgs};
use crate::error::SimError;
use crate::run::{self, RunArgs};

#[derive(Debug, Parser)]
#[command(name = "outpost-fleet-sim", about = "Outpost fleet simulator: simulated devices (software keys in place of a TPM) enrolling and checking in")]
pub struct Cli {
    /// PEM file of the CA certificates the server's TLS certificate must chain to
    /// (only these); without it, the system's trust store.
    #[arg(long, global = true, env = "OUTPOST_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll N simulated devices (one-time token each, credential activation) that run
    /// the signed release with image digest --image-sha256; keep them in --state.
    Enroll(EnrollArgs),
    /// Check the devices in --state in, round robin, for --duration, at --rate check-ins
    /// per second in total (0: as fast as --concurrency allows); print throughput and
    /// latency. Releases named in --fail VERSION=FRACTION fail on that fraction of the
    /// devices they are assigned to (a stable choice per device).
    Run(RunArgs),
}

pub async fn run(cli: Cli) -> Result<(), SimError> {
    let builder = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(256);
    let http = outpost_httpclient::client(builder, cli.ca_file.as_deref(), "--ca-file", None).map_err(|e| SimError::Runtime(e.to_string()))?;
    match cli.command {
        Command::Enroll(args) => enroll::run(http, args).await,
        Command::Run(args) => run::run(http, args).await,
    }
}
