//! Outpost's release metadata: what a firmware target's signed `custom` field says,
//! and release versions.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::attest::golden::GoldenValues;
use crate::error::{Error, Result};

/// The key under a target's `custom` object that holds Outpost's fields, so that
/// other tools' custom metadata can live beside ours.
pub const CUSTOM_KEY: &str = "outpost";

/// What kind of artifact a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Firmware,
}

/// How a target's bytes become the firmware image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The target is the image.
    #[default]
    Identity,
    /// The target is the image compressed with zstd.
    Zstd,
    /// The target is a zstd patch (`--patch-from` style) against the image named by
    /// `delta_base`; applying it yields the image.
    ZstdPatch,
}

/// Digest and length of the decoded image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDigest {
    pub sha256: String,
    pub length: u64,
}

/// A health check the release itself asks for, signed with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthCheck {
    /// Run a command (through `sh -c`); exit status 0 within `timeout_secs` passes.
    Command { run: String, #[serde(default = "default_check_timeout")] timeout_secs: u64 },
    /// HTTP GET answering 2xx within `timeout_secs` passes.
    Http { url: String, #[serde(default = "default_check_timeout")] timeout_secs: u64 },
    /// Start a command; it passes if it is still running after `seconds`.
    StaysUp { run: String, seconds: u64 },
}

fn default_check_timeout() -> u64 {
    30
}

/// The digest the device's TPM will record when it boots the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurement {
    pub sha256: String,
}

/// Signed custom metadata of a firmware target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareCustom {
    pub kind: ArtifactKind,
    pub version: ReleaseVersion,
    pub hardware_class: HardwareClass,
    /// SHA-256 of the image as booted (what the TPM will measure).
    pub expected_measurement: Measurement,
    /// How this target's bytes become the image.
    #[serde(default, skip_serializing_if = "is_identity")]
    pub encoding: Encoding,
    /// The decoded image, for zstd and patch targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageDigest>,
    /// For patches: the image the patch applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_base: Option<Measurement>,
    /// For patches: the full image target to fall back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_target: Option<String>,
    /// Health checks the release requires after a trial boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<HealthCheck>,
    /// How long a trial boot may take to pass its health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_deadline_secs: Option<u64>,
    /// The release's SBOM: a target beside the image, signed by the same role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<SbomRef>,
    /// Devices running a newer release may be sent back to this one. Only the offline
    /// role that signs the release can say so (`outpost release allow-rollback`); the
    /// director's online key alone can never order a downgrade.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback_allowed: bool,
    /// The events a good boot of this release produces on its hardware class
    /// (bootloader, kernel, initrd, command line: PCRs 4, 8, 9), which the server
    /// holds a device's quoted TCG event log against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden: Option<GoldenValues>,
    /// For a root filesystem under dm-verity: its hash tree's parameters and root
    /// hash. The agent puts them on the kernel command line for the slot (where the
    /// boot chain measures them); the image's initrd maps the root through them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<crate::verity::Verity>,
}

/// Where a release's SBOM is and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SbomRef {
    /// Target path of the CycloneDX JSON document.
    pub path: String,
    pub sha256: String,
    pub length: u64,
}

fn is_identity(e: &Encoding) -> bool {
    *e == Encoding::Identity
}

impl FirmwareCustom {
    /// A plain firmware image: the target is the image.
    pub fn image(version: ReleaseVersion, hardware_class: HardwareClass, sha256: String) -> Self {
        FirmwareCustom {
            kind: ArtifactKind::Firmware,
            version,
            hardware_class,
            expected_measurement: Measurement { sha256 },
            encoding: Encoding::Identity,
            image: None,
            delta_base: None,
            full_target: None,
            health: Vec::new(),
            trial_deadline_secs: None,
            sbom: None,
            rollback_allowed: false,
            golden: None,
            verity: None,
        }
    }

    /// Checks the fields that go together: patches name their base and full target,
    /// encoded targets name their decoded image, which matches the measurement.
    pub fn validate(&self, target: &str) -> Result<()> {
        let bad = |m: &str| Err(Error::schema(target, format!("custom.{CUSTOM_KEY}: {m}")));
        if self.encoding != Encoding::Identity {
            match &self.image {
                None => return bad("an encoded target must name its decoded image (image.sha256, image.length)"),
                Some(i) if i.sha256 != self.expected_measurement.sha256 => {
                    return bad("image.sha256 differs from expected_measurement.sha256")
                }
                _ => {}
            }
        }
        if self.encoding == Encoding::ZstdPatch && (self.delta_base.is_none() || self.full_target.is_none()) {
            return bad("a patch must name delta_base and full_target");
        }
        if let Some(golden) = &self.golden {
            golden.validate().map_err(|e| Error::schema(target, format!("custom.{CUSTOM_KEY}.golden: {e}")))?;
        }
        Ok(())
    }
}

impl FirmwareCustom {
    /// The `custom` object for a target: `{"outpost": {...}}`.
    pub fn to_custom(&self) -> Result<Value> {
        let inner = serde_json::to_value(self).map_err(|e| Error::Build(e.to_string()))?;
        Ok(serde_json::json!({ CUSTOM_KEY: inner }))
    }

    /// Reads Outpost's fields from a target's `custom`; `None` when the target is not
    /// an Outpost firmware target at all.
    pub fn from_custom(custom: Option<&Value>, target: &str) -> Result<Option<Self>> {
        let Some(inner) = custom.and_then(|c| c.get(CUSTOM_KEY)) else { return Ok(None) };
        serde_json::from_value(inner.clone())
            .map(Some)
            .map_err(|e| Error::schema(target, format!("custom.{CUSTOM_KEY}: {e}")))
    }
}

/// Target path of a firmware image: `firmware/<class>/<version>/<file name>`.
pub fn firmware_target_path(class: &HardwareClass, version: &ReleaseVersion, file_name: &str) -> String {
    format!("firmware/{class}/{version}/{file_name}")
}

/// A hardware class: lower-case letters, digits, `-` and `_`, 1..=64 characters
/// (it becomes a path segment and a selector).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HardwareClass(String);

impl HardwareClass {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HardwareClass {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(Error::Build(format!(
                "hardware class {s:?} must be 1-64 characters of a-z, 0-9, '-' or '_'"
            )));
        }
        Ok(HardwareClass(s))
    }
}

impl std::str::FromStr for HardwareClass {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        HardwareClass::try_from(s.to_owned())
    }
}

impl From<HardwareClass> for String {
    fn from(h: HardwareClass) -> String {
        h.0
    }
}

impl fmt::Display for HardwareClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A release version: dot-separated non-negative integers (`1.4.2`), compared
/// numerically, optionally followed by `-PRERELEASE` which sorts before the release.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReleaseVersion {
    text: String,
    parts: Vec<u64>,
    pre: Option<String>,
}

impl TryFrom<String> for ReleaseVersion {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        let bad = || Error::Build(format!("version {text:?} must look like 1.4.2 or 1.4.2-rc1"));
        let (main, pre) = match text.split_once('-') {
            Some((m, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.') => {
                (m, Some(p.to_owned()))
            }
            Some(_) => return Err(bad()),
            None => (text.as_str(), None),
        };
        let parts = main
            .split('.')
            .map(|p| if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) { None } else { p.parse().ok() })
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(bad)?;
        if parts.is_empty() || parts.len() > 4 {
            return Err(bad());
        }
        Ok(ReleaseVersion { text, parts, pre })
    }
}

impl std::str::FromStr for ReleaseVersion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ReleaseVersion::try_from(s.to_owned())
    }
}

impl From<ReleaseVersion> for String {
    fn from(v: ReleaseVersion) -> String {
        v.text
    }
}

impl fmt::Display for ReleaseVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Ord for ReleaseVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.parts.len().max(other.parts.len());
        for i in 0..n {
            let (a, b) = (self.parts.get(i).copied().unwrap_or(0), other.parts.get(i).copied().unwrap_or(0));
            match a.cmp(&b) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        match (&self.pre, &other.pre) {
            (None, None) => Ordering::Equal,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => a.cmp(b),
        }
    }
}

impl PartialEq for ReleaseVersion {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for ReleaseVersion {}

impl std::hash::Hash for ReleaseVersion {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut parts = self.parts.as_slice();
        while let [rest @ .., 0] = parts {
            parts = rest;
        }
        parts.hash(state);
        self.pre.hash(state);
    }
}

impl PartialOrd for ReleaseVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ReleaseVersion {
        s.parse().unwrap()
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(v("1.10.0") > v("1.9.9"));
        assert!(v("2.0") == v("2.0.0"));
        assert!(v("1.0.0-rc1") < v("1.0.0"));
        assert!("1..2".parse::<ReleaseVersion>().is_err());
        assert!("v1".parse::<ReleaseVersion>().is_err());
    }

    #[test]
    fn custom_roundtrip() {
        let mut c = FirmwareCustom::image(v("1.2.3"), "rpi4".parse().unwrap(), "ab".repeat(32));
        c.health.push(HealthCheck::Command { run: "true".into(), timeout_secs: 5 });
        let value = c.to_custom().unwrap();
        assert_eq!(FirmwareCustom::from_custom(Some(&value), "t").unwrap(), Some(c.clone()));
        assert!("RPi4".parse::<HardwareClass>().is_err());
        let mut patch = c.clone();
        patch.encoding = Encoding::ZstdPatch;
        assert!(patch.validate("t").is_err(), "a patch without base must be refused");
    }

    #[test]
    fn golden_values_travel_in_the_custom_metadata_and_are_validated() {
        use crate::attest::golden::GoldenFile;
        let file = |name: &str| GoldenFile { name: name.into(), sha256: "cd".repeat(32) };
        let mut c = FirmwareCustom::image(v("2.0.0"), "vm-x86".parse().unwrap(), "ab".repeat(32));
        // Without golden values the metadata is what it was (older readers see no change).
        assert!(c.to_custom().unwrap()["outpost"].get("golden").is_none());
        c.golden = Some(GoldenValues {
            bootloaders: vec![file("grubx64.efi")],
            kernel: file("vmlinuz"),
            initrd: file("initrd.img"),
            kernel_cmdlines: vec!["/vmlinuz root=/dev/vda2 ro".into()],
            boot_files: vec![],
        });
        let value = c.to_custom().unwrap();
        assert_eq!(FirmwareCustom::from_custom(Some(&value), "t").unwrap(), Some(c.clone()));
        assert!(c.validate("t").is_ok());
        if let Some(g) = c.golden.as_mut() {
            g.kernel_cmdlines.push("root=\"a b\"".into());
        }
        assert!(c.validate("t").unwrap_err().to_string().contains("golden"));
    }
}
