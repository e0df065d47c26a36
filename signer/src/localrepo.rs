//! The pipeline's local repository directory: the offline source of truth that
//! `outpost` signs into. Metadata lives under `metadata/` with versioned and
//! unversioned names, target files under `targets/` with consistent-snapshot names.
//! When the online snapshot and timestamp keys are local too, every change re-signs
//! them, making the directory a complete static TUF repository.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use outpost_protocol::keys::SigningKey;
use outpost_protocol::tuf::{self, consistent_name, online, Envelope, MetaFile, Root, Snapshot, Targets, Timestamp};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SignerError};
use crate::keyfile;

/// Expiry periods, persisted with the repository so every command uses the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub root_expires_secs: u64,
    pub targets_expires_secs: u64,
    pub snapshot_expires_secs: u64,
    pub timestamp_expires_secs: u64,
    /// Private key files of the online roles, when this directory signs them itself.
    #[serde(default)]
    pub online_keys: Option<OnlineKeyFiles>,
    /// Repository policy: every firmware release must come with an SBOM.
    #[serde(default)]
    pub require_sbom: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OnlineKeyFiles {
    pub snapshot: PathBuf,
    pub timestamp: PathBuf,
}

pub struct LocalRepo {
    pub dir: PathBuf,
    pub settings: Settings,
}

const SETTINGS: &str = "outpost-repo.json";

impl LocalRepo {
    pub fn create(dir: &Path, settings: Settings) -> Result<Self> {
        if dir.join("metadata/root.json").exists() {
            return Err(SignerError::Repo { dir: dir.into(), reason: "already initialized (metadata/root.json exists)".into() });
        }
        for sub in ["metadata", "targets"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| SignerError::io("create", &p, e))?;
        }
        let repo = LocalRepo { dir: dir.to_owned(), settings };
        repo.save_settings()?;
        Ok(repo)
    }

    pub fn open(dir: &Path) -> Result<Self> {
        let p = dir.join(SETTINGS);
        let bytes = std::fs::read(&p).map_err(|e| {
            SignerError::Repo { dir: dir.into(), reason: format!("not an Outpost repository (cannot read {SETTINGS}: {e}); run `outpost repo init` first") }
        })?;
        let settings = serde_json::from_slice(&bytes)
            .map_err(|e| SignerError::Repo { dir: dir.into(), reason: format!("{SETTINGS}: {e}") })?;
        Ok(LocalRepo { dir: dir.to_owned(), settings })
    }

    pub fn save_settings(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.settings).map_err(SignerError::encode("repository settings"))?;
        write_atomic(&self.dir.join(SETTINGS), &bytes)
    }

    pub fn metadata_path(&self, name: &str) -> PathBuf {
        self.dir.join("metadata").join(name)
    }

    pub fn expires(&self, secs: u64) -> chrono::DateTime<Utc> {
        online::expires_after(Utc::now(), chrono::Duration::seconds(secs as i64))
    }

    pub fn root(&self) -> Result<(Envelope<Root>, Vec<u8>)> {
        let p = self.metadata_path("root.json");
        let bytes = std::fs::read(&p).map_err(|e| SignerError::io("read", &p, e))?;
        let env = Envelope::parse(&bytes, "root").map_err(|e| SignerError::proto(format!("read {}", p.display()), e))?;
        Ok((env, bytes))
    }

    /// Root metadata file of a given version.
    pub fn root_version_bytes(&self, version: u64) -> Result<Vec<u8>> {
        let p = self.metadata_path(&format!("{version}.root.json"));
        std::fs::read(&p).map_err(|e| SignerError::io("read", &p, e))
    }

    pub fn role(&self, role: &str) -> Result<Option<(Envelope<Targets>, Vec<u8>)>> {
        let p = self.metadata_path(&format!("{}.json", tuf::quote_role(role)));
        match std::fs::read(&p) {
            Ok(bytes) => {
                let env = Envelope::parse(&bytes, role).map_err(|e| SignerError::proto(format!("read {}", p.display()), e))?;
                Ok(Some((env, bytes)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SignerError::io("read", &p, e)),
        }
    }

    /// Names of the targets roles (top-level and delegated) that have metadata here.
    pub fn role_names(&self) -> Result<Vec<String>> {
        let dir = self.dir.join("metadata");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| SignerError::io("list", &dir, e))? {
            let entry = entry.map_err(|e| SignerError::io("list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else { continue };
            if stem.starts_with(|c: char| c.is_ascii_digit()) || ["root", "timestamp", "snapshot"].contains(&stem) {
                continue;
            }
            let role = percent_encoding::percent_decode_str(stem).decode_utf8_lossy().into_owned();
            names.push(role);
        }
        names.sort();
        Ok(names)
    }

    /// The highest version of `role` under `metadata/` (0 when there is none),
    /// current or historical.
    pub fn highest_version(&self, role: &str) -> Result<u64> {
        let dir = self.dir.join("metadata");
        let suffix = format!(".{}.json", tuf::quote_role(role));
        let mut highest = 0;
        for entry in std::fs::read_dir(&dir).map_err(|e| SignerError::io("list", &dir, e))? {
            let entry = entry.map_err(|e| SignerError::io("list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(v) = name.strip_suffix(&suffix).and_then(|v| v.parse::<u64>().ok()) {
                highest = highest.max(v);
            }
        }
        Ok(highest)
    }

    /// Removes the current (unversioned) metadata of every role no delegation chain
    /// from `targets` names any more, so it leaves the snapshot and `repo push`.
    /// Returns their names.
    pub fn drop_unreachable_roles(&self) -> Result<Vec<String>> {
        let mut loaded = BTreeMap::new();
        for name in self.role_names()? {
            if let Some((env, _)) = self.role(&name)? {
                loaded.insert(name, env);
            }
        }
        let reachable: std::collections::BTreeSet<String> =
            tuf::RoleGraph::new(loaded.iter().map(|(k, v)| (k.as_str(), v))).reachable().into_iter().map(str::to_owned).collect();
        let mut removed = Vec::new();
        for name in loaded.keys().filter(|n| !reachable.contains(*n)) {
            let p = self.metadata_path(&format!("{}.json", tuf::quote_role(name)));
            std::fs::remove_file(&p).map_err(|e| SignerError::io("remove", &p, e))?;
            removed.push(name.clone());
        }
        if !removed.is_empty() {
            let dir = self.dir.join("metadata");
            outpost_fsio::sync_dir(&dir).map_err(|e| SignerError::io("fsync", &dir, e))?;
        }
        Ok(removed)
    }

    pub fn write_root(&self, version: u64, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.metadata_path(&format!("{version}.root.json")), bytes)?;
        write_atomic(&self.metadata_path("root.json"), bytes)
    }

    pub fn write_role(&self, role: &str, version: u64, bytes: &[u8]) -> Result<()> {
        let q = tuf::quote_role(role);
        write_atomic(&self.metadata_path(&format!("{version}.{q}.json")), bytes)?;
        write_atomic(&self.metadata_path(&format!("{q}.json")), bytes)
    }

    /// Keys and threshold that sign `role`, and the key set they come from.
    pub fn role_keys(&self, role: &str) -> Result<(Vec<String>, u64, BTreeMap<String, outpost_protocol::keys::PublicKey>)> {
        let (root, _) = self.root()?;
        if role == "targets" {
            let r = root.signed.role("targets").map_err(|e| SignerError::proto("root", e))?;
            return Ok((r.keyids.clone(), r.threshold, root.signed.keys.clone()));
        }
        for parent in self.role_names()? {
            if let Some((env, _)) = self.role(&parent)? {
                if let Some(d) = &env.signed.delegations {
                    if let Some((ids, t)) = d.role_keys(role) {
                        return Ok((ids, t, d.keys.clone()));
                    }
                }
            }
        }
        Err(SignerError::Repo { dir: self.dir.clone(), reason: format!("no role delegates to {role:?}; add it with `outpost repo delegate`") })
    }

    /// Signs targets metadata for `role`, checking first that `keys` meet its threshold.
    pub fn sign_role(&self, role: &str, body: &Targets, keys: &[SigningKey]) -> Result<Vec<u8>> {
        let (keyids, threshold, _) = self.role_keys(role)?;
        let usable: Vec<&SigningKey> = keys.iter().filter(|k| keyids.iter().any(|id| id == k.key_id())).collect();
        let distinct: std::collections::BTreeSet<&str> = usable.iter().map(|k| k.key_id()).collect();
        if (distinct.len() as u64) < threshold {
            return Err(SignerError::NotEnoughKeys { role: role.into(), threshold, have: distinct.len(), keyids });
        }
        tuf::sign(body, &usable).map_err(|e| SignerError::proto(format!("sign {role}"), e))
    }

    /// Re-signs snapshot and timestamp when this directory holds the online keys.
    pub fn resign_online(&self) -> Result<bool> {
        let Some(files) = &self.settings.online_keys else { return Ok(false) };
        let snap_key = keyfile::load_signing(&files.snapshot)?;
        let ts_key = keyfile::load_signing(&files.timestamp)?;
        let mut meta = BTreeMap::new();
        for role in self.role_names()? {
            if let Some((env, _)) = self.role(&role)? {
                meta.insert(format!("{role}.json"), MetaFile::version_only(env.signed.version));
            }
        }
        let old_snapshot: Option<Envelope<Snapshot>> = std::fs::read(self.metadata_path("snapshot.json"))
            .ok()
            .and_then(|b| Envelope::parse(&b, "snapshot").ok());
        let old_ts: Option<Envelope<Timestamp>> = std::fs::read(self.metadata_path("timestamp.json"))
            .ok()
            .and_then(|b| Envelope::parse(&b, "timestamp").ok());
        let snap_version = old_snapshot.map(|s| s.signed.version + 1).unwrap_or(1);
        let snapshot = online::sign_snapshot(snap_version, self.expires(self.settings.snapshot_expires_secs), meta, &snap_key)
            .map_err(|e| SignerError::proto("sign snapshot", e))?;
        write_atomic(&self.metadata_path(&format!("{snap_version}.snapshot.json")), &snapshot.bytes)?;
        write_atomic(&self.metadata_path("snapshot.json"), &snapshot.bytes)?;
        let ts_version = old_ts.map(|t| t.signed.version + 1).unwrap_or(1);
        let ts = online::sign_timestamp(ts_version, self.expires(self.settings.timestamp_expires_secs), snap_version, &snapshot.bytes, &ts_key)
            .map_err(|e| SignerError::proto("sign timestamp", e))?;
        write_atomic(&self.metadata_path("timestamp.json"), &ts.bytes)?;
        Ok(true)
    }

    /// Where a target file lives in a consistent-snapshot layout.
    pub fn target_file_path(&self, target_path: &str, sha256: &str) -> PathBuf {
        self.dir.join("targets").join(consistent_name(target_path, sha256))
    }
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    outpost_fsio::write_atomic(path, data).map_err(|e| SignerError::io("write", path, e))
}

pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 90d, 12h, 1y)"))
}
