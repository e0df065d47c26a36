//! `outpost-agent update`: refresh the image repository, choose the newest firmware
//! signed for this device's hardware class, and download it verified.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::install::select::{choose, Pick};
use crate::updater::Updater;

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

pub async fn run(config: &AgentConfig) -> Result<UpdateReport> {
    config.prepare_state()?;
    let (metadata_dir, download_dir) = (config.metadata_dir(), config.download_dir());
    let fetcher = config.device_fetcher()?;
    let mut updater = Updater::new(&metadata_dir, &format!("{}/metadata/", config.server_url), fetcher, chrono::Utc::now())?;
    updater.refresh().await?;
    let class = config.hardware_class.as_str();
    let candidates = updater.targets_under(&["firmware", class]).await?;
    // The installer's choice (full images only, metadata validated; a target filed
    // under this class but signed for another is refused, not skipped).
    let cand = choose(candidates, config, Pick::Newest)?.ok_or_else(|| AgentError::NoFirmware { class: class.to_owned() })?;
    let (info, custom) = (cand.full, cand.custom);
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
