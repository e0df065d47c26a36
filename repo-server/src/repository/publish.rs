//! A publish, step by step: the uploaded roots (each the next version, signed by the
//! trusted root and by itself), the uploaded targets roles (new versions, or retries
//! of what is served), the top-level targets and every delegation as clients reach
//! them, the target files the changed roles list, and then one transaction. Every
//! step only reads; nothing is visible until [`Repository::commit`] runs the journal.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use outpost_protocol::release::FirmwareCustom;
use outpost_protocol::tuf::{
    consistent_name, quote_role, verify_next_root, verify_threshold, Envelope, MetaFile, RoleGraph, Root, RootRotationError, TargetFile, Targets,
    TOP_LEVEL_ROLES,
};
use serde_json::Value;

use super::journal::{PlacedTarget, Transaction};
use super::online::{check_online_keys, transaction_files};
use outpost_protocol::api::repository::PublishOutcome;

use super::{index, pretty, read_if_exists, refuse, PublishError, Repository, SbomPolicy, State};
use crate::error::ServerError;

/// Every targets role after the upload, and the uploaded bytes of those it changes.
struct Roles {
    all: BTreeMap<String, Envelope<Targets>>,
    changed: BTreeMap<String, Vec<u8>>,
}

/// An upload that passed every check, ready to be committed.
struct Verified {
    root: Envelope<Root>,
    new_roots: Vec<(u64, Vec<u8>)>,
    roles: Roles,
    removed: Vec<String>,
    placed: Vec<PlacedTarget>,
}

impl Repository {
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
        let (root, new_roots) = self.accept_roots(&st, roots, now)?;
        let mut uploaded = self.accept_roles(&st, roles, now)?;
        verify_top_targets(&root, &uploaded)?;
        let removed = verify_delegations(&mut uploaded)?;
        if new_roots.is_empty() && uploaded.changed.is_empty() && removed.is_empty() {
            return Ok(st.already_published());
        }
        let placed = self.check_targets(&st, &uploaded)?;
        self.commit(&mut st, Verified { root, new_roots, roles: uploaded, removed, placed }, now)
    }

    /// The uploaded roots, in order: each the next version of the one before (a
    /// retry of a root already published is skipped). Returns the newest root and
    /// the new ones with their bytes.
    fn accept_roots(&self, st: &State, roots: &[Value], now: DateTime<Utc>) -> Result<(Envelope<Root>, Vec<(u64, Vec<u8>)>), PublishError> {
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
            check_next_root(i, &root, &env, now)?;
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
        Ok((root, new_roots))
    }

    /// The uploaded targets roles: versions first (what is new, what is a retry).
    fn accept_roles(&self, st: &State, roles: &BTreeMap<String, Value>, now: DateTime<Utc>) -> Result<Roles, PublishError> {
        let mut all = st.roles.clone();
        let mut changed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (name, value) in roles {
            if let Some((env, bytes)) = self.accept_role(&all, name, value, now)? {
                all.insert(name.clone(), env);
                changed.insert(name.clone(), bytes);
            }
        }
        Ok(Roles { all, changed })
    }

    /// One uploaded role: its new version with its bytes, or None when it is a retry
    /// of what is served.
    fn accept_role(
        &self,
        all: &BTreeMap<String, Envelope<Targets>>,
        name: &str,
        value: &Value,
        now: DateTime<Utc>,
    ) -> Result<Option<(Envelope<Targets>, Vec<u8>)>, PublishError> {
        if name != "targets" && (TOP_LEVEL_ROLES.contains(&name) || name.is_empty()) {
            return Err(refuse("invalid_metadata", format!("roles.{name}: a delegated role cannot be named like a top-level role")));
        }
        let bytes = pretty(value);
        let env: Envelope<Targets> = Envelope::parse(&bytes, name).map_err(|e| refuse("invalid_metadata", format!("roles.{name}: {e}")))?;
        let v = env.signed.version;
        let file = format!("{v}.{}.json", quote_role(name));
        let served = read_if_exists(&self.metadata_dir.join(&file))?;
        if let Some(cur) = all.get(name) {
            if v == cur.signed.version && served.as_deref() == Some(bytes.as_slice()) {
                return Ok(None); // already published: a retry
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
        Ok(Some((env, bytes)))
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

    /// Every target of a changed role must be present with its signed length and
    /// hash. Returns the uploads to place.
    fn check_targets(&self, st: &State, roles: &Roles) -> Result<Vec<PlacedTarget>, PublishError> {
        let mut placed: Vec<PlacedTarget> = Vec::new();
        for name in roles.changed.keys() {
            for (path, tf) in &roles.all[name].signed.targets {
                if let Some(staged) = self.check_target(name, path, tf)? {
                    if !placed.iter().any(|p| p.served == staged.served) {
                        placed.push(staged);
                    }
                }
                self.check_release(st, &roles.all[name], name, path, tf)?;
            }
        }
        Ok(placed)
    }

    /// One target of a changed role: its hash and path well-formed, its bytes served
    /// or staged with the signed length. Returns the upload to place when it is staged.
    fn check_target(&self, name: &str, path: &str, tf: &TargetFile) -> Result<Option<PlacedTarget>, PublishError> {
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
        Ok((file == staged).then_some(PlacedTarget { staged: staged_name, served: served_name }))
    }

    /// A release's SBOM reference must point at a target this role signs with that
    /// hash and length; its class is the one its path names; the SBOM policy applies
    /// to releases added now.
    fn check_release(&self, st: &State, role: &Envelope<Targets>, name: &str, path: &str, tf: &TargetFile) -> Result<(), PublishError> {
        let Ok(Some(custom)) = FirmwareCustom::from_custom(tf.custom.as_ref(), path) else { return Ok(()) };
        if let Some(why) = index::class_mismatch(path, &custom) {
            return Err(refuse("hardware_class_mismatch", format!("roles.{name}: {why}")));
        }
        match &custom.sbom {
            Some(sref) => {
                let signed = role.signed.targets.get(&sref.path);
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
            None if self.sbom_policy == SbomPolicy::Required && st.roles.get(name).is_none_or(|old| !old.signed.targets.contains_key(path)) => {
                return Err(refuse(
                    "sbom_required",
                    format!("roles.{name}: release target {path:?} has no SBOM, and this server's policy (repository.require_sbom) requires one"),
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// Verified: one transaction. Versioned role files and the snapshot first, the
    /// unversioned copies, the new roots, timestamp.json, root.json.
    fn commit(&self, st: &mut State, v: Verified, now: DateTime<Utc>) -> Result<PublishOutcome, PublishError> {
        let Verified { root, new_roots, roles: Roles { all, changed }, removed, placed } = v;
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
        Ok(st.applied(versions, removed))
    }
}

/// `env` must follow `root` (the rotation rule clients apply, [`verify_next_root`])
/// and not be expired.
fn check_next_root(i: usize, root: &Envelope<Root>, env: &Envelope<Root>, now: DateTime<Utc>) -> Result<(), PublishError> {
    let v = env.signed.version;
    verify_next_root(&root.signed, env).map_err(|e| match e {
        RootRotationError::NotSignedByTrusted { trusted_version, source } => {
            refuse("bad_signature", format!("roots[{i}] (v{v}) under trusted root v{trusted_version}: {source}"))
        }
        RootRotationError::NotNextVersion { expected, .. } => refuse("bad_version", format!("roots[{i}] is version {v}, expected {expected}")),
        RootRotationError::NotSignedByItself { source } => refuse("bad_signature", format!("roots[{i}] (v{v}) under its own keys: {source}")),
    })?;
    if env.is_expired(now) {
        return Err(refuse("expired", format!("roots[{i}] (v{v}) expired at {}", env.signed.expires)));
    }
    Ok(())
}

/// The top-level targets (served, or uploaded now) must verify under the newest root.
fn verify_top_targets(root: &Envelope<Root>, roles: &Roles) -> Result<(), PublishError> {
    let Some(top) = roles.all.get("targets") else {
        return Err(refuse("missing_targets", "the repository has no targets metadata yet; include roles.targets"));
    };
    let r = &root.signed.roles["targets"];
    if let Err(e) = verify_threshold("targets", &top.canonical_signed, &top.signatures, &r.keyids, r.threshold, &root.signed.keys) {
        return Err(if roles.changed.contains_key("targets") {
            refuse("bad_signature", format!("roles.targets: {e}"))
        } else {
            refuse(
                "needs_resign",
                format!("served targets v{} does not verify under root v{} ({e}); re-sign it and include it", top.signed.version, root.signed.version),
            )
        });
    }
    Ok(())
}

/// Delegated roles, as clients reach them: each through every delegator that names
/// it, each target along a chain that delegates its path at every hop. Drops the
/// roles no delegation reaches any more and returns their names.
fn verify_delegations(roles: &mut Roles) -> Result<Vec<String>, PublishError> {
    let Roles { all, changed } = roles;
    let graph = RoleGraph::new(all.iter().map(|(k, v)| (k.as_str(), v)));
    let reachable: BTreeSet<String> = graph.reachable().into_iter().map(str::to_owned).collect();
    if let Some(name) = changed.keys().find(|name| !reachable.contains(*name)) {
        return Err(refuse(
            "not_delegated",
            format!("roles.{name}: no delegation from targets (as served, with this upload) reaches role {name}"),
        ));
    }
    if let Some((parent, child, why)) = graph.unverified_edges().into_iter().find(|(parent, _, _)| reachable.contains(*parent)) {
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
    Ok(removed)
}
