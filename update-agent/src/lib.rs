//! `outpost-agent`, the device daemon: a TUF client that follows the specification's
//! workflow exactly; resumable, streaming, delta-capable downloads; A/B installs with
//! trial boots, health checks and automatic rollback, journaled against power loss.
//! TPM-rooted identity, measured boot and attested check-ins. Later: policy enforcement.

pub mod agent;
pub mod attest;
pub mod boot;
pub mod cli;
pub mod config;
pub mod danger;
pub mod director;
pub mod error;
pub mod fetch;
pub mod health;
pub mod install;
pub mod metrics;
pub mod mode;
pub mod policy;
pub mod report;
pub mod tpm;
pub mod tuf_client;
pub mod update;
pub mod updater;

pub use agent::{Agent, Output};
pub use mode::{Format, Passes};
pub use error::{AgentError, Result};
pub use fetch::Fetcher;
pub use updater::{TargetInfo, Updater};
