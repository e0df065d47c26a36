//! Signing the online roles, one way for every holder of the online keys: the server
//! (re-signing its repository after each publish and before expiry) and the signer's
//! local repository (when the pipeline keeps the online keys itself). A snapshot
//! lists the targets roles' versions; a timestamp describes the snapshot's exact
//! bytes (length and hashes). Expiry times are whole seconds.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::metadata::{new_snapshot, new_timestamp, sign, Envelope, MetaFile, Role, Snapshot, Timestamp};
use crate::error::Result;
use crate::keys::SigningKey;

/// Signed metadata: the file's bytes and what they parse to.
#[derive(Debug, Clone)]
pub struct SignedMetadata<T> {
    pub version: u64,
    pub bytes: Vec<u8>,
    pub envelope: Envelope<T>,
}

/// When metadata signed at `now` for `lifetime` expires (whole seconds: the expiry
/// format has no fractions).
pub fn expires_after(now: DateTime<Utc>, lifetime: chrono::Duration) -> DateTime<Utc> {
    now - chrono::Duration::nanoseconds(now.timestamp_subsec_nanos() as i64) + lifetime
}

/// A snapshot of `version` listing `meta` (`ROLE.json` → version), signed with `key`.
pub fn sign_snapshot(version: u64, expires: DateTime<Utc>, meta: BTreeMap<String, MetaFile>, key: &SigningKey) -> Result<SignedMetadata<Snapshot>> {
    signed(version, &new_snapshot(version, expires, meta), key, "snapshot")
}

/// A timestamp of `version` describing the snapshot file `snapshot_bytes` (of
/// `snapshot_version`), signed with `key`.
pub fn sign_timestamp(
    version: u64,
    expires: DateTime<Utc>,
    snapshot_version: u64,
    snapshot_bytes: &[u8],
    key: &SigningKey,
) -> Result<SignedMetadata<Timestamp>> {
    signed(version, &new_timestamp(version, expires, MetaFile::describing(snapshot_version, snapshot_bytes)), key, "timestamp")
}

fn signed<T: Role>(version: u64, body: &T, key: &SigningKey, role: &str) -> Result<SignedMetadata<T>> {
    let bytes = sign(body, &[key])?;
    let envelope = Envelope::parse(&bytes, role)?;
    Ok(SignedMetadata { version, bytes, envelope })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timestamp_describes_the_snapshot_bytes_and_expiry_is_whole_seconds() {
        let (snap_key, ts_key) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
        let now = DateTime::parse_from_rfc3339("2030-01-01T00:00:00.750Z").unwrap().with_timezone(&Utc);
        let expires = expires_after(now, chrono::Duration::days(1));
        assert_eq!(expires.to_rfc3339(), "2030-01-02T00:00:00+00:00");
        let mut meta = BTreeMap::new();
        meta.insert("targets.json".to_owned(), MetaFile::version_only(3));
        let snap = sign_snapshot(4, expires, meta, &snap_key).unwrap();
        assert_eq!((snap.version, snap.envelope.signed.version), (4, 4));
        let ts = sign_timestamp(9, expires, snap.version, &snap.bytes, &ts_key).unwrap();
        assert_eq!(ts.envelope.signed.version, 9);
        ts.envelope.signed.snapshot_meta().verify(&snap.bytes, "snapshot").unwrap();
        assert!(ts.envelope.signed.snapshot_meta().verify(b"other", "snapshot").is_err());
    }
}
