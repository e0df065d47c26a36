//! Command-line interface of `outpost`.

use clap::{Parser, Subcommand};

use crate::error::Result;
use crate::output::Output;

#[derive(Debug, Parser)]
#[command(
    name = "outpost",
    version,
    about = "Sign and publish Outpost releases with offline keys",
    long_about = "Sign and publish Outpost releases with offline keys.\n\n\
A typical pipeline: `outpost keys generate` for each key, `outpost repo init` once, \
`outpost repo delegate` a firmware role per hardware class, then `outpost release publish` \
for every build. Everything is signed locally; with --server the signed result is uploaded \
and the server verifies it against its trusted root."
)]
pub struct Cli {
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Generate and inspect ed25519 signing keys.
    #[command(subcommand)]
    Keys(crate::keys_cmd::KeysCommand),
    /// Create and maintain the TUF repository (root, delegations, push).
    #[command(subcommand)]
    Repo(crate::repo_cmd::RepoCommand),
    /// Publish signed releases.
    #[command(subcommand)]
    Release(crate::release_cmd::ReleaseCommand),
    /// The director's trust anchor (offline): director root versions, signed into the
    /// image repository's targets so devices learn whom the director is from offline keys.
    #[command(subcommand)]
    Director(crate::director_cmd::DirectorCommand),
    /// Devices: enrollment tokens, the fleet's attestation state (operator API).
    #[command(subcommand)]
    Device(crate::device_cmd::DeviceCommand),
    /// Canary rollouts: create, start, pause, resume, advance, abort, status (operator API).
    #[command(subcommand)]
    Rollout(crate::rollout_cmd::RolloutCommand),
    /// Network-policy bundles: check, and publish under the `policy` delegation.
    #[command(subcommand)]
    Policy(crate::policy_cmd::PolicyCommand),
    /// SBOMs: generate (root filesystem, Cargo.lock) and validate CycloneDX 1.5.
    #[command(subcommand)]
    Sbom(crate::sbom_cmd::SbomCommand),
    /// Check a file against the Sigstore signature and/or bundle `release publish` wrote
    /// beside it (cosign sign-blob format), with the PEM public key.
    VerifyBlob(crate::sigstore_out::VerifyBlobArgs),
}

pub async fn run(cli: Cli) -> Result<()> {
    let out = Output { json: cli.json };
    match cli.command {
        Command::Keys(cmd) => crate::keys_cmd::run(cmd, &out),
        Command::Repo(cmd) => crate::repo_cmd::run(cmd, &out).await,
        Command::Device(cmd) => crate::device_cmd::run(cmd, &out).await,
        Command::Director(cmd) => crate::director_cmd::run(cmd, &out).await,
        Command::Sbom(cmd) => crate::sbom_cmd::run(cmd, &out).await,
        Command::Rollout(cmd) => crate::rollout_cmd::run(cmd, &out).await,
        Command::Policy(cmd) => crate::policy_cmd::run(cmd, &out).await,
        Command::VerifyBlob(a) => crate::sigstore_out::run(a, &out),
        Command::Release(cmd) => crate::release_cmd::run(cmd, &out).await,
    }
}
