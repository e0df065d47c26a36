//! The director's online key and the per-device targets it signs at each check-in.

use std::path::Path;
use std::time::Duration;

use outpost_protocol::director::{self, Assignment};
use outpost_protocol::keys::{LoadedKey, SigningKey};

use crate::error::ServerError;

/// The server's online director key and the root devices pin.
pub struct Director {
    key: SigningKey,
    targets_expiry: Duration,
}

impl Director {
    /// Loads the director's online key. It is never made here: a server that lost it
    /// must not mint another (devices trust only the key their director root names),
    /// so a missing key stops the server with what to do.
    pub fn open(key_path: &Path, targets_expiry: Duration) -> Result<Self, ServerError> {
        let bytes = match std::fs::read(key_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ServerError::Config {
                    path: key_path.into(),
                    reason: "the director key is missing. Devices trust only the key their director root names, so the server \
                             will not make a new one. Restore the key from your backup; or, if it is lost, rotate: \
                             `outpost director rotate --repo REPO --root-key <director root keys> --director-key <new key>.pub \
                             --sign-key <targets key>` signs director root N+1 naming a new key (`outpost keys generate`), \
                             push it, and set [director] key to the new private key"
                        .into(),
                })
            }
            Err(e) => return Err(ServerError::io("read director key", key_path, e)),
        };
        let key = match LoadedKey::from_bytes(&bytes, &key_path.display().to_string()).map_err(|e| ServerError::proto("load director key", e))? {
            LoadedKey::Private(k) => k,
            LoadedKey::Public(_) => return Err(ServerError::Config { path: key_path.into(), reason: "the director key must be a private key".into() }),
        };
        tracing::info!(key_id = key.key_id(), "director key loaded");
        Ok(Director { key, targets_expiry })
    }

    /// Signs a device's director targets (version `version`, naming `assignment` or
    /// nothing), expiring `targets_expiry` after `now`.
    pub fn sign(&self, device_id: &str, version: u64, assignment: Option<&Assignment>, now: chrono::DateTime<chrono::Utc>) -> Result<String, ServerError> {
        let expires = now + chrono::Duration::from_std(self.targets_expiry).unwrap_or(chrono::Duration::days(1));
        let bytes = director::sign_targets(&self.key, device_id, version, expires, assignment).map_err(|e| ServerError::proto("sign director targets", e))?;
        String::from_utf8(bytes).map_err(|e| ServerError::State(e.to_string()))
    }
}
