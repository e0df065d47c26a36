//! `outpost sbom ...`: make and check CycloneDX 1.5 SBOMs for firmware images.

use std::path::PathBuf;

use clap::Subcommand;
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
    /// Which releases contain a component, and which devices run them (server API).
    /// QUERY: NAME, NAME@VERSION, NAME@>=1.2,<2.0, or a purl (pkg:deb/debian/openssl[@...]).
    Search {
        query: String,
        #[command(flatten)]
        server: crate::upload::ServerArgs,
    },
}

fn sbom_err(e: outpost_sbom::SbomError) -> SignerError {
    SignerError::Usage(e.to_string())
}

pub async fn run(cmd: SbomCommand, out: &Output) -> Result<()> {
    match cmd {
        SbomCommand::Generate { image, version, rootfs, cargo_lock, no_files, out: dest } => {
            let name = image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| SignerError::Usage(format!("--image {}: needs a file name", image.display())))?;
            let bytes = std::fs::read(&image).map_err(|e| SignerError::io("read", &image, e))?;
            let subject = outpost_sbom::Subject { name, version, image_sha256: outpost_protocol::hashing::sha256_hex(&bytes) };
            let started = std::time::Instant::now();
            let bom = match (&rootfs, &cargo_lock) {
                (Some(root), _) => {
                    let (root, subject) = (root.clone(), subject.clone());
                    tokio::task::spawn_blocking(move || outpost_sbom::from_rootfs(&root, &subject, !no_files))
                        .await
                        .map_err(|e| SignerError::Usage(format!("SBOM task: {e}")))?
                        .map_err(sbom_err)?
                }
                (None, Some(lock)) => outpost_sbom::from_cargo_lock(lock, &subject).map_err(sbom_err)?,
                (None, None) => return Err(SignerError::Usage("pass --rootfs DIR or --cargo-lock FILE".into())),
            };
            let json_bytes = outpost_sbom::to_json(&bom).map_err(sbom_err)?;
            let summary = outpost_sbom::validate(&json_bytes).map_err(sbom_err)?;
            crate::localrepo::write_atomic(&dest, &json_bytes)?;
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
        SbomCommand::Search { query, server } => {
            let server = server.require()?;
            let q = percent_encoding::utf8_percent_encode(&query, percent_encoding::NON_ALPHANUMERIC);
            let v = server.get_json("SBOM search", &format!("/api/v1/sbom/search?q={q}")).await?;
            let mut lines = vec![format!(
                "{query}: {} release(s), {} device(s) ({:.1} ms)",
                v["release_count"], v["device_count"], v["took_ms"].as_f64().unwrap_or(0.0)
            )];
            for r in v["releases"].as_array().into_iter().flatten() {
                lines.push(format!(
                    "  release {} ({} {}): {} {}",
                    r["target"].as_str().unwrap_or(""),
                    r["hardware_class"].as_str().unwrap_or(""),
                    r["version"].as_str().unwrap_or(""),
                    r["component"].as_str().unwrap_or(""),
                    r["component_version"].as_str().unwrap_or("")
                ));
            }
            for d in v["devices"].as_array().into_iter().flatten() {
                lines.push(format!(
                    "  device {} runs {}{}",
                    d["device_id"].as_str().unwrap_or(""),
                    d["release"].as_str().unwrap_or(""),
                    if d["quarantined"].as_bool() == Some(true) { " (quarantined)" } else { "" }
                ));
            }
            out.emit(&v, &lines.join("\n"));
            Ok(())
        }
        SbomCommand::Validate { file } => {
            let bytes = std::fs::read(&file).map_err(|e| SignerError::io("read", &file, e))?;
            let summary = outpost_sbom::validate(&bytes).map_err(|e| SignerError::Usage(format!("{}: {e}", file.display())))?;
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
