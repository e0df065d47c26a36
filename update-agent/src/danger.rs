//! The agent's dangerous switches, named so that every use reads as one (as in
//! rustls's `danger` module). The daemon's own path (`outpost-agent run`, `policy
//! run`) uses none of them.
//!
//! - [`UnsignedPolicy`]: enforce a network-policy bundle that no signature vouches
//!   for (`outpost-agent policy enforce FILE`, for trying a bundle on a device).
//! - [`OsBuffered`]: leave a verified download's durability to the OS (no fsync),
//!   for tools that verify again on every run, such as the TUF conformance client.
//!
//! The agent has no switch that turns expiry checks off: metadata, director targets
//! and policy bundles are always checked against the clock.

/// A policy bundle offered without a signature: only the bundle's own checks (schema,
/// version, expiry) apply, no TUF target vouches for its name and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsignedPolicy;

/// A download whose bytes the OS writes back in its own time: renamed into place
/// atomically, but neither the file nor its directory is fsynced, so a power cut may
/// lose it (never tear it into a file that verifies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsBuffered;
