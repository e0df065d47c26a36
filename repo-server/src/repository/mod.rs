//! The image repository on the local filesystem: TUF metadata under `metadata/`,
//! targets under `targets/` (consistent-snapshot names), uploads under `staging/`.
//!
//! The server holds only the online keys (snapshot, timestamp). Offline-signed root
//! and targets metadata arrive through [`Repository::publish`], which verifies the
//! whole upload against the trusted root, in memory, before anything changes. Every
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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outpost_protocol::keys::{LoadedKey, SigningKey};
use outpost_protocol::release::FirmwareCustom;
use outpost_protocol::tuf::{
    self, quote_role, verify_threshold, Envelope, MetaFile, RoleGraph, Root, Snapshot, Targets, Timestamp, TOP_LEVEL_ROLES,
};
use serde::Serialize;
use serde_json::Value;

use crate::config::ServerConfig;
use crate::error::ServerError;
use journal::{Journal, MetadataFile, PlacedTarget, Transaction};

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

#[derive(Debug, Serialize)]
pub struct PublishOutcome {
    pub root_version: u64,
    /// The roles this publish changed, with their new versions.
    pub roles: BTreeMap<String, u64>,
    /// Roles no delegation reaches any more, dropped from the snapshot.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_roles: Vec<String>,
    pub snapshot_version: u64,
    pub timestamp_version: u64,
    /// True when everything uploaded was already published byte for byte (a retry):
    /// nothing changed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

#[derive(Debug, Serialize)]
pub struct RepositoryStatus {
    pub root_version: u64,
    pub root_expires: String,
    pub roles: BTreeMap<String, u64>,
    pub snapshot_version: Option<u64>,
    pub timestamp_version: Option<u64>,
    pub timestamp_expires: Option<String>,
}

#[derive(Clone)]
struct State {
    root: Envelope<Root>,
    roles: BTreeMap<String, Envelope<Targets>>,
    snapshot: Option<Envelope<Snapshot>>,
    timestamp: Option<Envelope<Timestamp>>,
}

impl State {
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

pub use outpost_protocol::director::FirmwareRelease;

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
    /// Policy: new firmware releases must name an SBOM.
    require_sbom: bool,
    /// What the signed metadata offers, as the delegation search resolves it, built
    /// for the role versions it names (every check-in asks).
    index: std::sync::Mutex<Option<index::Index>>,
    /// Held while this server owns the repository directory.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

fn load_signing(path: &Path) -> Result<SigningKey, ServerError> {
    let bytes = std::fs::read(path).map_err(|e| ServerError::io("read key", path, e))?;
    match LoadedKey::from_bytes(&bytes, &path.display().to_string()).map_err(|e| ServerError::proto("load key", e))? {
        LoadedKey::Private(k) => Ok(k),
        LoadedKey::Public(_) => Err(ServerError::Config {
            path: path.into(),
            reason: "the server needs the private online key, this is a public key file".into(),
        }),
    }
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

fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    t - chrono::Duration::nanoseconds(t.timestamp_subsec_nanos() as i64)
}

fn consistent_name(target_path: &str, hash: &str) -> String {
    match target_path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{hash}.{name}"),
        None => format!("{hash}.{target_path}"),
    }
}

/// The online keys must be the ones `root` trusts for snapshot and timestamp.
fn check_online_keys(root: &Root, snapshot: &SigningKey, timestamp: &SigningKey) -> Result<(), String> {
    for (role, key) in [("snapshot", snapshot), ("timestamp", timestamp)] {
        let ids = root.roles.get(role).map(|r| r.keyids.clone()).unwrap_or_default();
        if !ids.iter().any(|id| id == key.key_id()) {
            return Err(format!(
                "root v{} does not list the server's online {role} key {} (it trusts {:?})",
                root.version,
                key.key_id(),
                ids
            ));
        }
    }
    Ok(())
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

/// New snapshot and timestamp (the snapshot only when `meta` is given), signed and
/// not yet written anywhere.
struct Online {
    snapshot: Option<(u64, Vec<u8>)>,
    snapshot_env: Envelope<Snapshot>,
    timestamp: Vec<u8>,
    timestamp_env: Envelope<Timestamp>,
}

impl Repository {
    /// Opens (or on first start creates from `trusted_root`) the repository, after
    /// applying a publish a crash left half done.
    pub fn open(config: &ServerConfig) -> Result<Self, ServerError> {
        let base = config.data_dir.join("repository");
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
        let snapshot_key = load_signing(&config.snapshot_key)?;
        let timestamp_key = load_signing(&config.timestamp_key)?;
        if !metadata_dir.join("root.json").exists() {
            let bytes = read(&config.trusted_root)?;
            let root: Envelope<Root> = Envelope::parse(&bytes, "root")
                .map_err(|e| ServerError::proto(format!("trusted root {}", config.trusted_root.display()), e))?;
            let r = root.signed.role("root").map_err(|e| ServerError::proto("trusted root", e))?;
            verify_threshold("root", &root.canonical_signed, &root.signatures, &r.keyids, r.threshold, &root.signed.keys)
                .map_err(|e| ServerError::proto(format!("trusted root {}", config.trusted_root.display()), e))?;
            let versioned = format!("{}.root.json", root.signed.version);
            if read_if_exists(&metadata_dir.join(&versioned))?.is_some_and(|served| served != bytes) {
                return Err(ServerError::Config {
                    path: config.trusted_root.clone(),
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
        check_online_keys(&state.root.signed, &snapshot_key, &timestamp_key)
            .map_err(|reason| ServerError::Config { path: config.snapshot_key.clone(), reason })?;
        Ok(Repository {
            metadata_dir,
            targets_dir,
            staging_dir,
            journal,
            snapshot_key,
            timestamp_key,
            snapshot_expiry: config.snapshot_expiry,
            timestamp_expiry: config.timestamp_expiry,
            state: tokio::sync::Mutex::new(state),
            index: std::sync::Mutex::new(None),
            require_sbom: config.require_sbom,
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

    /// Every SBOM the signed firmware targets name, as the delegation search resolves
    /// them: (full image target, class, version, image sha256, SBOM reference).
    pub async fn sbom_refs(&self) -> Vec<index::SbomEntry> {
        self.with_index(|idx| idx.sboms()).await
    }

    /// The full-image firmware targets signed for `hardware_class` (delta patches
    /// excluded), as the delegation search resolves their paths.
    pub async fn firmware_releases(&self, hardware_class: &str) -> Arc<Vec<FirmwareRelease>> {
        self.with_index(|idx| idx.releases(hardware_class)).await.unwrap_or_default()
    }

    /// Runs `f` on the index, rebuilding it first when a role changed.
    async fn with_index<T>(&self, f: impl FnOnce(&index::Index) -> T) -> T {
        let st = self.state.lock().await;
        let versions: Vec<(String, u64)> = st.roles.iter().map(|(k, v)| (k.clone(), v.signed.version)).collect();
        let mut cache = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let idx = match cache.take() {
            Some(idx) if idx.role_versions == versions => idx,
            _ => index::Index::build(&st.roles, versions),
        };
        f(cache.insert(idx))
    }

    /// The signed sha256 of a target, as the delegation search resolves its path.
    pub async fn target_sha256(&self, path: &str) -> Option<String> {
        self.with_index(|idx| idx.target(path).and_then(|t| t.hashes.get("sha256").cloned())).await
    }

    /// Where a published target's bytes are (consistent-snapshot name).
    pub fn target_file(&self, path: &str, sha256: &str) -> PathBuf {
        self.targets_dir.join(consistent_name(path, sha256))
    }

    /// Every expected measurement (image SHA-256) the offline-signed release metadata
    /// names for `hardware_class`, with the target that names it: only targets under
    /// `firmware/<hardware_class>/` that the delegation search resolves to a role
    /// whose chain delegates their path.
    pub async fn expected_measurements(&self, hardware_class: &str) -> Arc<BTreeMap<String, String>> {
        self.with_index(|idx| idx.measurements(hardware_class)).await.unwrap_or_default()
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

    fn outcome(st: &State, roles: BTreeMap<String, u64>, removed_roles: Vec<String>, unchanged: bool) -> PublishOutcome {
        PublishOutcome {
            root_version: st.root.signed.version,
            roles,
            removed_roles,
            snapshot_version: st.snapshot.as_ref().map(|s| s.signed.version).unwrap_or(0),
            timestamp_version: st.timestamp.as_ref().map(|t| t.signed.version).unwrap_or(0),
            unchanged,
        }
    }

    /// Verifies and applies an upload of offline-signed metadata: zero or more new
    /// root versions (in order) and new versions of targets roles. Every target they
    /// list must already be served or uploaded to staging with the signed length and
    /// sha256. Roles no delegation reaches any more are dropped. Then signs a new
    /// snapshot and timestamp, and makes it all visible as one transaction.
    ///
    /// Uploading what is already published (the same bytes under the same versions)
    /// is not an error: a pipeline that retries after a lost answer or a crash gets
    /// the current state back.
    pub async fn publish(&self, roots: &[Value], roles: &BTreeMap<String, Value>, now: DateTime<Utc>) -> Result<PublishOutcome, PublishError> {
        let mut st = self.state.lock().await;
        self.settle(&mut st)?;
        if roots.is_empty() && roles.is_empty() {
            return Err(refuse("empty_upload", "nothing to publish: no roots and no roles"));
        }
        let mut root = st.root.clone();
        let mut new_roots: Vec<(u64, Vec<u8>)> = Vec::new();
        for (i, value) in roots.iter().enumerate() {
            let bytes = pretty(value);
            let env: Envelope<Root> = Envelope::parse(&bytes, "root").map_err(|e| refuse("invalid_metadata", format!("roots[{i}]: {e}")))?;
            let v = env.signed.version;
            let served = read_if_exists(&self.metadata_dir.join(format!("{v}.root.json")))?;
            if v <= root.signed.version && new_roots.is_empty() {
                // Published before: a retry is the same bytes under the same name.
                match served {
                    Some(served) if served == bytes => continue,
                    Some(_) => {
                        return Err(refuse(
                            "version_reused",
                            format!("roots[{i}]: root v{v} is already published with other content; sign v{} instead", st.root.signed.version + 1),
                        ))
                    }
                    None => return Err(refuse("bad_version", format!("roots[{i}] is version {v}, older than the trusted root v{}", root.signed.version))),
                }
            }
            let old = &root.signed;
            let old_role = &old.roles["root"];
            verify_threshold("root", &env.canonical_signed, &env.signatures, &old_role.keyids, old_role.threshold, &old.keys)
                .map_err(|e| refuse("bad_signature", format!("roots[{i}] (v{v}) under trusted root v{}: {e}", old.version)))?;
            if v != old.version + 1 {
                return Err(refuse("bad_version", format!("roots[{i}] is version {v}, expected {}", old.version + 1)));
            }
            let own = &env.signed.roles["root"];
            verify_threshold("root", &env.canonical_signed, &env.signatures, &own.keyids, own.threshold, &env.signed.keys)
                .map_err(|e| refuse("bad_signature", format!("roots[{i}] (v{v}) under its own keys: {e}")))?;
            if env.is_expired(now) {
                return Err(refuse("expired", format!("roots[{i}] (v{v}) expired at {}", env.signed.expires)));
            }
            if served.is_some_and(|served| served != bytes) {
                return Err(refuse(
                    "version_reused",
                    format!("roots[{i}]: metadata/{v}.root.json was served before with other content (an interrupted publish); sign v{} instead", v + 1),
                ));
            }
            new_roots.push((v, bytes));
            root = env;
        }
        if !new_roots.is_empty() {
            check_online_keys(&root.signed, &self.snapshot_key, &self.timestamp_key)
                .map_err(|m| refuse("online_key_not_trusted", format!("{m}; configure the new online keys on the server first")))?;
        }

        // Targets roles: versions first (what is new, what is a retry).
        let mut all = st.roles.clone();
        let mut changed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (name, value) in roles {
            if name != "targets" && (TOP_LEVEL_ROLES.contains(&name.as_str()) || name.is_empty()) {
                return Err(refuse("invalid_metadata", format!("roles.{name}: a delegated role cannot be named like a top-level role")));
            }
            let bytes = pretty(value);
            let env: Envelope<Targets> = Envelope::parse(&bytes, name).map_err(|e| refuse("invalid_metadata", format!("roles.{name}: {e}")))?;
            let v = env.signed.version;
            let file = format!("{v}.{}.json", quote_role(name));
            let served = read_if_exists(&self.metadata_dir.join(&file))?;
            if let Some(cur) = all.get(name) {
                if v == cur.signed.version && served.as_deref() == Some(bytes.as_slice()) {
                    continue; // already published: a retry
                }
                if v <= cur.signed.version {
                    return Err(refuse(
                        "stale_version",
                        format!("roles.{name}: version {v} is not newer than the served version {}", cur.signed.version),
                    ));
                }
            }
            if served.is_some_and(|served| served != bytes) {
                let highest = self.highest_served_version(name)?;
                return Err(refuse(
                    "version_reused",
                    format!(
                        "roles.{name}: metadata/{file} was served before with other content (an interrupted publish, or a role revoked \
                         and delegated again); sign version {} or later",
                        highest + 1
                    ),
                ));
            }
            if env.is_expired(now) {
                return Err(refuse("expired", format!("roles.{name}: expired at {}", env.signed.expires)));
            }
            all.insert(name.clone(), env);
            changed.insert(name.clone(), bytes);
        }
        let Some(top) = all.get("targets") else {
            return Err(refuse("missing_targets", "the repository has no targets metadata yet; include roles.targets"));
        };
        {
            let r = &root.signed.roles["targets"];
            if let Err(e) = verify_threshold("targets", &top.canonical_signed, &top.signatures, &r.keyids, r.threshold, &root.signed.keys) {
                return Err(if changed.contains_key("targets") {
                    refuse("bad_signature", format!("roles.targets: {e}"))
                } else {
                    refuse("needs_resign", format!("served targets v{} does not verify under root v{} ({e}); re-sign it and include it", top.signed.version, root.signed.version))
                });
            }
        }

        // Delegated roles, as clients reach them: each through every delegator that
        // names it, each target along a chain that delegates its path at every hop.
        let graph = RoleGraph::new(all.iter().map(|(k, v)| (k.as_str(), v)));
        let reachable: BTreeSet<String> = graph.reachable().into_iter().map(str::to_owned).collect();
        for name in changed.keys() {
            if !reachable.contains(name) {
                return Err(refuse(
                    "not_delegated",
                    format!("roles.{name}: no delegation from targets (as served, with this upload) reaches role {name}"),
                ));
            }
        }
        for (parent, child, why) in graph.unverified_edges() {
            if !reachable.contains(parent) {
                continue;
            }
            return Err(if changed.contains_key(child) {
                refuse("bad_signature", format!("roles.{child}: does not verify under the keys {parent} delegates to it: {why}"))
            } else {
                refuse(
                    "needs_resign",
                    format!(
                        "served {child} v{} does not verify under the keys {parent} delegates to it after this upload ({why}); re-sign it and include it",
                        all[child].signed.version
                    ),
                )
            });
        }
        for name in changed.keys().filter(|n| n.as_str() != "targets") {
            if let Some(bad) = all[name].signed.targets.keys().find(|p| !graph.may_delegate(name, p)) {
                return Err(refuse(
                    "target_outside_delegation",
                    format!("roles.{name}: target {bad:?} is outside what the delegations give {name}: no chain from targets to {name} delegates that path at every hop"),
                ));
            }
        }
        drop(graph);
        let removed: Vec<String> = all.keys().filter(|k| !reachable.contains(*k)).cloned().collect();
        all.retain(|k, _| reachable.contains(k));

        if new_roots.is_empty() && changed.is_empty() && removed.is_empty() {
            return Ok(Self::outcome(&st, BTreeMap::new(), Vec::new(), true));
        }

        // Every target of a changed role must be present with its signed length and hash.
        let mut placed: Vec<PlacedTarget> = Vec::new();
        for name in changed.keys() {
            for (path, tf) in &all[name].signed.targets {
                let sha = tf.hashes.get("sha256").ok_or_else(|| {
                    refuse("missing_sha256", format!("roles.{name}: target {path:?} has no sha256 hash (this server names targets by sha256)"))
                })?;
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(refuse("invalid_metadata", format!("roles.{name}: target {path:?} sha256 is not 64 hex digits")));
                }
                if path.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
                    return Err(refuse("invalid_target_path", format!("roles.{name}: target path {path:?} has empty, '.' or '..' segments")));
                }
                let served_name = consistent_name(path, sha);
                let served = self.targets_dir.join(&served_name);
                let staged_name = sha.to_ascii_lowercase();
                let staged = self.staging_dir.join(&staged_name);
                let have = if served.exists() { Some(served.clone()) } else if staged.exists() { Some(staged.clone()) } else { None };
                let Some(file) = have else {
                    return Err(refuse(
                        "target_not_uploaded",
                        format!("roles.{name}: target {path:?} (sha256 {sha}) has not been uploaded; POST it to /api/v1/targets first"),
                    ));
                };
                let len = std::fs::metadata(&file).map_err(|e| ServerError::io("stat", &file, e))?.len();
                if len != tf.length {
                    return Err(refuse(
                        "length_mismatch",
                        format!("roles.{name}: target {path:?} is signed as {} bytes, the uploaded file has {len}", tf.length),
                    ));
                }
                if file == staged && !placed.iter().any(|p| p.served == served_name) {
                    placed.push(PlacedTarget { staged: staged_name, served: served_name });
                }
                // A release's SBOM reference must point at a target this role signs with
                // that hash and length; its class is the one its path names; the SBOM
                // policy applies to releases added now.
                if let Ok(Some(custom)) = FirmwareCustom::from_custom(tf.custom.as_ref(), path) {
                    if let Some(why) = index::class_mismatch(path, &custom) {
                        return Err(refuse("hardware_class_mismatch", format!("roles.{name}: {why}")));
                    }
                    match &custom.sbom {
                        Some(sref) => {
                            let signed = all[name].signed.targets.get(&sref.path);
                            if !signed.is_some_and(|t| t.hashes.get("sha256") == Some(&sref.sha256) && t.length == sref.length) {
                                return Err(refuse(
                                    "sbom_mismatch",
                                    format!(
                                        "roles.{name}: target {path:?} names SBOM {:?} (sha256 {}, {} bytes), which this role does not sign with that hash and length",
                                        sref.path, sref.sha256, sref.length
                                    ),
                                ));
                            }
                        }
                        None if self.require_sbom && st.roles.get(name).is_none_or(|old| !old.signed.targets.contains_key(path)) => {
                            return Err(refuse(
                                "sbom_required",
                                format!("roles.{name}: release target {path:?} has no SBOM, and this server's policy (repository.require_sbom) requires one"),
                            ));
                        }
                        None => {}
                    }
                }
            }
        }

        // Verified: one transaction. Versioned role files and the snapshot first, the
        // unversioned copies, the new roots, timestamp.json, root.json.
        let meta = all.iter().map(|(k, v)| (format!("{k}.json"), MetaFile::version_only(v.signed.version))).collect();
        let mut next = State { root, roles: all, snapshot: st.snapshot.clone(), timestamp: st.timestamp.clone() };
        let online = self.sign_online(&next, Some(meta), now)?;
        let roles: Vec<(&str, u64, &[u8])> = changed.iter().map(|(k, b)| (k.as_str(), next.roles[k].signed.version, b.as_slice())).collect();
        let mut tx = Transaction { targets: placed, files: transaction_files(&roles, &online, &new_roots)?, ..Transaction::default() };
        tx.remove = removed.iter().map(|r| format!("{}.json", quote_role(r))).collect();
        self.journal.run(&tx)?;
        next.snapshot = Some(online.snapshot_env);
        next.timestamp = Some(online.timestamp_env);
        *st = next;
        if !removed.is_empty() {
            tracing::warn!(roles = ?removed, "roles no delegation reaches any more were dropped from the snapshot");
        }
        let versions = changed.keys().map(|k| (k.clone(), st.roles[k].signed.version)).collect();
        Ok(Self::outcome(&st, versions, removed, false))
    }

    /// The highest version of `role` under `metadata/` (0 when none).
    fn highest_served_version(&self, role: &str) -> Result<u64, ServerError> {
        let suffix = format!(".{}.json", quote_role(role));
        let mut highest = 0;
        let entries = std::fs::read_dir(&self.metadata_dir).map_err(|e| ServerError::io("list", &self.metadata_dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(v) = name.strip_suffix(&suffix).and_then(|v| v.parse::<u64>().ok()) {
                highest = highest.max(v);
            }
        }
        Ok(highest)
    }

    /// Signs a snapshot (when `meta` is given; its version is the next one no file
    /// under `metadata/` has) and a timestamp for `st`.
    fn sign_online(&self, st: &State, meta: Option<BTreeMap<String, MetaFile>>, now: DateTime<Utc>) -> Result<Online, ServerError> {
        let now = whole_seconds(now);
        let (snapshot, snapshot_env, snap_bytes) = match meta {
            Some(meta) => {
                let mut version = st.snapshot.as_ref().map(|s| s.signed.version + 1).unwrap_or(1);
                // A number an interrupted publish of an older server left behind was
                // perhaps served: never reuse it.
                while self.metadata_dir.join(format!("{version}.snapshot.json")).exists() {
                    version += 1;
                }
                let expires = now + chrono::Duration::from_std(self.snapshot_expiry).unwrap_or(chrono::Duration::days(7));
                let body = tuf::metadata::new_snapshot(version, expires, meta);
                let bytes = tuf::sign(&body, &[&self.snapshot_key]).map_err(|e| ServerError::proto("sign snapshot", e))?;
                let env = Envelope::parse(&bytes, "snapshot").map_err(|e| ServerError::proto("snapshot", e))?;
                (Some((version, bytes.clone())), env, bytes)
            }
            None => {
                let env = st.snapshot.clone().ok_or_else(|| ServerError::State("no snapshot to re-time".into()))?;
                let bytes = read(&self.metadata_dir.join(format!("{}.snapshot.json", env.signed.version)))?;
                (None, env, bytes)
            }
        };
        let version = st.timestamp.as_ref().map(|t| t.signed.version + 1).unwrap_or(1);
        let expires = now + chrono::Duration::from_std(self.timestamp_expiry).unwrap_or(chrono::Duration::days(1));
        let body = tuf::metadata::new_timestamp(version, expires, MetaFile::describing(snapshot_env.signed.version, &snap_bytes));
        let timestamp = tuf::sign(&body, &[&self.timestamp_key]).map_err(|e| ServerError::proto("sign timestamp", e))?;
        let timestamp_env = Envelope::parse(&timestamp, "timestamp").map_err(|e| ServerError::proto("timestamp", e))?;
        Ok(Online { snapshot, snapshot_env, timestamp, timestamp_env })
    }

    /// Re-signs timestamp (and snapshot) when less than half their lifetime is left.
    /// Returns what was re-signed.
    pub async fn resign_if_due(&self, now: DateTime<Utc>) -> Result<Option<(u64, u64)>, ServerError> {
        let mut st = self.state.lock().await;
        self.settle(&mut st)?;
        let (Some(ts), Some(snap)) = (st.timestamp.clone(), st.snapshot.clone()) else { return Ok(None) };
        let left = |expires: Result<DateTime<Utc>, outpost_protocol::Error>| expires.map(|e| e - now).unwrap_or(chrono::Duration::zero());
        let half = |d: Duration| chrono::Duration::from_std(d / 2).unwrap_or(chrono::Duration::zero());
        let snapshot_due = left(snap.expires_at()) < half(self.snapshot_expiry);
        let timestamp_due = left(ts.expires_at()) < half(self.timestamp_expiry);
        if !snapshot_due && !timestamp_due {
            return Ok(None);
        }
        let meta = snapshot_due.then(|| snap.signed.meta.clone());
        let online = self.sign_online(&st, meta, now)?;
        self.journal.run(&Transaction { files: transaction_files(&[], &online, &[])?, ..Transaction::default() })?;
        st.snapshot = Some(online.snapshot_env);
        st.timestamp = Some(online.timestamp_env);
        Ok(Some((
            st.snapshot.as_ref().map(|s| s.signed.version).unwrap_or(0),
            st.timestamp.as_ref().map(|t| t.signed.version).unwrap_or(0),
        )))
    }
}

/// The metadata files of a transaction, in the order they become visible: versioned
/// role files and snapshot (new names no client looks for yet), their unversioned
/// copies, the new roots, `timestamp.json` (what clients start from), `root.json`.
/// The roots come right before the timestamp so that a client sees a new root and the
/// metadata it signs as close together as static files allow.
fn transaction_files(roles: &[(&str, u64, &[u8])], online: &Online, roots: &[(u64, Vec<u8>)]) -> Result<Vec<MetadataFile>, ServerError> {
    let mut files = Vec::new();
    for (name, version, bytes) in roles {
        files.push(MetadataFile::new(format!("{version}.{}.json", quote_role(name)), bytes)?);
    }
    if let Some((version, bytes)) = &online.snapshot {
        files.push(MetadataFile::new(format!("{version}.snapshot.json"), bytes)?);
    }
    for (name, _, bytes) in roles {
        files.push(MetadataFile::new(format!("{}.json", quote_role(name)), bytes)?);
    }
    if let Some((_, bytes)) = &online.snapshot {
        files.push(MetadataFile::new("snapshot.json", bytes)?);
    }
    for (version, bytes) in roots {
        files.push(MetadataFile::new(format!("{version}.root.json"), bytes)?);
    }
    files.push(MetadataFile::new("timestamp.json", &online.timestamp)?);
    if let Some((_, bytes)) = roots.last() {
        files.push(MetadataFile::new("root.json", bytes)?);
    }
    Ok(files)
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
