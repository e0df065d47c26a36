//! The install journal: where an install stands, persisted after every step (write
//! temp, fsync, rename, fsync the directory), so a restart after a power cut at any
//! instant continues or undoes the install correctly. States are types, not strings.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::boot::Slot;
use crate::error::{AgentError, Result};

/// The release an install is about: the full image target and how it is fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Target path of the full image in the image repository.
    pub target: String,
    pub version: String,
    /// SHA-256 and length of the image as it must land in the slot.
    pub sha256: String,
    pub length: u64,
    /// The release's signed health checks and trial deadline, kept from the verified
    /// metadata so a trial boot without network still runs them.
    #[serde(default)]
    pub health: Vec<outpost_protocol::release::HealthCheck>,
    #[serde(default)]
    pub trial_deadline_secs: Option<u64>,
    /// SHA-256 of the release's SBOM, verified against the signed metadata.
    #[serde(default)]
    pub sbom_sha256: Option<String>,
    /// The root filesystem's signed dm-verity parameters, which go on the slot's
    /// kernel command line when the trial is armed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<outpost_protocol::verity::Verity>,
}

/// What is being downloaded: the signed target and how its bytes become the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Target path actually fetched (the image, its zstd form, or a delta).
    pub target: String,
    pub encoding: Encoding,
    /// Signed length of the fetched target.
    pub length: u64,
}

/// How fetched bytes become the image: the signed metadata's own type (same JSON).
pub use outpost_protocol::release::Encoding;

/// Where the install stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Nothing in progress.
    Idle,
    /// Receiving `transfer`; `durable` bytes of it are fsynced in the partial file.
    /// With `into`, the image goes straight into that (inactive) slot's partition while
    /// it arrives: then a target sent as-is is kept on the partition itself, and
    /// `durable` counts bytes fsynced there. The boot environment is untouched until
    /// the slot reads back as the signed image.
    Downloading {
        release: Release,
        transfer: Transfer,
        durable: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        into: Option<Slot>,
    },
    /// The image is staged and both the transfer and the image digest verified.
    Verified { release: Release },
    /// Copying the verified image into the inactive slot.
    Writing { release: Release, slot: Slot },
    /// The slot holds the verified image and is set to boot once on trial.
    Installed { release: Release, slot: Slot },
    /// Booted from the trial slot; health checks decide.
    TrialBoot { release: Release, slot: Slot },
    /// The trial slot passed and is now the active slot.
    Committed { release: Release, slot: Slot },
    /// The release was abandoned; the previous slot stays active.
    RolledBack { release: Release, slot: Slot, reason: String },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Downloading { .. } => "downloading",
            Phase::Verified { .. } => "verified",
            Phase::Writing { .. } => "writing",
            Phase::Installed { .. } => "installed",
            Phase::TrialBoot { .. } => "trial_boot",
            Phase::Committed { .. } => "committed",
            Phase::RolledBack { .. } => "rolled_back",
        }
    }
}

/// The journal file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub phase: Phase,
    /// The release the active slot runs, when known.
    pub running: Option<Release>,
    /// Releases that were rolled back: not retried until a newer one appears.
    #[serde(default)]
    pub failed: Vec<Release>,
    /// Install outcomes not yet delivered to the server.
    #[serde(default)]
    pub pending_reports: Vec<super::Report>,
}

impl Default for Journal {
    fn default() -> Self {
        Journal { phase: Phase::Idle, running: None, failed: Vec::new(), pending_reports: Vec::new() }
    }
}

/// The journal on disk.
pub struct JournalFile {
    path: PathBuf,
}

impl JournalFile {
    pub fn new(path: &Path) -> Self {
        JournalFile { path: path.to_owned() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the journal; a missing file is a fresh device. A corrupt file is an
    /// error naming it (the caller decides how to recover: never by guessing).
    pub fn load(&self) -> Result<Journal> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::Corrupt { path: self.path.clone(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(e) => Err(AgentError::io("read journal", &self.path, e)),
        }
    }

    pub fn store(&self, journal: &Journal) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(journal).map_err(|e| AgentError::Serialize { what: "install journal".into(), reason: e.to_string() })?;
        outpost_fsio::write_atomic(&self.path, &bytes).map_err(|e| AgentError::io("write journal", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        Release {
            target: "firmware/rpi4/1.0.0/fw.img".into(),
            version: "1.0.0".into(),
            sha256: "ab".repeat(32),
            length: 3,
            health: Vec::new(),
            trial_deadline_secs: None,
            sbom_sha256: None,
            verity: None,
        }
    }

    #[test]
    fn roundtrip_and_typed_phases() {
        let dir = tempfile::tempdir().unwrap();
        let jf = JournalFile::new(&dir.path().join("journal.json"));
        assert_eq!(jf.load().unwrap(), Journal::default());
        let j = Journal { phase: Phase::Installed { release: release(), slot: Slot::B }, ..Journal::default() };
        jf.store(&j).unwrap();
        assert_eq!(jf.load().unwrap(), j);
        let text = std::fs::read_to_string(jf.path()).unwrap();
        assert!(text.contains("\"phase\": \"installed\""), "{text}");
    }

    #[test]
    fn corrupt_journal_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let jf = JournalFile::new(&dir.path().join("journal.json"));
        std::fs::write(jf.path(), b"{\"phase\": \"flying\"}").unwrap();
        let err = jf.load().unwrap_err().to_string();
        assert!(err.contains("journal.json") && err.contains("corrupt"), "{err}");
    }
}
