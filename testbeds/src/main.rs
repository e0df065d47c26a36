//! `outpost-fleet-sim`: many simulated devices in one process, enrolling through the
//! server's real enrollment API and checking in through its real attested check-in
//! API, at a configurable rate, with a configurable failure rate per release.
//!
//! SIMULATED DEVICES: software keys in place of a TPM (see `softkeys`). That is the
//! only shortcut; every message is what a device with a TPM sends, and the server
//! verifies it the same way. A simulated install is instantaneous: an assigned release
//! is "committed" (its digest becomes the measured boot) or "rolled back" at once,
//! reported at the next check-in.

mod checkin;
mod cli;
mod enroll;
mod error;
mod http;
mod run;
mod softkeys;
mod state;

use clap::Parser;

/// Said in every output: these are not real devices.
const LABEL: &str = "SIMULATED devices (software keys in place of a TPM)";

#[tokio::main]
async fn main() {
    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli).await {
        eprintln!("outpost-fleet-sim: {e}");
        std::process::exit(1);
    }
}
