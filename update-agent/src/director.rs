//! The device's side of the director repository: the director root pinned at
//! enrollment, and the latest verified director targets (this device's assignment),
//! kept across restarts so an offline device still knows what it was told, until the
//! assignment expires.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use outpost_protocol::director::{self, DirectorView};
use outpost_protocol::tuf::metadata::{Envelope, Root};

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};

pub fn root_path(config: &AgentConfig) -> PathBuf {
    config.state_dir.join("director-root.json")
}

pub fn targets_path(config: &AgentConfig) -> PathBuf {
    config.state_dir.join("director-targets.json")
}

fn refused(e: outpost_protocol::Error) -> AgentError {
    AgentError::Director(outpost_protocol::display_chain(&e))
}

/// Pins the director root the server gave at enrollment (checked first). A device
/// re-enrolling starts over with the new root and no assignment.
pub fn pin_root(config: &AgentConfig, root: &str, now: DateTime<Utc>) -> Result<()> {
    director::check_root(root.as_bytes(), now).map_err(refused)?;
    crate::updater::write_atomic(&root_path(config), root.as_bytes())?;
    match std::fs::remove_file(targets_path(config)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io("remove", targets_path(config), e)),
    }
}

/// The pinned director root, or None when the device follows no director (not
/// enrolled). The root is pinned: its expiry does not unpin it.
pub fn pinned(config: &AgentConfig) -> Result<Option<Envelope<Root>>> {
    let path = root_path(config);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AgentError::io("read", &path, e)),
    };
    let env = Envelope::<Root>::parse(&bytes, "director root").map_err(|e| AgentError::Corrupt { path: path.clone(), reason: e.to_string() })?;
    Ok(Some(env))
}

fn stored(config: &AgentConfig) -> Result<Option<Vec<u8>>> {
    let path = targets_path(config);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io("read", &path, e)),
    }
}

/// Verifies director targets from a check-in under the pinned root and keeps them:
/// for this device, signed by the director, unexpired, and not older than the ones
/// already accepted (the same version must be the same document).
pub fn accept(config: &AgentConfig, root: &Envelope<Root>, device_id: &str, text: &str, now: DateTime<Utc>) -> Result<DirectorView> {
    let mut min_version = 0;
    if let Some(old) = stored(config)?.filter(|old| old != text.as_bytes()) {
        // A different document must be newer than the one kept (whose expiry does not
        // matter here).
        if let Ok(v) = director::verify_targets(root, &old, device_id, 0, DateTime::<Utc>::MIN_UTC) {
            min_version = v.version + 1;
        }
    }
    let view = director::verify_targets(root, text.as_bytes(), device_id, min_version, now).map_err(refused)?;
    crate::updater::write_atomic(&targets_path(config), text.as_bytes())?;
    Ok(view)
}

/// The device's current verified assignment: None when the director has not spoken
/// yet; an error when what it said has expired (the device cannot tell whether it
/// still holds, so it installs nothing).
pub fn current(config: &AgentConfig, root: &Envelope<Root>, device_id: &str, now: DateTime<Utc>) -> Result<Option<DirectorView>> {
    let Some(bytes) = stored(config)? else { return Ok(None) };
    director::verify_targets(root, &bytes, device_id, 0, now).map(Some).map_err(refused)
}
