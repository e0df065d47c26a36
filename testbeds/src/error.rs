//! The simulator's errors: each names the request, file or argument that failed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A request to the server failed, was refused, or its answer could not be read.
    #[error("POST {url}: {reason}")]
    Post { url: String, reason: String },
    /// The server's answer lacks a field the simulator needs.
    #[error("{0}")]
    Answer(&'static str),
    /// A command-line argument is malformed.
    #[error("{0}")]
    Usage(String),
    /// Key material (hex, the AK, an EK, an activated credential) is unusable.
    #[error("{0}")]
    Key(String),
    /// A message or the state could not be encoded.
    #[error("{0}")]
    Encode(String),
    /// The director's targets metadata in a verdict is not JSON.
    #[error("director targets: {0}")]
    DirectorTargets(serde_json::Error),
    #[error("read {}: {source}", path.display())]
    ReadState { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    ParseState { path: PathBuf, source: serde_json::Error },
    #[error("write {}: {source}", path.display())]
    WriteState { path: PathBuf, source: std::io::Error },
    #[error("rename {}: {source}", path.display())]
    RenameState { path: PathBuf, source: std::io::Error },
    /// `enroll --append` to a state file of another server.
    #[error("{} holds devices of {old}, not {new}", path.display())]
    OtherServer { path: PathBuf, old: String, new: String },
    #[error("no devices in the state file; run enroll first")]
    NoDevices,
    #[error("every check-in failed")]
    EveryCheckinFailed,
    /// The HTTP client could not be built, or a worker task failed.
    #[error("{0}")]
    Runtime(String),
}

/// Wraps a key-handling error.
pub fn key_err(e: impl std::fmt::Display) -> SimError {
    SimError::Key(e.to_string())
}

/// Wraps an encoding error.
pub fn encode_err(e: impl std::fmt::Display) -> SimError {
    SimError::Encode(e.to_string())
}
