//! The TUF client workflow over HTTP, step for step as the specification (and its
//! reference implementation) does it: root chain → timestamp → snapshot → targets,
//! then a lazy, depth-first, path-matched search of delegations per target. Local
//! copies are tried first and used when still valid as final metadata, so unchanged
//! snapshot and targets are never downloaded twice.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use outpost_protocol::pattern::pattern_may_match_prefix;
use outpost_protocol::tuf::{consistent_name, quote_file_name, quote_role, quote_target_path, SnapshotSource, TargetFile, Targets, TrustedSet};
use outpost_protocol::Error as TufError;

use crate::error::{AgentError, Result};
use crate::fetch::Fetcher;

/// Limits from the specification's reference client.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_root_rotations: u64,
    pub max_delegations: usize,
    pub root_max_length: u64,
    pub timestamp_max_length: u64,
    pub snapshot_max_length: u64,
    pub targets_max_length: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_root_rotations: 256,
            max_delegations: 32,
            root_max_length: 512_000,
            timestamp_max_length: 16_384,
            snapshot_max_length: 2_000_000,
            targets_max_length: 5_000_000,
        }
    }
}

/// A target found in signed metadata: its path, its signed description, and the role
/// that signed it.
#[derive(Debug, Clone)]
pub struct TargetInfo {
    pub path: String,
    pub file: TargetFile,
    pub role: String,
}

pub struct Updater {
    metadata_dir: PathBuf,
    metadata_url: String,
    fetcher: Fetcher,
    trusted: TrustedSet,
    limits: Limits,
    refreshed: bool,
}

fn with_slash(url: &str) -> String {
    if url.ends_with('/') {
        url.to_owned()
    } else {
        format!("{url}/")
    }
}

impl Updater {
    /// Loads the trusted root from `metadata_dir/root.json`.
    pub fn new(metadata_dir: &Path, metadata_url: &str, fetcher: Fetcher, now: DateTime<Utc>) -> Result<Self> {
        let root_path = metadata_dir.join("root.json");
        let root = std::fs::read(&root_path).map_err(|e| AgentError::io("read trusted root", &root_path, e))?;
        let trusted = TrustedSet::new(&root, now).map_err(|e| AgentError::tuf(format!("load trusted root {}", root_path.display()), e))?;
        Ok(Updater {
            metadata_dir: metadata_dir.to_owned(),
            metadata_url: with_slash(metadata_url),
            fetcher,
            trusted,
            limits: Limits::default(),
            refreshed: false,
        })
    }

    /// The agent's TUF client for its image repository (`server_url/metadata/`).
    pub fn for_agent(config: &crate::config::AgentConfig, fetcher: Fetcher) -> Result<Self> {
        Self::new(&config.metadata_dir(), &format!("{}/metadata/", config.server_url), fetcher, Utc::now())
    }

    pub fn trusted(&self) -> &TrustedSet {
        &self.trusted
    }

    /// Top-level refresh: root, timestamp, snapshot, targets. Runs at most once per
    /// updater (the reference client's contract).
    pub async fn refresh(&mut self) -> Result<()> {
        if self.refreshed {
            return Ok(());
        }
        self.load_root().await?;
        self.load_timestamp().await?;
        self.load_snapshot().await?;
        self.load_targets("targets", "root").await?;
        self.refreshed = true;
        Ok(())
    }

    fn local_path(&self, role: &str) -> PathBuf {
        self.metadata_dir.join(format!("{}.json", quote_role(role)))
    }

    fn read_local(&self, role: &str) -> Option<Vec<u8>> {
        std::fs::read(self.local_path(role)).ok()
    }

    fn persist(&self, role: &str, data: &[u8]) -> Result<()> {
        let path = self.local_path(role);
        outpost_fsio::write_atomic(&path, data).map_err(|e| AgentError::io("write", &path, e))
    }

    fn url(&self, role: &str, version: Option<u64>) -> String {
        match version {
            Some(v) => format!("{}{v}.{}.json", self.metadata_url, quote_role(role)),
            None => format!("{}{}.json", self.metadata_url, quote_role(role)),
        }
    }

    async fn load_root(&mut self) -> Result<()> {
        let start = self.trusted.root().version + 1;
        for version in start..start + self.limits.max_root_rotations {
            let url = self.url("root", Some(version));
            let data = match self.fetcher.fetch_bytes(&url, self.limits.root_max_length).await {
                Ok(d) => d,
                Err(e) if e.is_not_found() => break,
                Err(e) => return Err(e),
            };
            self.trusted.update_root(&data).map_err(|e| AgentError::tuf(format!("update to root v{version}"), e))?;
            self.persist("root", &data)?;
            tracing::info!(version, "trusted new root");
        }
        Ok(())
    }

    async fn load_timestamp(&mut self) -> Result<()> {
        if let Some(local) = self.read_local("timestamp") {
            if let Err(e) = self.trusted.update_timestamp(&local) {
                tracing::debug!(error = %e, "local timestamp not valid as final");
            }
        }
        let url = self.url("timestamp", None);
        let data = self.fetcher.fetch_bytes(&url, self.limits.timestamp_max_length).await?;
        match self.trusted.update_timestamp(&data) {
            Ok(()) => self.persist("timestamp", &data),
            Err(TufError::EqualVersion { .. }) => Ok(()),
            Err(e) => Err(AgentError::tuf("verify timestamp", e)),
        }
    }

    async fn load_snapshot(&mut self) -> Result<()> {
        if let Some(local) = self.read_local("snapshot") {
            match self.trusted.update_snapshot(&local, SnapshotSource::LocalCopy) {
                Ok(()) => return Ok(()),
                Err(e) => tracing::debug!(error = %e, "local snapshot not valid as final"),
            }
        }
        let ts = self.trusted.timestamp().ok_or_else(|| AgentError::NotLoaded { role: "timestamp".into() })?;
        let meta = ts.snapshot_meta();
        let limit = meta.length.unwrap_or(self.limits.snapshot_max_length);
        let version = self.trusted.root().consistent_snapshot.then_some(meta.version);
        let url = self.url("snapshot", version);
        let data = self.fetcher.fetch_bytes(&url, limit).await?;
        self.trusted.update_snapshot(&data, SnapshotSource::Fetched).map_err(|e| AgentError::tuf("verify snapshot", e))?;
        self.persist("snapshot", &data)
    }

    async fn load_targets(&mut self, role: &str, delegator: &str) -> Result<&Targets> {
        if self.trusted.targets(role).is_some() {
            self.trusted
                .check_loaded_for_delegator(role, delegator)
                .map_err(|e| AgentError::tuf(format!("verify {role}"), e))?;
        } else {
            let local_ok = match self.read_local(role) {
                Some(local) => match self.trusted.update_delegated_targets(&local, role, delegator) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(role, error = %e, "local metadata not valid as final");
                        false
                    }
                },
                None => false,
            };
            if !local_ok {
                let snapshot = self.trusted.snapshot().ok_or_else(|| AgentError::NotLoaded { role: "snapshot".into() })?;
                let meta = snapshot.meta.get(&format!("{role}.json")).ok_or_else(|| {
                    AgentError::tuf(
                        format!("load {role}"),
                        TufError::Missing(format!("role {role} is delegated but not listed in snapshot")),
                    )
                })?;
                let limit = meta.length.unwrap_or(self.limits.targets_max_length);
                let version = self.trusted.root().consistent_snapshot.then_some(meta.version);
                let url = self.url(role, version);
                let data = self.fetcher.fetch_bytes(&url, limit).await?;
                self.trusted
                    .update_delegated_targets(&data, role, delegator)
                    .map_err(|e| AgentError::tuf(format!("verify {role}"), e))?;
                self.persist(role, &data)?;
            }
        }
        self.trusted.targets(role).ok_or_else(|| AgentError::NotLoaded { role: role.to_owned() })
    }

    /// Finds `target_path` by a pre-order depth-first walk of the delegation graph,
    /// loading only roles whose paths match, honouring `terminating` (client workflow
    /// 5.6.7): a role is reached only through a chain in which every hop is delegated
    /// that path. This is the one delegation search of the agent: the installer's and
    /// the policy step's candidates are resolved through it too. A search that would
    /// need more than `max_delegations` roles is an error, never a silent "absent".
    pub async fn get_target_info(&mut self, target_path: &str) -> Result<Option<TargetInfo>> {
        self.refresh().await?;
        let mut to_visit: Vec<(String, String)> = vec![("targets".into(), "root".into())];
        let mut visited: BTreeSet<String> = BTreeSet::new();
        let mut budget = self.limits.max_delegations;
        while let Some((role, parent)) = to_visit.pop() {
            if visited.contains(&role) {
                continue;
            }
            if budget == 0 {
                return Err(AgentError::DelegationLimit {
                    target: target_path.to_owned(),
                    limit: self.limits.max_delegations,
                    next_role: role,
                });
            }
            let targets = self.load_targets(&role, &parent).await?;
            if let Some(file) = targets.targets.get(target_path) {
                return Ok(Some(TargetInfo { path: target_path.to_owned(), file: file.clone(), role }));
            }
            let mut children = Vec::new();
            if let Some(d) = &targets.delegations {
                for (child, terminating) in d.roles_for_target(target_path) {
                    children.push((child, role.clone()));
                    if terminating {
                        to_visit.clear();
                        break;
                    }
                }
            }
            visited.insert(role);
            budget -= 1;
            children.reverse();
            to_visit.extend(children);
        }
        Ok(None)
    }

    /// Every target under the path segments in `prefix` that the delegation search
    /// resolves, exactly as [`Self::get_target_info`] resolves each path: which role
    /// answers, in which order, with `terminating` and `path_hash_prefixes` honoured.
    ///
    /// Two steps. First the candidate paths: every role that could hold a path under
    /// the prefix is read (roles whose patterns cannot match the prefix are not
    /// loaded); what these roles list is only a guess, never the answer. Then each
    /// candidate is looked up on its own with the conformant search, and only what it
    /// returns counts, so a role that lists a path its chain of delegations does not
    /// give it — at any hop, not only the last — contributes nothing.
    pub async fn targets_under(&mut self, prefix: &[&str]) -> Result<Vec<TargetInfo>> {
        self.refresh().await?;
        let prefix_str = format!("{}/", prefix.join("/"));
        let mut candidates: BTreeSet<String> = BTreeSet::new();
        let mut to_visit: Vec<(String, String)> = vec![("targets".into(), "root".into())];
        let mut visited: BTreeSet<String> = BTreeSet::new();
        while let Some((role, parent)) = to_visit.pop() {
            if !visited.insert(role.clone()) {
                continue;
            }
            // Every role read is listed in the trusted snapshot (load_targets refuses
            // one that is not), so this walk is bounded by the snapshot's size.
            let targets = self.load_targets(&role, &parent).await?.clone();
            candidates.extend(targets.targets.keys().filter(|p| p.starts_with(&prefix_str)).cloned());
            let Some(delegations) = &targets.delegations else { continue };
            let mut children = Vec::new();
            for r in delegations.roles.iter().flatten() {
                let may = match (&r.paths, &r.path_hash_prefixes) {
                    (Some(paths), _) => paths.iter().any(|p| pattern_may_match_prefix(p, prefix)),
                    (None, Some(_)) => true,
                    (None, None) => false,
                };
                if may {
                    children.push((r.name.clone(), role.clone()));
                }
            }
            if let Some(bins) = &delegations.succinct_roles {
                // Hash bins: any bin may hold a path under the prefix; the snapshot
                // lists the bins that exist.
                let snapshot = self.trusted.snapshot().ok_or_else(|| AgentError::NotLoaded { role: "snapshot".into() })?;
                for name in snapshot.meta.keys().filter_map(|f| f.strip_suffix(".json")) {
                    if bins.is_delegated_role(name) {
                        children.push((name.to_owned(), role.clone()));
                    }
                }
            }
            children.reverse();
            to_visit.extend(children);
        }
        let mut found = Vec::new();
        for path in candidates {
            if let Some(info) = self.get_target_info(&path).await? {
                found.push(info);
            }
        }
        Ok(found)
    }

    /// The local file for a target: `dir/<path URL-quoted as one file name>`.
    pub fn local_target_path(target_dir: &Path, info: &TargetInfo) -> PathBuf {
        target_dir.join(quote_file_name(&info.path))
    }

    /// Is the local copy already the signed target (length and all hashes)?
    pub fn is_cached(target_dir: &Path, info: &TargetInfo) -> bool {
        let path = Self::local_target_path(target_dir, info);
        let Ok(meta) = std::fs::metadata(&path) else { return false };
        if meta.len() != info.file.length {
            return false;
        }
        let Ok(mut hasher) = outpost_protocol::hashing::MultiHasher::for_expected(&info.file.hashes, &info.path) else {
            return false;
        };
        let Ok(mut f) = std::fs::File::open(&path) else { return false };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match std::io::Read::read(&mut f, &mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(_) => return false,
            }
        }
        hasher.verify(&info.file.hashes, &info.path).is_ok()
    }

    /// Where a target is fetched from (consistent snapshots: `dir/HASH.name`).
    pub fn target_url(&self, info: &TargetInfo, target_base_url: &str) -> Result<String> {
        let remote = if self.trusted.root().consistent_snapshot {
            let hash = info.file.naming_hash().ok_or_else(|| AgentError::TargetNotFound(info.path.clone()))?;
            consistent_name(&info.path, hash)
        } else {
            info.path.clone()
        };
        Ok(format!("{}{}", with_slash(target_base_url), quote_target_path(&remote)))
    }

    /// A small target read into memory (at most `limit` bytes), verified against its
    /// signed length and hashes.
    pub async fn fetch_target_bytes(&self, info: &TargetInfo, target_base_url: &str, limit: u64) -> Result<Vec<u8>> {
        if info.file.length > limit {
            return Err(AgentError::TooLarge { url: info.path.clone(), limit });
        }
        let url = self.target_url(info, target_base_url)?;
        let data = self.fetcher.fetch_bytes(&url, info.file.length).await?;
        outpost_protocol::hashing::verify_bytes(&data, Some(info.file.length), Some(&info.file.hashes), &format!("target {}", info.path))
            .map_err(|e| AgentError::tuf(format!("verify target {}", info.path), e))?;
        Ok(data)
    }

    /// Downloads a target into `target_dir`, verified, replacing any older copy.
    pub async fn download_target(
        &self,
        info: &TargetInfo,
        target_base_url: &str,
        target_dir: &Path,
        durability: crate::fetch::Durability,
    ) -> Result<PathBuf> {
        let url = self.target_url(info, target_base_url)?;
        let dest = Self::local_target_path(target_dir, info);
        self.fetcher
            .download_verified(&url, &dest, info.file.length, &info.file.hashes, &format!("target {}", info.path), durability)
            .await?;
        Ok(dest)
    }
}

