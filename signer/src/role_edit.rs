//! Editing a targets role in the local repository, shared by every command that
//! signs target files (`release`, `policy`, `director`, `sbom denylist`): which role
//! is delegated a path, the target entry of a file, the staging directory for files
//! made on the way, and signing the role's next version, storing it and pushing it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use outpost_protocol::keys::SigningKey;
use outpost_protocol::tuf::{TargetFile, Targets};

use crate::error::{Result, SignerError};
use crate::localrepo::{parse_duration, LocalRepo};
use crate::output::Output;
use crate::upload::{PushReport, Server};

/// The deepest role, following delegations depth-first, that is delegated `path`
/// and whose metadata this repository holds.
pub(crate) fn role_for_path(repo: &LocalRepo, path: &str) -> Result<String> {
    let mut role = "targets".to_owned();
    for _ in 0..32 {
        let Some((env, _)) = repo.role(&role)? else { break };
        let next = env
            .signed
            .delegations
            .as_ref()
            .map(|d| d.roles_for_target(path))
            .unwrap_or_default()
            .into_iter()
            .map(|(name, _)| name)
            .find(|name| repo.role(name).ok().flatten().is_some());
        match next {
            Some(n) => role = n,
            None => break,
        }
    }
    Ok(role)
}

/// The target entry of a file of `length` bytes with SHA-256 `sha256` (hex).
pub(crate) fn target_file(length: u64, sha256: &str, custom: Option<serde_json::Value>) -> TargetFile {
    let hashes = BTreeMap::from([("sha256".to_owned(), sha256.to_owned())]);
    TargetFile { length, hashes, custom, extra: Default::default() }
}

/// `REPO/.staging`, created: where files made for a release wait until they are stored
/// or uploaded.
pub(crate) fn staging_dir(repo: &LocalRepo) -> Result<PathBuf> {
    let staging = repo.dir.join(".staging");
    std::fs::create_dir_all(&staging).map_err(|e| SignerError::io("create", &staging, e))?;
    Ok(staging)
}

/// A target file just made: its path in the repository, where its bytes are, its SHA-256.
pub(crate) type Fresh<'a> = (&'a str, &'a Path, &'a str);

/// Signs `body` as the next version of `role` (expiring after `expires`, default the
/// repository's targets expiry), stores it with the new target files (offline: copied
/// into the directory) and re-signs snapshot and timestamp; with a server, uploads the
/// changed metadata and `fresh` files. Returns what the push did.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn commit_role(
    repo: &LocalRepo,
    role: &str,
    body: &mut Targets,
    keys: &[SigningKey],
    fresh: &[Fresh<'_>],
    expires: Option<Duration>,
    server: Option<&Server>,
    out: &Output,
) -> Result<Option<PushReport>> {
    body.version += 1;
    let secs = expires.map(|d| d.as_secs().max(1)).unwrap_or(repo.settings.targets_expires_secs);
    body.expires = outpost_protocol::tuf::format_expires(repo.expires(secs));
    let bytes = repo.sign_role(role, body, keys)?;
    if server.is_none() {
        // Offline: the directory keeps the target files too.
        for (path, file, sha256) in fresh {
            let dest = repo.target_file_path(path, sha256);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| SignerError::io("create", parent, e))?;
            }
            let tmp = dest.with_extension("partial");
            std::fs::copy(file, &tmp).map_err(|e| SignerError::io("copy target to", &tmp, e))?;
            std::fs::rename(&tmp, &dest).map_err(|e| SignerError::io("rename", &dest, e))?;
        }
    }
    repo.write_role(role, body.version, &bytes)?;
    repo.resign_online()?;
    match server {
        Some(s) => {
            let fresh: Vec<(&str, &Path)> = fresh.iter().map(|(p, f, _)| (*p, *f)).collect();
            Ok(Some(crate::upload::push(repo, s, &fresh, out).await?))
        }
        None => Ok(None),
    }
}

/// The end of a human line about a signed role: where it went.
pub(crate) fn pushed_note(pushed: Option<&PushReport>, repo: &LocalRepo) -> String {
    match pushed {
        Some(p) => format!("; uploaded: {}", p.summary),
        None => format!("; offline in {}", repo.dir.display()),
    }
}

/// What every command that signs a targets role takes: the repository, the role's
/// keys, how long the new version stays valid, and where to upload it.
#[derive(Debug, Args)]
pub struct RoleSignArgs {
    #[arg(long)]
    pub repo: PathBuf,
    /// Private keys of the signing role (repeat to meet its threshold).
    #[arg(long = "key", required = true)]
    pub keys: Vec<PathBuf>,
    /// How long the role's new metadata stays valid (default: the repository's targets expiry).
    #[arg(long, value_parser = parse_duration)]
    pub expires: Option<Duration>,
    #[command(flatten)]
    pub server: crate::upload::ServerArgs,
}

/// An opened repository with the keys and server to sign and upload with.
pub struct Signing {
    pub repo: LocalRepo,
    pub keys: Vec<SigningKey>,
    pub expires: Option<Duration>,
    pub server: Option<Server>,
}

impl RoleSignArgs {
    pub fn open(&self) -> Result<Signing> {
        let repo = LocalRepo::open(&self.repo)?;
        let server = self.server.optional()?;
        let keys = crate::keyfile::load_all_signing(&self.keys)?;
        Ok(Signing { repo, keys, expires: self.expires, server })
    }
}

impl Signing {
    /// The current body of `role`.
    pub fn role_body(&self, role: &str) -> Result<Targets> {
        let (env, _) = self
            .repo
            .role(role)?
            .ok_or_else(|| SignerError::repo(&self.repo.dir, format!("role {role} has no metadata yet")))?;
        Ok(env.signed)
    }

    /// [`commit_role`] with these keys, expiry and server.
    pub async fn commit(&self, role: &str, body: &mut Targets, fresh: &[Fresh<'_>], out: &Output) -> Result<Option<crate::upload::PushReport>> {
        commit_role(&self.repo, role, body, &self.keys, fresh, self.expires, self.server.as_ref(), out).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_entry_lists_its_sha256() {
        let t = target_file(12, "ab", None);
        assert_eq!((t.length, t.hashes.get("sha256").map(String::as_str), t.custom), (12, Some("ab"), None));
    }
}
