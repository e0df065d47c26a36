//! The image repository on the local filesystem: TUF metadata under `metadata/`,
//! targets under `targets/` (consistent-snapshot names), uploads under `staging/`.
//!
//! The server holds only the online keys (snapshot, timestamp). Offline-signed root
//! and targets metadata arrive through [`Repository::publish`], which verifies the
//! whole upload against the trusted root before writing anything; new versioned
//! files are written first and `timestamp.json` is renamed into place last, so a
//! client (or a crash) sees either the old repository or the new one, never a mix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outpost_protocol::keys::{LoadedKey, SigningKey};
use outpost_protocol::tuf::{
    self, quote_role, verify_threshold, Envelope, MetaFile, Root, Snapshot, Targets, Timestamp,
};
use serde::Serialize;
use serde_json::Value;

use crate::config::ServerConfig;
use crate::error::ServerError;

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
    pub roles: BTreeMap<String, u64>,
    pub snapshot_version: u64,
    pub timestamp_version: u64,
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

/// A signed full-image firmware release, as the director assigns it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FirmwareRelease {
    pub path: String,
    pub length: u64,
    pub sha256: String,
    pub version: String,
    /// The image digest the device's TPM records when it boots this release.
    pub measurement: String,
    pub sbom_sha256: Option<String>,
}

pub struct Repository {
    metadata_dir: PathBuf,
    targets_dir: PathBuf,
    staging_dir: PathBuf,
    snapshot_key: SigningKey,
    timestamp_key: SigningKey,
    snapshot_expiry: Duration,
    timestamp_expiry: Duration,
    state: tokio::sync::Mutex<State>,
    /// Policy: new firmware releases must name an SBOM.
    require_sbom: bool,
    /// What the signed firmware metadata says per hardware class, built for the role
    /// versions it names (every check-in asks).
    firmware: std::sync::Mutex<Option<FirmwareIndex>>,
}

/// Signed firmware metadata per hardware class, for one set of role versions.
struct FirmwareIndex {
    role_versions: Vec<(String, u64)>,
    /// Expected measurement (image sha256) -> the target that names it.
    measurements: BTreeMap<String, Arc<BTreeMap<String, String>>>,
    /// Full-image releases (delta patches excluded).
    releases: BTreeMap<String, Arc<Vec<FirmwareRelease>>>,
}

impl FirmwareIndex {
    /// One pass over every verified role's targets.
    fn build(st: &State, role_versions: Vec<(String, u64)>) -> Self {
        let mut measurements: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut releases: BTreeMap<String, BTreeMap<String, FirmwareRelease>> = BTreeMap::new();
        for env in st.roles.values() {
            for (path, file) in &env.signed.targets {
                let Ok(Some(custom)) = outpost_protocol::release::FirmwareCustom::from_custom(file.custom.as_ref(), path) else { continue };
                let class = custom.hardware_class.as_str();
                measurements.entry(class.to_owned()).or_default().entry(custom.expected_measurement.sha256.clone()).or_insert_with(|| path.clone());
                if custom.encoding == outpost_protocol::release::Encoding::ZstdPatch {
                    continue;
                }
                let Some(sha256) = file.hashes.get("sha256") else { continue };
                releases.entry(class.to_owned()).or_default().entry(path.clone()).or_insert_with(|| FirmwareRelease {
                    path: path.clone(),
                    length: file.length,
                    sha256: sha256.clone(),
                    version: custom.version.to_string(),
                    measurement: custom.expected_measurement.sha256.clone(),
                    sbom_sha256: custom.sbom.as_ref().map(|s| s.sha256.clone()),
                });
            }
        }
        FirmwareIndex {
            role_versions,
            measurements: measurements.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            releases: releases.into_iter().map(|(k, v)| (k, Arc::new(v.into_values().collect()))).collect(),
        }
    }
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

impl Repository {
    /// Opens (or on first start creates from `trusted_root`) the repository.
    pub fn open(config: &ServerConfig) -> Result<Self, ServerError> {
        let base = config.data_dir.join("repository");
        let metadata_dir = base.join("metadata");
        let targets_dir = base.join("targets");
        let staging_dir = base.join("staging");
        for d in [&metadata_dir, &targets_dir, &staging_dir] {
            std::fs::create_dir_all(d).map_err(|e| ServerError::io("create", d, e))?;
        }
        remove_partial_uploads(&staging_dir);
        let snapshot_key = load_signing(&config.snapshot_key)?;
        let timestamp_key = load_signing(&config.timestamp_key)?;
        let root_path = metadata_dir.join("root.json");
        if !root_path.exists() {
            let bytes = read(&config.trusted_root)?;
            let root: Envelope<Root> = Envelope::parse(&bytes, "root")
                .map_err(|e| ServerError::proto(format!("trusted root {}", config.trusted_root.display()), e))?;
            let r = root.signed.role("root").map_err(|e| ServerError::proto("trusted root", e))?;
            verify_threshold("root", &root.canonical_signed, &root.signatures, &r.keyids, r.threshold, &root.signed.keys)
                .map_err(|e| ServerError::proto(format!("trusted root {}", config.trusted_root.display()), e))?;
            write_atomic(&metadata_dir.join(format!("{}.root.json", root.signed.version)), &bytes)?;
            write_atomic(&root_path, &bytes)?;
            tracing::info!(version = root.signed.version, "initialized repository from trusted root");
        }
        let root: Envelope<Root> = Envelope::parse(&read(&root_path)?, "root").map_err(|e| ServerError::proto("root.json", e))?;
        check_online_keys(&root.signed, &snapshot_key, &timestamp_key)
            .map_err(|reason| ServerError::Config { path: config.snapshot_key.clone(), reason })?;
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
        Ok(Repository {
            metadata_dir,
            targets_dir,
            staging_dir,
            snapshot_key,
            timestamp_key,
            snapshot_expiry: config.snapshot_expiry,
            timestamp_expiry: config.timestamp_expiry,
            state: tokio::sync::Mutex::new(state),
            firmware: std::sync::Mutex::new(None),
            require_sbom: config.require_sbom,
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

    /// Every SBOM the signed firmware targets name: (full image target, class,
    /// version, image sha256, SBOM reference), one per SBOM.
    pub async fn sbom_refs(&self) -> Vec<(String, String, String, String, outpost_protocol::release::SbomRef)> {
        let st = self.state.lock().await;
        let mut out: BTreeMap<String, (String, String, String, String, outpost_protocol::release::SbomRef)> = BTreeMap::new();
        for env in st.roles.values() {
            for (path, file) in &env.signed.targets {
                if let Ok(Some(c)) = outpost_protocol::release::FirmwareCustom::from_custom(file.custom.as_ref(), path) {
                    if let Some(sref) = &c.sbom {
                        let target = c.full_target.clone().unwrap_or_else(|| path.clone());
                        out.entry(sref.sha256.clone()).or_insert_with(|| {
                            (target, c.hardware_class.as_str().to_owned(), c.version.to_string(), c.expected_measurement.sha256.clone(), sref.clone())
                        });
                    }
                }
            }
        }
        out.into_values().collect()
    }

    /// The full-image firmware targets signed for `hardware_class` (delta patches
    /// excluded), from every verified role.
    pub async fn firmware_releases(&self, hardware_class: &str) -> Arc<Vec<FirmwareRelease>> {
        self.with_firmware_index(|idx| idx.releases.get(hardware_class).cloned()).await.unwrap_or_default()
    }

    /// Runs `f` on the firmware index, rebuilding it first when a role changed.
    async fn with_firmware_index<T>(&self, f: impl FnOnce(&FirmwareIndex) -> T) -> T {
        let st = self.state.lock().await;
        let versions: Vec<(String, u64)> = st.roles.iter().map(|(k, v)| (k.clone(), v.signed.version)).collect();
        let mut cache = self.firmware.lock().unwrap_or_else(|p| p.into_inner());
        let idx = match cache.take() {
            Some(idx) if idx.role_versions == versions => idx,
            _ => FirmwareIndex::build(&st, versions),
        };
        f(cache.insert(idx))
    }

    /// The signed sha256 of a target, looked up in every verified role.
    pub async fn target_sha256(&self, path: &str) -> Option<String> {
        let st = self.state.lock().await;
        st.roles.values().find_map(|env| env.signed.targets.get(path).and_then(|t| t.hashes.get("sha256").cloned()))
    }

    /// Where a published target's bytes are (consistent-snapshot name).
    pub fn target_file(&self, path: &str, sha256: &str) -> PathBuf {
        self.targets_dir.join(consistent_name(path, sha256))
    }

    /// Every expected measurement (image SHA-256) the offline-signed release metadata
    /// names for `hardware_class`, with the target that names it. Roles reach the state
    /// only after their signatures and delegated paths verified on publish.
    pub async fn expected_measurements(&self, hardware_class: &str) -> Arc<BTreeMap<String, String>> {
        self.with_firmware_index(|idx| idx.measurements.get(hardware_class).cloned()).await.unwrap_or_default()
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

    /// Verifies and applies an upload of offline-signed metadata: zero or more new
    /// root versions (in order) and new versions of targets roles. Every target they
    /// list must already be served or uploaded to staging with the signed length and
    /// sha256. Then signs a new snapshot and timestamp.
    pub async fn publish(&self, roots: &[Value], roles: &BTreeMap<String, Value>, now: DateTime<Utc>) -> Result<PublishOutcome, PublishError> {
        let mut st = self.state.lock().await;
        let mut root = st.root.clone();
        let mut new_roots: Vec<(u64, Vec<u8>)> = Vec::new();
        for (i, value) in roots.iter().enumerate() {
            let bytes = pretty(value);
            let env: Envelope<Root> = Envelope::parse(&bytes, "root").map_err(|e| refuse("invalid_metadata", format!("roots[{i}]: {e}")))?;
            let old = &root.signed;
            let old_role = &old.roles["root"];
            verify_threshold("root", &env.canonical_signed, &env.signatures, &old_role.keyids, old_role.threshold, &old.keys)
                .map_err(|e| refuse("bad_signature", format!("roots[{i}] (v{}) under trusted root v{}: {e}", env.signed.version, old.version)))?;
            if env.signed.version != old.version + 1 {
                return Err(refuse("bad_version", format!("roots[{i}] is version {}, expected {}", env.signed.version, old.version + 1)));
            }
            let own = &env.signed.roles["root"];
            verify_threshold("root", &env.canonical_signed, &env.signatures, &own.keyids, own.threshold, &env.signed.keys)
                .map_err(|e| refuse("bad_signature", format!("roots[{i}] (v{}) under its own keys: {e}", env.signed.version)))?;
            if env.is_expired(now) {
                return Err(refuse("expired", format!("roots[{i}] (v{}) expired at {}", env.signed.version, env.signed.expires)));
            }
            new_roots.push((env.signed.version, bytes));
            root = env;
        }
        if !new_roots.is_empty() {
            check_online_keys(&root.signed, &self.snapshot_key, &self.timestamp_key)
                .map_err(|m| refuse("online_key_not_trusted", format!("{m}; configure the new online keys on the server first")))?;
        }

        // Targets roles, each verified with its delegator's keys (as updated by this upload).
        let mut all = st.roles.clone();
        let mut pending: BTreeMap<String, Vec<u8>> = roles.iter().map(|(k, v)| (k.clone(), pretty(v))).collect();
        let mut changed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        while !pending.is_empty() {
            let next = pending.keys().find(|name| name.as_str() == "targets" || delegator_of(&all, name, &pending).is_some()).cloned();
            let Some(name) = next else {
                let names: Vec<&String> = pending.keys().collect();
                return Err(refuse("not_delegated", format!("roles {names:?} are not delegated by any role in the repository or this upload")));
            };
            let bytes = pending.remove(&name).unwrap_or_default();
            let env: Envelope<Targets> = Envelope::parse(&bytes, &name).map_err(|e| refuse("invalid_metadata", format!("roles.{name}: {e}")))?;
            verify_role(&root.signed, &all, &name, &env).map_err(|m| refuse("bad_signature", format!("roles.{name}: {m}")))?;
            if let Some(cur) = all.get(&name) {
                if env.signed.version <= cur.signed.version && !changed.contains_key(&name) {
                    return Err(refuse(
                        "stale_version",
                        format!("roles.{name}: version {} is not newer than the served version {}", env.signed.version, cur.signed.version),
                    ));
                }
            }
            if env.is_expired(now) {
                return Err(refuse("expired", format!("roles.{name}: expired at {}", env.signed.expires)));
            }
            if name != "targets" {
                if let Some(parent) = delegator_of(&all, &name, &pending) {
                    let d = all.get(&parent).and_then(|p| p.signed.delegations.as_ref());
                    let role = d.and_then(|d| d.roles.as_ref()).and_then(|r| r.iter().find(|r| r.name == name));
                    if let Some(role) = role {
                        if let Some(bad) = env.signed.targets.keys().find(|p| !role.is_delegated_path(p)) {
                            return Err(refuse(
                                "target_outside_delegation",
                                format!("roles.{name}: target {bad:?} is outside the paths {parent} delegates to it ({:?})", role.paths),
                            ));
                        }
                    }
                }
            }
            all.insert(name.clone(), env);
            changed.insert(name, bytes);
        }
        if !all.contains_key("targets") {
            return Err(refuse("missing_targets", "the repository has no targets metadata yet; include roles.targets"));
        }
        // Roles left unchanged must still verify under the new root and delegations.
        for (name, env) in &all {
            if !changed.contains_key(name) {
                verify_role(&root.signed, &all, name, env).map_err(|m| {
                    refuse("needs_resign", format!("served {name} v{} no longer verifies after this upload ({m}); re-sign it and include it", env.signed.version))
                })?;
            }
        }
        if new_roots.is_empty() && changed.is_empty() {
            return Err(refuse("empty_upload", "nothing to publish: no roots and no roles"));
        }

        // Every target of a changed role must be present with its signed length and hash.
        let mut to_link: Vec<(PathBuf, PathBuf)> = Vec::new();
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
                let served = self.targets_dir.join(consistent_name(path, sha));
                let staged = self.staging_dir.join(sha.to_ascii_lowercase());
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
                if file == staged {
                    to_link.push((staged, served));
                }
                // A release's SBOM reference must point at a target this role signs with
                // that hash and length; the SBOM policy applies to releases added now.
                if let Ok(Some(custom)) = outpost_protocol::release::FirmwareCustom::from_custom(tf.custom.as_ref(), path) {
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

        // Verified: commit. Versioned files first, timestamp.json last.
        for (from, to) in &to_link {
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir).map_err(|e| ServerError::io("create", dir, e))?;
            }
            if !to.exists() {
                std::fs::hard_link(from, to)
                    .or_else(|_| std::fs::copy(from, to).map(|_| ()))
                    .map_err(|e| ServerError::io("place target", to, e))?;
            }
        }
        for (version, bytes) in &new_roots {
            write_atomic(&self.metadata_dir.join(format!("{version}.root.json")), bytes)?;
        }
        if let Some((_, bytes)) = new_roots.last() {
            write_atomic(&self.metadata_dir.join("root.json"), bytes)?;
        }
        for (name, bytes) in &changed {
            let q = quote_role(name);
            write_atomic(&self.metadata_dir.join(format!("{}.{q}.json", all[name].signed.version)), bytes)?;
            write_atomic(&self.metadata_dir.join(format!("{q}.json")), bytes)?;
        }
        let meta = all.iter().map(|(k, v)| (format!("{k}.json"), MetaFile::version_only(v.signed.version))).collect();
        let mut next = State { root, roles: all, snapshot: st.snapshot.clone(), timestamp: st.timestamp.clone() };
        self.sign_snapshot_and_timestamp(&mut next, Some(meta), now)?;
        for (from, _) in &to_link {
            let _ = std::fs::remove_file(from);
        }
        *st = next;
        Ok(PublishOutcome {
            root_version: st.root.signed.version,
            roles: changed.keys().map(|k| (k.clone(), st.roles[k].signed.version)).collect(),
            snapshot_version: st.snapshot.as_ref().map(|s| s.signed.version).unwrap_or(0),
            timestamp_version: st.timestamp.as_ref().map(|t| t.signed.version).unwrap_or(0),
        })
    }

    /// Signs snapshot (when `meta` is given) and timestamp into `st` and onto disk.
    fn sign_snapshot_and_timestamp(&self, st: &mut State, meta: Option<BTreeMap<String, MetaFile>>, now: DateTime<Utc>) -> Result<(), ServerError> {
        let now = whole_seconds(now);
        let (snap_env, snap_bytes) = match meta {
            Some(meta) => {
                let version = st.snapshot.as_ref().map(|s| s.signed.version + 1).unwrap_or(1);
                let expires = now + chrono::Duration::from_std(self.snapshot_expiry).unwrap_or(chrono::Duration::days(7));
                let body = tuf::metadata::new_snapshot(version, expires, meta);
                let bytes = tuf::sign(&body, &[&self.snapshot_key]).map_err(|e| ServerError::proto("sign snapshot", e))?;
                write_atomic(&self.metadata_dir.join(format!("{version}.snapshot.json")), &bytes)?;
                write_atomic(&self.metadata_dir.join("snapshot.json"), &bytes)?;
                let env = Envelope::parse(&bytes, "snapshot").map_err(|e| ServerError::proto("snapshot", e))?;
                (env, bytes)
            }
            None => {
                let env = st.snapshot.clone().ok_or_else(|| ServerError::State("no snapshot to re-time".into()))?;
                let bytes = read(&self.metadata_dir.join(format!("{}.snapshot.json", env.signed.version)))?;
                (env, bytes)
            }
        };
        let version = st.timestamp.as_ref().map(|t| t.signed.version + 1).unwrap_or(1);
        let expires = now + chrono::Duration::from_std(self.timestamp_expiry).unwrap_or(chrono::Duration::days(1));
        let body = tuf::metadata::new_timestamp(version, expires, MetaFile::describing(snap_env.signed.version, &snap_bytes));
        let bytes = tuf::sign(&body, &[&self.timestamp_key]).map_err(|e| ServerError::proto("sign timestamp", e))?;
        write_atomic(&self.metadata_dir.join("timestamp.json"), &bytes)?;
        st.timestamp = Some(Envelope::parse(&bytes, "timestamp").map_err(|e| ServerError::proto("timestamp", e))?);
        st.snapshot = Some(snap_env);
        Ok(())
    }

    /// Re-signs timestamp (and snapshot) when less than half their lifetime is left.
    /// Returns what was re-signed.
    pub async fn resign_if_due(&self, now: DateTime<Utc>) -> Result<Option<(u64, u64)>, ServerError> {
        let mut st = self.state.lock().await;
        let (Some(ts), Some(snap)) = (st.timestamp.clone(), st.snapshot.clone()) else { return Ok(None) };
        let left = |expires: Result<DateTime<Utc>, outpost_protocol::Error>| expires.map(|e| e - now).unwrap_or(chrono::Duration::zero());
        let half = |d: Duration| chrono::Duration::from_std(d / 2).unwrap_or(chrono::Duration::zero());
        let snapshot_due = left(snap.expires_at()) < half(self.snapshot_expiry);
        let timestamp_due = left(ts.expires_at()) < half(self.timestamp_expiry);
        if !snapshot_due && !timestamp_due {
            return Ok(None);
        }
        let meta = snapshot_due.then(|| snap.signed.meta.clone());
        let mut next = st.clone();
        self.sign_snapshot_and_timestamp(&mut next, meta, now)?;
        *st = next;
        Ok(Some((
            st.snapshot.as_ref().map(|s| s.signed.version).unwrap_or(0),
            st.timestamp.as_ref().map(|t| t.signed.version).unwrap_or(0),
        )))
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

/// The role that delegates `name`, among served roles and roles in this upload.
fn delegator_of(all: &BTreeMap<String, Envelope<Targets>>, name: &str, pending: &BTreeMap<String, Vec<u8>>) -> Option<String> {
    all.iter()
        .filter(|(parent, _)| !pending.contains_key(*parent))
        .find(|(_, env)| env.signed.delegations.as_ref().is_some_and(|d| d.role_keys(name).is_some()))
        .map(|(parent, _)| parent.clone())
}

fn verify_role(root: &Root, all: &BTreeMap<String, Envelope<Targets>>, name: &str, env: &Envelope<Targets>) -> Result<(), String> {
    if name == "targets" {
        let r = &root.roles["targets"];
        return verify_threshold(name, &env.canonical_signed, &env.signatures, &r.keyids, r.threshold, &root.keys).map_err(|e| e.to_string());
    }
    for parent in all.values() {
        if let Some(d) = &parent.signed.delegations {
            if let Some((ids, t)) = d.role_keys(name) {
                return verify_threshold(name, &env.canonical_signed, &env.signatures, &ids, t, &d.keys).map_err(|e| e.to_string());
            }
        }
    }
    Err(format!("no role delegates to {name}"))
}
