//! `outpost-agent tuf-client`: the public TUF conformance client contract (init,
//! refresh, download), so any TUF test harness can drive this agent's TUF client.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::error::{AgentError, Result};
use crate::fetch::{Fetcher, HttpLimits};
use crate::updater::Updater;

#[derive(Debug, Args)]
pub struct TufClientArgs {
    /// Directory of trusted metadata (root.json, timestamp.json, ... unversioned names).
    #[arg(long)]
    pub metadata_dir: PathBuf,
    /// Base URL of the repository's metadata.
    #[arg(long)]
    pub metadata_url: Option<String>,
    /// Target path to download (repeatable; processed in order, stop at the first failure).
    #[arg(long = "target-name")]
    pub target_names: Vec<String>,
    /// Base URL of the repository's targets.
    #[arg(long)]
    pub target_base_url: Option<String>,
    /// Where verified targets are stored, named by their URL-quoted target path.
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
    /// Seconds to wait for a connection or for the next bytes before giving up.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Slow-retrieval floor: every answer must keep this average rate (bytes per
    /// second) once --timeout seconds have passed, so a file of L bytes must arrive
    /// within timeout + L / rate seconds.
    #[arg(long, default_value_t = crate::fetch::DEFAULT_MIN_RATE, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_bytes_per_sec: u64,
    #[command(subcommand)]
    pub op: TufOp,
}

#[derive(Debug, Subcommand)]
pub enum TufOp {
    /// Trust ROOT_FILE as the initial root (no network).
    Init { trusted_root: PathBuf },
    /// Run the TUF client workflow for the top-level roles.
    Refresh,
    /// Refresh, then fetch and verify each --target-name.
    Download,
}

pub async fn run(args: TufClientArgs) -> Result<()> {
    match &args.op {
        TufOp::Init { trusted_root } => {
            let data = std::fs::read(trusted_root).map_err(|e| AgentError::io("read", trusted_root, e))?;
            std::fs::create_dir_all(&args.metadata_dir).map_err(|e| AgentError::io("create", &args.metadata_dir, e))?;
            let root = args.metadata_dir.join("root.json");
            outpost_fsio::write_atomic(&root, &data).map_err(|e| AgentError::io("write", &root, e))
        }
        TufOp::Refresh => {
            let mut updater = updater(&args)?;
            updater.refresh().await
        }
        TufOp::Download => {
            let base = args.target_base_url.as_deref().ok_or_else(|| AgentError::MissingArgument { command: "download", flag: "--target-base-url" })?;
            let dir = args.target_dir.as_deref().ok_or_else(|| AgentError::MissingArgument { command: "download", flag: "--target-dir" })?;
            if args.target_names.is_empty() {
                return Err(AgentError::MissingArgument { command: "download", flag: "at least one --target-name" });
            }
            std::fs::create_dir_all(dir).map_err(|e| AgentError::io("create", dir, e))?;
            let mut updater = updater(&args)?;
            for name in &args.target_names {
                let info = updater.get_target_info(name).await?.ok_or_else(|| AgentError::TargetNotFound(name.clone()))?;
                if Updater::is_cached(dir, &info) {
                    tracing::info!(target = %name, "already downloaded and verified");
                    continue;
                }
                let path = updater.download_target(&info, base, dir, crate::fetch::Durability::OsBuffered(crate::danger::OsBuffered)).await?;
                tracing::info!(target = %name, path = %path.display(), "downloaded and verified");
            }
            Ok(())
        }
    }
}

fn updater(args: &TufClientArgs) -> Result<Updater> {
    let url = args.metadata_url.as_deref().ok_or_else(|| AgentError::MissingArgument { command: "tuf-client", flag: "--metadata-url" })?;
    let fetcher = Fetcher::new(HttpLimits::new(Duration::from_secs(args.timeout), args.min_bytes_per_sec), None)?;
    Updater::new(&args.metadata_dir, url, fetcher, chrono::Utc::now())
}
