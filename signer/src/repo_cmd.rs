//! `outpost repo init | rotate-root | delegate | undelegate | push`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use outpost_protocol::keys::{LoadedKey, SigningKey};
use outpost_protocol::tuf::{self, verify_threshold, DelegatedRole, Delegations, Envelope, RoleKeys, Root};
use serde_json::json;

use crate::error::{Result, SignerError};
use crate::keyfile;
use crate::localrepo::{parse_duration, LocalRepo, OnlineKeyFiles, Settings};
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a new repository: root (N keys, threshold), targets, snapshot and timestamp keys.
    Init(InitArgs),
    /// Sign a new root version: new keys and/or threshold, signed by the old and the new thresholds.
    RotateRoot(RotateArgs),
    /// Delegate target paths (e.g. firmware/<class>/*/*) to a role with its own keys.
    Delegate(DelegateArgs),
    /// Revoke a delegation: the parent stops delegating to the role. Needs only the
    /// parent's keys (not the role's, which may be compromised); after `repo push` the
    /// role, and the roles only it delegated, leave the snapshot and clients no longer
    /// trust anything they sign.
    Undelegate(UndelegateArgs),
    /// Upload the repository's offline-signed metadata and targets to a server.
    Push(PushArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Repository directory to create.
    #[arg(long)]
    pub repo: PathBuf,
    /// Root key (private key file; repeat for each root key).
    #[arg(long = "root-key", required = true)]
    pub root_keys: Vec<PathBuf>,
    /// How many root keys must sign a new root.
    #[arg(long, default_value_t = 1)]
    pub threshold: u64,
    /// Targets role key (private key file).
    #[arg(long)]
    pub targets_key: PathBuf,
    /// Snapshot key: private (this directory signs snapshots) or .pub (the server does).
    #[arg(long)]
    pub snapshot_key: PathBuf,
    /// Timestamp key: private or .pub, like --snapshot-key.
    #[arg(long)]
    pub timestamp_key: PathBuf,
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    pub root_expires: Duration,
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    pub targets_expires: Duration,
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub snapshot_expires: Duration,
    #[arg(long, default_value = "1d", value_parser = parse_duration)]
    pub timestamp_expires: Duration,
    /// Repository policy: `release publish` refuses firmware without an SBOM.
    #[arg(long)]
    pub require_sbom: bool,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    #[arg(long)]
    pub repo: PathBuf,
    /// Private keys to sign with: enough of the current root keys and of the new ones.
    #[arg(long = "sign-key", required = true)]
    pub sign_keys: Vec<PathBuf>,
    /// The new set of root keys (default: unchanged).
    #[arg(long = "root-key")]
    pub root_keys: Vec<PathBuf>,
    /// The new root threshold (default: unchanged).
    #[arg(long)]
    pub threshold: Option<u64>,
    /// Replace the targets key.
    #[arg(long)]
    pub targets_key: Option<PathBuf>,
    /// Replace the snapshot key.
    #[arg(long)]
    pub snapshot_key: Option<PathBuf>,
    /// Replace the timestamp key.
    #[arg(long)]
    pub timestamp_key: Option<PathBuf>,
    #[arg(long, value_parser = parse_duration)]
    pub expires: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct DelegateArgs {
    #[arg(long)]
    pub repo: PathBuf,
    /// Name of the delegated role, e.g. firmware.
    #[arg(long)]
    pub role: String,
    /// The delegated role's keys (public or private; repeat).
    #[arg(long = "delegate-key", required = true)]
    pub delegate_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub threshold: u64,
    /// Path patterns the role may sign (`*` stays within one path segment).
    #[arg(long = "paths", required = true)]
    pub paths: Vec<String>,
    /// Stop the search at this role for paths it matches.
    #[arg(long)]
    pub terminating: bool,
    /// Private keys of the delegating (parent) role.
    #[arg(long = "sign-key", required = true)]
    pub sign_keys: Vec<PathBuf>,
    /// The delegating role.
    #[arg(long, default_value = "targets")]
    pub parent: String,
}

#[derive(Debug, Args)]
pub struct UndelegateArgs {
    #[arg(long)]
    pub repo: PathBuf,
    /// The delegated role to remove.
    #[arg(long)]
    pub role: String,
    /// Private keys of the delegating (parent) role.
    #[arg(long = "sign-key", required = true)]
    pub sign_keys: Vec<PathBuf>,
    /// The delegating role.
    #[arg(long, default_value = "targets")]
    pub parent: String,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    #[arg(long)]
    pub repo: PathBuf,
    #[command(flatten)]
    pub server: crate::upload::ServerArgs,
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

pub async fn run(cmd: RepoCommand, out: &Output) -> Result<()> {
    match cmd {
        RepoCommand::Init(a) => init(a, out),
        RepoCommand::RotateRoot(a) => rotate(a, out),
        RepoCommand::Delegate(a) => delegate(a, out),
        RepoCommand::Undelegate(a) => undelegate(a, out),
        RepoCommand::Push(a) => {
            let repo = LocalRepo::open(&a.repo)?;
            let server = a.server.require()?;
            let report = crate::upload::push(&repo, &server, &[], out).await?;
            out.emit(&report, &format!("pushed to {}: {}", server.url, report.summary));
            Ok(())
        }
    }
}

fn add_key(keys: &mut BTreeMap<String, outpost_protocol::keys::PublicKey>, k: &LoadedKey) -> Result<String> {
    let id = k.key_id().map_err(|e| SignerError::proto("key id", e))?;
    keys.insert(id.clone(), k.public().clone());
    Ok(id)
}

fn role_keys(keyids: Vec<String>, threshold: u64) -> RoleKeys {
    RoleKeys { keyids, threshold, extra: BTreeMap::new() }
}

fn init(a: InitArgs, out: &Output) -> Result<()> {
    if a.threshold < 1 || a.threshold as usize > a.root_keys.len() {
        return Err(SignerError::Usage(format!(
            "--threshold {} must be between 1 and the number of --root-key files ({})",
            a.threshold,
            a.root_keys.len()
        )));
    }
    let root_signers = keyfile::load_all_signing(&a.root_keys)?;
    let targets_key = keyfile::load_signing(&a.targets_key)?;
    let snapshot_key = keyfile::load(&a.snapshot_key)?;
    let timestamp_key = keyfile::load(&a.timestamp_key)?;
    let online_keys = match (&snapshot_key, &timestamp_key) {
        (LoadedKey::Private(_), LoadedKey::Private(_)) => Some(OnlineKeyFiles {
            snapshot: std::fs::canonicalize(&a.snapshot_key).map_err(|e| SignerError::io("resolve", &a.snapshot_key, e))?,
            timestamp: std::fs::canonicalize(&a.timestamp_key).map_err(|e| SignerError::io("resolve", &a.timestamp_key, e))?,
        }),
        _ => None,
    };
    let settings = Settings {
        root_expires_secs: secs(a.root_expires),
        targets_expires_secs: secs(a.targets_expires),
        snapshot_expires_secs: secs(a.snapshot_expires),
        timestamp_expires_secs: secs(a.timestamp_expires),
        online_keys,
        require_sbom: a.require_sbom,
    };
    let repo = LocalRepo::create(&a.repo, settings)?;
    let mut keys = BTreeMap::new();
    let mut root_ids = Vec::new();
    for k in &root_signers {
        let id = add_key(&mut keys, &LoadedKey::Private(k.clone()))?;
        if !root_ids.contains(&id) {
            root_ids.push(id);
        }
    }
    if (root_ids.len() as u64) < a.threshold {
        return Err(SignerError::Usage("root keys must be distinct keys".into()));
    }
    let mut roles = BTreeMap::new();
    roles.insert("root".to_owned(), role_keys(root_ids.clone(), a.threshold));
    roles.insert("targets".to_owned(), role_keys(vec![add_key(&mut keys, &LoadedKey::Private(targets_key.clone()))?], 1));
    roles.insert("snapshot".to_owned(), role_keys(vec![add_key(&mut keys, &snapshot_key)?], 1));
    roles.insert("timestamp".to_owned(), role_keys(vec![add_key(&mut keys, &timestamp_key)?], 1));
    let root = Root {
        typ: "root".into(),
        spec_version: tuf::SPEC_VERSION.into(),
        version: 1,
        expires: tuf::format_expires(repo.expires(repo.settings.root_expires_secs)),
        consistent_snapshot: true,
        keys,
        roles,
        extra: BTreeMap::new(),
    };
    let signers: Vec<&SigningKey> = root_signers.iter().collect();
    let root_bytes = tuf::sign(&root, &signers).map_err(|e| SignerError::proto("sign root", e))?;
    repo.write_root(1, &root_bytes)?;
    let targets = tuf::metadata::new_targets(1, repo.expires(repo.settings.targets_expires_secs));
    let t_bytes = repo.sign_role("targets", &targets, std::slice::from_ref(&targets_key))?;
    repo.write_role("targets", 1, &t_bytes)?;
    let complete = repo.resign_online()?;
    out.emit(
        &json!({"repo": repo.dir, "root_version": 1, "root_keys": root_ids, "threshold": a.threshold, "signs_online_roles": complete}),
        &format!(
            "initialized {} (root v1: {} of {} keys; consistent snapshots){}",
            repo.dir.display(),
            a.threshold,
            root_ids.len(),
            if complete { "; snapshot and timestamp signed locally" } else { "; snapshot and timestamp left to the server" }
        ),
    );
    Ok(())
}

fn rotate(a: RotateArgs, out: &Output) -> Result<()> {
    let mut repo = LocalRepo::open(&a.repo)?;
    let (old, _) = repo.root()?;
    let signers = keyfile::load_all_signing(&a.sign_keys)?;
    let mut new = old.signed.clone();
    new.version = old.signed.version + 1;
    let expires = a.expires.map(secs).unwrap_or(repo.settings.root_expires_secs);
    new.expires = tuf::format_expires(repo.expires(expires));
    if !a.root_keys.is_empty() {
        let mut ids = Vec::new();
        for p in &a.root_keys {
            let id = add_key(&mut new.keys, &keyfile::load(p)?)?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if let Some(r) = new.roles.get_mut("root") {
            r.keyids = ids;
        }
    }
    if let Some(t) = a.threshold {
        if let Some(r) = new.roles.get_mut("root") {
            r.threshold = t;
        }
    }
    let mut new_online = None;
    for (role, path) in [("targets", &a.targets_key), ("snapshot", &a.snapshot_key), ("timestamp", &a.timestamp_key)] {
        if let Some(p) = path {
            let k = keyfile::load(p)?;
            let id = add_key(&mut new.keys, &k)?;
            if let Some(r) = new.roles.get_mut(role) {
                r.keyids = vec![id];
            }
            if role != "targets" && matches!(k, LoadedKey::Private(_)) {
                new_online.get_or_insert_with(Vec::new).push((role, p.clone()));
            }
        }
    }
    let root_role = new.roles.get("root").cloned().ok_or_else(|| SignerError::repo(&repo.dir, "metadata/root.json has no root role"))?;
    if root_role.threshold < 1 || root_role.threshold as usize > root_role.keyids.len() {
        return Err(SignerError::Usage(format!(
            "new root threshold {} must be between 1 and its number of keys ({})",
            root_role.threshold,
            root_role.keyids.len()
        )));
    }
    // Drop keys no role uses any more.
    let used: BTreeSet<String> = new.roles.values().flat_map(|r| r.keyids.iter().cloned()).collect();
    new.keys.retain(|id, _| used.contains(id));
    let old_ids = &old.signed.roles["root"].keyids;
    let usable: Vec<&SigningKey> =
        signers.iter().filter(|k| old_ids.iter().chain(&root_role.keyids).any(|id| id == k.key_id())).collect();
    let bytes = tuf::sign(&new, &usable).map_err(|e| SignerError::proto("sign root", e))?;
    let env: Envelope<Root> = Envelope::parse(&bytes, "root").map_err(|e| SignerError::proto("re-read root", e))?;
    let old_role = &old.signed.roles["root"];
    verify_threshold("root", &env.canonical_signed, &env.signatures, &old_role.keyids, old_role.threshold, &old.signed.keys)
        .map_err(|e| SignerError::proto(format!("root v{} under the current root's threshold", new.version), e))?;
    verify_threshold("root", &env.canonical_signed, &env.signatures, &root_role.keyids, root_role.threshold, &new.keys)
        .map_err(|e| SignerError::proto(format!("root v{} under its own threshold", new.version), e))?;
    repo.write_root(new.version, &bytes)?;
    if let Some(list) = new_online {
        if let Some(files) = repo.settings.online_keys.as_mut() {
            for (role, p) in list {
                let abs = std::fs::canonicalize(&p).map_err(|e| SignerError::io("resolve", &p, e))?;
                if role == "snapshot" {
                    files.snapshot = abs;
                } else {
                    files.timestamp = abs;
                }
            }
        }
        repo.save_settings()?;
    }
    repo.resign_online()?;
    out.emit(
        &json!({"root_version": new.version, "threshold": root_role.threshold, "root_keys": root_role.keyids}),
        &format!("signed root v{} ({} of {} keys)", new.version, root_role.threshold, root_role.keyids.len()),
    );
    Ok(())
}

fn delegate(a: DelegateArgs, out: &Output) -> Result<()> {
    let repo = LocalRepo::open(&a.repo)?;
    if tuf::TOP_LEVEL_ROLES.contains(&a.role.as_str()) || a.role.is_empty() {
        return Err(SignerError::Usage(format!("--role {:?}: a delegated role cannot be named like a top-level role", a.role)));
    }
    let (parent_env, _) = repo
        .role(&a.parent)?
        .ok_or_else(|| SignerError::Usage(format!("--parent {}: no metadata for that role in this repository", a.parent)))?;
    let sign_keys = keyfile::load_all_signing(&a.sign_keys)?;
    let delegate_keys: Vec<LoadedKey> = a.delegate_keys.iter().map(|p| keyfile::load(p)).collect::<Result<_>>()?;
    let mut parent = parent_env.signed.clone();
    let delegations = parent.delegations.get_or_insert_with(|| Delegations {
        keys: BTreeMap::new(),
        roles: Some(Vec::new()),
        succinct_roles: None,
        extra: BTreeMap::new(),
    });
    let mut ids = Vec::new();
    for k in &delegate_keys {
        let id = add_key(&mut delegations.keys, k)?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    if a.threshold < 1 || a.threshold as usize > ids.len() {
        return Err(SignerError::Usage(format!("--threshold {} must be between 1 and the number of distinct --delegate-key files ({})", a.threshold, ids.len())));
    }
    let roles = delegations.roles.get_or_insert_with(Vec::new);
    let role = DelegatedRole {
        name: a.role.clone(),
        keyids: ids.clone(),
        threshold: a.threshold,
        terminating: a.terminating,
        paths: Some(a.paths.clone()),
        path_hash_prefixes: None,
        extra: BTreeMap::new(),
    };
    match roles.iter_mut().find(|r| r.name == a.role) {
        Some(existing) => *existing = role,
        None => roles.push(role),
    }
    let used: BTreeSet<String> = roles.iter().flat_map(|r| r.keyids.iter().cloned()).collect();
    delegations.keys.retain(|id, _| used.contains(id));
    parent.version += 1;
    parent.expires = tuf::format_expires(repo.expires(repo.settings.targets_expires_secs));
    let bytes = repo.sign_role(&a.parent, &parent, &sign_keys)?;
    repo.write_role(&a.parent, parent.version, &bytes)?;
    // First version of the delegated role, when its keys are at hand.
    let mut created = false;
    if repo.role(&a.role)?.is_none() {
        let privs: Vec<SigningKey> = delegate_keys.iter().filter_map(|k| k.signing().cloned()).collect();
        if privs.len() as u64 >= a.threshold {
            // A role revoked and delegated again continues its numbering: its old
            // versions may still be served, and a versioned name never changes content.
            let version = repo.highest_version(&a.role)? + 1;
            let body = tuf::metadata::new_targets(version, repo.expires(repo.settings.targets_expires_secs));
            let b = repo.sign_role(&a.role, &body, &privs)?;
            repo.write_role(&a.role, version, &b)?;
            created = true;
        }
    }
    repo.resign_online()?;
    out.emit(
        &json!({"role": a.role, "parent": a.parent, "parent_version": parent.version, "keyids": ids, "threshold": a.threshold, "paths": a.paths, "terminating": a.terminating, "created_role_metadata": created}),
        &format!(
            "{} v{} delegates {:?} to {} ({} of {} keys{})",
            a.parent,
            parent.version,
            a.paths,
            a.role,
            a.threshold,
            ids.len(),
            if a.terminating { ", terminating" } else { "" }
        ),
    );
    Ok(())
}

fn undelegate(a: UndelegateArgs, out: &Output) -> Result<()> {
    let repo = LocalRepo::open(&a.repo)?;
    let (parent_env, _) = repo
        .role(&a.parent)?
        .ok_or_else(|| SignerError::Usage(format!("--parent {}: no metadata for that role in this repository", a.parent)))?;
    let sign_keys = keyfile::load_all_signing(&a.sign_keys)?;
    let mut parent = parent_env.signed.clone();
    let not_delegated = || SignerError::Usage(format!("--role {}: {} does not delegate to it (see metadata/{}.json)", a.role, a.parent, tuf::quote_role(&a.parent)));
    let delegations = parent.delegations.as_mut().ok_or_else(not_delegated)?;
    if delegations.succinct_roles.is_some() {
        return Err(SignerError::repo(
            &repo.dir,
            format!("{} delegates to hash bins (succinct_roles); one bin cannot be removed, re-sign the bin instead", a.parent),
        ));
    }
    let roles = delegations.roles.get_or_insert_with(Vec::new);
    let before = roles.len();
    roles.retain(|r| r.name != a.role);
    if roles.len() == before {
        return Err(not_delegated());
    }
    let used: BTreeSet<String> = roles.iter().flat_map(|r| r.keyids.iter().cloned()).collect();
    delegations.keys.retain(|id, _| used.contains(id));
    if roles.is_empty() {
        parent.delegations = None;
    }
    parent.version += 1;
    parent.expires = tuf::format_expires(repo.expires(repo.settings.targets_expires_secs));
    let bytes = repo.sign_role(&a.parent, &parent, &sign_keys)?;
    repo.write_role(&a.parent, parent.version, &bytes)?;
    // The roles no delegation reaches now leave the repository (their versioned files
    // stay as history: those names were published).
    let removed = repo.drop_unreachable_roles()?;
    repo.resign_online()?;
    out.emit(
        &json!({"role": a.role, "parent": a.parent, "parent_version": parent.version, "removed_roles": removed}),
        &format!(
            "{} v{} no longer delegates to {}; removed from this repository: {} (push to publish)",
            a.parent,
            parent.version,
            a.role,
            if removed.is_empty() { "nothing else".to_owned() } else { removed.join(", ") }
        ),
    );
    Ok(())
}
