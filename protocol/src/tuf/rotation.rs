//! Root rotation (TUF client workflow 5.3.4–5.3.5), one rule for every side that
//! accepts a new root: the agent's trusted set walking the root chain and the server
//! accepting an uploaded root. The next root must be version N+1 and be signed both
//! by the trusted root's root keys (threshold) and by its own.

use super::metadata::{verify_threshold, Envelope, Root};
use crate::error::Error;

/// Why a new root does not follow the trusted one. Each caller words it for its
/// reader (the server names the upload's index, the client the versions).
#[derive(Debug, thiserror::Error)]
pub enum RootRotationError {
    /// The new root does not meet the trusted root's root threshold.
    #[error("not signed by the trusted root v{trusted_version}: {source}")]
    NotSignedByTrusted { trusted_version: u64, source: Error },
    /// The new root is not the next version.
    #[error("version {got}, expected {expected}")]
    NotNextVersion { expected: u64, got: u64 },
    /// The new root does not meet its own root threshold.
    #[error("not signed by its own root keys: {source}")]
    NotSignedByItself { source: Error },
}

/// Checks that `new` may follow `trusted`: signed by `trusted`'s root threshold, the
/// next version, signed by its own root threshold (in that order). Expiry is not
/// checked here: a client walks through expired intermediate roots, and only the
/// last one must be current.
pub fn verify_next_root(trusted: &Root, new: &Envelope<Root>) -> Result<(), RootRotationError> {
    let old_role = trusted.role("root").map_err(|source| RootRotationError::NotSignedByTrusted { trusted_version: trusted.version, source })?;
    verify_threshold("root", &new.canonical_signed, &new.signatures, &old_role.keyids, old_role.threshold, &trusted.keys)
        .map_err(|source| RootRotationError::NotSignedByTrusted { trusted_version: trusted.version, source })?;
    if new.signed.version != trusted.version + 1 {
        return Err(RootRotationError::NotNextVersion { expected: trusted.version + 1, got: new.signed.version });
    }
    let own = new.signed.role("root").map_err(|source| RootRotationError::NotSignedByItself { source })?;
    verify_threshold("root", &new.canonical_signed, &new.signatures, &own.keyids, own.threshold, &new.signed.keys)
        .map_err(|source| RootRotationError::NotSignedByItself { source })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{Duration, Utc};

    use super::*;
    use crate::keys::SigningKey;
    use crate::tuf::metadata::{format_expires, sign, RoleKeys, SPEC_VERSION};

    fn root(version: u64, root_key: &SigningKey) -> Root {
        let mut keys = BTreeMap::new();
        keys.insert(root_key.key_id().to_owned(), root_key.public().clone());
        let roles = ["root", "timestamp", "snapshot", "targets"]
            .into_iter()
            .map(|r| (r.to_owned(), RoleKeys { keyids: vec![root_key.key_id().into()], threshold: 1, extra: BTreeMap::new() }))
            .collect();
        Root {
            typ: "root".into(),
            spec_version: SPEC_VERSION.into(),
            version,
            expires: format_expires(Utc::now() + Duration::days(1)),
            consistent_snapshot: true,
            keys,
            roles,
            extra: BTreeMap::new(),
        }
    }

    fn signed(body: &Root, keys: &[&SigningKey]) -> Envelope<Root> {
        Envelope::parse(&sign(body, keys).unwrap(), "root").unwrap()
    }

    #[test]
    fn the_next_root_needs_both_thresholds_and_the_next_version() {
        let (old_key, new_key) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
        let trusted = root(1, &old_key);
        // Rotated to a new key: signed by both is accepted.
        verify_next_root(&trusted, &signed(&root(2, &new_key), &[&old_key, &new_key])).unwrap();
        // Only the new key: the trusted root did not sign it.
        let e = verify_next_root(&trusted, &signed(&root(2, &new_key), &[&new_key])).unwrap_err();
        assert!(matches!(e, RootRotationError::NotSignedByTrusted { trusted_version: 1, .. }), "{e}");
        // Only the old key: the new root does not sign itself.
        let e = verify_next_root(&trusted, &signed(&root(2, &new_key), &[&old_key])).unwrap_err();
        assert!(matches!(e, RootRotationError::NotSignedByItself { .. }), "{e}");
        // A skipped version.
        let e = verify_next_root(&trusted, &signed(&root(3, &old_key), &[&old_key])).unwrap_err();
        assert!(matches!(e, RootRotationError::NotNextVersion { expected: 2, got: 3 }), "{e}");
    }
}
