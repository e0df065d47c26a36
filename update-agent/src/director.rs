//! The device's side of the director repository: the director root, learned from the
//! offline-signed image repository and followed as a chain of versions, and the latest
//! verified director targets (this device's assignment),
//! kept across restarts so an offline device still knows what it was told, until the
//! assignment expires.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use outpost_protocol::director::{self, DirectorView};
use outpost_protocol::tuf::metadata::{Envelope, Root};

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::updater::Updater;

pub fn root_path(config: &AgentConfig) -> PathBuf {
    config.state_dir.join("director-root.json")
}

pub fn targets_path(config: &AgentConfig) -> PathBuf {
    config.state_dir.join("director-targets.json")
}

fn refused(e: outpost_protocol::Error) -> AgentError {
    AgentError::Director(outpost_protocol::display_chain(&e))
}

/// The largest director root the agent reads.
const ROOT_MAX_LENGTH: u64 = 512_000;

/// Learns whom the director is from the image repository, never from a server's word:
/// `director/1.root.json` signed by the repository's top-level targets role (offline
/// keys) is the first director root, and each `director/N+1.root.json` must also be
/// signed by version N's root keys and its own (the TUF root chain). Starts from the
/// pinned root, pins the newest, and returns it. A device that re-enrolls keeps its
/// chain.
pub async fn sync_root(config: &AgentConfig, updater: &mut Updater) -> Result<Envelope<Root>> {
    let base = format!("{}/targets/", config.server_url);
    let path = root_path(config);
    let mut current: Option<Vec<u8>> = match std::fs::read(&path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(AgentError::io("read", &path, e)),
    };
    let pinned_version = match &current {
        Some(b) => Some(Envelope::<Root>::parse(b, "director root").map_err(|e| AgentError::Corrupt { path: path.clone(), reason: e.to_string() })?.signed.version),
        None => None,
    };
    let mut version = pinned_version.map_or(1, |v| v + 1);
    loop {
        let target = director::root_target_path(version);
        let Some(info) = updater.get_target_info(&target).await? else { break };
        if info.role != director::ROOT_SIGNER_ROLE {
            return Err(AgentError::Director(format!(
                "{target} is signed by role {}; only the image repository's top-level {} role (offline keys) may vouch for a director root",
                info.role,
                director::ROOT_SIGNER_ROLE
            )));
        }
        let bytes = updater.fetch_target_bytes(&info, &base, ROOT_MAX_LENGTH).await?;
        match &current {
            None => director::check_first_root(&bytes),
            Some(prev) => director::check_next_root(prev, &bytes),
        }
        .map_err(|e| AgentError::Director(format!("{target}: {}", outpost_protocol::display_chain(&e))))?;
        current = Some(bytes);
        version += 1;
    }
    let bytes = current.ok_or_else(|| {
        AgentError::Director(
            "the image repository vouches for no director (director/1.root.json signed by its targets role): `outpost director init` makes one".into(),
        )
    })?;
    let env = Envelope::<Root>::parse(&bytes, "director root").map_err(refused)?;
    if pinned_version != Some(env.signed.version) {
        outpost_fsio::write_atomic(&path, &bytes).map_err(|e| AgentError::io("write", &path, e))?;
        tracing::info!(version = env.signed.version, "trusting director root from the image repository");
    }
    Ok(env)
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
    let path = targets_path(config);
    outpost_fsio::write_atomic(&path, text.as_bytes()).map_err(|e| AgentError::io("write", &path, e))?;
    Ok(view)
}

/// The device's current verified assignment: None when the director has not spoken
/// yet; an error when what it said has expired (the device cannot tell whether it
/// still holds, so it installs nothing).
pub fn current(config: &AgentConfig, root: &Envelope<Root>, device_id: &str, now: DateTime<Utc>) -> Result<Option<DirectorView>> {
    let Some(bytes) = stored(config)? else { return Ok(None) };
    verify(root, &bytes, device_id, now).map(Some)
}

/// Director targets (already accepted) verified under `root` (which may be newer than
/// the one they were accepted under) at `now`.
pub fn verify(root: &Envelope<Root>, bytes: &[u8], device_id: &str, now: DateTime<Utc>) -> Result<DirectorView> {
    director::verify_targets(root, bytes, device_id, 0, now).map_err(refused)
}
