//! The agent's TOML configuration, validated into typed values at load time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::release::HardwareClass;
use serde::Deserialize;

use crate::error::{AgentError, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server_url: String,
    hardware_class: String,
    state_dir: PathBuf,
    trusted_root: PathBuf,
    #[serde(default)]
    http: RawHttp,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    timeout: Option<String>,
}

/// A loaded, validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server_url: String,
    pub hardware_class: HardwareClass,
    pub state_dir: PathBuf,
    pub trusted_root: PathBuf,
    pub http_timeout: Duration,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| AgentError::Config { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let hardware_class = raw.hardware_class.parse().map_err(|e: outpost_protocol::Error| err(format!("hardware_class: {e}")))?;
        if !(raw.server_url.starts_with("http://") || raw.server_url.starts_with("https://")) {
            return Err(err(format!("server_url {:?} must start with http:// or https://", raw.server_url)));
        }
        let http_timeout = match raw.http.timeout {
            Some(t) => humantime::parse_duration(&t).map_err(|e| err(format!("http.timeout {t:?}: {e}")))?,
            None => Duration::from_secs(30),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(AgentConfig {
            server_url: raw.server_url.trim_end_matches('/').to_owned(),
            hardware_class,
            state_dir: base.join(raw.state_dir),
            trusted_root: base.join(raw.trusted_root),
            http_timeout,
        })
    }

    pub fn metadata_dir(&self) -> PathBuf {
        self.state_dir.join("metadata")
    }

    pub fn download_dir(&self) -> PathBuf {
        self.state_dir.join("downloads")
    }
}
