//! The director repository (Uptane-style): per-device TUF targets metadata, signed
//! online by the server's director key, naming the one image a device should run now
//! (or none). The director only chooses: a device installs an assignment only when
//! the image repository's offline-signed target agrees with it (checked by the agent).
//!
//! The director root is a TUF root whose `root` role holds offline director root keys
//! and whose other roles name the online director key. Devices learn it from the image
//! repository (`director/N.root.json`, signed by the offline targets role) and follow
//! its versions as a chain, like the image root. Each device's targets metadata binds the device id (top
//! level and in the target's custom metadata) and carries a per-device version that
//! only grows, so neither another device's assignment nor an older one of its own is
//! accepted.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::keys::SigningKey;
use crate::tuf::metadata::{self, Envelope, Root, RoleKeys, TargetFile, Targets};

/// Where in the director targets the device id is bound.
const DEVICE_FIELD: &str = "x-outpost-device-id";

/// The signed custom metadata of an assigned target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentCustom {
    pub device_id: String,
    pub rollout_id: String,
    pub wave: u32,
    pub hardware_class: String,
    /// The release version the image repository signs for this target.
    pub version: String,
    /// An explicit rollback (abort with roll back): the version may go backwards.
    #[serde(default)]
    pub rollback: bool,
}

/// One assigned image: the image repository's target path, its length and sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub path: String,
    pub length: u64,
    pub sha256: String,
    pub custom: AssignmentCustom,
}

/// A verified director targets document for one device.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectorView {
    pub version: u64,
    pub expires: DateTime<Utc>,
    pub assignment: Option<Assignment>,
}

/// Where the image repository lists director root version `version`. Only its
/// top-level `targets` role (offline keys) may sign these targets: that is how a
/// device comes to trust the director, exactly as far as it trusts the image
/// repository, and never because a server said so once.
pub fn root_target_path(version: u64) -> String {
    format!("director/{version}.root.json")
}

/// The image repository role that signs director roots.
pub const ROOT_SIGNER_ROLE: &str = "targets";

/// A director root, version `version`: its `root` role is the director root keys
/// (offline, `threshold` of them), every other role the online director key. Signed by
/// `signers`: for version 1 the root keys; for a rotation also enough of the previous
/// version's root keys (the TUF root chain rule).
pub fn root(root_keys: &[crate::keys::PublicKey], threshold: u64, director: &crate::keys::PublicKey, version: u64, expires: DateTime<Utc>, signers: &[&SigningKey]) -> Result<Vec<u8>> {
    if root_keys.is_empty() || threshold == 0 || threshold > root_keys.len() as u64 {
        return Err(Error::Build(format!("a director root needs 1 to {} of its {} root keys as threshold, not {threshold}", root_keys.len(), root_keys.len())));
    }
    let mut keys = BTreeMap::new();
    let mut root_ids = Vec::new();
    for k in root_keys {
        let id = k.key_id()?;
        keys.insert(id.clone(), k.clone());
        root_ids.push(id);
    }
    let director_id = director.key_id()?;
    keys.insert(director_id.clone(), director.clone());
    let roles = metadata::TOP_LEVEL_ROLES
        .iter()
        .map(|r| {
            let (keyids, threshold) = if *r == "root" { (root_ids.clone(), threshold) } else { (vec![director_id.clone()], 1) };
            ((*r).to_owned(), RoleKeys { keyids, threshold, extra: BTreeMap::new() })
        })
        .collect();
    let root = Root {
        typ: "root".into(),
        spec_version: metadata::SPEC_VERSION.into(),
        version,
        expires: metadata::format_expires(expires),
        consistent_snapshot: false,
        keys,
        roles,
        extra: BTreeMap::new(),
    };
    metadata::sign(&root, signers)
}

/// Signs device `device_id`'s director targets, version `version`, with `assignment`
/// (None: the device should stay on what it runs).
pub fn sign_targets(key: &SigningKey, device_id: &str, version: u64, expires: DateTime<Utc>, assignment: Option<&Assignment>) -> Result<Vec<u8>> {
    let mut t = metadata::new_targets(version, expires);
    t.extra.insert(DEVICE_FIELD.into(), Value::String(device_id.to_owned()));
    if let Some(a) = assignment {
        if a.custom.device_id != device_id {
            return Err(Error::Build(format!("assignment for device {} signed into device {device_id}'s targets", a.custom.device_id)));
        }
        let custom = serde_json::to_value(&a.custom).map_err(|e| Error::Build(e.to_string()))?;
        let mut hashes = BTreeMap::new();
        hashes.insert("sha256".to_owned(), a.sha256.clone());
        t.targets.insert(a.path.clone(), TargetFile { length: a.length, hashes, custom: Some(custom), extra: BTreeMap::new() });
    }
    metadata::sign(&t, &[key])
}

/// Parses and checks the first director root a device trusts (vouched for by the
/// image repository's offline targets role): a valid TUF root of version 1, signed by
/// its own root threshold.
pub fn check_first_root(bytes: &[u8]) -> Result<Envelope<Root>> {
    let env = Envelope::<Root>::parse(bytes, "director root")?;
    if env.signed.version != 1 {
        return Err(Error::Version { role: "director root".into(), reason: format!("the first director root must be version 1, not {}", env.signed.version) });
    }
    let r = env.signed.role("root")?;
    metadata::verify_threshold("director root", &env.canonical_signed, &env.signatures, &r.keyids, r.threshold, &env.signed.keys)?;
    Ok(env)
}

/// The next director root after `trusted` (the TUF root chain rule): version N+1,
/// signed by the trusted root's root threshold and by its own.
pub fn check_next_root(trusted: &[u8], next: &[u8]) -> Result<Envelope<Root>> {
    let mut set = crate::tuf::TrustedSet::new(trusted, DateTime::<Utc>::MIN_UTC)?;
    set.update_root(next)?;
    Envelope::<Root>::parse(next, "director root")
}

/// Verifies `bytes` as device `device_id`'s director targets under the pinned director
/// `root`: signatures by the root's targets role, not expired, for this device, and a
/// version at least `min_version` (the last one the device accepted).
pub fn verify_targets(root: &Envelope<Root>, bytes: &[u8], device_id: &str, min_version: u64, now: DateTime<Utc>) -> Result<DirectorView> {
    let role = "director targets";
    let env = Envelope::<Targets>::parse(bytes, role)?;
    let r = root.signed.role("targets")?;
    metadata::verify_threshold(role, &env.canonical_signed, &env.signatures, &r.keyids, r.threshold, &root.signed.keys)?;
    let bound = env.signed.extra.get(DEVICE_FIELD).and_then(Value::as_str).unwrap_or("<none>");
    if bound != device_id {
        return Err(Error::Integrity { what: role.into(), reason: format!("signed for device {bound}, not this device ({device_id})") });
    }
    if env.signed.version < min_version {
        return Err(Error::Version {
            role: role.into(),
            reason: format!("version {} is older than version {min_version} this device already accepted (replayed assignment)", env.signed.version),
        });
    }
    let expires = env.expires_at()?;
    if expires <= now {
        return Err(Error::Expired { role: role.into(), expires: env.signed.expires.clone() });
    }
    if env.signed.delegations.is_some() {
        return Err(Error::schema(role, "director targets may not delegate"));
    }
    if env.signed.targets.len() > 1 {
        return Err(Error::schema(role, format!("assigns {} images; a device runs one", env.signed.targets.len())));
    }
    let assignment = match env.signed.targets.iter().next() {
        None => None,
        Some((path, file)) => {
            let sha256 = file.hashes.get("sha256").cloned().ok_or_else(|| Error::schema(role, format!("target {path} has no sha256")))?;
            let custom: AssignmentCustom = serde_json::from_value(file.custom.clone().unwrap_or(Value::Null))
                .map_err(|e| Error::schema(role, format!("target {path} custom: {e}")))?;
            if custom.device_id != device_id {
                return Err(Error::Integrity { what: role.into(), reason: format!("target {path} is assigned to device {}, not {device_id}", custom.device_id) });
            }
            Some(Assignment { path: path.clone(), length: file.length, sha256, custom })
        }
    };
    Ok(DirectorView { version: env.signed.version, expires, assignment })
}

/// A signed full-image firmware release, as the director assigns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirmwareRelease {
    pub path: String,
    pub length: u64,
    pub sha256: String,
    pub version: String,
    /// The image digest the device's TPM records when it boots this release.
    pub measurement: String,
    pub sbom_sha256: Option<String>,
    /// What a good boot of this release measures (firmware, GRUB), when it was signed
    /// with golden values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden: Option<crate::attest::golden::GoldenValues>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::generate().unwrap_or_else(|e| panic!("{e}"))
    }

    fn assignment(device: &str) -> Assignment {
        Assignment {
            path: "firmware/rpi4/1.2.0/image.bin".into(),
            length: 4096,
            sha256: "ab".repeat(32),
            custom: AssignmentCustom {
                device_id: device.into(),
                rollout_id: "r1".into(),
                wave: 0,
                hardware_class: "rpi4".into(),
                version: "1.2.0".into(),
                rollback: false,
            },
        }
    }

    #[test]
    fn a_device_accepts_only_its_own_current_assignment_from_the_pinned_key() {
        let now = Utc::now();
        let later = now + chrono::Duration::hours(1);
        let k = key();
        let offline = key();
        let root = check_first_root(&root(&[offline.public().clone()], 1, k.public(), 1, now + chrono::Duration::days(365), &[&offline]).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        let signed = sign_targets(&k, "dev-a", 3, later, Some(&assignment("dev-a"))).unwrap_or_default();
        let view = verify_targets(&root, &signed, "dev-a", 3, now).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(view.version, 3);
        assert_eq!(view.assignment, Some(assignment("dev-a")));
        // Another device cannot use it.
        let err = verify_targets(&root, &signed, "dev-b", 0, now).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not this device"), "{err}");
        // An older version is a replay.
        let err = verify_targets(&root, &signed, "dev-a", 4, now).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("replayed"), "{err}");
        // Expired.
        let err = verify_targets(&root, &signed, "dev-a", 0, later).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("expired"), "{err}");
        // Another key.
        let forged = sign_targets(&key(), "dev-a", 9, later, Some(&assignment("dev-a"))).unwrap_or_default();
        let err = verify_targets(&root, &forged, "dev-a", 0, now).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("threshold"), "{err}");
        // No assignment is a valid answer.
        let empty = sign_targets(&k, "dev-a", 5, later, None).unwrap_or_default();
        assert_eq!(verify_targets(&root, &empty, "dev-a", 3, now).map(|v| v.assignment).ok(), Some(None));
        // An assignment naming another device cannot be signed into this one's targets.
        assert!(sign_targets(&k, "dev-a", 6, later, Some(&assignment("dev-b"))).is_err());
    }

    #[test]
    fn director_roots_rotate_only_by_a_chain_signed_by_the_offline_root_keys() {
        let now = Utc::now();
        let expires = now + chrono::Duration::days(365);
        let (offline, online) = (key(), key());
        let v1 = root(&[offline.public().clone()], 1, online.public(), 1, expires, &[&offline]).unwrap_or_default();
        assert!(check_first_root(&v1).is_ok());
        // The online key cannot make itself a root: it signs no root role.
        let (new_online, new_offline) = (key(), key());
        let by_online = root(&[new_offline.public().clone()], 1, new_online.public(), 2, expires, &[&online, &new_offline]).unwrap_or_default();
        let err = check_next_root(&v1, &by_online).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("threshold"), "{err}");
        // Old and new root keys together: accepted.
        let v2 = root(&[new_offline.public().clone()], 1, new_online.public(), 2, expires, &[&offline, &new_offline]).unwrap_or_default();
        assert!(check_next_root(&v1, &v2).is_ok());
        // Skipping a version is not a chain.
        let v3 = root(&[new_offline.public().clone()], 1, new_online.public(), 3, expires, &[&new_offline]).unwrap_or_default();
        assert!(check_next_root(&v1, &v3).is_err());
        assert!(check_next_root(&v2, &v3).is_ok());
        // A first root must be version 1.
        assert!(check_first_root(&v2).is_err());
    }

    #[test]
    fn a_tampered_assignment_fails_its_signature() {
        let now = Utc::now();
        let k = key();
        let offline = key();
        let root = check_first_root(&root(&[offline.public().clone()], 1, k.public(), 1, now + chrono::Duration::days(1), &[&offline]).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        let signed = sign_targets(&k, "dev-a", 1, now + chrono::Duration::hours(1), Some(&assignment("dev-a"))).unwrap_or_default();
        let text = String::from_utf8(signed).unwrap_or_default().replace("4096", "4097");
        let err = verify_targets(&root, text.as_bytes(), "dev-a", 0, now).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("threshold"), "{err}");
    }

    #[test]
    fn trusted_metadata_that_expires_during_an_update_is_reported() {
        let now = Utc::now();
        let offline = key();
        let bytes = root(&[offline.public().clone()], 1, key().public(), 1, now + chrono::Duration::minutes(10), &[&offline]).unwrap_or_default();
        let set = crate::tuf::TrustedSet::new(&bytes, now).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.expired_at(now), None);
        let (role, _) = set.expired_at(now + chrono::Duration::minutes(11)).unwrap_or_default();
        assert_eq!(role, "root");
    }

}
