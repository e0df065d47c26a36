//! The state file: the simulated devices and the EK keys behind them.

use std::path::PathBuf;

use outpost_protocol::report::InstallReport;
use outpost_protocol::slot::Slot;
use serde::{Deserialize, Serialize};

use crate::error::{encode_err, SimError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimDevice {
    pub device_id: String,
    pub hardware_class: String,
    pub ek: usize,
    pub ek_policy: String,
    pub ak: String,
    pub image_sha256: String,
    pub version: Option<String>,
    pub slot: Slot,
    #[serde(default)]
    pub pending: Vec<InstallReport>,
    /// Versions this device rolled back (not installed again, like the agent).
    #[serde(default)]
    pub failed: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SimState {
    pub label: String,
    pub server: String,
    /// PKCS#8 DER of the pool's RSA keys, hex.
    pub ek_keys: Vec<String>,
    pub devices: Vec<SimDevice>,
}

pub fn load(path: &PathBuf) -> Result<SimState, SimError> {
    let bytes = std::fs::read(path).map_err(|source| SimError::ReadState { path: path.clone(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| SimError::ParseState { path: path.clone(), source })
}

pub fn save(path: &PathBuf, state: &SimState) -> Result<(), SimError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(state).map_err(encode_err)?).map_err(|source| SimError::WriteState { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| SimError::RenameState { path: path.clone(), source })
}
