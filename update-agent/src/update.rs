//! `outpost-agent update`: refresh the image repository, choose the newest firmware
//! signed for this device's hardware class, and download it verified.

use std::path::PathBuf;

use outpost_protocol::release::{FirmwareCustom, ReleaseVersion};
use serde::Serialize;

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::fetch::Fetcher;
use crate::updater::{TargetInfo, Updater};

/// What an update check did, for people and for `--json`.
#[derive(Debug, Serialize)]
pub struct UpdateReport {
    pub hardware_class: String,
    pub root_version: u64,
    pub timestamp_version: u64,
    pub snapshot_version: u64,
    pub target: String,
    pub signed_by_role: String,
    pub version: String,
    pub length: u64,
    pub sha256: String,
    pub expected_measurement: String,
    pub path: PathBuf,
    pub already_present: bool,
}

/// Creates the metadata and download directories and, on first use, trusts the
/// provisioned root (`trusted_root`) by copying it into the metadata directory.
pub fn prepare_state(config: &AgentConfig) -> Result<()> {
    let metadata_dir = config.metadata_dir();
    for d in [&metadata_dir, &config.download_dir()] {
        std::fs::create_dir_all(d).map_err(|e| AgentError::io("create", d, e))?;
    }
    let root_file = metadata_dir.join("root.json");
    if !root_file.exists() {
        let data = std::fs::read(&config.trusted_root).map_err(|e| AgentError::io("read trusted root", &config.trusted_root, e))?;
        outpost_fsio::write_atomic(&root_file, &data).map_err(|e| AgentError::io("write", &root_file, e))?;
    }
    Ok(())
}

pub async fn run(config: &AgentConfig) -> Result<UpdateReport> {
    prepare_state(config)?;
    let (metadata_dir, download_dir) = (config.metadata_dir(), config.download_dir());
    let fetcher = Fetcher::new(config.http_limits())?;
    let mut updater = Updater::new(&metadata_dir, &format!("{}/metadata/", config.server_url), fetcher, chrono::Utc::now())?;
    updater.refresh().await?;
    let class = config.hardware_class.as_str();
    let candidates = updater.targets_under(&["firmware", class]).await?;
    let (info, custom) = newest_for_class(candidates, config)?;
    let already_present = Updater::is_cached(&download_dir, &info);
    let path = if already_present {
        Updater::local_target_path(&download_dir, &info)
    } else {
        updater.download_target(&info, &format!("{}/targets/", config.server_url), &download_dir, crate::fetch::Durability::Fsync).await?
    };
    let t = updater.trusted();
    Ok(UpdateReport {
        hardware_class: class.to_owned(),
        root_version: t.root().version,
        timestamp_version: t.timestamp().map(|x| x.version).unwrap_or(0),
        snapshot_version: t.snapshot().map(|x| x.version).unwrap_or(0),
        target: info.path.clone(),
        signed_by_role: info.role.clone(),
        version: custom.version.to_string(),
        length: info.file.length,
        sha256: info.file.hashes.get("sha256").cloned().unwrap_or_default(),
        expected_measurement: custom.expected_measurement.sha256.clone(),
        path,
        already_present,
    })
}

/// The newest firmware whose signed custom metadata names this hardware class. A
/// target filed under this class whose signed class differs is refused, not skipped.
fn newest_for_class(candidates: Vec<TargetInfo>, config: &AgentConfig) -> Result<(TargetInfo, FirmwareCustom)> {
    let mut best: Option<(ReleaseVersion, TargetInfo, FirmwareCustom)> = None;
    for info in candidates {
        let custom = FirmwareCustom::from_custom(info.file.custom.as_ref(), &info.path)
            .map_err(|e| AgentError::tuf(format!("read custom metadata of {}", info.path), e))?;
        let Some(custom) = custom else { continue };
        if custom.hardware_class != config.hardware_class {
            return Err(AgentError::HardwareClassMismatch {
                target: info.path.clone(),
                expected: config.hardware_class.to_string(),
                found: custom.hardware_class.to_string(),
            });
        }
        if best.as_ref().is_none_or(|(v, _, _)| custom.version > *v) {
            best = Some((custom.version.clone(), info, custom));
        }
    }
    best.map(|(_, i, c)| (i, c)).ok_or_else(|| AgentError::NoFirmware { class: config.hardware_class.to_string() })
}
