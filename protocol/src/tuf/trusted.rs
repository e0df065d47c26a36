//! The trusted metadata set: the only place where metadata becomes trusted. Each
//! `update_*` applies one step of the TUF client workflow to bytes the caller fetched
//! (from disk or the network) and either accepts them or says why not. Pure: no I/O,
//! the reference time is given.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::metadata::{verify_threshold, Envelope, Root, Snapshot, Targets, Timestamp};
use super::rotation::{verify_next_root, RootRotationError};
use crate::error::{Error, Result};

/// Where snapshot bytes come from, which decides whether they must match the
/// timestamp's description of `snapshot.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSource {
    /// Fetched from the repository: the bytes must have the length and hashes the
    /// trusted timestamp gives for `snapshot.json`.
    Fetched,
    /// The client's own copy, trusted on an earlier run: its hashes need not match
    /// the new timestamp (a newer snapshot may exist remotely); it still guards
    /// against rollback and is used only when it is final.
    LocalCopy,
}

pub struct TrustedSet {
    root: Envelope<Root>,
    timestamp: Option<Envelope<Timestamp>>,
    snapshot: Option<Envelope<Snapshot>>,
    targets: BTreeMap<String, Envelope<Targets>>,
    /// Delegators each loaded targets role has been verified against.
    verified_by: BTreeMap<String, std::collections::BTreeSet<String>>,
    now: DateTime<Utc>,
}

impl TrustedSet {
    /// Starts from a root the caller already trusts (local copy or pinned file). It
    /// must be signed by its own threshold; its expiry is checked once the root chain
    /// has been walked (a stale local root is how clients start after being offline).
    pub fn new(root_bytes: &[u8], now: DateTime<Utc>) -> Result<Self> {
        let root: Envelope<Root> = Envelope::parse(root_bytes, "root")?;
        let r = root.signed.role("root")?;
        verify_threshold("root", &root.canonical_signed, &root.signatures, &r.keyids, r.threshold, &root.signed.keys)?;
        Ok(TrustedSet { root, timestamp: None, snapshot: None, targets: BTreeMap::new(), verified_by: BTreeMap::new(), now })
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// The first trusted role (root, timestamp, snapshot, then the loaded targets
    /// roles) already expired at `at`, with its expiry. The set checks expiry against
    /// the time its update began (the client workflow's fixed time); an update that
    /// runs long asks this before it acts on what it loaded.
    pub fn expired_at(&self, at: DateTime<Utc>) -> Option<(String, String)> {
        let expired = |role: &str, expires: &str| Some((role.to_owned(), expires.to_owned()));
        if self.root.is_expired(at) {
            return expired("root", &self.root.signed.expires);
        }
        if let Some(t) = self.timestamp.as_ref().filter(|t| t.is_expired(at)) {
            return expired("timestamp", &t.signed.expires);
        }
        if let Some(s) = self.snapshot.as_ref().filter(|s| s.is_expired(at)) {
            return expired("snapshot", &s.signed.expires);
        }
        self.targets.iter().find(|(_, t)| t.is_expired(at)).and_then(|(role, t)| expired(role, &t.signed.expires))
    }

    pub fn root(&self) -> &Root {
        &self.root.signed
    }

    pub fn timestamp(&self) -> Option<&Timestamp> {
        self.timestamp.as_ref().map(|t| &t.signed)
    }

    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref().map(|s| &s.signed)
    }

    pub fn targets(&self, role: &str) -> Option<&Targets> {
        self.targets.get(role).map(|t| &t.signed)
    }

    /// Client workflow 5.3: the next root must be version N+1, signed by the trusted
    /// root's threshold and by its own.
    pub fn update_root(&mut self, bytes: &[u8]) -> Result<()> {
        if self.timestamp.is_some() {
            return Err(Error::Order("cannot update root after timestamp".into()));
        }
        let new: Envelope<Root> = Envelope::parse(bytes, "root")?;
        let (old_version, new_version) = (self.root.signed.version, new.signed.version);
        verify_next_root(&self.root.signed, &new).map_err(|e| match e {
            RootRotationError::NotSignedByTrusted { source, .. } => {
                with_context(source, &format!("new root v{new_version} under trusted root v{old_version}"))
            }
            RootRotationError::NotNextVersion { expected, got } => {
                Error::Version { role: "root".into(), reason: format!("expected version {expected}, got {got}") }
            }
            RootRotationError::NotSignedByItself { source } => with_context(source, &format!("new root v{new_version} under its own keys")),
        })?;
        self.root = new;
        Ok(())
    }

    /// Client workflow 5.4. On an equal version this returns [`Error::EqualVersion`]
    /// and keeps the trusted timestamp. An expired timestamp is kept as trusted (for
    /// rollback protection of the next one) but reported as [`Error::Expired`].
    pub fn update_timestamp(&mut self, bytes: &[u8]) -> Result<()> {
        if self.snapshot.is_some() {
            return Err(Error::Order("cannot update timestamp after snapshot".into()));
        }
        if self.root.is_expired(self.now) {
            return Err(Error::Expired { role: "root".into(), expires: self.root.signed.expires.clone() });
        }
        let new: Envelope<Timestamp> = Envelope::parse(bytes, "timestamp")?;
        let r = self.root.signed.role("timestamp")?;
        verify_threshold("timestamp", &new.canonical_signed, &new.signatures, &r.keyids, r.threshold, &self.root.signed.keys)?;
        if let Some(old) = &self.timestamp {
            if new.signed.version < old.signed.version {
                return Err(Error::Version {
                    role: "timestamp".into(),
                    reason: format!("rollback from trusted version {} to {}", old.signed.version, new.signed.version),
                });
            }
            if new.signed.version == old.signed.version {
                return Err(Error::EqualVersion { role: "timestamp".into(), version: new.signed.version });
            }
            let (old_snap, new_snap) = (old.signed.snapshot_meta().version, new.signed.snapshot_meta().version);
            if new_snap < old_snap {
                return Err(Error::Version {
                    role: "snapshot".into(),
                    reason: format!("timestamp rolls snapshot back from version {old_snap} to {new_snap}"),
                });
            }
        }
        self.timestamp = Some(new);
        self.check_final_timestamp()
    }

    fn check_final_timestamp(&self) -> Result<()> {
        let ts = self.timestamp.as_ref().ok_or_else(|| Error::Order("timestamp not loaded".into()))?;
        if ts.is_expired(self.now) {
            return Err(Error::Expired { role: "timestamp".into(), expires: ts.signed.expires.clone() });
        }
        Ok(())
    }

    /// Client workflow 5.5. A [`SnapshotSource::LocalCopy`] need not match the
    /// timestamp's hashes (a newer snapshot may exist remotely); it is still checked
    /// as final, and when it is not final it still guards against rollback.
    pub fn update_snapshot(&mut self, bytes: &[u8], source: SnapshotSource) -> Result<()> {
        if self.targets.contains_key("targets") {
            return Err(Error::Order("cannot update snapshot after targets".into()));
        }
        let ts = self.timestamp.as_ref().ok_or_else(|| Error::Order("cannot update snapshot before timestamp".into()))?;
        self.check_final_timestamp()?;
        let meta = ts.signed.snapshot_meta();
        match source {
            SnapshotSource::Fetched => meta.verify(bytes, "snapshot.json (as described by timestamp)")?,
            SnapshotSource::LocalCopy => {}
        }
        let new: Envelope<Snapshot> = Envelope::parse(bytes, "snapshot")?;
        let r = self.root.signed.role("snapshot")?;
        verify_threshold("snapshot", &new.canonical_signed, &new.signatures, &r.keyids, r.threshold, &self.root.signed.keys)?;
        if let Some(old) = &self.snapshot {
            for (name, info) in &old.signed.meta {
                let Some(new_info) = new.signed.meta.get(name) else {
                    return Err(Error::Version {
                        role: "snapshot".into(),
                        reason: format!("new snapshot v{} drops {name}, listed in trusted snapshot v{}", new.signed.version, old.signed.version),
                    });
                };
                if new_info.version < info.version {
                    return Err(Error::Version {
                        role: "snapshot".into(),
                        reason: format!("{name} rolls back from version {} to {}", info.version, new_info.version),
                    });
                }
            }
        }
        self.snapshot = Some(new);
        self.check_final_snapshot()
    }

    fn check_final_snapshot(&self) -> Result<()> {
        let snap = self.snapshot.as_ref().ok_or_else(|| Error::Order("snapshot not loaded".into()))?;
        let ts = self.timestamp.as_ref().ok_or_else(|| Error::Order("timestamp not loaded".into()))?;
        if snap.is_expired(self.now) {
            return Err(Error::Expired { role: "snapshot".into(), expires: snap.signed.expires.clone() });
        }
        let want = ts.signed.snapshot_meta().version;
        if snap.signed.version != want {
            return Err(Error::Version {
                role: "snapshot".into(),
                reason: format!("timestamp names snapshot version {want}, got {}", snap.signed.version),
            });
        }
        Ok(())
    }

    /// Client workflow 5.6/5.7: top-level targets (`delegator` = "root") or a delegated
    /// role, verified against the snapshot's version and hashes and the delegator's keys.
    pub fn update_delegated_targets(&mut self, bytes: &[u8], role: &str, delegator: &str) -> Result<()> {
        if self.snapshot.is_none() {
            return Err(Error::Order("cannot load targets before snapshot".into()));
        }
        self.check_final_snapshot()?;
        let (keyids, threshold, keys) = self.delegator_keys(role, delegator)?;
        let snap = self.snapshot.as_ref().map(|s| &s.signed).ok_or_else(|| Error::Order("snapshot".into()))?;
        let meta = snap
            .meta
            .get(&format!("{role}.json"))
            .ok_or_else(|| Error::Missing(format!("snapshot does not list {role}.json")))?;
        meta.verify(bytes, &format!("{role}.json (as described by snapshot)"))?;
        let new: Envelope<Targets> = Envelope::parse(bytes, role)?;
        verify_threshold(role, &new.canonical_signed, &new.signatures, &keyids, threshold, &keys)?;
        if new.signed.version != meta.version {
            return Err(Error::Version {
                role: role.into(),
                reason: format!("snapshot names version {}, got {}", meta.version, new.signed.version),
            });
        }
        if new.is_expired(self.now) {
            return Err(Error::Expired { role: role.into(), expires: new.signed.expires.clone() });
        }
        self.targets.insert(role.to_owned(), new);
        self.verified_by.entry(role.to_owned()).or_default().insert(delegator.to_owned());
        Ok(())
    }

    /// A role already loaded through one delegator, reached again through another:
    /// its signatures must also meet this delegator's keys and threshold.
    pub fn check_loaded_for_delegator(&mut self, role: &str, delegator: &str) -> Result<()> {
        if self.verified_by.get(role).is_some_and(|d| d.contains(delegator)) {
            return Ok(());
        }
        let (keyids, threshold, keys) = self.delegator_keys(role, delegator)?;
        let env = self.targets.get(role).ok_or_else(|| Error::Order(format!("{role} is not loaded")))?;
        verify_threshold(role, &env.canonical_signed, &env.signatures, &keyids, threshold, &keys)
            .map_err(|e| with_context(e, &format!("as delegated by {delegator}")))?;
        self.verified_by.entry(role.to_owned()).or_default().insert(delegator.to_owned());
        Ok(())
    }

    fn delegator_keys(&self, role: &str, delegator: &str) -> Result<(Vec<String>, u64, BTreeMap<String, crate::keys::PublicKey>)> {
        if delegator == "root" {
            let r = self.root.signed.role("targets")?;
            return Ok((r.keyids.clone(), r.threshold, self.root.signed.keys.clone()));
        }
        let parent = self
            .targets
            .get(delegator)
            .ok_or_else(|| Error::Order(format!("delegator {delegator} of {role} is not loaded")))?;
        let d = parent
            .signed
            .delegations
            .as_ref()
            .ok_or_else(|| Error::Missing(format!("{delegator} has no delegations (looking for {role})")))?;
        let (ids, t) = d
            .role_keys(role)
            .ok_or_else(|| Error::Missing(format!("{delegator} does not delegate to {role}")))?;
        Ok((ids, t, d.keys.clone()))
    }
}

fn with_context(e: Error, ctx: &str) -> Error {
    match e {
        Error::Threshold { role, valid, threshold } => Error::Threshold { role: format!("{role} ({ctx})"), valid, threshold },
        other => other,
    }
}
