//! `outpost-agent`, the device daemon: a TUF client that follows the specification's
//! workflow exactly, and verified streaming downloads of firmware for its hardware
//! class. Later: A/B install, TPM attestation, policy enforcement.

pub mod cli;
pub mod config;
pub mod error;
pub mod fetch;
pub mod tuf_client;
pub mod update;
pub mod updater;

pub use error::{AgentError, Result};
pub use fetch::Fetcher;
pub use updater::{TargetInfo, Updater};
