//! `outpost release publish`: sign a firmware release offline and optionally upload it.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use outpost_protocol::release::{firmware_target_path, FirmwareCustom, HardwareClass, ReleaseVersion};
use outpost_protocol::tuf::TargetFile;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Result, SignerError};
use crate::keyfile;
use crate::localrepo::{parse_duration, LocalRepo};
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Add a firmware image as a signed target (offline), then upload it when --server is given.
    Publish(PublishArgs),
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[arg(long)]
    pub repo: PathBuf,
    /// The firmware image.
    #[arg(long)]
    pub firmware: PathBuf,
    /// Hardware class the image is for (a-z, 0-9, - and _).
    #[arg(long)]
    pub hardware_class: HardwareClass,
    /// Release version, e.g. 1.4.2.
    #[arg(long)]
    pub version: ReleaseVersion,
    /// Private keys of the signing role (repeat to meet its threshold).
    #[arg(long = "key", required = true)]
    pub keys: Vec<PathBuf>,
    /// Role to sign with (default: the delegated role whose paths match, else targets).
    #[arg(long)]
    pub role: Option<String>,
    /// How long the role's new metadata stays valid (default: the repository's targets expiry).
    #[arg(long, value_parser = parse_duration)]
    pub expires: Option<Duration>,
    #[command(flatten)]
    pub server: crate::upload::ServerArgs,
}

pub async fn run(cmd: ReleaseCommand, out: &Output) -> Result<()> {
    match cmd {
        ReleaseCommand::Publish(a) => publish(a, out).await,
    }
}

/// The deepest role, following delegations depth-first, that is delegated `path`
/// and whose metadata this repository holds.
fn role_for_path(repo: &LocalRepo, path: &str) -> Result<String> {
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

async fn publish(a: PublishArgs, out: &Output) -> Result<()> {
    let repo = LocalRepo::open(&a.repo)?;
    let server = a.server.optional()?;
    let keys = keyfile::load_all_signing(&a.keys)?;
    let file_name = a
        .firmware
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && !n.starts_with('.'))
        .ok_or_else(|| SignerError::Usage(format!("--firmware {}: needs a file name", a.firmware.display())))?;
    let fw = a.firmware.clone();
    let (length, sha256) = tokio::task::spawn_blocking(move || -> Result<(u64, String)> {
        let mut f = std::fs::File::open(&fw).map_err(|e| SignerError::io("open", &fw, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n_total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| SignerError::io("read", &fw, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            n_total += n as u64;
        }
        Ok((n_total, hex::encode(h.finalize())))
    })
    .await
    .map_err(|e| SignerError::Usage(format!("hashing task: {e}")))??;
    let path = firmware_target_path(&a.hardware_class, &a.version, &file_name);
    let role = match a.role.clone() {
        Some(r) => r,
        None => role_for_path(&repo, &path)?,
    };
    let (env, _) = repo
        .role(&role)?
        .ok_or_else(|| SignerError::Usage(format!("role {role} has no metadata yet in {}", repo.dir.display())))?;
    let custom = FirmwareCustom::image(a.version.clone(), a.hardware_class.clone(), sha256.clone())
    .to_custom()
    .map_err(|e| SignerError::proto("custom metadata", e))?;
    let mut body = env.signed.clone();
    if let Some(existing) = body.targets.get(&path) {
        if existing.hashes.get("sha256") != Some(&sha256) || existing.length != length {
            return Err(SignerError::Usage(format!(
                "{path} is already published with different content; a release version is immutable, publish a new version"
            )));
        }
    }
    let mut hashes = std::collections::BTreeMap::new();
    hashes.insert("sha256".to_owned(), sha256.clone());
    body.targets.insert(path.clone(), TargetFile { length, hashes, custom: Some(custom), extra: Default::default() });
    body.version += 1;
    let secs = a.expires.map(|d| d.as_secs().max(1)).unwrap_or(repo.settings.targets_expires_secs);
    body.expires = outpost_protocol::tuf::format_expires(repo.expires(secs));
    let bytes = repo.sign_role(&role, &body, &keys)?;
    if server.is_none() {
        // Offline: the directory keeps the target file too.
        let dest = repo.target_file_path(&path, &sha256);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| SignerError::io("create", parent, e))?;
        }
        let tmp = dest.with_extension("partial");
        std::fs::copy(&a.firmware, &tmp).map_err(|e| SignerError::io("copy target to", &tmp, e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| SignerError::io("rename", &dest, e))?;
    }
    repo.write_role(&role, body.version, &bytes)?;
    repo.resign_online()?;
    let pushed = match &server {
        Some(s) => Some(crate::upload::push(&repo, s, Some((&path, &a.firmware)), out).await?),
        None => None,
    };
    out.emit(
        &json!({"target": path, "role": role, "role_version": body.version, "length": length, "sha256": sha256,
                "hardware_class": a.hardware_class, "version": a.version, "pushed": pushed}),
        &format!(
            "signed {path} ({length} bytes, sha256 {sha256}) into {role} v{}{}",
            body.version,
            match &pushed {
                Some(p) => format!("; uploaded: {}", p["summary"].as_str().unwrap_or("")),
                None => format!("; offline in {}", repo.dir.display()),
            }
        ),
    );
    Ok(())
}
