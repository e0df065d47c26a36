//! The image repository on the local filesystem: TUF metadata under `metadata/`,
//! targets under `targets/` (consistent-snapshot names), uploads under `staging/`.
//!
//! The server holds only the online keys (snapshot, timestamp; [`online`]).
//! Offline-signed root and targets metadata arrive through [`Repository::publish`]
//! ([`publish`]), which verifies the whole upload against the trusted root, in
//! memory, before anything changes. Every
//! change is then one transaction ([`journal`]): committed by one atomic rename,
//! applied (versioned files first, `timestamp.json` last), rolled forward at start
//! after a crash. A versioned name (`N.root.json`, `N.snapshot.json`, `N.<role>.json`)
//! is never served with two contents: a publish that would write one with other
//! bytes is refused (roles and roots, whose versions the offline signer chose) or
//! takes the next free number (snapshot, chosen here). A retry of a publish that
//! already landed is accepted and changes nothing.
//!
//! What the repository offers devices (releases, expected measurements, the
//! deny-list, SBOMs) is read through the conformant delegation search ([`index`]).
//!
//! One server owns a repository directory: it holds an exclusive lock on
//! `repository/.lock` while it runs. Servers that share a PostgreSQL state store
//! still have a repository each (see docs/rollouts.md).

pub mod index;
pub mod journal;
mod online;
mod publish;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::keys::SigningKey;
use outpost_protocol::tuf::{consistent_name, quote_role, verify_threshold, Envelope, Root, Snapshot, Targets, Timestamp};
// What a publish did and what is published now, as the API answers them.
pub use outpost_protocol::api::repository::{PublishOutcome, RepositoryStatus};
use serde_json::Value;

use crate::error::ServerError;
pub use index::FirmwareRelease;
use journal::{Journal, MetadataFile, Transaction};

/// Why a publish was refused (a client error) or failed (ours).
#[derive(Debug)]
pub enum PublishError {
    Refused { code: &'static str, message: String },
    Internal(ServerError),
}

impl From<ServerError> for PublishError {
    fn from(e: ServerError) -> Self {
        PublishError::Internal(e)
    }
}

fn refuse(code: &'static str, message: impl Into<String>) -> PublishError {
    PublishError::Refused { code, message: message.into() }
}

#[derive(Clone)]
struct State {
    root: Envelope<Root>,
    roles: BTreeMap<String, Envelope<Targets>>,
    snapshot: Option<Envelope<Snapshot>>,
    timestamp: Option<Envelope<Timestamp>>,
}

impl State {
    /// A publish that changed `roles` (to these versions) and dropped `removed_roles`.
    fn applied(&self, roles: BTreeMap<String, u64>, removed_roles: Vec<String>) -> PublishOutcome {
        PublishOutcome { roles, removed_roles, unchanged: false, ..self.already_published() }
    }

    /// A retry: everything uploaded was already published; the state as it is.
    fn already_published(&self) -> PublishOutcome {
        PublishOutcome {
            root_version: self.root.signed.version,
            roles: BTreeMap::new(),
            removed_roles: Vec::new(),
            snapshot_version: self.snapshot.as_ref().map(|s| s.signed.version).unwrap_or(0),
            timestamp_version: self.timestamp.as_ref().map(|t| t.signed.version).unwrap_or(0),
            unchanged: true,
        }
    }

    /// What `metadata/` serves: root.json, and the roles the timestamp's snapshot lists.
    fn load(metadata_dir: &Path) -> Result<Self, ServerError> {
        let root_path = metadata_dir.join("root.json");
        let root: Envelope<Root> = Envelope::parse(&read(&root_path)?, "root").map_err(|e| ServerError::proto("root.json", e))?;
        let mut state = State { root, roles: BTreeMap::new(), snapshot: None, timestamp: None };
        let ts_path = metadata_dir.join("timestamp.json");
        if ts_path.exists() {
            let ts: Envelope<Timestamp> = Envelope::parse(&read(&ts_path)?, "timestamp").map_err(|e| ServerError::proto("timestamp.json", e))?;
            let sv = ts.signed.snapshot_meta().version;
            let snap: Envelope<Snapshot> = Envelope::parse(&read(&metadata_dir.join(format!("{sv}.snapshot.json")))?, "snapshot")
                .map_err(|e| ServerError::proto(format!("{sv}.snapshot.json"), e))?;
            for (file, meta) in &snap.signed.meta {
                let Some(role) = file.strip_suffix(".json") else { continue };
                let p = metadata_dir.join(format!("{}.{}.json", meta.version, quote_role(role)));
                let env: Envelope<Targets> = Envelope::parse(&read(&p)?, role).map_err(|e| ServerError::proto(p.display().to_string(), e))?;
                state.roles.insert(role.to_owned(), env);
            }
            state.snapshot = Some(snap);
            state.timestamp = Some(ts);
        }
        Ok(state)
    }
}

/// What the repository needs to open: its own settings, nothing else of the
/// server's configuration.
#[derive(Debug, Clone)]
pub struct RepositorySettings {
    /// The repository directory (`repository/` under the server's data directory).
    pub dir: PathBuf,
    /// The root to start from when the directory has none yet.
    pub trusted_root: PathBuf,
    /// Private key files of the online roles.
    pub snapshot_key: PathBuf,
    pub timestamp_key: PathBuf,
    /// How long a signed snapshot and timestamp stay valid.
    pub snapshot_expiry: Duration,
    pub timestamp_expiry: Duration,
    /// Whether new firmware releases must name an SBOM.
    pub sbom_policy: SbomPolicy,
}

/// The repository's SBOM policy for firmware releases added by a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SbomPolicy {
    /// A release without a signed SBOM reference is refused (`repository.require_sbom`).
    Required,
    /// A release may come without one.
    Optional,
}

pub struct Repository {
    metadata_dir: PathBuf,
    targets_dir: PathBuf,
    staging_dir: PathBuf,
    journal: Journal,
    snapshot_key: SigningKey,
    timestamp_key: SigningKey,
    snapshot_expiry: Duration,
    timestamp_expiry: Duration,
    state: tokio::sync::Mutex<State>,
    sbom_policy: SbomPolicy,
    /// What the signed metadata offers, as the delegation search resolves it, built
    /// for the role versions it names (every check-in asks).
    index: std::sync::Mutex<Option<index::Index>>,
    /// Held while this server owns the repository directory.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

fn read(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|e| ServerError::io("read", path, e))
}

/// A file's bytes, or None when it does not exist.
fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, ServerError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ServerError::io("read", path, e)),
    }
}

/// Durable write (see `outpost_fsio::write_atomic`).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ServerError> {
    outpost_fsio::write_atomic(path, data).map_err(|e| ServerError::io("write", path, e))
}

/// Takes the repository directory for this process, or says who has it.
fn lock_repository(base: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ServerError> {
    let path = base.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ServerError::io("open", &path, e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| ServerError::Config {
        path: path.clone(),
        reason: format!(
            "another outpost-server process uses this repository directory ({errno}); each server needs its own data_dir"
        ),
    })
}

impl Repository {
    /// Opens (or on first start creates from `trusted_root`) the repository, after
    /// applying a publish a crash left half done.
    pub fn open(settings: &RepositorySettings) -> Result<Self, ServerError> {
        let base = settings.dir.clone();
        let metadata_dir = base.join("metadata");
        let targets_dir = base.join("targets");
        let staging_dir = base.join("staging");
        for d in [&metadata_dir, &targets_dir, &staging_dir] {
            std::fs::create_dir_all(d).map_err(|e| ServerError::io("create", d, e))?;
        }
        let lock = lock_repository(&base)?;
        remove_partial_uploads(&staging_dir);
        journal::remove_temporary_files(&base);
        journal::remove_temporary_files(&metadata_dir);
        let journal = Journal::new(&base, &metadata_dir, &targets_dir, &staging_dir);
        if let Some(files) = journal.recover()? {
            tracing::warn!(files, "completed a publish that a crash interrupted after it was committed");
        }
        let snapshot_key = online::load_signing(&settings.snapshot_key)?;
        let timestamp_key = online::load_signing(&settings.timestamp_key)?;
        if !metadata_dir.join("root.json").exists() {
            let bytes = read(&settings.trusted_root)?;
            let root: Envelope<Root> = Envelope::parse(&bytes, "root")
                .map_err(|e| ServerError::proto(format!("trusted root {}", settings.trusted_root.display()), e))?;
            let r = root.signed.role("root").map_err(|e| ServerError::proto("trusted root", e))?;
            verify_threshold("root", &root.canonical_signed, &root.signatures, &r.keyids, r.threshold, &root.signed.keys)
                .map_err(|e| ServerError::proto(format!("trusted root {}", settings.trusted_root.display()), e))?;
            let versioned = format!("{}.root.json", root.signed.version);
            if read_if_exists(&metadata_dir.join(&versioned))?.is_some_and(|served| served != bytes) {
                return Err(ServerError::Config {
                    path: settings.trusted_root.clone(),
                    reason: format!("metadata/{versioned} is already served with other content; configure that root as trusted_root"),
                });
            }
            journal.run(&Transaction {
                files: vec![MetadataFile::new(versioned, &bytes)?, MetadataFile::new("root.json", &bytes)?],
                ..Transaction::default()
            })?;
            tracing::info!(version = root.signed.version, "initialized repository from trusted root");
        }
        let state = State::load(&metadata_dir)?;
        online::check_online_keys(&state.root.signed, &snapshot_key, &timestamp_key)
            .map_err(|reason| ServerError::Config { path: settings.snapshot_key.clone(), reason })?;
        Ok(Repository {
            metadata_dir,
            targets_dir,
            staging_dir,
            journal,
            snapshot_key,
            timestamp_key,
            snapshot_expiry: settings.snapshot_expiry,
            timestamp_expiry: settings.timestamp_expiry,
            state: tokio::sync::Mutex::new(state),
            index: std::sync::Mutex::new(None),
            sbom_policy: settings.sbom_policy,
            _lock: lock,
        })
    }

    pub fn metadata_dir(&self) -> &Path {
        &self.metadata_dir
    }

    pub fn targets_dir(&self) -> &Path {
        &self.targets_dir
    }

    pub fn staging_dir(&self) -> &Path {
        &self.staging_dir
    }

    /// Drops uploads that never finished (after a crash, or at shutdown).
    pub fn remove_partial_uploads(&self) {
        remove_partial_uploads(&self.staging_dir);
    }

    /// A transaction an earlier change committed but could not apply (an I/O error)
    /// is applied before the next one, and the state re-read from what is served.
    fn settle(&self, st: &mut State) -> Result<(), ServerError> {
        if self.journal.pending() {
            self.journal.recover()?;
            *st = State::load(&self.metadata_dir)?;
        }
        Ok(())
    }

    /// Where a published target's bytes are (consistent-snapshot name).
    pub fn target_file(&self, path: &str, sha256: &str) -> PathBuf {
        self.targets_dir.join(consistent_name(path, sha256))
    }

    pub async fn status(&self) -> RepositoryStatus {
        let st = self.state.lock().await;
        RepositoryStatus {
            root_version: st.root.signed.version,
            root_expires: st.root.signed.expires.clone(),
            roles: st.roles.iter().map(|(k, v)| (k.clone(), v.signed.version)).collect(),
            snapshot_version: st.snapshot.as_ref().map(|s| s.signed.version),
            timestamp_version: st.timestamp.as_ref().map(|t| t.signed.version),
            timestamp_expires: st.timestamp.as_ref().map(|t| t.signed.expires.clone()),
        }
    }


}

/// Uploads interrupted by a crash or shutdown are never published: drop them.
fn remove_partial_uploads(staging_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(staging_dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".part") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).unwrap_or_default();
    b.push(b'\n');
    b
}
