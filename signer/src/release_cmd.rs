//! `outpost release publish`: sign a firmware release offline and optionally upload it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use outpost_protocol::release::{firmware_target_path, Encoding, FirmwareCustom, HardwareClass, HealthCheck, ImageDigest, Measurement, ReleaseVersion, SbomRef};
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
    /// Allow devices on newer releases to be sent back to this one: re-signs the
    /// release's targets (image and deltas) with `rollback_allowed`, offline, with the
    /// keys of the role that signs it. Without this, the director cannot order a
    /// downgrade to the release, whatever its online key signs.
    AllowRollback(AllowRollbackArgs),
}

#[derive(Debug, Args)]
pub struct AllowRollbackArgs {
    #[arg(long)]
    pub repo: PathBuf,
    #[arg(long)]
    pub hardware_class: HardwareClass,
    /// The release devices may go back to.
    #[arg(long)]
    pub version: ReleaseVersion,
    /// Private keys of the role that signs the release (repeat to meet its threshold).
    #[arg(long = "key", required = true)]
    pub keys: Vec<PathBuf>,
    /// How long the role's new metadata stays valid (default: the repository's targets expiry).
    #[arg(long, value_parser = parse_duration)]
    pub expires: Option<Duration>,
    #[command(flatten)]
    pub server: crate::upload::ServerArgs,
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
    /// Store the image zstd-compressed (devices decompress while downloading).
    #[arg(long)]
    pub zstd: bool,
    /// Also publish a zstd patch from this earlier release (needs --delta-base).
    #[arg(long, requires = "delta_base")]
    pub delta_from: Option<ReleaseVersion>,
    /// The earlier release's image file; its sha256 must match what was signed for it.
    #[arg(long, requires = "delta_from")]
    pub delta_base: Option<PathBuf>,
    /// Health check command devices run after the trial boot (repeatable; `sh -c`).
    #[arg(long = "health-command")]
    pub health_commands: Vec<String>,
    /// URL devices GET after the trial boot, expecting 2xx (repeatable).
    #[arg(long = "health-http")]
    pub health_http: Vec<String>,
    /// How long devices may take to pass the health checks after a trial boot.
    #[arg(long, value_parser = parse_duration)]
    pub trial_deadline: Option<Duration>,
    /// The pipeline's CycloneDX 1.5 JSON SBOM for this image (validated; its
    /// metadata.component must carry the image's SHA-256).
    #[arg(long, conflicts_with_all = ["sbom_rootfs", "sbom_cargo_lock"])]
    pub sbom: Option<PathBuf>,
    /// Generate the SBOM from the image's root filesystem tree (dpkg status, os-release, files).
    #[arg(long, conflicts_with = "sbom_cargo_lock")]
    pub sbom_rootfs: Option<PathBuf>,
    /// Generate the SBOM from a Cargo.lock.
    #[arg(long)]
    pub sbom_cargo_lock: Option<PathBuf>,
    /// Where to write the Sigstore signatures (cosign sign-blob `.sig`, bundle
    /// `.sigstore.json`) of the image and the SBOM, and the key's PEM [REPO/sigstore].
    #[arg(long)]
    pub sigstore_dir: Option<PathBuf>,
    #[command(flatten)]
    pub server: crate::upload::ServerArgs,
}

pub async fn run(cmd: ReleaseCommand, out: &Output) -> Result<()> {
    match cmd {
        ReleaseCommand::Publish(a) => publish(a, out).await,
        ReleaseCommand::AllowRollback(a) => allow_rollback(a, out).await,
    }
}

async fn allow_rollback(a: AllowRollbackArgs, out: &Output) -> Result<()> {
    let repo = LocalRepo::open(&a.repo)?;
    let server = a.server.optional()?;
    let keys = keyfile::load_all_signing(&a.keys)?;
    let prefix = format!("firmware/{}/{}/", a.hardware_class, a.version);
    let role = role_for_path(&repo, &format!("{prefix}image"))?;
    let (env, _) = repo
        .role(&role)?
        .ok_or_else(|| SignerError::Usage(format!("role {role} has no metadata yet in {}", repo.dir.display())))?;
    let mut body = env.signed;
    let mut changed = Vec::new();
    for (path, file) in body.targets.iter_mut().filter(|(p, _)| p.starts_with(&prefix)) {
        let Some(mut custom) = FirmwareCustom::from_custom(file.custom.as_ref(), path).map_err(|e| SignerError::proto("custom metadata", e))? else {
            continue;
        };
        if custom.version != a.version || custom.hardware_class != a.hardware_class {
            continue;
        }
        if !custom.rollback_allowed {
            custom.rollback_allowed = true;
            file.custom = Some(custom.to_custom().map_err(|e| SignerError::proto("custom metadata", e))?);
            changed.push(path.clone());
        }
    }
    if changed.is_empty() {
        let listed = body.targets.keys().any(|p| p.starts_with(&prefix));
        return Err(SignerError::Usage(if listed {
            format!("release {} for {} already allows rollback (role {role})", a.version, a.hardware_class)
        } else {
            format!("no release {} for hardware class {} is signed by role {role}", a.version, a.hardware_class)
        }));
    }
    let pushed = commit_role(&repo, &role, &mut body, &keys, &[], a.expires, server.as_ref(), out).await?;
    out.emit(
        &json!({"role": role, "role_version": body.version, "targets": changed, "rollback_allowed": true, "pushed": pushed}),
        &format!("devices may now be sent back to {} {} ({} re-signed into {role} v{})", a.hardware_class, a.version, changed.join(", "), body.version),
    );
    Ok(())
}

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

/// [`crate::sigstore_out::sign_file`] on the blocking pool.
async fn sign_file(key: &outpost_protocol::keys::SigningKey, file: &std::path::Path, expected_sha256: Option<&str>) -> Result<crate::sigstore_out::Signed> {
    let (key, file, expected) = (key.clone(), file.to_owned(), expected_sha256.map(str::to_owned));
    tokio::task::spawn_blocking(move || crate::sigstore_out::sign_file(&key, &file, expected.as_deref()))
        .await
        .map_err(|e| SignerError::Usage(format!("signing task: {e}")))?
}

/// SHA-256 and length of a file, streamed.
fn hash_file(path: &std::path::Path) -> Result<(u64, String)> {
    let f = std::fs::File::open(path).map_err(|e| SignerError::io("open", path, e))?;
    let (sha, len) = outpost_protocol::hashing::sha256_reader(f).map_err(|e| SignerError::io("read", path, e))?;
    Ok((len, sha))
}

/// A target file produced for this release, and where its bytes are.
struct Artifact {
    path: String,
    file: PathBuf,
    length: u64,
    sha256: String,
    /// Outpost metadata of firmware targets; None for the SBOM document.
    custom: Option<FirmwareCustom>,
    /// Made here (compressed or patch), removed after use.
    temporary: bool,
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
    // The image's Sigstore signature (for people outside Outpost) reads the image twice
    // anyway; its SHA-256 and length are the ones the release metadata lists.
    let sigstore_key = keys.first().ok_or_else(|| SignerError::Usage("release publish needs a signing --key".into()))?;
    let image_signed = sign_file(sigstore_key, &a.firmware, None).await?;
    let (image_len, image_sha) = (image_signed.length, image_signed.sha256_hex());
    let image_path = firmware_target_path(&a.hardware_class, &a.version, &file_name);
    let role = match a.role.clone() {
        Some(r) => r,
        None => role_for_path(&repo, &image_path)?,
    };
    let (env, _) = repo
        .role(&role)?
        .ok_or_else(|| SignerError::Usage(format!("role {role} has no metadata yet in {}", repo.dir.display())))?;
    let mut base = FirmwareCustom::image(a.version.clone(), a.hardware_class.clone(), image_sha.clone());
    for run in &a.health_commands {
        base.health.push(HealthCheck::Command { run: run.clone(), timeout_secs: 60 });
    }
    for url in &a.health_http {
        base.health.push(HealthCheck::Http { url: url.clone(), timeout_secs: 30 });
    }
    base.trial_deadline_secs = a.trial_deadline.map(|d| d.as_secs().max(1));
    let staging = repo.dir.join(".staging");
    std::fs::create_dir_all(&staging).map_err(|e| SignerError::io("create", &staging, e))?;

    let mut artifacts = Vec::new();
    let full = if a.zstd {
        let path = format!("{image_path}.zst");
        let tmp = staging.join(format!("{}.zst", image_sha));
        let (src, dst) = (a.firmware.clone(), tmp.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let input = std::fs::File::open(&src).map_err(|e| SignerError::io("open", &src, e))?;
            let output = std::fs::File::create(&dst).map_err(|e| SignerError::io("create", &dst, e))?;
            let mut enc = zstd::stream::write::Encoder::new(output, 19).map_err(|e| SignerError::io("compress", &dst, e))?;
            enc.long_distance_matching(true).map_err(|e| SignerError::io("compress", &dst, e))?;
            enc.include_checksum(true).map_err(|e| SignerError::io("compress", &dst, e))?;
            std::io::copy(&mut std::io::BufReader::new(input), &mut enc).map_err(|e| SignerError::io("compress", &src, e))?;
            enc.finish().map_err(|e| SignerError::io("compress", &dst, e))?.sync_all().map_err(|e| SignerError::io("fsync", &dst, e))
        })
        .await
        .map_err(|e| SignerError::Usage(format!("compression task: {e}")))??;
        let (length, sha256) = hash_file(&tmp)?;
        let mut custom = base.clone();
        custom.encoding = Encoding::Zstd;
        custom.image = Some(ImageDigest { sha256: image_sha.clone(), length: image_len });
        Artifact { path, file: tmp, length, sha256, custom: Some(custom), temporary: true }
    } else {
        Artifact { path: image_path.clone(), file: a.firmware.clone(), length: image_len, sha256: image_sha.clone(), custom: Some(base.clone()), temporary: false }
    };
    let full_path = full.path.clone();

    // The SBOM: a target beside the image, named with its hash in the image's metadata.
    let mut sbom_artifact: Option<Artifact> = None;
    let sbom_bytes: Option<Vec<u8>> = {
        let subject = outpost_sbom::Subject { name: file_name.clone(), version: a.version.to_string(), image_sha256: image_sha.clone() };
        let sbom_err = |e: outpost_sbom::SbomError| SignerError::Usage(format!("SBOM: {e}"));
        if let Some(f) = &a.sbom {
            Some(std::fs::read(f).map_err(|e| SignerError::io("read", f, e))?)
        } else if let Some(root) = &a.sbom_rootfs {
            let (root, subject) = (root.clone(), subject.clone());
            let bom = tokio::task::spawn_blocking(move || outpost_sbom::from_rootfs(&root, &subject, true))
                .await
                .map_err(|e| SignerError::Usage(format!("SBOM task: {e}")))?
                .map_err(sbom_err)?;
            Some(outpost_sbom::to_json(&bom).map_err(sbom_err)?)
        } else if let Some(lock) = &a.sbom_cargo_lock {
            Some(outpost_sbom::to_json(&outpost_sbom::from_cargo_lock(lock, &subject).map_err(sbom_err)?).map_err(sbom_err)?)
        } else {
            None
        }
    };
    match &sbom_bytes {
        None if repo.settings.require_sbom => {
            return Err(SignerError::Usage(
                "this repository's policy requires an SBOM for every release: pass --sbom FILE, --sbom-rootfs DIR or --sbom-cargo-lock FILE".into(),
            ))
        }
        None => {}
        Some(bytes) => {
            let summary = outpost_sbom::validate(bytes).map_err(|e| SignerError::Usage(format!("{}: {e}", a.sbom.as_deref().unwrap_or(std::path::Path::new("generated SBOM")).display())))?;
            if summary.subject_sha256.as_deref() != Some(image_sha.as_str()) {
                return Err(SignerError::Usage(format!(
                    "the SBOM describes an image with sha256 {:?} (metadata.component.hashes), not this image ({image_sha})",
                    summary.subject_sha256
                )));
            }
            let sha256 = hex::encode(Sha256::digest(bytes));
            let path = format!("{image_path}.cdx.json");
            let tmp = staging.join(format!("{sha256}.cdx.json"));
            crate::localrepo::write_atomic(&tmp, bytes)?;
            let sref = SbomRef { path: path.clone(), sha256: sha256.clone(), length: bytes.len() as u64 };
            base.sbom = Some(sref.clone());
            sbom_artifact = Some(Artifact { path, file: tmp, length: bytes.len() as u64, sha256, custom: None, temporary: true });
        }
    }
    let mut full = full;
    if let Some(c) = full.custom.as_mut() {
        c.sbom = base.sbom.clone();
    }
    artifacts.push(full);
    artifacts.extend(sbom_artifact);

    if let (Some(from), Some(base_file)) = (&a.delta_from, &a.delta_base) {
        // The base must be exactly what was signed for that release.
        let signed_base = env
            .signed
            .targets
            .iter()
            .filter_map(|(p, t)| FirmwareCustom::from_custom(t.custom.as_ref(), p).ok().flatten())
            .find(|c| c.version == *from && c.hardware_class == a.hardware_class && c.encoding != Encoding::ZstdPatch)
            .ok_or_else(|| SignerError::Usage(format!("--delta-from {from}: no {} release {from} in role {role}", a.hardware_class)))?;
        let (_, base_sha) = hash_file(base_file)?;
        if base_sha != signed_base.expected_measurement.sha256 {
            return Err(SignerError::Usage(format!(
                "--delta-base {}: sha256 {base_sha} is not the signed image of release {from} ({})",
                base_file.display(),
                signed_base.expected_measurement.sha256
            )));
        }
        let (old, new) = (base_file.clone(), a.firmware.clone());
        let patch = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let old = std::fs::read(&old).map_err(|e| SignerError::io("read", &old, e))?;
            let new = std::fs::read(&new).map_err(|e| SignerError::io("read", &new, e))?;
            outpost_protocol::codec::make_patch(&old, &new, 19).map_err(|e| SignerError::Usage(format!("making the zstd patch: {e}")))
        })
        .await
        .map_err(|e| SignerError::Usage(format!("patch task: {e}")))??;
        let path = format!("{image_path}.from-{from}.zst-patch");
        let tmp = staging.join(format!("{image_sha}.from-{from}.zst-patch"));
        crate::localrepo::write_atomic(&tmp, &patch)?;
        let mut custom = base.clone();
        custom.encoding = Encoding::ZstdPatch;
        custom.image = Some(ImageDigest { sha256: image_sha.clone(), length: image_len });
        custom.delta_base = Some(Measurement { sha256: base_sha });
        custom.full_target = Some(full_path.clone());
        let sha256 = hex::encode(Sha256::digest(&patch));
        artifacts.push(Artifact { path, file: tmp, length: patch.len() as u64, sha256, custom: Some(custom), temporary: true });
    }

    let mut body = env.signed.clone();
    for art in &artifacts {
        if let Some(c) = &art.custom {
            c.validate(&art.path).map_err(|e| SignerError::proto("release metadata", e))?;
        }
        if let Some(existing) = body.targets.get(&art.path) {
            if existing.hashes.get("sha256") != Some(&art.sha256) || existing.length != art.length {
                return Err(SignerError::Usage(format!(
                    "{} is already published with different content; a release version is immutable, publish a new version",
                    art.path
                )));
            }
        }
        let mut hashes = std::collections::BTreeMap::new();
        hashes.insert("sha256".to_owned(), art.sha256.clone());
        let custom = match &art.custom {
            Some(c) => Some(c.to_custom().map_err(|e| SignerError::proto("custom metadata", e))?),
            None => None,
        };
        body.targets.insert(art.path.clone(), TargetFile { length: art.length, hashes, custom, extra: Default::default() });
    }
    // The SBOM's Sigstore signature, made before anything is stored or uploaded, so a
    // file that changed since it was hashed stops the release here.
    let mut signed = vec![(image_path.clone(), image_signed)];
    for sbom in artifacts.iter().filter(|x| x.custom.is_none()) {
        signed.push((sbom.path.clone(), sign_file(sigstore_key, &sbom.file, Some(&sbom.sha256)).await?));
    }
    let fresh: Vec<(&str, &std::path::Path, &str)> = artifacts.iter().map(|a| (a.path.as_str(), a.file.as_path(), a.sha256.as_str())).collect();
    let pushed = commit_role(&repo, &role, &mut body, &keys, &fresh, a.expires, server.as_ref(), out).await?;
    let sigstore_dir = a.sigstore_dir.clone().unwrap_or_else(|| repo.dir.join("sigstore"));
    let mut sigstore = Vec::new();
    let pem_path = sigstore_dir.join(format!("{}.pub.pem", sigstore_key.key_id()));
    std::fs::create_dir_all(&sigstore_dir).map_err(|e| SignerError::io("create", &sigstore_dir, e))?;
    crate::localrepo::write_atomic(&pem_path, crate::sigstore_out::public_pem(sigstore_key)?.as_bytes())?;
    for (path, signature) in &signed {
        let written = crate::sigstore_out::write_signature(sigstore_key, signature, &sigstore_dir.join(path))?;
        sigstore.push(json!({"target": path, "signature": written.signature, "bundle": written.bundle, "public_key": pem_path}));
    }
    for art in &artifacts {
        if art.temporary {
            let _ = std::fs::remove_file(&art.file);
        }
    }
    let listed: Vec<serde_json::Value> = artifacts
        .iter()
        .map(|a| json!({"target": a.path, "length": a.length, "sha256": a.sha256, "encoding": a.custom.as_ref().map(|c| c.encoding), "sbom": a.custom.is_none()}))
        .collect();
    out.emit(
        &json!({"target": full_path, "targets": listed, "role": role, "role_version": body.version, "length": image_len, "sha256": image_sha,
                "hardware_class": a.hardware_class, "version": a.version, "pushed": pushed, "sigstore": sigstore}),
        &format!(
            "signed {} ({image_len} byte image, sha256 {image_sha}) into {role} v{}{}",
            artifacts.iter().map(|a| format!("{} [{} bytes]", a.path, a.length)).collect::<Vec<_>>().join(", "),
            body.version,
            match &pushed {
                Some(p) => format!("; uploaded: {}", p.summary),
                None => format!("; offline in {}", repo.dir.display()),
            }
        ),
    );
    Ok(())
}

/// Signs `body` as the next version of `role` (expiring after `expires`, default the
/// repository's targets expiry), stores it with the new target files (offline: copied
/// into the directory) and re-signs snapshot and timestamp; with a server, uploads the
/// changed metadata and `fresh` files. Returns the server's answer.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn commit_role(
    repo: &LocalRepo,
    role: &str,
    body: &mut outpost_protocol::tuf::Targets,
    keys: &[outpost_protocol::keys::SigningKey],
    fresh: &[(&str, &std::path::Path, &str)],
    expires: Option<Duration>,
    server: Option<&crate::upload::Server>,
    out: &Output,
) -> Result<Option<crate::upload::PushReport>> {
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
            let fresh: Vec<(&str, &std::path::Path)> = fresh.iter().map(|(p, f, _)| (*p, *f)).collect();
            Ok(Some(crate::upload::push(repo, s, &fresh, out).await?))
        }
        None => Ok(None),
    }
}
