//! The protocol crate's one error type. Variants name the failed operation and carry
//! the role, file or key concerned.

use thiserror::Error;

/// Everything that can go wrong while parsing, verifying or producing metadata.
#[derive(Debug, Error)]
pub enum Error {
    /// Metadata bytes are not valid JSON or do not follow the TUF schema.
    #[error("invalid {role} metadata: {reason}")]
    Schema { role: String, reason: String },

    /// The metadata's `_type` is not the expected one.
    #[error("expected {expected} metadata, got _type {found:?}")]
    WrongType { expected: String, found: String },

    /// Fewer valid signatures than the role's threshold.
    #[error("{role} metadata has {valid} valid signature(s) from its trusted keys; threshold is {threshold}")]
    Threshold { role: String, valid: usize, threshold: u64 },

    /// A version that is not the one the workflow requires (rollback, mix-and-match).
    #[error("{role} version mismatch: {reason}")]
    Version { role: String, reason: String },

    /// The new metadata has the same version as the trusted one (not an attack: keep the trusted copy).
    #[error("{role} version {version} is the version already trusted")]
    EqualVersion { role: String, version: u64 },

    /// Metadata whose expiry is in the past (freeze attack or stale repository).
    #[error("{role} metadata expired at {expires}")]
    Expired { role: String, expires: String },

    /// Length or hashes of downloaded bytes do not match what signed metadata says.
    #[error("{what}: {reason}")]
    Integrity { what: String, reason: String },

    /// Something the workflow needs is missing from signed metadata.
    #[error("{0}")]
    Missing(String),

    /// A key file or key material that cannot be used.
    #[error("key error: {0}")]
    Key(String),

    /// Metadata the caller asked to produce is not valid (editor side).
    #[error("cannot build metadata: {0}")]
    Build(String),

    /// A TPM structure, quote or measurement log that is malformed or does not verify.
    #[error("TPM {what}: {reason}")]
    Tpm { what: String, reason: String },

    /// A TCG event log that cannot be parsed: the record (0 is the Spec ID header), the
    /// byte offset where that record starts, and the field that is wrong.
    #[error("TCG event log record {record} (at byte {offset}), {field}: {reason}")]
    EventLog { record: usize, offset: usize, field: &'static str, reason: String },

    /// An event log that does not replay to the PCRs the TPM quoted: the log is not
    /// the one of this boot (forged, truncated or reordered).
    #[error("event log does not replay to the quote: {0}")]
    Replay(String),

    /// A boot whose measurements are not the release's golden values; names the event.
    #[error("measured boot is not the golden boot: {0}")]
    Golden(Box<BootMismatch>),

    /// A network-policy bundle that is malformed; the text names the scope, rule and field.
    #[error("policy {0}")]
    Policy(String),

    /// The delegation search for a target path cannot finish: a role it reaches has no
    /// metadata or does not verify under its delegator's keys, or it needs more roles
    /// than the limit. A client stops there too, so nothing is decided for the path.
    #[error("delegation search for {target:?}: {reason}")]
    Search { target: String, reason: String },

    /// Programming-order error in the trusted set (e.g. timestamp before root is final).
    #[error("TUF workflow order: {0}")]
    Order(String),

    /// Reading the bytes to sign or check failed.
    #[error("read {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The first event of a boot that is not golden, or what a golden boot lacks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BootMismatch {
    /// The event's record number in the log; None when something is missing.
    pub record: Option<usize>,
    pub pcr: u32,
    /// The event type's name (`EV_IPL`).
    pub event_type: Option<String>,
    /// The event data when it is text (a file name, GRUB's measured string).
    pub text: Option<String>,
    /// The event's SHA-256 digest, hex.
    pub found: Option<String>,
    /// What would have matched.
    pub expected: Vec<String>,
    pub reason: String,
}

impl std::fmt::Display for BootMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.record {
            Some(r) => write!(f, "record {r} (PCR {}", self.pcr)?,
            None => write!(f, "PCR {}", self.pcr)?,
        }
        if let Some(t) = &self.event_type {
            write!(f, ", {t}")?;
        }
        if let Some(text) = &self.text {
            write!(f, ", {text:?}")?;
        }
        if self.record.is_some() {
            f.write_str(")")?;
        }
        write!(f, ": {}", self.reason)?;
        if let Some(found) = &self.found {
            write!(f, "; found sha256 {found}")?;
        }
        if !self.expected.is_empty() {
            write!(f, "; expected {}", self.expected.join(" or "))?;
        }
        Ok(())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources on one line (`a: b: c`), skipping a source whose text
/// its parent already shows.
pub fn display_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}

impl Error {
    pub(crate) fn schema(role: &str, reason: impl std::fmt::Display) -> Self {
        Error::Schema { role: role.to_owned(), reason: reason.to_string() }
    }
}
