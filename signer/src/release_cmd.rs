//! `outpost release publish | allow-rollback`: sign a firmware release offline and
//! optionally upload it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use outpost_protocol::keys::SigningKey;
use outpost_protocol::release::{firmware_target_path, Encoding, FirmwareCustom, HardwareClass, HealthCheck, ImageDigest, Measurement, ReleaseVersion, SbomRef};
use outpost_protocol::tuf::Targets;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Result, SignerError};
use crate::localrepo::parse_duration;
use crate::output::Output;
use crate::role_edit::{pushed_note, role_for_path, staging_dir, target_file, Fresh, RoleSignArgs};
use crate::sbom_cmd::{make_sbom, SbomSource};

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Add a firmware image as a signed target (offline), then upload it when --server is given.
    Publish(Box<PublishArgs>),
    /// Allow devices on newer releases to be sent back to this one: re-signs the
    /// release's targets (image and deltas) with `rollback_allowed`, offline, with the
    /// keys of the role that signs it. Without this, the director cannot order a
    /// downgrade to the release, whatever its online key signs.
    AllowRollback(AllowRollbackArgs),
}

#[derive(Debug, Args)]
pub struct AllowRollbackArgs {
    #[arg(long)]
    pub hardware_class: HardwareClass,
    /// The release devices may go back to.
    #[arg(long)]
    pub version: ReleaseVersion,
    #[command(flatten)]
    pub sign: RoleSignArgs,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub sign: RoleSignArgs,
    /// The firmware image.
    #[arg(long)]
    pub firmware: PathBuf,
    /// Hardware class the image is for (a-z, 0-9, - and _).
    #[arg(long)]
    pub hardware_class: HardwareClass,
    /// Release version, e.g. 1.4.2.
    #[arg(long)]
    pub version: ReleaseVersion,
    /// Role to sign with (default: the delegated role whose paths match, else targets).
    #[arg(long)]
    pub role: Option<String>,
    /// Store the image zstd-compressed (devices decompress while downloading).
    #[arg(long)]
    pub zstd: bool,
    /// zstd level for --zstd (1-22): 19 packs tightest for devices on slow links; a
    /// low level compresses a large root filesystem in seconds instead of minutes.
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22), requires = "zstd")]
    pub zstd_level: i32,
    /// zstd level of the delta's regions (1-22): 19 makes the smallest patches; a low
    /// level makes them in a fraction of the time.
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22), requires = "delta_from")]
    pub delta_level: i32,
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
    pub boot: crate::release_golden::BootArgs,
}

pub async fn run(cmd: ReleaseCommand, out: &Output) -> Result<()> {
    match cmd {
        ReleaseCommand::Publish(a) => publish(*a, out).await,
        ReleaseCommand::AllowRollback(a) => allow_rollback(a, out).await,
    }
}

async fn allow_rollback(a: AllowRollbackArgs, out: &Output) -> Result<()> {
    let s = a.sign.open()?;
    let prefix = format!("firmware/{}/{}/", a.hardware_class, a.version);
    let role = role_for_path(&s.repo, &format!("{prefix}image"))?;
    let mut body = s.role_body(&role)?;
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
        return Err(if listed {
            SignerError::repo(&s.repo.dir, format!("release {} for {} already allows rollback (role {role})", a.version, a.hardware_class))
        } else {
            SignerError::Usage(format!("no release {} for hardware class {} is signed by role {role}", a.version, a.hardware_class))
        });
    }
    let pushed = s.commit(&role, &mut body, &[], out).await?;
    out.emit(
        &json!({"role": role, "role_version": body.version, "targets": changed, "rollback_allowed": true, "pushed": pushed}),
        &format!("devices may now be sent back to {} {} ({} re-signed into {role} v{})", a.hardware_class, a.version, changed.join(", "), body.version),
    );
    Ok(())
}

/// [`crate::sigstore_out::sign_file`] on the blocking pool.
async fn sign_file(key: &SigningKey, file: &Path, expected_sha256: Option<&str>) -> Result<crate::sigstore_out::Signed> {
    let (key, file, expected) = (key.clone(), file.to_owned(), expected_sha256.map(str::to_owned));
    tokio::task::spawn_blocking(move || crate::sigstore_out::sign_file(&key, &file, expected.as_deref()))
        .await
        .map_err(SignerError::task("signing task"))?
}

/// SHA-256 and length of a file, streamed (see [`outpost_fsio::hash_file`]).
fn hash_file(path: &Path) -> Result<(u64, String)> {
    let (sha, len) = outpost_fsio::hash_file(path, None).map_err(|e| SignerError::io("hash", path, e))?;
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

/// The image being released: its target path, digest and Sigstore signature.
struct Image {
    file: PathBuf,
    file_name: String,
    path: String,
    sha256: String,
    length: u64,
    signed: crate::sigstore_out::Signed,
}

impl Image {
    /// The image's firmware metadata with another encoding (the release's image digest
    /// kept, for devices to check what they decode).
    fn encoded(&self, base: &FirmwareCustom, encoding: Encoding) -> FirmwareCustom {
        let mut custom = base.clone();
        custom.encoding = encoding;
        custom.image = Some(ImageDigest { sha256: self.sha256.clone(), length: self.length });
        custom
    }
}

/// The firmware metadata every target of the release shares: version, class, health
/// checks, trial deadline.
fn base_custom(a: &PublishArgs, image_sha: &str) -> FirmwareCustom {
    let mut base = FirmwareCustom::image(a.version.clone(), a.hardware_class.clone(), image_sha.to_owned());
    for run in &a.health_commands {
        base.health.push(HealthCheck::Command { run: run.clone(), timeout_secs: 60 });
    }
    for url in &a.health_http {
        base.health.push(HealthCheck::Http { url: url.clone(), timeout_secs: 30 });
    }
    base.trial_deadline_secs = a.trial_deadline.map(|d| d.as_secs().max(1));
    base
}

/// The full image target: the image itself, or with --zstd a compressed copy in staging.
async fn full_artifact(a: &PublishArgs, image: &Image, base: &FirmwareCustom, staging: &Path) -> Result<Artifact> {
    if !a.zstd {
        return Ok(Artifact {
            path: image.path.clone(),
            file: image.file.clone(),
            length: image.length,
            sha256: image.sha256.clone(),
            custom: Some(base.clone()),
            temporary: false,
        });
    }
    let tmp = staging.join(format!("{}.zst", image.sha256));
    let (src, dst) = (image.file.clone(), tmp.clone());
    let level = a.zstd_level;
    tokio::task::spawn_blocking(move || compress(&src, &dst, level)).await.map_err(SignerError::task("compression task"))??;
    let (length, sha256) = hash_file(&tmp)?;
    Ok(Artifact { path: format!("{}.zst", image.path), file: tmp, length, sha256, custom: Some(image.encoded(base, Encoding::Zstd)), temporary: true })
}

/// zstd at `level` with long-distance matching and a checksum, fsynced. The window
/// is 8 MiB ([`FULL_WINDOW_LOG`]): the device's decoder keeps a window that large
/// while it streams the image into the slot (long-distance matching would otherwise
/// ask for 128 MiB of the device's memory).
fn compress(src: &Path, dst: &Path, level: i32) -> Result<()> {
    let input = std::fs::File::open(src).map_err(|e| SignerError::io("open", src, e))?;
    let output = std::fs::File::create(dst).map_err(|e| SignerError::io("create", dst, e))?;
    let mut enc = zstd::stream::write::Encoder::new(output, level).map_err(|e| SignerError::io("compress", dst, e))?;
    enc.long_distance_matching(true).map_err(|e| SignerError::io("compress", dst, e))?;
    enc.window_log(FULL_WINDOW_LOG).map_err(|e| SignerError::io("compress", dst, e))?;
    enc.include_checksum(true).map_err(|e| SignerError::io("compress", dst, e))?;
    std::io::copy(&mut std::io::BufReader::new(input), &mut enc).map_err(|e| SignerError::io("compress", src, e))?;
    enc.finish().map_err(|e| SignerError::io("compress", dst, e))?.sync_all().map_err(|e| SignerError::io("fsync", dst, e))
}

/// The window of a full zstd target (2^23 bytes = 8 MiB).
const FULL_WINDOW_LOG: u32 = 23;

/// The SBOM bytes the release carries: the pipeline's file or one generated here.
async fn sbom_bytes(a: &PublishArgs, image: &Image) -> Result<Option<Vec<u8>>> {
    let subject = outpost_sbom::Subject { name: image.file_name.clone(), version: a.version.to_string(), image_sha256: image.sha256.clone() };
    let source = if let Some(f) = &a.sbom {
        return Ok(Some(std::fs::read(f).map_err(|e| SignerError::io("read", f, e))?));
    } else if let Some(root) = &a.sbom_rootfs {
        SbomSource::Rootfs { root: root.clone(), files: outpost_sbom::Files::Include }
    } else if let Some(lock) = &a.sbom_cargo_lock {
        SbomSource::CargoLock(lock.clone())
    } else {
        return Ok(None);
    };
    Ok(Some(make_sbom(&source, &subject).await?))
}

/// The SBOM target beside the image (checked to describe this image), and the
/// reference to it the image's metadata carries; None without an SBOM, unless the
/// repository's settings require one.
async fn sbom_artifact(a: &PublishArgs, image: &Image, settings: &crate::localrepo::Settings, staging: &Path) -> Result<Option<(Artifact, SbomRef)>> {
    let Some(bytes) = sbom_bytes(a, image).await? else {
        if settings.require_sbom {
            return Err(SignerError::Usage(
                "this repository's policy requires an SBOM for every release: pass --sbom FILE, --sbom-rootfs DIR or --sbom-cargo-lock FILE".into(),
            ));
        }
        return Ok(None);
    };
    let sbom_name = a.sbom.as_deref().unwrap_or(Path::new("generated SBOM")).display();
    let summary = outpost_sbom::validate(&bytes).map_err(|e| SignerError::input(&sbom_name, e))?;
    if summary.subject_sha256.as_deref() != Some(image.sha256.as_str()) {
        return Err(SignerError::verify(
            &sbom_name,
            format!(
                "the SBOM describes an image with sha256 {:?} (metadata.component.hashes), not this image ({})",
                summary.subject_sha256, image.sha256
            ),
        ));
    }
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let path = format!("{}.cdx.json", image.path);
    let tmp = staging.join(format!("{sha256}.cdx.json"));
    crate::localrepo::write_atomic(&tmp, &bytes)?;
    let sref = SbomRef { path: path.clone(), sha256: sha256.clone(), length: bytes.len() as u64 };
    Ok(Some((Artifact { path, file: tmp, length: bytes.len() as u64, sha256, custom: None, temporary: true }, sref)))
}

/// With --delta-from/--delta-base: a zstd patch from that release's image (which must
/// be exactly what was signed for it) to this one.
async fn delta_artifact(a: &PublishArgs, image: &Image, base: &FirmwareCustom, role: &str, body: &Targets, full_path: &str, staging: &Path) -> Result<Option<Artifact>> {
    let (Some(from), Some(base_file)) = (&a.delta_from, &a.delta_base) else { return Ok(None) };
    let signed_base = body
        .targets
        .iter()
        .filter_map(|(p, t)| FirmwareCustom::from_custom(t.custom.as_ref(), p).ok().flatten())
        .find(|c| c.version == *from && c.hardware_class == a.hardware_class && c.encoding != Encoding::ZstdPatch)
        .ok_or_else(|| SignerError::Usage(format!("--delta-from {from}: no {} release {from} in role {role}", a.hardware_class)))?;
    let (_, base_sha) = hash_file(base_file)?;
    if base_sha != signed_base.expected_measurement.sha256 {
        return Err(SignerError::verify(
            format!("--delta-base {}", base_file.display()),
            format!("sha256 {base_sha} is not the signed image of release {from} ({})", signed_base.expected_measurement.sha256),
        ));
    }
    let (old, new, level) = (base_file.clone(), image.file.clone(), a.delta_level);
    let patch = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let old_bytes = std::fs::read(&old).map_err(|e| SignerError::io("read", &old, e))?;
        let new_bytes = std::fs::read(&new).map_err(|e| SignerError::io("read", &new, e))?;
        outpost_protocol::wpatch::make(&old_bytes, &new_bytes, level).map_err(|e| SignerError::io("make a windowed zstd patch for", &new, e))
    })
    .await
    .map_err(SignerError::task("patch task"))??;
    let tmp = staging.join(format!("{}.from-{from}.zst-patch", image.sha256));
    crate::localrepo::write_atomic(&tmp, &patch)?;
    let mut custom = image.encoded(base, Encoding::ZstdPatch);
    custom.delta_base = Some(Measurement { sha256: base_sha });
    custom.full_target = Some(full_path.to_owned());
    let sha256 = hex::encode(Sha256::digest(&patch));
    let path = format!("{}.from-{from}.zst-patch", image.path);
    Ok(Some(Artifact { path, file: tmp, length: patch.len() as u64, sha256, custom: Some(custom), temporary: true }))
}

/// Lists the artifacts in `body`; a path already listed must have the same content
/// (a release version is immutable; the refusal names the repository `dir`).
fn list_artifacts(dir: &Path, body: &mut Targets, artifacts: &[Artifact]) -> Result<()> {
    for art in artifacts {
        if let Some(c) = &art.custom {
            c.validate(&art.path).map_err(|e| SignerError::proto("release metadata", e))?;
        }
        if let Some(existing) = body.targets.get(&art.path) {
            if existing.hashes.get("sha256") != Some(&art.sha256) || existing.length != art.length {
                return Err(SignerError::repo(dir, format!(
                    "{} is already published with different content; a release version is immutable, publish a new version",
                    art.path
                )));
            }
        }
        let custom = match &art.custom {
            Some(c) => Some(c.to_custom().map_err(|e| SignerError::proto("custom metadata", e))?),
            None => None,
        };
        body.targets.insert(art.path.clone(), target_file(art.length, &art.sha256, custom));
    }
    Ok(())
}

/// Writes the Sigstore signatures (and the key's PEM) into `dir`; what was written, as JSON.
fn write_sigstore(key: &SigningKey, signed: &[(String, crate::sigstore_out::Signed)], dir: &Path) -> Result<Vec<serde_json::Value>> {
    let pem_path = dir.join(format!("{}.pub.pem", key.key_id()));
    std::fs::create_dir_all(dir).map_err(|e| SignerError::io("create", dir, e))?;
    crate::localrepo::write_atomic(&pem_path, crate::sigstore_out::public_pem(key)?.as_bytes())?;
    let mut written_all = Vec::new();
    for (path, signature) in signed {
        let written = crate::sigstore_out::write_signature(key, signature, &dir.join(path))?;
        written_all.push(json!({"target": path, "signature": written.signature, "bundle": written.bundle, "public_key": pem_path}));
    }
    Ok(written_all)
}

async fn publish(a: PublishArgs, out: &Output) -> Result<()> {
    let s = a.sign.open()?;
    let file_name = a
        .firmware
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && !n.starts_with('.'))
        .ok_or_else(|| SignerError::Usage(format!("--firmware {}: needs a file name", a.firmware.display())))?;
    // The image's Sigstore signature (for people outside Outpost) reads the image twice
    // anyway; its SHA-256 and length are the ones the release metadata lists.
    let sigstore_key = s.keys.first().ok_or_else(|| SignerError::Usage("release publish needs a signing --key".into()))?;
    let signed = sign_file(sigstore_key, &a.firmware, None).await?;
    let path = firmware_target_path(&a.hardware_class, &a.version, &file_name);
    let image = Image { file: a.firmware.clone(), file_name, path, sha256: signed.sha256_hex(), length: signed.length, signed };
    let role = match a.role.clone() {
        Some(r) => r,
        None => role_for_path(&s.repo, &image.path)?,
    };
    let mut body = s.role_body(&role)?;
    let mut base = base_custom(&a, &image.sha256);
    base.golden = a.boot.golden()?;
    base.verity = a.boot.verity(&a.firmware, base.golden.as_ref())?;
    let staging = staging_dir(&s.repo)?;

    let mut full = full_artifact(&a, &image, &base, &staging).await?;
    let full_path = full.path.clone();
    // The SBOM: a target beside the image, named with its hash in the image's metadata.
    let sbom = sbom_artifact(&a, &image, &s.repo.settings, &staging).await?;
    base.sbom = sbom.as_ref().map(|(_, sref)| sref.clone());
    if let Some(c) = full.custom.as_mut() {
        c.sbom = base.sbom.clone();
    }
    let mut artifacts = vec![full];
    artifacts.extend(sbom.map(|(art, _)| art));
    artifacts.extend(delta_artifact(&a, &image, &base, &role, &body, &full_path, &staging).await?);
    list_artifacts(&s.repo.dir, &mut body, &artifacts)?;
    // The SBOM's Sigstore signature, made before anything is stored or uploaded, so a
    // file that changed since it was hashed stops the release here.
    let mut signed = vec![(image.path.clone(), image.signed.clone())];
    for sbom in artifacts.iter().filter(|x| x.custom.is_none()) {
        signed.push((sbom.path.clone(), sign_file(sigstore_key, &sbom.file, Some(&sbom.sha256)).await?));
    }
    let fresh: Vec<Fresh<'_>> = artifacts.iter().map(|a| (a.path.as_str(), a.file.as_path(), a.sha256.as_str())).collect();
    let pushed = s.commit(&role, &mut body, &fresh, out).await?;
    let sigstore = write_sigstore(sigstore_key, &signed, &a.sigstore_dir.clone().unwrap_or_else(|| s.repo.dir.join("sigstore")))?;
    for art in artifacts.iter().filter(|a| a.temporary) {
        let _ = std::fs::remove_file(&art.file);
    }
    let listed: Vec<serde_json::Value> = artifacts
        .iter()
        .map(|a| json!({"target": a.path, "length": a.length, "sha256": a.sha256, "encoding": a.custom.as_ref().map(|c| c.encoding), "sbom": a.custom.is_none()}))
        .collect();
    let (image_len, image_sha) = (image.length, &image.sha256);
    out.emit(
        &json!({"target": full_path, "targets": listed, "role": role, "role_version": body.version, "length": image_len, "sha256": image_sha,
                "hardware_class": a.hardware_class, "version": a.version, "pushed": pushed, "sigstore": sigstore, "golden": base.golden,
                "verity": base.verity}),
        &format!(
            "signed {} ({image_len} byte image, sha256 {image_sha}) into {role} v{}{}",
            artifacts.iter().map(|a| format!("{} [{} bytes]", a.path, a.length)).collect::<Vec<_>>().join(", "),
            body.version,
            pushed_note(pushed.as_ref(), &s.repo)
        ),
    );
    Ok(())
}
