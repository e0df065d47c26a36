//! What the signed metadata offers devices, read as a conformant client reads it.
//!
//! A target path counts only as the TUF delegation search resolves it
//! ([`outpost_protocol::tuf::RoleGraph::find`]: every hop delegates the path, order,
//! `terminating` and hash prefixes honoured, each role verified under the delegator
//! it is reached through). A role that lists a path its chain does not give it, or
//! that sits behind a terminating sibling, contributes nothing: its releases are not
//! offered by the director, its expected measurements do not attest a device, its
//! deny-list or SBOM is not read. A firmware target counts for the hardware class its
//! path names (`firmware/<class>/...`) and only if its signed `hardware_class` is that
//! class: a role delegated one class's paths cannot speak for another class.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use outpost_protocol::release::{Encoding, FirmwareCustom, SbomRef};
use outpost_protocol::tuf::{Envelope, RoleGraph, TargetFile, Targets};

use super::Repository;

/// An SBOM a resolved firmware target names: (full image target, class, version,
/// image sha256, SBOM reference).
pub type SbomEntry = (String, String, String, String, SbomRef);

/// The hardware class a firmware target path is for: `firmware/<class>/...`.
pub fn path_class(path: &str) -> Option<&str> {
    let mut parts = path.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("firmware"), Some(class), Some(_)) if !class.is_empty() => Some(class),
        _ => None,
    }
}

/// Why a firmware target's signed class does not fit its path, if it does not.
pub fn class_mismatch(path: &str, custom: &FirmwareCustom) -> Option<String> {
    let signed = custom.hardware_class.as_str();
    match path_class(path) {
        Some(class) if class == signed => None,
        Some(class) => Some(format!("target {path:?} is under firmware/{class}/ but its custom hardware_class is {signed:?}")),
        None => Some(format!("firmware target {path:?} (hardware_class {signed:?}) is not under firmware/{signed}/")),
    }
}

pub use outpost_protocol::director::FirmwareRelease;

/// Built for one set of role versions (every check-in reads it).
pub struct Index {
    pub role_versions: Vec<(String, u64)>,
    /// Every path a reachable role lists, as the search resolves it: (role, target).
    resolved: BTreeMap<String, (String, TargetFile)>,
    /// Expected measurement (image sha256) -> the target that names it, per class.
    measurements: BTreeMap<String, Arc<BTreeMap<String, String>>>,
    /// Full-image releases (delta patches excluded), per class.
    releases: BTreeMap<String, Arc<Vec<FirmwareRelease>>>,
    sboms: Vec<SbomEntry>,
}

impl Index {
    pub fn build(roles: &BTreeMap<String, Envelope<Targets>>, role_versions: Vec<(String, u64)>) -> Self {
        let graph = RoleGraph::new(roles.iter().map(|(k, v)| (k.as_str(), v)));
        let reachable = graph.reachable();
        let paths: BTreeSet<&str> =
            roles.iter().filter(|(name, _)| reachable.contains(name.as_str())).flat_map(|(_, env)| env.signed.targets.keys().map(String::as_str)).collect();
        let mut resolved = BTreeMap::new();
        let mut ignored = 0usize;
        for path in paths {
            match graph.find(path) {
                Ok(Some(found)) => {
                    resolved.insert(path.to_owned(), (found.role.to_owned(), found.target.clone()));
                }
                Ok(None) => ignored += 1,
                Err(e) => {
                    ignored += 1;
                    tracing::warn!(target = path, error = %e, "target not offered: the delegation search for it fails");
                }
            }
        }
        if ignored > 0 {
            tracing::info!(ignored, "targets listed by roles the delegation search does not reach for their path are not offered");
        }
        let mut measurements: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut releases: BTreeMap<String, BTreeMap<String, FirmwareRelease>> = BTreeMap::new();
        let mut sboms: BTreeMap<String, SbomEntry> = BTreeMap::new();
        for (path, (role, file)) in &resolved {
            let custom = match FirmwareCustom::from_custom(file.custom.as_ref(), path) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(target = %path, %role, error = %e, "firmware target with unreadable custom metadata not offered");
                    continue;
                }
            };
            if let Some(why) = class_mismatch(path, &custom) {
                tracing::warn!(%role, "firmware target not offered: {why}");
                continue;
            }
            let class = custom.hardware_class.as_str().to_owned();
            measurements.entry(class.clone()).or_default().entry(custom.expected_measurement.sha256.clone()).or_insert_with(|| path.clone());
            if let Some(sref) = &custom.sbom {
                // The SBOM is read only if the search gives it the signed hash too.
                let signed = resolved.get(&sref.path).is_some_and(|(_, t)| t.hashes.get("sha256") == Some(&sref.sha256) && t.length == sref.length);
                if signed {
                    let target = custom.full_target.clone().unwrap_or_else(|| path.clone());
                    sboms.entry(sref.sha256.clone()).or_insert_with(|| {
                        (target, class.clone(), custom.version.to_string(), custom.expected_measurement.sha256.clone(), sref.clone())
                    });
                }
            }
            if custom.encoding == Encoding::ZstdPatch {
                continue;
            }
            let Some(sha256) = file.hashes.get("sha256") else { continue };
            releases.entry(class).or_default().insert(
                path.clone(),
                FirmwareRelease {
                    path: path.clone(),
                    length: file.length,
                    sha256: sha256.clone(),
                    version: custom.version.to_string(),
                    measurement: custom.expected_measurement.sha256.clone(),
                    sbom_sha256: custom.sbom.as_ref().map(|s| s.sha256.clone()),
                    golden: custom.golden.clone(),
                },
            );
        }
        Index {
            role_versions,
            resolved,
            measurements: measurements.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            releases: releases.into_iter().map(|(k, v)| (k, Arc::new(v.into_values().collect()))).collect(),
            sboms: sboms.into_values().collect(),
        }
    }

    pub fn measurements(&self, class: &str) -> Option<Arc<BTreeMap<String, String>>> {
        self.measurements.get(class).cloned()
    }

    pub fn releases(&self, class: &str) -> Option<Arc<Vec<FirmwareRelease>>> {
        self.releases.get(class).cloned()
    }

    pub fn sboms(&self) -> Vec<SbomEntry> {
        self.sboms.clone()
    }

    /// The target a client resolves for `path`.
    pub fn target(&self, path: &str) -> Option<&TargetFile> {
        self.resolved.get(path).map(|(_, t)| t)
    }
}

impl Repository {
    /// Every SBOM the signed firmware targets name, as the delegation search resolves
    /// them: (full image target, class, version, image sha256, SBOM reference).
    pub async fn sbom_refs(&self) -> Vec<SbomEntry> {
        self.with_index(|idx| idx.sboms()).await
    }

    /// The full-image firmware targets signed for `hardware_class` (delta patches
    /// excluded), as the delegation search resolves their paths.
    pub async fn firmware_releases(&self, hardware_class: &str) -> Arc<Vec<FirmwareRelease>> {
        self.with_index(|idx| idx.releases(hardware_class)).await.unwrap_or_default()
    }

    /// Runs `f` on the index, rebuilding it first when a role changed.
    async fn with_index<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        let st = self.state.lock().await;
        let versions: Vec<(String, u64)> = st.roles.iter().map(|(k, v)| (k.clone(), v.signed.version)).collect();
        let mut cache = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let idx = match cache.take() {
            Some(idx) if idx.role_versions == versions => idx,
            _ => Index::build(&st.roles, versions),
        };
        f(cache.insert(idx))
    }

    /// The signed sha256 of a target, as the delegation search resolves its path.
    pub async fn target_sha256(&self, path: &str) -> Option<String> {
        self.with_index(|idx| idx.target(path).and_then(|t| t.hashes.get("sha256").cloned())).await
    }

    /// Every expected measurement (image SHA-256) the offline-signed release metadata
    /// names for `hardware_class`, with the target that names it: only targets under
    /// `firmware/<hardware_class>/` that the delegation search resolves to a role
    /// whose chain delegates their path.
    pub async fn expected_measurements(&self, hardware_class: &str) -> Arc<BTreeMap<String, String>> {
        self.with_index(|idx| idx.measurements(hardware_class)).await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_class_is_the_paths() {
        assert_eq!(path_class("firmware/rpi4/1.0.0/fw.img"), Some("rpi4"));
        assert_eq!(path_class("firmware/rpi4"), None);
        assert_eq!(path_class("policy/rpi4/x"), None);
        let custom = FirmwareCustom::image("1.0.0".parse().unwrap(), "x86".parse().unwrap(), "ab".repeat(32));
        assert!(class_mismatch("firmware/rpi4/1.0.0/fw.img", &custom).unwrap().contains("its custom hardware_class is \"x86\""));
        assert!(class_mismatch("firmware/x86/1.0.0/fw.img", &custom).is_none());
        assert!(class_mismatch("other/fw.img", &custom).is_some());
    }
}
