//! Choosing the release: the signed firmware targets of this hardware class grouped by
//! version into candidates (full image, deltas, SBOM), one picked (the newest, the
//! director's assignment, or the one the active slot holds), and compared with the
//! release the device runs. The `update` command picks with the same function.

use std::collections::BTreeMap;
use std::path::Path;

use outpost_protocol::director::Assignment;
use outpost_protocol::release::{Encoding, FirmwareCustom, ReleaseVersion};
use sha2::{Digest, Sha256};

use super::journal::Release;
use super::Installer;
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::updater::TargetInfo;

/// Signed facts about one release version, gathered from its targets.
pub struct Candidate {
    pub version: ReleaseVersion,
    pub full: TargetInfo,
    pub custom: FirmwareCustom,
    pub deltas: Vec<(TargetInfo, FirmwareCustom)>,
    /// The signed SBOM target the release names.
    pub sbom: Option<TargetInfo>,
}

/// What the device is asked to install, as far as versions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Order {
    /// No director: the newest signed release; an older one is never installed.
    Newest,
    /// The director's assignment, which moves forward only.
    Assigned,
    /// The director's assignment flagged as a rollback: it may go backwards when the
    /// image repository's offline keys allow it.
    AssignedRollback,
}

impl Order {
    pub(super) fn of(assignment: Option<&Assignment>) -> Self {
        match assignment {
            None => Order::Newest,
            Some(a) if a.custom.rollback => Order::AssignedRollback,
            Some(_) => Order::Assigned,
        }
    }
}

/// The candidate against the running release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Versus {
    /// The device already runs it, or a newer one that it keeps.
    UpToDate,
    /// Install it.
    Install,
}

/// Compares the candidate with the version the device runs (an unreadable running
/// version compares as unknown: install). Refuses a director order that goes backwards
/// without a signed rollback, or a rollback the image repository does not allow.
pub(super) fn versus_running(running: &str, cand: &FirmwareCustom, order: Order) -> Result<Versus> {
    let Ok(running_version) = running.parse::<ReleaseVersion>() else { return Ok(Versus::Install) };
    if running_version == cand.version {
        return Ok(Versus::UpToDate);
    }
    if running_version < cand.version {
        return Ok(Versus::Install);
    }
    match order {
        Order::Newest => Ok(Versus::UpToDate),
        Order::Assigned => Err(AgentError::Director(format!(
            "the director assigns {} but this device runs {running}: versions do not go backwards without a signed rollback",
            cand.version
        ))),
        Order::AssignedRollback if !cand.rollback_allowed => Err(AgentError::Director(format!(
            "the director orders a rollback from {running} to {}, but no rollback allowance signed by the image repository's offline keys covers {} \
             (outpost release allow-rollback): the online director key alone cannot downgrade a device",
            cand.version, cand.version
        ))),
        Order::AssignedRollback => {
            tracing::warn!(from = %running, to = %cand.version, "the director assigns a rollback the image repository allows");
            Ok(Versus::Install)
        }
    }
}

impl Installer {
    /// The signed release the active slot holds, found by hashing the slot's first
    /// bytes for each length a release of this class has (one pass over the slot).
    pub(super) fn held_release(&self, infos: Vec<TargetInfo>) -> Result<Option<Candidate>> {
        let active = self.boot.slot_path(self.boot.state()?.active);
        let lengths: std::collections::BTreeSet<u64> = infos
            .iter()
            .filter_map(|i| FirmwareCustom::from_custom(i.file.custom.as_ref(), &i.path).ok().flatten().map(|c| (i, c)))
            .filter(|(_, c)| c.encoding != Encoding::ZstdPatch)
            .map(|(i, c)| c.image.as_ref().map(|x| x.length).unwrap_or(i.file.length))
            .collect();
        let Ok(held) = hash_prefixes(&active, &lengths) else { return Ok(None) };
        choose(infos, &self.config, Pick::Measurement(&held))
    }
}

/// The director's assignment and the image repository's signed target must agree on
/// length, hashes, hardware class and version.
pub(super) fn agrees(a: &outpost_protocol::director::Assignment, cand: &Candidate, config: &AgentConfig) -> Result<()> {
    let signed_sha = cand.full.file.hashes.get("sha256").map(String::as_str).unwrap_or("<none>");
    if a.length != cand.full.file.length || a.sha256 != signed_sha {
        return Err(AgentError::Director(format!(
            "the director's {} ({} bytes, sha256 {}) disagrees with the image repository's signed target ({} bytes, sha256 {signed_sha})",
            a.path, a.length, a.sha256, cand.full.file.length
        )));
    }
    if a.custom.hardware_class != config.hardware_class.as_str() {
        return Err(AgentError::Director(format!("the assignment is for hardware class {}, this device is {}", a.custom.hardware_class, config.hardware_class)));
    }
    if a.custom.version != cand.version.to_string() {
        return Err(AgentError::Director(format!("the director says {} is version {}, the image repository signs it as {}", a.path, a.custom.version, cand.version)));
    }
    Ok(())
}

/// Which full image `choose` picks.
pub enum Pick<'a> {
    Newest,
    Path(&'a str),
    /// The release whose image length maps to its sha256 here (the slot's first
    /// `length` bytes hashed, for each length a release has).
    Measurement(&'a BTreeMap<u64, String>),
}

/// What the journal keeps of a release.
pub(super) fn release_of(cand: &Candidate) -> Release {
    Release {
        target: cand.full.path.clone(),
        version: cand.version.to_string(),
        sha256: cand.custom.expected_measurement.sha256.clone(),
        length: cand.custom.image.as_ref().map(|i| i.length).unwrap_or(cand.full.file.length),
        health: cand.custom.health.clone(),
        trial_deadline_secs: cand.custom.trial_deadline_secs,
        sbom_sha256: cand.custom.sbom.as_ref().map(|s| s.sha256.clone()),
        verity: cand.custom.verity.clone(),
    }
}

/// Groups signed firmware targets for this class by version and picks one full image
/// (`want`): the newest, the one at a path, or the one with a measurement. A target
/// filed under this class but signed for another is refused.
pub fn choose(infos: Vec<TargetInfo>, config: &AgentConfig, want: Pick<'_>) -> Result<Option<Candidate>> {
    let by_path: BTreeMap<String, TargetInfo> = infos.iter().map(|i| (i.path.clone(), i.clone())).collect();
    let mut fulls: BTreeMap<String, (ReleaseVersion, TargetInfo, FirmwareCustom)> = BTreeMap::new();
    let mut deltas: Vec<(TargetInfo, FirmwareCustom)> = Vec::new();
    for info in infos {
        let Some(custom) = FirmwareCustom::from_custom(info.file.custom.as_ref(), &info.path)
            .map_err(|e| AgentError::tuf(format!("read custom metadata of {}", info.path), e))?
        else {
            continue;
        };
        custom.validate(&info.path).map_err(|e| AgentError::tuf("release metadata", e))?;
        if custom.hardware_class != config.hardware_class {
            return Err(AgentError::HardwareClassMismatch {
                target: info.path.clone(),
                expected: config.hardware_class.to_string(),
                found: custom.hardware_class.to_string(),
            });
        }
        match custom.encoding {
            Encoding::ZstdPatch => deltas.push((info, custom)),
            _ => {
                fulls.insert(info.path.clone(), (custom.version.clone(), info, custom));
            }
        }
    }
    let chosen = match want {
        Pick::Newest => fulls.into_values().max_by(|a, b| a.0.cmp(&b.0)),
        Pick::Path(path) => fulls.remove(path),
        Pick::Measurement(held) => fulls.into_values().find(|(_, info, c)| {
            held.get(&c.image.as_ref().map(|i| i.length).unwrap_or(info.file.length)).is_some_and(|sha| *sha == c.expected_measurement.sha256)
        }),
    };
    let Some((version, full, custom)) = chosen else { return Ok(None) };
    let deltas = deltas.into_iter().filter(|(_, c)| c.full_target.as_deref() == Some(full.path.as_str())).collect();
    let sbom = match &custom.sbom {
        None => None,
        Some(sref) => {
            let err = |reason: String| AgentError::Sbom { release: full.path.clone(), reason };
            let info = by_path.get(&sref.path).ok_or_else(|| err(format!("names {}, which is not a signed target", sref.path)))?;
            if info.file.hashes.get("sha256") != Some(&sref.sha256) || info.file.length != sref.length {
                return Err(err(format!(
                    "the signed SBOM target {} ({} bytes, sha256 {:?}) is not the SBOM the release names ({} bytes, sha256 {})",
                    sref.path,
                    info.file.length,
                    info.file.hashes.get("sha256"),
                    sref.length,
                    sref.sha256
                )));
            }
            Some(info.clone())
        }
    };
    Ok(Some(Candidate { version, full, custom, deltas, sbom }))
}

/// SHA-256 of the first `n` bytes of `path` for every `n` in `lengths`, in one pass
/// (lengths past the end are left out).
fn hash_prefixes(path: &Path, lengths: &std::collections::BTreeSet<u64>) -> Result<BTreeMap<u64, String>> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| AgentError::io("open", path, e))?;
    let mut out = BTreeMap::new();
    let mut h = Sha256::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for &len in lengths {
        while pos < len {
            let want = usize::try_from((len - pos).min(buf.len() as u64)).unwrap_or(buf.len());
            let n = f.read(&mut buf[..want]).map_err(|e| AgentError::io("read", path, e))?;
            if n == 0 {
                return Ok(out);
            }
            h.update(&buf[..n]);
            pos += n as u64;
        }
        out.insert(len, hex::encode(h.clone().finalize()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str, rollback_allowed: bool) -> FirmwareCustom {
        let mut c = FirmwareCustom::image(version.parse().unwrap(), "rpi4".parse().unwrap(), "ab".repeat(32));
        c.rollback_allowed = rollback_allowed;
        c
    }

    #[test]
    fn same_or_newer_running_version_is_up_to_date_without_a_director() {
        assert_eq!(versus_running("1.2.0", &release("1.2.0", false), Order::Newest).unwrap(), Versus::UpToDate);
        assert_eq!(versus_running("1.3.0", &release("1.2.0", false), Order::Newest).unwrap(), Versus::UpToDate);
        assert_eq!(versus_running("1.1.0", &release("1.2.0", false), Order::Newest).unwrap(), Versus::Install);
        assert_eq!(versus_running("not a version", &release("1.2.0", false), Order::Newest).unwrap(), Versus::Install);
    }

    #[test]
    fn the_director_goes_backwards_only_with_a_signed_rollback_allowance() {
        assert!(matches!(versus_running("1.3.0", &release("1.2.0", true), Order::Assigned), Err(AgentError::Director(_))));
        assert!(matches!(versus_running("1.3.0", &release("1.2.0", false), Order::AssignedRollback), Err(AgentError::Director(_))));
        assert_eq!(versus_running("1.3.0", &release("1.2.0", true), Order::AssignedRollback).unwrap(), Versus::Install);
        assert_eq!(versus_running("1.2.0", &release("1.2.0", true), Order::AssignedRollback).unwrap(), Versus::UpToDate);
    }
}
