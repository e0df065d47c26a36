//! Pinning in bpffs and adopting what an earlier agent pinned: the pin layout, the
//! privilege and bpffs checks, the pin files of links, and [`detach_pinned`].

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use outpost_protocol::policy::ScopeKind;

use crate::{ifindex, programs, Enforcer, Error};

/// The statfs magic of a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the default pin root lives: bpffs is mounted here when nothing is.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The pinned layout of one build of the programs.
pub(crate) struct Pins {
    /// `<pin root>/<programs hash>`.
    pub(crate) dir: PathBuf,
    /// Directories of other builds of the programs under the same root: removed once
    /// this build's links are attached (an upgrade without a gap).
    pub(crate) retired: Vec<PathBuf>,
}

impl Pins {
    pub(crate) fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }

    pub(crate) fn links(&self) -> PathBuf {
        self.dir.join("links")
    }
}

impl Enforcer {
    /// Links pinned by an earlier agent that no scope of this one has claimed yet.
    pub(crate) fn unclaimed_pins(&self) -> Vec<PathBuf> {
        let Some(p) = &self.pins else { return Vec::new() };
        let claimed: BTreeSet<PathBuf> = self.attached.keys().flat_map(|(k, t)| self.link_pin_paths(*k, t).ok()).flat_map(|(a, b)| [a, b]).collect();
        std::fs::read_dir(p.links())
            .map(|rd| rd.flatten().map(|e| e.path()).filter(|f| !claimed.contains(f)).collect())
            .unwrap_or_default()
    }

    /// The pin files of a scope's two links. Workloads are named by cgroup id (a
    /// cgroup removed and made again is another cgroup), interfaces by index and name.
    pub(crate) fn link_pin_paths(&self, kind: ScopeKind, target: &str) -> Result<(PathBuf, PathBuf), Error> {
        let p = self.pins.as_ref().ok_or_else(|| Error::Load("not pinned".into()))?;
        let stem = match kind {
            ScopeKind::Workload => {
                let path = self.cgroup_root.join(target);
                let ino = std::fs::metadata(&path)
                    .map_err(|e| Error::Scope { scope: format!("workload cgroup {}", path.display()), reason: e.to_string() })?
                    .ino();
                format!("cgroup-{ino}")
            }
            ScopeKind::Interface => {
                let idx = ifindex(target).ok_or_else(|| Error::Scope { scope: format!("interface {target:?}"), reason: "no such interface".into() })?;
                // bpffs refuses names with a dot (VLAN interfaces have one).
                format!("if-{idx}-{}", target.replace('.', "_"))
            }
        };
        Ok((p.links().join(format!("{stem}-egress")), p.links().join(format!("{stem}-ingress"))))
    }
}

/// Creates `<root>/<programs hash>/{maps,links}` on bpffs (mounting bpffs at
/// [`BPFFS_MOUNT`] when the root is under it and nothing is mounted) and lists the
/// directories of other builds of the programs under the same root.
pub(crate) fn prepare_pins(root: &Path) -> Result<Pins, Error> {
    let err = |path: &Path, reason: String| Error::Pin { path: path.to_path_buf(), reason };
    // Without the privilege to mount or write bpffs there is no eBPF either: say so.
    let io_err = |path: &Path, what: &str, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            Error::Unsupported(format!("{what} {}: {e} (the agent needs root, or CAP_BPF and CAP_NET_ADMIN)", path.display()))
        } else {
            err(path, format!("{what}: {e}"))
        }
    };
    if !has_bpf_privilege() {
        return Err(Error::Unsupported("no privilege to load BPF programs (the agent needs root, or CAP_BPF and CAP_NET_ADMIN)".into()));
    }
    if !is_bpffs(root) {
        let mount = Path::new(BPFFS_MOUNT);
        if root.starts_with(mount) && !is_bpffs(mount) {
            std::fs::create_dir_all(mount).map_err(|e| io_err(mount, "creating", e))?;
            mount_bpffs(mount).map_err(|e| io_err(mount, "mounting bpffs at", e))?;
            tracing::info!(path = BPFFS_MOUNT, "mounted the BPF file system");
        }
    }
    let private = || {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b
    };
    private().create(root).map_err(|e| io_err(root, "creating", e))?;
    if !is_bpffs(root) {
        return Err(err(root, format!("not on a BPF file system (mount one: mount -t bpf bpf {BPFFS_MOUNT})")));
    }
    let dir = root.join(programs_tag()?);
    for d in [dir.join("maps"), dir.join("links")] {
        private().create(&d).map_err(|e| io_err(&d, "creating", e))?;
    }
    // bpffs's root is world-writable (sticky): anyone may have made these directories
    // first, and whoever owns them can unlink the pins inside, which ends enforcement.
    // Only directories of this user, writable by no one else, hold pins.
    for d in [root.to_path_buf(), dir.clone(), dir.join("maps"), dir.join("links")] {
        let md = std::fs::symlink_metadata(&d).map_err(|e| io_err(&d, "reading", e))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !md.is_dir() || md.uid() != me || md.mode() & 0o022 != 0 {
            return Err(err(
                &d,
                format!(
                    "owned by uid {} with mode {:o}, not by uid {me} and writable only by it: another user could remove the pins and end enforcement; refusing to pin there (remove it, or choose another pin directory)",
                    md.uid(),
                    md.mode() & 0o7777
                ),
            ));
        }
    }
    let retired = std::fs::read_dir(root)
        .map_err(|e| err(root, e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && *p != dir && p.join("maps").is_dir())
        .collect();
    Ok(Pins { dir, retired })
}

/// Names this build of the programs: the first 16 hex digits of their SHA-256.
fn programs_tag() -> Result<String, Error> {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(programs()?);
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// Root, or the effective capabilities CAP_BPF (39) or CAP_SYS_ADMIN (21).
fn has_bpf_privilege() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0);
    eff & ((1 << 39) | (1 << 21)) != 0
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is NUL-terminated and `buf` is a properly sized out-parameter.
    let rc = unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
    // SAFETY: statfs filled `buf` when it returned 0.
    rc == 0 && i64::from(unsafe { buf.assume_init() }.f_type) == BPF_FS_MAGIC
}

fn mount_bpffs(at: &Path) -> std::io::Result<()> {
    let target = CString::new(at.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let (src, fstype) = (c"bpf", c"bpf");
    // SAFETY: every pointer is a valid NUL-terminated string for the call; no data.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes one build's pins: links first (their programs detach), then maps. Returns
/// how many objects were unpinned.
pub(crate) fn remove_pins(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                std::fs::remove_file(e.path())?;
                n += 1;
            }
            std::fs::remove_dir(&d)?;
        }
    }
    std::fs::remove_dir(dir)?;
    Ok(n)
}

/// What [`detach_pinned`] removed.
#[derive(Debug, Default)]
pub struct Detached {
    /// Pinned links removed (each one detached a program).
    pub links: Vec<PathBuf>,
    /// Pinned maps removed.
    pub maps: usize,
}

/// Ends enforcement pinned under `root` by any build of the programs: unpins every
/// link (the programs detach once no agent holds them) and every map. An agent still
/// running holds its links open until it exits: stop it first.
pub fn detach_pinned(root: &Path) -> Result<Detached, Error> {
    let err = |path: &Path, e: std::io::Error| Error::Pin { path: path.to_path_buf(), reason: e.to_string() };
    let mut out = Detached::default();
    let Ok(rd) = std::fs::read_dir(root) else { return Ok(out) };
    for build in rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        if let Ok(links) = std::fs::read_dir(build.join("links")) {
            out.links.extend(links.flatten().map(|e| e.path()));
        }
        out.maps += std::fs::read_dir(build.join("maps")).map(|m| m.count()).unwrap_or(0);
        remove_pins(&build).map_err(|e| err(&build, e))?;
    }
    if std::fs::read_dir(root).is_ok_and(|mut r| r.next().is_none()) {
        std::fs::remove_dir(root).map_err(|e| err(root, e))?;
    }
    Ok(out)
}
