#!/usr/bin/env bash
# Install what Outpost needs on a Debian 12 machine, as root. Idempotent and quiet:
# a second run on a ready machine installs nothing and prints one line per step.
#
#   bash scripts/setup.sh
#
# Steps: Debian packages (only those missing), check the Rust toolchain (and install
# bpf-linker, cargo-fuzz and cargo-deb), create the Python venv at <repo>/.venv with
# tests/requirements.txt installed.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------
APT_PACKAGES=(
  faketime      # clock control for expiry tests
  python3-venv  # the test venv (built on Debian's python3)
  curl          # health checks in scripts
  openssl       # sha256 reference in the bench
  jq            # JSON output of the CLIs in scripts
  procps        # pkill/pgrep/ps for process handling in tests
  time          # GNU time: /usr/bin/time -v for peak RSS
  pkg-config    # -sys crates
  grub-common   # grub-editenv: the GRUB boot-control backend is tested against it
  xdelta3       # delta benchmark baseline
  swtpm         # software TPM 2.0: one per device in tests, testbeds and the main job
  swtpm-tools   # swtpm_setup: manufactures a TPM's state (EK, EK certificate)
  # The virtual device (testbeds/vm, tests/test_vm.py): QEMU with UEFI firmware, its
  # root filesystems from Debian packages, GRUB for EFI, partitions without mounting.
  qemu-system-x86     # qemu-system-x86_64 (TCG: KVM guests die on this machine kind)
  ovmf                # UEFI firmware for QEMU (OVMF_CODE_4M.fd measures into the TPM)
  debootstrap         # the device's root filesystem from Debian packages
  grub-efi-amd64-bin  # GRUB's EFI modules (tpm, loadenv, linuxefi) for grub-mkimage
  mtools              # writes the ESP's FAT image without mounting it
  dosfstools          # mkfs.vfat for the ESP
  fdisk               # sfdisk: the GPT of the device's disk
  e2fsprogs           # mke2fs -d: slot and data filesystems from a directory
  cryptsetup-bin      # veritysetup: the dm-verity hash tree of a slot image
  socat               # forwards the VM's one allowed connection to the server on loopback
  libtss2-dev   # TPM2 Software Stack that tss-esapi links (Debian 12: 3.2)
  tpm2-tools    # tpm2_* commands used by tests to inspect a device's TPM independently
  chromium      # headless browser: the dashboard test drives it over the DevTools pipe
  bpftool       # tests check that detaching leaves no Outpost programs behind
  iproute2      # network namespaces and veth pairs for the policy tests
  nftables      # the policy benchmark's baseline (chains and sets)
  iperf3        # throughput through the policy programs in the benchmark
  postgresql    # the scale-out state store: tests and the benchmark start their own server
  strace        # the publish crash test holds and counts the server's file-system steps
  g++           # libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets
  dpkg-dev      # dpkg-shlibdeps: cargo-deb computes the packages' Depends with it
  liblzma-dev   # cargo-deb's xz compression links liblzma
  debootstrap   # tests/test_packages.py installs the .debs into a Debian 12 chroot
  systemd       # systemd-analyze verify checks the packages' units
)
# ---------------------------------------------------------------------------

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg -s "$pkg" >/dev/null 2>&1 \
     || ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || die "missing Debian packages (${missing[*]}); run this script as root"
  command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"
  log "installing Debian packages: ${missing[*]}"
  # Update the package lists once (they may be absent or stale on a fresh machine).
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages: all present"
fi

# ---------------------------------------------------------------------------
# 2. Rust toolchain (stable, via rustup; installed with the machine)
# ---------------------------------------------------------------------------
if [[ -d "$HOME/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! cargo_version="$(cargo --version 2>/dev/null)"; then
  die "cargo not found. Install the stable Rust toolchain with rustup (https://rustup.rs), then re-run scripts/setup.sh"
fi
log "Rust: $cargo_version"

# eBPF: the programs in ebpf/programs are built for the BPF target by the nightly
# toolchain (with rust-src, for -Z build-std=core) and linked by bpf-linker against
# the nightly's own LLVM (the rust-llvm feature: no system LLVM needed). The
# nightly is the machine's; it is not updated here, since bpf-linker's LLVM must
# match it.
if ! rustup toolchain list | grep -q '^nightly'; then
  die "the nightly Rust toolchain is missing (rustup toolchain install nightly --component rust-src); it builds the eBPF programs"
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to the nightly toolchain"
  rustup component add rust-src --toolchain nightly >/dev/null
fi
nightly_llvm="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
BPF_LINKER_VERSION=0.10.4
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against the nightly's LLVM $nightly_llvm (about a minute)"
  cargo install --quiet --locked bpf-linker --version "$BPF_LINKER_VERSION" \
    --no-default-features --features "rust-llvm-$nightly_llvm" >/dev/null
fi
log "eBPF: $(bpf-linker --version 2>/dev/null | head -1), nightly LLVM $nightly_llvm"

# Fuzzing: cargo-fuzz (built with the stable toolchain) drives the nightly one with
# sanitizers (scripts/fuzz.sh, docs/fuzzing.md). Pinned: 0.13.2 builds with the
# machine's toolchains.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION (about a minute)"
  cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" >/dev/null
fi
log "fuzzing: $(cargo fuzz --version 2>/dev/null)"

# Debian packages of the binaries (scripts/packages.sh): cargo-deb. Pinned: 3.8.0
# builds with the machine's stable toolchain (it needs rustc 1.85 or later); about
# 45 s to build on 2 cores.
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  log "installing cargo-deb $CARGO_DEB_VERSION (about a minute)"
  cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION" >/dev/null
fi
log "packaging: $(cargo deb --version 2>/dev/null)"

# ---------------------------------------------------------------------------
# 3. Python venv for the test suite and the bench
# ---------------------------------------------------------------------------
REQ_FILE="tests/requirements.txt"
mkdir -p tests
touch "$REQ_FILE"
# Ensure the two base requirements are present (another file may add more lines).
ensure_req() {
  local name="$1" line="$2"
  if ! grep -qiE "^[[:space:]]*${name}([[:space:]]*[<>=!~;\[]|[[:space:]]*$)" "$REQ_FILE"; then
    # keep the file newline-terminated before appending
    if [[ -s "$REQ_FILE" && -n "$(tail -c1 "$REQ_FILE")" ]]; then echo >>"$REQ_FILE"; fi
    echo "$line" >>"$REQ_FILE"
    log "added '$line' to $REQ_FILE"
  fi
}
ensure_req tuf 'tuf>=7,<8'
ensure_req pytest 'pytest>=8,<9'

# Debian's python3 (python3-venv is installed above); fall back to whatever python3 is on PATH.
PYTHON_BASE="/usr/bin/python3"
[[ -x "$PYTHON_BASE" ]] || PYTHON_BASE="$(command -v python3 || true)"
[[ -n "$PYTHON_BASE" ]] || die "python3 not found"

VENV="$REPO_ROOT/.venv"
if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "existing .venv is broken; recreating it"
  rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating Python venv at .venv"
  "$PYTHON_BASE" -m venv "$VENV"
fi

# Skip pip when every requirement is already satisfied (no network needed then).
req_satisfied() {
  "$VENV/bin/python" - "$REQ_FILE" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import PackageNotFoundError, distribution
try:
    from packaging.requirements import Requirement
except ImportError:  # packaging not yet installed: let pip decide
    sys.exit(1)

def ok(req):
    try:
        dist = distribution(req.name)
    except PackageNotFoundError:
        return False
    if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
        return False
    for extra in req.extras:  # check extras' own requirements too
        for dep in dist.requires or []:
            r = Requirement(dep)
            if r.marker and r.marker.evaluate({"extra": extra}) and not ok(r):
                return False
    return True

for raw in open(sys.argv[1], encoding="utf-8"):
    line = raw.split("#", 1)[0].strip()
    if not line:
        continue
    if line.startswith("-"):  # options such as -r/-e: cannot check cheaply
        sys.exit(1)
    req = Requirement(line)
    if req.marker and not req.marker.evaluate():
        continue
    if not ok(req):
        sys.exit(1)
PY
}

if req_satisfied; then
  log "Python venv: requirements already satisfied ($REQ_FILE)"
else
  log "installing Python requirements from $REQ_FILE into .venv"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip packaging
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ_FILE"
  req_satisfied || die "Python requirements still unsatisfied after pip install ($REQ_FILE)"
fi

log "done"
