//! The agent's one error type. Each variant names the failed operation and carries
//! the URL, path or role concerned.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    /// Metadata or a target failed a TUF check (signature, version, expiry, hash...).
    #[error("{step}: {source}")]
    Tuf {
        step: String,
        #[source]
        source: outpost_protocol::Error,
    },

    /// The server answered with an HTTP error status.
    #[error("GET {url}: HTTP {status}")]
    HttpStatus { url: String, status: u16 },

    /// The connection failed or broke.
    #[error("GET {url}: {reason}")]
    Fetch { url: String, reason: String },

    /// No byte arrived within the stall timeout (slow-retrieval attack or dead link).
    #[error("GET {url}: timed out: no data for {after:?}")]
    Timeout { url: String, after: Duration },

    /// The answer fell behind the minimum average rate (`[http] min_bytes_per_sec`):
    /// a slow-retrieval attack, or a link slower than the configured floor.
    #[error("GET {url}: slow retrieval: {received} bytes in {elapsed:.1?}, below the minimum average rate of {min_rate} bytes/s (counted after {grace:?})")]
    SlowRetrieval { url: String, received: u64, elapsed: Duration, min_rate: u64, grace: Duration },

    /// The server sent more than the signed or configured maximum (endless-data attack).
    #[error("GET {url}: endless data: more than {limit} bytes")]
    TooLarge { url: String, limit: u64 },

    /// The server sent fewer bytes than the signed length.
    #[error("GET {url}: truncated: got {got} of {expected} bytes")]
    Truncated { url: String, got: u64, expected: u64 },

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The received bytes verified but do not decode to the signed image.
    #[error("GET {url}: {reason}")]
    ImageMismatch { url: String, reason: String },

    /// Not enough free space for a download or install.
    #[error("not enough free space in {path}: need {needed} bytes, {available} available")]
    NoSpace { path: PathBuf, needed: u64, available: u64 },

    /// The slot's partition is smaller than the image (refused before writing).
    #[error("the slot partition {path} holds {size} bytes: too small for the {needed}-byte image")]
    SlotTooSmall { path: PathBuf, needed: u64, size: u64 },

    /// A health check failed (the trial boot is rolled back).
    #[error("health check {check} failed: {reason}")]
    Health { check: String, reason: String },

    #[error("target {0:?} is not in the signed repository")]
    TargetNotFound(String),

    /// The delegation search for a target needs more roles than the limit allows: the
    /// answer is unknown, so nothing is chosen rather than a wrong "absent".
    #[error("searching the delegations for {target}: more than {limit} roles would be visited (next: {next_role}); refusing to guess")]
    DelegationLimit { target: String, limit: usize, next_role: String },

    #[error("no firmware for hardware class {class} in the signed repository")]
    NoFirmware { class: String },

    #[error("target {target} is for hardware class {found}, this device is {expected}")]
    HardwareClassMismatch { target: String, expected: String, found: String },

    /// A state file (journal, boot environment) that cannot be read as what it should be.
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error("configuration {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    /// A command-line argument the command needs was not given.
    #[error("{command} needs {flag}")]
    MissingArgument { command: &'static str, flag: &'static str },

    /// The agent config lacks the section a command needs.
    #[error("the agent config has no [{section}] section{hint}")]
    MissingSection { section: &'static str, hint: &'static str },

    /// The device has no identity to attest with.
    #[error("not enrolled{hint}")]
    NotEnrolled { hint: &'static str },

    /// `policy status` while nothing is enforced.
    #[error("no network policy is enforced (no [policy] section, or no bundle applied yet)")]
    NoPolicyEnforced,

    /// A state file or request that cannot be serialized.
    #[error("serialize {what}: {reason}")]
    Serialize { what: String, reason: String },

    /// A blocking task (TPM call, transfer worker) that panicked, was cancelled or
    /// ended before it answered.
    #[error("{task}: {reason}")]
    Task { task: &'static str, reason: String },

    /// TUF metadata a step relies on was not loaded before it (the workflow's order
    /// broken: a bug, never the repository's doing).
    #[error("{role} metadata not loaded")]
    NotLoaded { role: String },

    /// A boot environment change the boot control refuses to make.
    #[error("boot control: {0}")]
    BootControl(String),

    /// The signed deny-list cannot be read or applied: nothing is installed past it.
    #[error("{list}: {reason}; not installing past a deny-list that cannot be read")]
    DenyListUnreadable { list: String, reason: String },

    /// The TPM refused or failed an operation (or cannot be reached).
    #[error("TPM: {op}: {reason}")]
    Tpm { op: &'static str, reason: String },

    /// The server answered an enrollment or check-in step with an error.
    #[error("{step}: server answered HTTP {status}: {message}")]
    Api { step: &'static str, status: u16, message: String },

    /// A release's SBOM is missing, differs from what the release names, or does not
    /// describe the release's image.
    #[error("SBOM of {release}: {reason}")]
    Sbom { release: String, reason: String },

    /// The device's own measured state does not match its event log or release.
    #[error("attestation: {0}")]
    Attestation(String),

    /// A network-policy bundle refused, or enforcement that cannot run.
    #[error("network policy: {0}")]
    Policy(String),

    /// A director assignment that is not verified, or that the image repository's
    /// signed targets do not agree with.
    #[error("director assignment refused: {0}")]
    Director(String),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    pub(crate) fn tuf(step: impl Into<String>, source: outpost_protocol::Error) -> Self {
        AgentError::Tuf { step: step.into(), source }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AgentError::Io { op, path: path.into(), source }
    }

    /// Is this "the file is not there" from the repository (ends the root walk)?
    pub fn is_not_found(&self) -> bool {
        matches!(self, AgentError::HttpStatus { status: 403 | 404, .. })
    }
}
