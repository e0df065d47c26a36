//! The online roles: the server signs snapshot and timestamp with the keys it holds,
//! checks that the trusted root lists those keys, and re-signs both before they
//! expire. Nothing here writes: what is signed goes through the journal.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outpost_protocol::keys::{LoadedKey, SigningKey};
use outpost_protocol::tuf::online::{expires_after, sign_snapshot, sign_timestamp};
use outpost_protocol::tuf::{quote_role, Envelope, MetaFile, Root, Snapshot, Timestamp};

use super::journal::{MetadataFile, Transaction};
use super::{read, Repository, State};
use crate::error::ServerError;

/// New snapshot and timestamp (the snapshot only when `meta` is given), signed and
/// not yet written anywhere.
pub(super) struct Online {
    pub(super) snapshot: Option<(u64, Vec<u8>)>,
    pub(super) snapshot_env: Envelope<Snapshot>,
    pub(super) timestamp: Vec<u8>,
    pub(super) timestamp_env: Envelope<Timestamp>,
}

pub(super) fn load_signing(path: &Path) -> Result<SigningKey, ServerError> {
    let bytes = std::fs::read(path).map_err(|e| ServerError::io("read key", path, e))?;
    match LoadedKey::from_bytes(&bytes, &path.display().to_string()).map_err(|e| ServerError::proto("load key", e))? {
        LoadedKey::Private(k) => Ok(k),
        LoadedKey::Public(_) => Err(ServerError::Config {
            path: path.into(),
            reason: "the server needs the private online key, this is a public key file".into(),
        }),
    }
}

/// A configured lifetime as chrono counts it (`fallback` for one too long to count).
fn lifetime(d: Duration, fallback: chrono::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(fallback)
}

/// The online keys must be the ones `root` trusts for snapshot and timestamp.
pub(super) fn check_online_keys(root: &Root, snapshot: &SigningKey, timestamp: &SigningKey) -> Result<(), String> {
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
    /// Signs a snapshot (when `meta` is given; its version is the next one no file
    /// under `metadata/` has) and a timestamp for `st`.
    pub(super) fn sign_online(&self, st: &State, meta: Option<BTreeMap<String, MetaFile>>, now: DateTime<Utc>) -> Result<Online, ServerError> {
        let (snapshot, snapshot_env, snap_bytes) = match meta {
            Some(meta) => {
                let mut version = st.snapshot.as_ref().map(|s| s.signed.version + 1).unwrap_or(1);
                // A number an interrupted publish of an older server left behind was
                // perhaps served: never reuse it.
                while self.metadata_dir.join(format!("{version}.snapshot.json")).exists() {
                    version += 1;
                }
                let expires = expires_after(now, lifetime(self.snapshot_expiry, chrono::Duration::days(7)));
                let signed = sign_snapshot(version, expires, meta, &self.snapshot_key).map_err(|e| ServerError::proto("sign snapshot", e))?;
                (Some((version, signed.bytes.clone())), signed.envelope, signed.bytes)
            }
            None => {
                let env = st.snapshot.clone().ok_or_else(|| ServerError::State("no snapshot to re-time".into()))?;
                let bytes = read(&self.metadata_dir.join(format!("{}.snapshot.json", env.signed.version)))?;
                (None, env, bytes)
            }
        };
        let version = st.timestamp.as_ref().map(|t| t.signed.version + 1).unwrap_or(1);
        let expires = expires_after(now, lifetime(self.timestamp_expiry, chrono::Duration::days(1)));
        let signed = sign_timestamp(version, expires, snapshot_env.signed.version, &snap_bytes, &self.timestamp_key)
            .map_err(|e| ServerError::proto("sign timestamp", e))?;
        Ok(Online { snapshot, snapshot_env, timestamp: signed.bytes, timestamp_env: signed.envelope })
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
pub(super) fn transaction_files(roles: &[(&str, u64, &[u8])], online: &Online, roots: &[(u64, Vec<u8>)]) -> Result<Vec<MetadataFile>, ServerError> {
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
