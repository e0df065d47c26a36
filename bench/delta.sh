#!/usr/bin/env bash
# Delta-update benchmark (issue 3): Outpost's zstd patches against xdelta3 and bsdiff on
# realistic root-filesystem image pairs, plus the bytes a resumed download saves.
#
#   bash bench/delta.sh
#
# 1. Downloads real Debian packages (`apt-get download`, cached in target/bench-debs) and
#    unpacks them with `dpkg-deb -x` into tree A; tree B is the same set where a few
#    packages (openssl, glibc, curl, python3.11, tzdata by default) moved to their next
#    real archive version: A holds the older build the archive still serves, B the newer.
# 2. Builds image A and B as ext4 (mkfs.ext4 -d, fixed size, deterministic) and as
#    squashfs (mksquashfs, fixed mkfs time, all-root).
# 3. For each pair: `delta make/apply` (Outpost's codec, protocol/src/codec.rs, what
#    `outpost release publish --delta-from` makes and the agent applies), xdelta3 and
#    bsdiff/bspatch: patch size, make time, apply time (median), peak RSS; every applied
#    output is checked against image B's sha256.
# 4. Resume: a 64 MiB release is published to a real outpost-server; a real
#    `outpost-agent run --once` downloads it through a counting TCP proxy on 127.0.0.1,
#    is SIGKILLed at a seeded random offset, restarted, and the bytes fetched are counted.
# 5. Prints a Markdown section and puts it between <!-- delta:begin --> and
#    <!-- delta:end --> in docs/benchmarks.md (the rest of the file is kept).
#
# Does not build anything: needs target/release/examples/delta and the release binaries
# (cargo build --release --examples). Installs xdelta3, bsdiff and
# squashfs-tools with apt-get when missing. Environment (defaults in brackets):
#   BENCH_DELTA_DIR          scratch directory [<repo>/target/bench-delta], wiped first
#   BENCH_DEB_CACHE          .deb cache, kept between runs [<repo>/target/bench-debs]
#                            (both outside target/bench, which bench.sh wipes)
#   BENCH_DELTA_FORMATS      image formats ["ext4 squashfs"]
#   BENCH_DELTA_LEVELS       Outpost zstd levels ["19 22 15 3"]; 19 is what `release publish` uses
#   BENCH_DELTA_RUNS         timed applies per tool [3]
#   BENCH_DELTA_XDELTA       xdelta3 variants, comma-separated option sets
#                            ["default,-9,-9 -B IMG"]; IMG = the image size, "default" = no options
#   BENCH_DELTA_BSDIFF       1 = include bsdiff/bspatch [1]
#   BENCH_BSDIFF_TIMEOUT     give up on one bsdiff make after this many seconds [300]
#   BENCH_DELTA_CHANGED      packages whose version changes from A to B
#   BENCH_SQUASHFS_COMP      mksquashfs compressor [gzip]
#   BENCH_RESUME_MIB         image size for the resume measurement [64]
#   BENCH_RESUME_TRIALS      interrupted downloads [10]
#   BENCH_RESUME_RATE        agent bandwidth cap, bytes/s [33554432]
#   BENCH_SEED               seed of the interruption offsets [20261123]
#   BENCH_DELTA_PARTS        "codecs resume" [both]
#   BENCH_OUT                report file [docs/benchmarks.md]
#   OUTPOST_BIN              directory of the binaries [<repo>/target/release]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
trap 'echo "delta.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

OUTPOST_BIN="${OUTPOST_BIN:-$REPO_ROOT/target/release}"
# shellcheck source=scripts/lib/fleet.sh
source "$REPO_ROOT/scripts/lib/fleet.sh"
trap fleet_stop_server EXIT

WORK="${BENCH_DELTA_DIR:-$REPO_ROOT/target/bench-delta}"
DEBS="${BENCH_DEB_CACHE:-$REPO_ROOT/target/bench-debs}"
FORMATS="${BENCH_DELTA_FORMATS:-ext4 squashfs}"
LEVELS="${BENCH_DELTA_LEVELS:-19 22 15 3}"
RUNS="${BENCH_DELTA_RUNS:-3}"
XDELTA_VARIANTS="${BENCH_DELTA_XDELTA:-default,-9,-9 -B IMG}"
WITH_BSDIFF="${BENCH_DELTA_BSDIFF:-1}"
BSDIFF_TIMEOUT="${BENCH_BSDIFF_TIMEOUT:-300}"
SQUASHFS_COMP="${BENCH_SQUASHFS_COMP:-gzip}"
RESUME_MIB="${BENCH_RESUME_MIB:-64}"
RESUME_TRIALS="${BENCH_RESUME_TRIALS:-10}"
RESUME_RATE="${BENCH_RESUME_RATE:-33554432}"
SEED="${BENCH_SEED:-20261123}"
PARTS=" ${BENCH_DELTA_PARTS:-codecs resume} "
OUT="${BENCH_OUT:-$REPO_ROOT/docs/benchmarks.md}"
DELTA_BIN="$OUTPOST_BIN/examples/delta"
PY=python3
MEASURE=("$PY" "$REPO_ROOT/bench/delta_measure.py")

# Fixed inputs that make the images reproducible.
EPOCH=1700000000                                # 2023-11-14 22:13:20 UTC
FS_UUID="6f757470-6f73-4074-a000-64656c746131"  # ext4 UUID and directory hash seed

# The root filesystem: 82 Debian bookworm packages (a small systemd-based device
# with Python, Perl, curl and OpenSSL), about 150 MB unpacked.
PACKAGES=(
  base-files base-passwd bash coreutils util-linux mount findutils grep sed diffutils
  tar gzip less debianutils dpkg apt libapt-pkg6.0 procps libproc2-0
  libc6 libc-bin libgcc-s1 libstdc++6 libssl3 openssl libcurl4 curl ca-certificates tzdata
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib perl-base
  systemd libsystemd0 libxml2 libsqlite3-0 zlib1g libzstd1 liblzma5 liblz4-1 libbz2-1.0
  libgnutls30 libnettle8 libhogweed6 libgmp10 libtasn1-6 libp11-kit0 libunistring2 libidn2-0
  libpsl5 libnghttp2-14 libssh2-1 librtmp1 libbrotli1 libexpat1 libffi8
  libkrb5-3 libgssapi-krb5-2 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2
  libldap-2.5-0 libsasl2-2 libncursesw6 libtinfo6 ncurses-base libcap2 libpam0g libpam-modules
  libseccomp2 libselinux1 libblkid1 libmount1 libuuid1 libacl1 libattr1 libcrypt1 libmd0
  libgcrypt20 libpcre2-8-0
)
# Five source packages' binaries that change version between A and B.
read -r -a CHANGED <<<"${BENCH_DELTA_CHANGED:-libssl3 openssl libc6 libc-bin libcurl4 curl python3.11-minimal libpython3.11-minimal libpython3.11-stdlib tzdata}"

# --------------------------------------------------------------------------- prerequisites
[[ -x "$DELTA_BIN" ]] || fleet_die "$DELTA_BIN not found: build it with 'cargo build --release --examples -p outpost-protocol'"
if [[ "$PARTS" == *" resume "* ]]; then fleet_require_bins; fi
need_pkgs=()
command -v xdelta3 >/dev/null || need_pkgs+=(xdelta3)
command -v mksquashfs >/dev/null || need_pkgs+=(squashfs-tools)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
[[ -x /usr/bin/time ]] || need_pkgs+=(time)
if [[ "$WITH_BSDIFF" == 1 ]] && ! command -v bsdiff >/dev/null; then
  if apt-cache show bsdiff >/dev/null 2>&1; then need_pkgs+=(bsdiff); else
    echo "delta.sh: bsdiff is not in this machine's archive; skipping it" >&2
    WITH_BSDIFF=0
  fi
fi
if ((${#need_pkgs[@]})); then
  fleet_log "installing ${need_pkgs[*]} (apt-get)"
  [[ "$(id -u)" == 0 ]] || fleet_die "need root to apt-get install ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >&2
fi
for c in apt-get apt-cache dpkg-deb debugfs e2fsck jq; do
  command -v "$c" >/dev/null || fleet_die "$c not found"
done

case "$(realpath -m "$WORK")" in
  / | "$REPO_ROOT" | "$HOME") fleet_die "BENCH_DELTA_DIR=$WORK would wipe too much; choose a scratch directory" ;;
esac
rm -rf "$WORK"
mkdir -p "$WORK" "$DEBS"
RECORD="$WORK/results.jsonl"
LOG="$WORK/commands.log"
: >"$RECORD"
: >"$LOG"
echo "delta.sh: scratch directory $WORK (command output in $LOG), .deb cache $DEBS" >&2

fact() { # KEY VALUE: a fact for the report
  jq -nc --arg k "$1" --arg v "$2" '{kind: "fact", key: $k, value: $v}' >>"$RECORD"
}
fact loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)"

# --------------------------------------------------------------------------- packages
# Print a package's versions known to apt, newest first.
versions_desc() {
  apt-cache madison "$1" | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -u |
    "$PY" -c '
import functools, subprocess, sys
vs = [l.strip() for l in sys.stdin if l.strip()]
def cmp(a, b):
    if subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0:
        return -1
    return 0 if a == b else 1
print("\n".join(sorted(vs, key=functools.cmp_to_key(cmp), reverse=True)))'
}
candidate() { apt-cache policy "$1" | awk '/Candidate:/ {print $2; exit}'; }

# Print the cached .deb for PKG VERSION, downloading it when missing.
deb_for() {
  local pkg="$1" ver="$2" enc f
  enc="${ver//:/%3a}"
  for f in "$DEBS/${pkg}_${enc}_"*.deb; do
    [[ -s "$f" ]] && { printf '%s\n' "$f"; return 0; }
  done
  (cd "$DEBS" && apt-get download -q "$pkg=$ver" >>"$LOG" 2>&1) \
    || fleet_die "apt-get download $pkg=$ver failed (see $LOG)"
  for f in "$DEBS/${pkg}_${enc}_"*.deb; do
    [[ -s "$f" ]] && { printf '%s\n' "$f"; return 0; }
  done
  fleet_die "apt-get download $pkg=$ver left no .deb in $DEBS"
}

if [[ "$PARTS" == *" codecs "* ]]; then
fleet_log "choosing package versions (tree A: older build of ${#CHANGED[@]} packages; tree B: newest)"
if ! apt-cache policy "${PACKAGES[0]}" | grep -q 'Candidate: [0-9]'; then
  apt-get update -q >>"$LOG" 2>&1 || fleet_die "apt-get update failed (see $LOG)"
fi
declare -A VER_A VER_B
for p in "${PACKAGES[@]}"; do
  v="$(candidate "$p")"
  [[ -n "$v" && "$v" != "(none)" ]] || fleet_die "package $p has no installable version"
  VER_A[$p]="$v"
  VER_B[$p]="$v"
done
for p in "${CHANGED[@]}"; do
  [[ -n "${VER_A[$p]:-}" ]] || fleet_die "changed package $p is not in the package set"
  mapfile -t vs < <(versions_desc "$p")
  ((${#vs[@]} >= 2)) || fleet_die "package $p has only one version in this archive (${vs[*]}); drop it from BENCH_DELTA_CHANGED"
  VER_B[$p]="${vs[0]}"
  VER_A[$p]="${vs[1]}"
  printf '  %-24s A %-28s B %s\n' "$p" "${vs[1]}" "${vs[0]}" >&2
  jq -nc --arg p "$p" --arg a "${vs[1]}" --arg b "${vs[0]}" '{kind: "changed", package: $p, a: $a, b: $b}' >>"$RECORD"
done

fleet_log "downloading ${#PACKAGES[@]} + ${#CHANGED[@]} .deb files into $DEBS (cached)"
declare -A DEB_A DEB_B
for p in "${PACKAGES[@]}"; do
  DEB_A[$p]="$(deb_for "$p" "${VER_A[$p]}")"
  DEB_B[$p]="$(deb_for "$p" "${VER_B[$p]}")"
done
deb_bytes=0
for p in "${PACKAGES[@]}"; do deb_bytes=$((deb_bytes + $(stat -c %s "${DEB_A[$p]}"))); done

# --------------------------------------------------------------------------- trees
# Unpack the set into DIR in list order; directory times are then fixed (shared
# directories would otherwise carry the unpack time).
make_tree() {
  local side="$1" dir="$2" p deb
  rm -rf "$dir"
  mkdir -p "$dir"
  for p in "${PACKAGES[@]}"; do
    if [[ "$side" == A ]]; then deb="${DEB_A[$p]}"; else deb="${DEB_B[$p]}"; fi
    dpkg-deb -x "$deb" "$dir"
  done
  find "$dir" -type d -exec touch -h -d "@$EPOCH" {} +
}
fleet_log "unpacking trees A and B (dpkg-deb -x)"
make_tree A "$WORK/tree-a"
make_tree B "$WORK/tree-b"
for s in a b; do
  fact "tree_${s}_bytes" "$(du -sb "$WORK/tree-$s" | awk '{print $1}')"
  fact "tree_${s}_files" "$(find "$WORK/tree-$s" | wc -l)"
done
fact packages "${#PACKAGES[@]}"
fact deb_bytes "$deb_bytes"
fact changed_files "$({ diff -rq --no-dereference "$WORK/tree-a" "$WORK/tree-b" 2>/dev/null || true; } | wc -l)"

# --------------------------------------------------------------------------- images
# ext4: one fixed size for both, fixed UUID and hash seed, mkfs time faked. mke2fs -d
# copies each source file's atime and ctime (the unpack time), so those are set to the
# fixed epoch afterwards with debugfs; e2fsck then checks the result.
DEBUGFS_TIME="$(date -u -d "@$EPOCH" +%Y%m%d%H%M%S)"
max_kib="$(du -sk "$WORK/tree-a" "$WORK/tree-b" | awk '$1 > m {m = $1} END {print m}')"
EXT4_MIB=$(((max_kib * 5 / 4 / 1024 + 32 + 15) / 16 * 16))
make_ext4() {
  local tree="$1" img="$2"
  rm -f "$img"
  E2FSPROGS_FAKE_TIME="$EPOCH" mkfs.ext4 -q -F -b 4096 -L rootfs -U "$FS_UUID" \
    -E "root_owner=0:0,hash_seed=$FS_UUID" -d "$tree" "$img" "${EXT4_MIB}M" >>"$LOG" 2>&1
  "$PY" - "$tree" "$DEBUGFS_TIME" >"$img.debugfs" <<'PY'
import os, sys
root, t = sys.argv[1], sys.argv[2]
paths = ["/"]
for d, dirs, files in os.walk(root):  # symlinks to directories are listed, not followed
    dirs.sort()
    paths += ["/" + os.path.relpath(os.path.join(d, n), root) for n in dirs + sorted(files)]
for p in paths:
    if '"' in p or "\n" in p:
        sys.exit(f"unsupported file name {p!r}")
    for field in ("atime", "ctime"):
        print(f'sif "{p}" {field} {t}')
PY
  E2FSPROGS_FAKE_TIME="$EPOCH" debugfs -w -f "$img.debugfs" "$img" >>"$LOG" 2>&1
  rm -f "$img.debugfs"
  e2fsck -fn "$img" >>"$LOG" 2>&1 || fleet_die "e2fsck reports errors in $img (see $LOG)"
}
make_squashfs() {
  local tree="$1" img="$2"
  rm -f "$img"
  mksquashfs "$tree" "$img" -noappend -all-root -mkfs-time "$EPOCH" -comp "$SQUASHFS_COMP" \
    -no-progress -quiet >>"$LOG" 2>&1
}
PAIRS=()
for fmt in $FORMATS; do
  fleet_log "building $fmt images A and B"
  for s in a b; do
    case "$fmt" in
      ext4) make_ext4 "$WORK/tree-$s" "$WORK/$fmt-$s.img" ;;
      squashfs) make_squashfs "$WORK/tree-$s" "$WORK/$fmt-$s.img" ;;
      *) fleet_die "unknown image format $fmt (ext4 or squashfs)" ;;
    esac
  done
  # Reproducibility check: image A built a second time from a fresh unpack is identical.
  make_tree A "$WORK/tree-a2"
  case "$fmt" in
    ext4) make_ext4 "$WORK/tree-a2" "$WORK/$fmt-a2.img" ;;
    squashfs) make_squashfs "$WORK/tree-a2" "$WORK/$fmt-a2.img" ;;
  esac
  if cmp -s "$WORK/$fmt-a.img" "$WORK/$fmt-a2.img"; then fact "${fmt}_reproducible" yes; else fact "${fmt}_reproducible" no; fi
  rm -rf "$WORK/tree-a2" "$WORK/$fmt-a2.img"
  PAIRS+=(--pair "$fmt:$WORK/$fmt-a.img:$WORK/$fmt-b.img")
done
fact ext4_mib "$EXT4_MIB"
fact squashfs_comp "$SQUASHFS_COMP"
rm -rf "$WORK/tree-a" "$WORK/tree-b"

# --------------------------------------------------------------------------- codecs
fleet_log "delta make/apply: outpost (levels $LEVELS), xdelta3 ($XDELTA_VARIANTS)$([[ $WITH_BSDIFF == 1 ]] && echo ', bsdiff')"
"${MEASURE[@]}" codecs --record "$RECORD" --work "$WORK/patches" --log "$LOG" \
  --delta-bin "$DELTA_BIN" --levels "$LEVELS" --runs "$RUNS" --xdelta "$XDELTA_VARIANTS" \
  --bsdiff "$WITH_BSDIFF" --bsdiff-timeout "$BSDIFF_TIMEOUT" "${PAIRS[@]}"
fi

# --------------------------------------------------------------------------- resume
if [[ "$PARTS" == *" resume "* ]]; then
fleet_log "resume: server + repository, publishing a $RESUME_MIB MiB image"
RW="$WORK/resume"
mkdir -p "$RW"
KEYS="$RW/keys"
REPO="$RW/repo"
fleet_make_keys "$KEYS" 2>>"$LOG"
fleet_init_repo "$REPO" "$KEYS" >>"$LOG" 2>&1
PORT="$(fleet_free_port)"
SERVER_URL="http://127.0.0.1:$PORT"
fleet_write_server_config "$RW/server.toml" "$PORT" "$RW/server-data" "$KEYS" "$REPO"
TOKEN="$(fleet_create_token "$RW/server.toml" bench-delta)"
fleet_start_server "$RW/server.toml" "$RW/server.log" 2>>"$LOG"
fleet_wait_healthy "$SERVER_URL" 30
"$OUTPOST_BIN/outpost" repo push --repo "$REPO" --server "$SERVER_URL" --token "$TOKEN" >>"$LOG" 2>&1
IMAGE="$RW/resume.img"
head -c $((RESUME_MIB * 1024 * 1024)) /dev/urandom >"$IMAGE"
"$OUTPOST_BIN/outpost" release publish --repo "$REPO" --firmware "$IMAGE" \
  --hardware-class rpi4 --version 1.0.0 --key "$KEYS/firmware.key" \
  --server "$SERVER_URL" --token "$TOKEN" >>"$LOG" 2>&1
fleet_log "resume: $RESUME_TRIALS downloads SIGKILLed at random offsets (seed $SEED), then resumed"
"${MEASURE[@]}" resume --record "$RECORD" --work "$RW/devices" --log "$LOG" \
  --agent-bin "$OUTPOST_BIN/outpost-agent" --server-url "$SERVER_URL" \
  --trusted-root "$REPO/metadata/1.root.json" --image "$IMAGE" \
  --rate "$RESUME_RATE" --trials "$RESUME_TRIALS" --seed "$SEED"
fleet_stop_server
fi

# --------------------------------------------------------------------------- report
fleet_log "report"
CPU="$(lscpu 2>/dev/null | awk -F: '/^Model name/ {sub(/^[ \t]+/, "", $2); print $2; exit}')"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo 'none yet')"
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null | head -1)" ]]; then COMMIT="$COMMIT (with uncommitted changes)"; fi
fact date "$(date -u '+%Y-%m-%d %H:%M UTC')"
fact cpu "${CPU:-unknown}"
fact nproc "$(nproc)"
fact loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)"
fact mem "$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
fact commit "$COMMIT"
fact xdelta3 "$(xdelta3 -V 2>&1 | head -1 | awk '{print $3}' | tr -d ,) (Debian $(dpkg-query -W -f '${Version}' xdelta3))"
[[ "$WITH_BSDIFF" == 1 ]] && fact bsdiff "Debian $(dpkg-query -W -f '${Version}' bsdiff)"
fact e2fsprogs "$(dpkg-query -W -f '${Version}' e2fsprogs)"
fact squashfs_tools "$(dpkg-query -W -f '${Version}' squashfs-tools 2>/dev/null || echo none)"
fact delta_bin "${DELTA_BIN#"$REPO_ROOT"/} (built $(date -u -r "$DELTA_BIN" '+%Y-%m-%d %H:%M UTC'))"
"${MEASURE[@]}" report --record "$RECORD" --out "$OUT"
echo "delta.sh: section written to ${OUT#"$REPO_ROOT"/}" >&2
