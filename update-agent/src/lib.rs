//! `outpost-agent`, the device daemon: a TUF client that follows the specification's
//! workflow exactly; resumable, streaming, delta-capable downloads; A/B installs with
//! trial boots, health checks and automatic rollback, journaled against power loss.
//! TPM-rooted identity, measured boot and attested check-ins. Later: policy enforcement.

mod agent;
pub mod attest;
pub mod boot;
pub mod cli;
pub mod config;
pub mod danger;
pub mod devicecert;
mod director;
mod error;
mod fetch;
mod health;
mod incidents;
mod install;
mod metrics;
mod mode;
pub mod peers;
mod policy;
mod report;
pub mod tpm;
mod tls;
mod tuf_client;
mod update;
mod updater;

pub use agent::{Agent, Output};
pub use mode::{Format, Passes};
pub use error::{AgentError, Result};
pub use fetch::Fetcher;
pub use updater::{TargetInfo, Updater};
