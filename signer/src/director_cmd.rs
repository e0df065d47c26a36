//! `outpost director init | rotate`: the director's trust anchor, made offline. A
//! director root's `root` role holds offline director root keys and its other roles
//! the online director key the server signs with. Each version is published as a
//! target of the image repository's top-level targets role (`director/N.root.json`),
//! so devices trust the director exactly as far as they trust the image repository's
//! offline keys, and follow rotations as a chain of versions.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use outpost_protocol::director;
use outpost_protocol::keys::{LoadedKey, PublicKey};
use outpost_protocol::tuf::metadata::{Envelope, Root};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Result, SignerError};
use crate::keyfile;
use crate::localrepo::{parse_duration, LocalRepo};
use crate::output::Output;
use crate::role_edit::{commit_role, target_file};

#[derive(Debug, Subcommand)]
pub enum DirectorCommand {
    /// Make director root version 1 and sign it into the image repository's targets.
    Init(InitArgs),
    /// Make director root version N+1 (new director key and/or new root keys), signed
    /// by the current root keys and the new ones, into the image repository's targets.
    Rotate(RotateArgs),
}

/// Where a director root version is signed into: the image repository, its top-level
/// targets role's keys, and the server to upload to.
#[derive(Debug, Args)]
pub struct TargetsSignArgs {
    #[arg(long)]
    pub repo: PathBuf,
    /// Private keys of the image repository's top-level targets role.
    #[arg(long = "sign-key", required = true)]
    pub sign_keys: Vec<PathBuf>,
    /// How long the director root version stays valid.
    #[arg(long, default_value = "3650d", value_parser = parse_duration)]
    pub expires: Duration,
    #[command(flatten)]
    pub server: crate::upload::ServerArgs,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Director root keys (offline; private, repeat for each). They sign director roots.
    #[arg(long = "root-key", required = true)]
    pub root_keys: Vec<PathBuf>,
    /// How many director root keys must sign the next director root.
    #[arg(long, default_value_t = 1)]
    pub threshold: u64,
    /// The online director key the server will sign assignments with (public or private).
    #[arg(long)]
    pub director_key: PathBuf,
    #[command(flatten)]
    pub target: TargetsSignArgs,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Private keys to sign with: enough of the current director root keys, and of the
    /// new ones when they change.
    #[arg(long = "root-key", required = true)]
    pub root_keys: Vec<PathBuf>,
    /// The new set of director root keys (default: unchanged).
    #[arg(long = "new-root-key")]
    pub new_root_keys: Vec<PathBuf>,
    /// The new threshold (default: unchanged).
    #[arg(long)]
    pub threshold: Option<u64>,
    /// The new online director key (default: unchanged).
    #[arg(long)]
    pub director_key: Option<PathBuf>,
    #[command(flatten)]
    pub target: TargetsSignArgs,
}

pub async fn run(cmd: DirectorCommand, out: &Output) -> Result<()> {
    match cmd {
        DirectorCommand::Init(a) => init(a, out).await,
        DirectorCommand::Rotate(a) => rotate(a, out).await,
    }
}

fn public_of(path: &std::path::Path) -> Result<PublicKey> {
    Ok(match keyfile::load(path)? {
        LoadedKey::Private(k) => k.public().clone(),
        LoadedKey::Public(p) => p,
    })
}

/// The director roots the repository's targets role lists, by version.
fn published(repo: &LocalRepo) -> Result<Vec<(u64, PathBuf)>> {
    let (env, _) = repo.role("targets")?.ok_or_else(|| SignerError::repo(&repo.dir, "no targets metadata"))?;
    let mut out = Vec::new();
    for (path, file) in &env.signed.targets {
        if let Some(v) = path.strip_prefix("director/").and_then(|p| p.strip_suffix(".root.json")).and_then(|v| v.parse::<u64>().ok()) {
            let sha = file.hashes.get("sha256").cloned().unwrap_or_default();
            out.push((v, repo.target_file_path(path, &sha)));
        }
    }
    out.sort();
    Ok(out)
}

async fn init(a: InitArgs, out: &Output) -> Result<()> {
    let repo = LocalRepo::open(&a.target.repo)?;
    if !published(&repo)?.is_empty() {
        return Err(SignerError::repo(&repo.dir, "already has a director root; `outpost director rotate` makes the next version"));
    }
    let root_signers = keyfile::load_all_signing(&a.root_keys)?;
    let root_public: Vec<PublicKey> = root_signers.iter().map(|k| k.public().clone()).collect();
    let director_key = public_of(&a.director_key)?;
    let signers: Vec<&_> = root_signers.iter().collect();
    let bytes = director::root(&root_public, a.threshold, &director_key, 1, repo.expires(a.target.expires.as_secs()), &signers)
        .map_err(|e| SignerError::proto("sign director root", e))?;
    director::check_first_root(&bytes).map_err(|e| SignerError::proto("director root v1", e))?;
    commit(&repo, 1, &bytes, &a.target, out).await
}

async fn rotate(a: RotateArgs, out: &Output) -> Result<()> {
    let repo = LocalRepo::open(&a.target.repo)?;
    let (version, file) = published(&repo)?
        .pop()
        .ok_or_else(|| SignerError::repo(&repo.dir, "no director root yet: `outpost director init` makes version 1"))?;
    let prev_bytes = std::fs::read(&file).map_err(|e| SignerError::io("read director root", &file, e))?;
    let prev = Envelope::<Root>::parse(&prev_bytes, "director root").map_err(|e| SignerError::proto("director root", e))?;
    let prev_root = prev.signed.role("root").map_err(|e| SignerError::proto("director root", e))?;
    let root_public: Vec<PublicKey> = if a.new_root_keys.is_empty() {
        prev_root.keyids.iter().filter_map(|id| prev.signed.keys.get(id).cloned()).collect()
    } else {
        a.new_root_keys.iter().map(|p| public_of(p)).collect::<Result<_>>()?
    };
    let threshold = a.threshold.unwrap_or(prev_root.threshold);
    let director_key = match &a.director_key {
        Some(p) => public_of(p)?,
        None => {
            let t = prev.signed.role("targets").map_err(|e| SignerError::proto("director root", e))?;
            t.keyids.first().and_then(|id| prev.signed.keys.get(id).cloned()).ok_or_else(|| SignerError::input(file.display(), "the current director root names no director key"))?
        }
    };
    let mut signer_keys = keyfile::load_all_signing(&a.root_keys)?;
    for p in &a.new_root_keys {
        if let LoadedKey::Private(k) = keyfile::load(p)? {
            signer_keys.push(k);
        }
    }
    let signers: Vec<&_> = signer_keys.iter().collect();
    let bytes = director::root(&root_public, threshold, &director_key, version + 1, repo.expires(a.target.expires.as_secs()), &signers)
        .map_err(|e| SignerError::proto("sign director root", e))?;
    // What devices will check: signed by the current root keys' threshold and its own.
    director::check_next_root(&prev_bytes, &bytes).map_err(|e| SignerError::proto(format!("director root v{}", version + 1), e))?;
    commit(&repo, version + 1, &bytes, &a.target, out).await
}

/// Lists director root `version` as a target of the top-level targets role.
async fn commit(repo: &LocalRepo, version: u64, bytes: &[u8], target: &TargetsSignArgs, out: &Output) -> Result<()> {
    let server = target.server.optional()?;
    let keys = keyfile::load_all_signing(&target.sign_keys)?;
    let (env, _) = repo.role("targets")?.ok_or_else(|| SignerError::repo(&repo.dir, "no targets metadata"))?;
    let mut body = env.signed;
    let path = director::root_target_path(version);
    let sha = hex::encode(Sha256::digest(bytes));
    body.targets.insert(path.clone(), target_file(bytes.len() as u64, &sha, None));
    let staged = repo.dir.join(format!(".director-{version}.root.json"));
    crate::localrepo::write_atomic(&staged, bytes)?;
    let fresh = [(path.as_str(), staged.as_path(), sha.as_str())];
    let pushed = commit_role(repo, "targets", &mut body, &keys, &fresh, None, server.as_ref(), out).await;
    let _ = std::fs::remove_file(&staged);
    let pushed = pushed?;
    let env = Envelope::<Root>::parse(bytes, "director root").map_err(|e| SignerError::proto("director root", e))?;
    let director_id = env.signed.role("targets").ok().and_then(|r| r.keyids.first().cloned()).unwrap_or_default();
    out.emit(
        &json!({"target": path, "version": version, "director_key_id": director_id, "targets_version": body.version, "pushed": pushed}),
        &format!("director root v{version} (director key {director_id}) signed into targets v{} as {path}", body.version),
    );
    Ok(())
}
