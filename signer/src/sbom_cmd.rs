//! `outpost sbom ...`: make and check CycloneDX 1.5 SBOMs for firmware images.

use std::path::PathBuf;

use clap::Subcommand;
use outpost_protocol::api::sbom::{AffectedAnswer, SbomHit, SearchAnswer};
use serde_json::json;

use crate::error::{Result, SignerError};
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum SbomCommand {
    /// Write an SBOM for IMAGE from its root filesystem tree or from a Cargo.lock.
    Generate {
        /// The firmware image the SBOM describes (its SHA-256 goes into metadata.component).
        #[arg(long)]
        image: PathBuf,
        /// Release version of the image.
        #[arg(long)]
        version: String,
        /// The image's root filesystem tree (dpkg status, os-release, files).
        #[arg(long, conflicts_with = "cargo_lock", required_unless_present = "cargo_lock")]
        rootfs: Option<PathBuf>,
        /// A Cargo.lock (crates as components).
        #[arg(long)]
        cargo_lock: Option<PathBuf>,
        /// Leave out the per-file components of a root filesystem (packages and OS only).
        #[arg(long)]
        no_files: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check that FILE is valid CycloneDX 1.5 JSON and show what it describes.
    Validate { file: PathBuf },
    /// Sign and publish the vulnerability deny-list (target security/denylist.json) with
    /// the security role's keys; devices refuse affected releases, the server flags them.
    Denylist {
        #[arg(long)]
        repo: PathBuf,
        /// The deny-list (JSON; see docs/sbom.md).
        #[arg(long)]
        file: PathBuf,
        /// Private keys of the signing role (repeat to meet its threshold).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Role to sign with (default: the delegated role whose paths match, e.g. `security`).
        #[arg(long)]
        role: Option<String>,
        #[command(flatten)]
        server: crate::upload::ServerArgs,
    },
    /// The signed deny-list's affected entries with the releases and devices they hit (server API).
    Affected {
        #[command(flatten)]
        server: crate::upload::ServerArgs,
    },
    /// Which releases contain a component, and which devices run them (server API).
    /// QUERY: NAME, NAME@VERSION, NAME@>=1.2,<2.0, or a purl (pkg:deb/debian/openssl[@...]).
    Search {
        query: String,
        #[command(flatten)]
        server: crate::upload::ServerArgs,
    },
}

fn sbom_err(op: &'static str) -> impl FnOnce(outpost_sbom::SbomError) -> SignerError {
    move |source| SignerError::Sbom { op, source }
}

pub async fn run(cmd: SbomCommand, out: &Output) -> Result<()> {
    match cmd {
        SbomCommand::Generate { image, version, rootfs, cargo_lock, no_files, out: dest } => {
            let source = match (rootfs, cargo_lock) {
                (Some(root), _) => SbomSource::Rootfs { root, files: if no_files { outpost_sbom::Files::Exclude } else { outpost_sbom::Files::Include } },
                (None, Some(lock)) => SbomSource::CargoLock(lock),
                (None, None) => return Err(SignerError::Usage("pass --rootfs DIR or --cargo-lock FILE".into())),
            };
            generate(&image, version, source, &dest, out).await
        }
        SbomCommand::Search { query, server } => {
            let q = percent_encoding::utf8_percent_encode(&query, percent_encoding::NON_ALPHANUMERIC);
            let v: SearchAnswer = server.require()?.get_json("SBOM search", &format!("/api/v1/sbom/search?q={q}")).await?;
            out.emit(&v, &search_lines(&query, &v));
            Ok(())
        }
        SbomCommand::Denylist { repo, file, keys, role, server } => publish_denylist(&repo, &file, &keys, role, &server, out).await,
        SbomCommand::Affected { server } => {
            let v: AffectedAnswer = server.require()?.get_json("affected releases", "/api/v1/sbom/affected").await?;
            out.emit(&v, &affected_lines(&v));
            Ok(())
        }
        SbomCommand::Validate { file } => {
            let bytes = std::fs::read(&file).map_err(|e| SignerError::io("read", &file, e))?;
            let summary = outpost_sbom::validate(&bytes).map_err(|e| SignerError::input(file.display(), e))?;
            out.emit(
                &summary,
                &format!(
                    "{}: valid CycloneDX 1.5; describes {} {} (sha256 {}); {} components",
                    file.display(),
                    summary.subject_name.as_deref().unwrap_or("?"),
                    summary.subject_version.as_deref().unwrap_or("?"),
                    summary.subject_sha256.as_deref().unwrap_or("none"),
                    summary.components
                ),
            );
            Ok(())
        }
    }
}

/// What an SBOM is made from.
#[derive(Debug, Clone)]
pub enum SbomSource {
    /// An image's root filesystem tree (dpkg status, os-release, files).
    Rootfs { root: PathBuf, files: outpost_sbom::Files },
    /// A Cargo.lock (crates as components).
    CargoLock(PathBuf),
}

/// Makes the CycloneDX 1.5 JSON of `subject` from `source` (a root filesystem is
/// walked on the blocking pool).
pub(crate) async fn make_sbom(source: &SbomSource, subject: &outpost_sbom::Subject) -> Result<Vec<u8>> {
    let bom = match source {
        SbomSource::Rootfs { root, files } => {
            let (root, subject, files) = (root.clone(), subject.clone(), *files);
            tokio::task::spawn_blocking(move || outpost_sbom::from_rootfs(&root, &subject, files))
                .await
                .map_err(SignerError::task("SBOM task"))?
                .map_err(sbom_err("make the SBOM"))?
        }
        SbomSource::CargoLock(lock) => outpost_sbom::from_cargo_lock(lock, subject).map_err(sbom_err("make the SBOM"))?,
    };
    outpost_sbom::to_json(&bom).map_err(sbom_err("encode the SBOM"))
}

async fn generate(image: &std::path::Path, version: String, source: SbomSource, dest: &std::path::Path, out: &Output) -> Result<()> {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| SignerError::Usage(format!("--image {}: needs a file name", image.display())))?;
    let bytes = std::fs::read(image).map_err(|e| SignerError::io("read", image, e))?;
    let subject = outpost_sbom::Subject { name, version, image_sha256: outpost_protocol::hashing::sha256_hex(&bytes) };
    let started = std::time::Instant::now();
    let json_bytes = make_sbom(&source, &subject).await?;
    let summary = outpost_sbom::validate(&json_bytes).map_err(sbom_err("check the generated SBOM"))?;
    crate::localrepo::write_atomic(dest, &json_bytes)?;
    out.emit(
        &json!({"out": dest, "components": summary.components, "packages": summary.packages.len(), "bytes": json_bytes.len(),
                "image_sha256": subject.image_sha256, "seconds": started.elapsed().as_secs_f64()}),
        &format!(
            "wrote {} ({} components, {} packages, {} bytes) for {} sha256 {}",
            dest.display(),
            summary.components,
            summary.packages.len(),
            json_bytes.len(),
            subject.name,
            subject.image_sha256
        ),
    );
    Ok(())
}

fn search_lines(query: &str, v: &SearchAnswer) -> String {
    let mut lines = vec![format!("{query}: {} release(s), {} device(s) ({:.1} ms)", v.release_count, v.device_count, v.took_ms)];
    for r in &v.releases {
        lines.push(format!(
            "  release {} ({} {}): {} {}{}",
            r.target,
            r.hardware_class,
            r.version,
            r.component,
            r.component_version.as_deref().unwrap_or(""),
            undecided_note(r)
        ));
    }
    for d in &v.devices {
        lines.push(format!("  device {} runs {}{}", d.device_id, d.release, if d.quarantined { " (quarantined)" } else { "" }));
    }
    lines.join("\n")
}

fn affected_lines(v: &AffectedAnswer) -> String {
    let mut lines = Vec::new();
    if v.denylist.is_none() {
        lines.push("no deny-list published".to_owned());
    }
    for e in &v.entries {
        lines.push(format!(
            "{} ({} {}): {} release(s), {} device(s)",
            e.entry.id,
            e.entry.component.as_deref().or(e.entry.purl.as_deref()).unwrap_or(""),
            e.entry.affected,
            e.releases.len(),
            e.devices.len()
        ));
        for r in &e.releases {
            lines.push(format!("  release {} ({} {}){}", r.target, r.component, r.component_version.as_deref().unwrap_or(""), undecided_note(r)));
        }
        for d in &e.devices {
            lines.push(format!("  device {} runs {}", d.device_id, d.release));
        }
    }
    lines.join("\n")
}

/// For a hit whose version could not be placed against the range (listed rather than
/// left out; the deny-list counts it as affected): why.
fn undecided_note(hit: &SbomHit) -> String {
    hit.undecided.as_deref().map(|why| format!(" [version not comparable: {why}]")).unwrap_or_default()
}

/// Adds (or replaces) the deny-list target, signs the role, uploads when --server is set.
async fn publish_denylist(
    repo_dir: &std::path::Path,
    file: &std::path::Path,
    keys: &[PathBuf],
    role: Option<String>,
    server: &crate::upload::ServerArgs,
    out: &Output,
) -> Result<()> {
    use outpost_sbom::denylist::{DenyList, DENYLIST_TARGET};
    let s = crate::role_edit::Signing {
        repo: crate::localrepo::LocalRepo::open(repo_dir)?,
        server: server.optional()?,
        keys: crate::keyfile::load_all_signing(keys)?,
        expires: None,
    };
    let bytes = std::fs::read(file).map_err(|e| SignerError::io("read", file, e))?;
    let list = DenyList::parse(&bytes).map_err(|e| SignerError::input(file.display(), e))?;
    let role = match role {
        Some(r) => r,
        None => crate::role_edit::role_for_path(&s.repo, DENYLIST_TARGET)?,
    };
    if role == "targets" || role.starts_with("firmware") {
        return Err(SignerError::Usage(format!(
            "the deny-list must be signed by its own delegation (e.g. `repo delegate --role security --paths 'security/*'`), not {role}"
        )));
    }
    let mut body = s.role_body(&role)?;
    let sha256 = outpost_protocol::hashing::sha256_hex(&bytes);
    body.targets.insert(DENYLIST_TARGET.to_owned(), crate::role_edit::target_file(bytes.len() as u64, &sha256, None));
    let tmp = crate::role_edit::staging_dir(&s.repo)?.join(format!("{sha256}.denylist.json"));
    crate::localrepo::write_atomic(&tmp, &bytes)?;
    let pushed = s.commit(&role, &mut body, &[(DENYLIST_TARGET, tmp.as_path(), sha256.as_str())], out).await;
    let _ = std::fs::remove_file(&tmp);
    let pushed = pushed?;
    let affected = list.entries.iter().filter(|e| e.status == outpost_sbom::denylist::Status::Affected).count();
    out.emit(
        &json!({"target": DENYLIST_TARGET, "sha256": sha256, "role": role, "role_version": body.version, "entries": list.entries.len(),
                "affected_entries": affected, "pushed": pushed}),
        &format!("signed {DENYLIST_TARGET} ({} entries, {affected} affected) into {role} v{}", list.entries.len(), body.version),
    );
    Ok(())
}
