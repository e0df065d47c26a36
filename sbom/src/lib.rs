//! SBOMs for Outpost releases: CycloneDX 1.5 JSON made from a firmware image's root
//! filesystem tree (Debian `dpkg` status, `os-release`, every regular file with its
//! SHA-256) or from a `Cargo.lock`; validation of SBOMs a pipeline brings; and the
//! facts Outpost signs and checks about them (which image an SBOM describes).
//!
//! The SBOM's `metadata.component` is the firmware image itself (type `firmware`, its
//! name, version and SHA-256), which is how a device checks that an SBOM belongs to the
//! image it is about to install.

pub mod denylist;
pub mod query;
pub mod version;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use cyclonedx_bom::external_models::normalized_string::NormalizedString;
use cyclonedx_bom::external_models::uri::Purl;
use cyclonedx_bom::models::bom::{Bom, UrnUuid};
use cyclonedx_bom::models::component::{Classification, Component, Components};
use cyclonedx_bom::models::hash::{Hash, HashAlgorithm, HashValue, Hashes};
use cyclonedx_bom::models::metadata::Metadata;
use cyclonedx_bom::models::tool::{Tool, Tools};
use cyclonedx_bom::validation::Validate;
use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The crate's one error type; each variant names the file or field concerned.
#[derive(Debug, Error)]
pub enum SbomError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An input (dpkg status, Cargo.lock, os-release) that cannot be read as what it should be.
    #[error("{path}: {reason}")]
    Input { path: PathBuf, reason: String },
    /// An SBOM that is not valid CycloneDX 1.5 JSON, or not one Outpost can use.
    #[error("SBOM: {0}")]
    Invalid(String),
    /// A version that its ecosystem's rules cannot read.
    #[error("version {version:?} is not a valid {ecosystem} version: {reason}")]
    Version { version: String, ecosystem: version::Ecosystem, reason: String },
    /// A purl that cannot be read as a Package URL.
    #[error("purl {purl:?} cannot be read: {reason}")]
    Purl { purl: String, reason: String },
    /// A version range on a purl type whose version ordering Outpost does not know.
    #[error("purl type {purl_type:?} has no version ordering here (deb, cargo, npm and pypi have); only an exact version (=) can be matched")]
    NoVersionOrdering { purl_type: String },
}

pub type Result<T, E = SbomError> = std::result::Result<T, E>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SbomError + 'a {
    move |source| SbomError::Io { op, path: path.to_owned(), source }
}

/// What the SBOM describes: the firmware image.
#[derive(Debug, Clone)]
pub struct Subject {
    pub name: String,
    pub version: String,
    /// SHA-256 of the image, hex.
    pub image_sha256: String,
}

/// Percent-encoding for purl segments (everything but unreserved characters).
fn purl_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn sha256_hash(hex_digest: &str) -> Hashes {
    Hashes(vec![Hash { alg: HashAlgorithm::SHA_256, content: HashValue(hex_digest.to_owned()) }])
}

fn purl(s: String) -> Purl {
    // The string is built from escaped segments above; Purl's FromStr cannot fail.
    s.parse().unwrap_or_else(|()| unreachable!("Purl::from_str is infallible"))
}

fn new_bom(subject: &Subject, components: Vec<Component>) -> Bom {
    let mut image = Component::new(Classification::Firmware, &subject.name, &subject.version, Some(format!("firmware:{}", subject.name)));
    image.hashes = Some(sha256_hash(&subject.image_sha256));
    let tool = Tool {
        vendor: Some(NormalizedString::new("Outpost")),
        name: Some(NormalizedString::new("outpost")),
        version: Some(NormalizedString::new(env!("CARGO_PKG_VERSION"))),
        hashes: None,
        external_references: None,
    };
    Bom {
        serial_number: Some(UrnUuid::generate()),
        metadata: Some(Metadata { component: Some(image), tools: Some(Tools::List(vec![tool])), ..Metadata::default() }),
        components: Some(Components(components)),
        ..Bom::default()
    }
}

/// One installed Debian package from a dpkg status file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// Parses a dpkg `status` file: the packages whose status is "installed".
pub fn parse_dpkg_status(text: &str, path: &Path) -> Result<Vec<DebPackage>> {
    let mut out = Vec::new();
    for (i, para) in text.split("\n\n").enumerate() {
        let mut fields: BTreeMap<&str, String> = BTreeMap::new();
        let mut last: Option<&str> = None;
        for line in para.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(k) = last {
                    if let Some(v) = fields.get_mut(k) {
                        v.push('\n');
                        v.push_str(line.trim());
                    }
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let (k, v) = line.split_once(':').ok_or_else(|| SbomError::Input {
                path: path.to_owned(),
                reason: format!("paragraph {}: line {line:?} is not 'Field: value'", i + 1),
            })?;
            fields.insert(k, v.trim().to_owned());
            last = Some(k);
        }
        if fields.is_empty() {
            continue;
        }
        let installed = fields.get("Status").is_some_and(|s| s.split_whitespace().last() == Some("installed"));
        if !installed {
            continue;
        }
        let get = |k: &str| {
            fields.get(k).cloned().ok_or_else(|| SbomError::Input {
                path: path.to_owned(),
                reason: format!("paragraph {}: installed package without a {k} field", i + 1),
            })
        };
        out.push(DebPackage { name: get("Package")?, version: get("Version")?, architecture: get("Architecture")? });
    }
    Ok(out)
}

fn os_release(root: &Path) -> Option<BTreeMap<String, String>> {
    for rel in ["etc/os-release", "usr/lib/os-release"] {
        if let Ok(text) = std::fs::read_to_string(root.join(rel)) {
            return Some(
                text.lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
                    .collect(),
            );
        }
    }
    None
}

fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io("list", dir))?.collect::<std::io::Result<_>>().map_err(io("list", dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let ft = e.file_type().map_err(io("stat", &path))?;
        if ft.is_dir() {
            walk(root, &path, out)?;
        } else if ft.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
            out.push((format!("/{rel}"), path));
        }
    }
    Ok(())
}

/// Whether [`from_rootfs`] lists every regular file of the tree too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Files {
    /// Every regular file, with its SHA-256.
    Include,
    /// Packages and the operating system only.
    Exclude,
}

/// An SBOM for a root filesystem tree: the operating system (os-release), every
/// installed Debian package (purl `pkg:deb/<distro>/<name>@<version>?arch=..`), and,
/// with [`Files::Include`], every regular file with its SHA-256.
pub fn from_rootfs(root: &Path, subject: &Subject, files: Files) -> Result<Bom> {
    let os = os_release(root);
    let distro_id = os.as_ref().and_then(|o| o.get("ID").cloned()).unwrap_or_else(|| "debian".into());
    let distro_version = os.as_ref().and_then(|o| o.get("VERSION_ID").cloned());
    let mut components = Vec::new();
    if let Some(o) = &os {
        let name = o.get("ID").cloned().unwrap_or_else(|| "linux".into());
        let version = o.get("VERSION_ID").cloned().unwrap_or_default();
        let mut c = Component::new(Classification::OperatingSystem, &name, &version, Some(format!("os:{name}")));
        c.description = o.get("PRETTY_NAME").map(|p| NormalizedString::new(p));
        components.push(c);
    }
    let status_path = root.join("var/lib/dpkg/status");
    if status_path.exists() {
        let text = std::fs::read_to_string(&status_path).map_err(io("read", &status_path))?;
        for p in parse_dpkg_status(&text, &status_path)? {
            let mut q = format!("arch={}", purl_escape(&p.architecture));
            if let Some(v) = &distro_version {
                q.push_str(&format!("&distro={}-{}", purl_escape(&distro_id), purl_escape(v)));
            }
            let id = format!("pkg:deb/{}/{}@{}?{q}", purl_escape(&distro_id), purl_escape(&p.name), purl_escape(&p.version));
            let mut c = Component::new(Classification::Library, &p.name, &p.version, Some(id.clone()));
            c.purl = Some(purl(id));
            components.push(c);
        }
    }
    if files == Files::Include {
        let mut list = Vec::new();
        walk(root, root, &mut list)?;
        for (rel, path) in list {
            let mut c = Component::new(Classification::File, &rel, "", Some(format!("file:{rel}")));
            c.version = None;
            c.hashes = Some(sha256_hash(&file_sha256(&path)?));
            components.push(c);
        }
    }
    if components.is_empty() {
        return Err(SbomError::Input {
            path: root.to_owned(),
            reason: "no os-release, no dpkg status and no files: not a root filesystem".into(),
        });
    }
    Ok(new_bom(subject, components))
}

/// An SBOM for the crates a `Cargo.lock` pins (purl `pkg:cargo/<name>@<version>`, the
/// registry checksum as SHA-256 when the lock file has one).
pub fn from_cargo_lock(lock: &Path, subject: &Subject) -> Result<Bom> {
    let text = std::fs::read_to_string(lock).map_err(io("read", lock))?;
    let doc: toml::Value = toml::from_str(&text).map_err(|e| SbomError::Input { path: lock.to_owned(), reason: e.to_string() })?;
    let packages = doc
        .get("package")
        .and_then(|p| p.as_array())
        .ok_or_else(|| SbomError::Input { path: lock.to_owned(), reason: "no [[package]] entries".into() })?;
    let mut components = Vec::new();
    for (i, p) in packages.iter().enumerate() {
        let field = |k: &str| {
            p.get(k).and_then(|v| v.as_str()).map(str::to_owned).ok_or_else(|| SbomError::Input {
                path: lock.to_owned(),
                reason: format!("package {}: missing {k}", i + 1),
            })
        };
        let (name, version) = (field("name")?, field("version")?);
        let id = format!("pkg:cargo/{}@{}", purl_escape(&name), purl_escape(&version));
        let mut c = Component::new(Classification::Library, &name, &version, Some(id.clone()));
        c.purl = Some(purl(id));
        if let Some(sum) = p.get("checksum").and_then(|v| v.as_str()) {
            c.hashes = Some(sha256_hash(sum));
        }
        components.push(c);
    }
    Ok(new_bom(subject, components))
}

/// CycloneDX 1.5 JSON bytes.
pub fn to_json(bom: &Bom) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    bom.clone().output_as_json_v1_5(&mut out).map_err(|e| SbomError::Invalid(format!("cannot serialize: {e}")))?;
    Ok(out)
}

/// One component as Outpost indexes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentRef {
    pub name: String,
    pub version: Option<String>,
    pub purl: Option<String>,
}

/// What a valid SBOM says about itself.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub spec_version: String,
    pub subject_name: Option<String>,
    pub subject_version: Option<String>,
    /// SHA-256 of the firmware image the SBOM describes (metadata.component.hashes).
    pub subject_sha256: Option<String>,
    pub components: usize,
    pub packages: Vec<ComponentRef>,
}

/// Parses and validates CycloneDX 1.5 JSON; errors name what is wrong.
pub fn validate(bytes: &[u8]) -> Result<Summary> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| SbomError::Invalid(format!("not JSON: {e}")))?;
    match value.get("bomFormat").and_then(|v| v.as_str()) {
        Some("CycloneDX") => {}
        other => return Err(SbomError::Invalid(format!("bomFormat is {other:?}, not \"CycloneDX\""))),
    }
    match value.get("specVersion").and_then(|v| v.as_str()) {
        Some("1.5") => {}
        other => return Err(SbomError::Invalid(format!("specVersion is {other:?}; Outpost takes CycloneDX 1.5"))),
    }
    let bom = Bom::parse_from_json_v1_5(bytes).map_err(|e| SbomError::Invalid(format!("not CycloneDX 1.5: {e}")))?;
    let result = bom.validate();
    if !result.passed() {
        let errors: Vec<String> = result.errors().map(|(k, v)| format!("{k}: {v:?}")).take(5).collect();
        return Err(SbomError::Invalid(format!("fails CycloneDX validation: {}", errors.join("; "))));
    }
    let subject = bom.metadata.as_ref().and_then(|m| m.component.as_ref());
    let subject_sha256 = subject
        .and_then(|c| c.hashes.as_ref())
        .and_then(|h| h.0.iter().find(|h| h.alg == HashAlgorithm::SHA_256).map(|h| h.content.0.to_ascii_lowercase()));
    let comps = bom.components.as_ref().map(|c| c.0.as_slice()).unwrap_or_default();
    let packages = comps
        .iter()
        .filter(|c| c.component_type != Classification::File)
        .map(|c| ComponentRef {
            name: c.name.to_string(),
            version: c.version.as_ref().map(|v| v.to_string()),
            purl: c.purl.as_ref().map(|p| p.to_string()),
        })
        .collect();
    Ok(Summary {
        spec_version: "1.5".into(),
        subject_name: subject.map(|c| c.name.to_string()),
        subject_version: subject.and_then(|c| c.version.as_ref().map(|v| v.to_string())),
        subject_sha256,
        components: comps.len(),
        packages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9+deb12u14\nDescription: GNU C Library\n shared libraries\n\nPackage: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1.0\n\nPackage: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2+b7\n";

    fn subject() -> Subject {
        Subject { name: "fw.img".into(), version: "1.0.0".into(), image_sha256: "ab".repeat(32) }
    }

    #[test]
    fn dpkg_status_keeps_installed_packages() {
        let p = parse_dpkg_status(STATUS, Path::new("status")).unwrap_or_default();
        assert_eq!(p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["libc6", "bash"]);
        assert_eq!(p[0].version, "2.36-9+deb12u14");
        let err = parse_dpkg_status("Package: x\nStatus: install ok installed\n", Path::new("s")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("Version"), "{err}");
    }

    #[test]
    fn rootfs_sbom_round_trips_and_validates() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        std::fs::create_dir_all(root.join("var/lib/dpkg")).unwrap_or_default();
        std::fs::create_dir_all(root.join("etc")).unwrap_or_default();
        std::fs::write(root.join("var/lib/dpkg/status"), STATUS).unwrap_or_default();
        std::fs::write(root.join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").unwrap_or_default();
        let bom = from_rootfs(root, &subject(), Files::Include).unwrap_or_else(|e| panic!("{e}"));
        let json = to_json(&bom).unwrap_or_else(|e| panic!("{e}"));
        let s = validate(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.subject_sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert!(s.packages.iter().any(|p| p.purl.as_deref() == Some("pkg:deb/debian/libc6@2.36-9%2Bdeb12u14?arch=amd64&distro=debian-12")), "{:?}", s.packages);
        assert_eq!(s.components, 1 + 2 + 2, "os + 2 packages + 2 files");
    }

    #[test]
    fn malformed_sboms_are_refused_by_name() {
        for (doc, want) in [
            (&b"{"[..], "not JSON"),
            (br#"{"bomFormat":"SPDX","specVersion":"1.5","version":1}"#, "bomFormat"),
            (br#"{"bomFormat":"CycloneDX","specVersion":"1.4","version":1}"#, "specVersion"),
            (br#"{"bomFormat":"CycloneDX","specVersion":"1.5","version":1,"components":[{"type":"nonsense","name":"x"}]}"#, "CycloneDX"),
        ] {
            let err = validate(doc).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
