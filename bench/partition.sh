#!/usr/bin/env bash
# Streamed installs into a partition (issue 18 part 3), on the host, in one run:
#
#   sudo bash bench/partition.sh        (root: losetup)
#
# 1. A GPT disk image with two partitions of image size + 16 MiB, attached with
#    `losetup -P`; the agent's file backend has its slots pointing at them.
# 2. A BENCH_IMAGE_MIB random image published through a running outpost-server; a
#    fresh agent installs it (`run --once`: download, verify, write into partition B,
#    flush, read back, trial, commit) under /usr/bin/time -v: wall time, peak RSS.
# 3. The two limits, measured in the same run: `openssl dgst -sha256` of the image
#    file (warm page cache) and `dd` of the same bytes into the same partition
#    (oflag=direct conv=fsync). The agent's throughput is reported against the LOWER.
# 4. A delta: v2 = v1 with BENCH_EDITS random 4 KiB blocks rewritten, published with
#    --delta-from (level BENCH_DELTA_LEVEL); the agent installs it into partition A
#    reading its base from partition B; against `xdelta3 -d` of the same pair
#    (patch made with `xdelta3 -9`): time, peak RSS, patch sizes.
# Prints a Markdown section. Not part of the tests.
#
# Environment: OUTPOST_BIN [<repo>/target/release], BENCH_DIR [/tmp/outpost-bench-partition]
# (images, server data), BENCH_DISK_DIR [BENCH_DIR] (the disk image: put it on the disk
# to be measured, BENCH_DIR may be a tmpfs),
# BENCH_IMAGE_MIB [1024], BENCH_EDITS [256], BENCH_DELTA_LEVEL [3].
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
OUTPOST_BIN="${OUTPOST_BIN:-$REPO_ROOT/target/release}"
# shellcheck source=scripts/lib/fleet.sh
source "$REPO_ROOT/scripts/lib/fleet.sh"
WORK="${BENCH_DIR:-/tmp/outpost-bench-partition}"
MIB="${BENCH_IMAGE_MIB:-1024}"
EDITS="${BENCH_EDITS:-256}"
DELTA_LEVEL="${BENCH_DELTA_LEVEL:-3}"
LOOP=""
EXTRA_LOOPS=()

cleanup() {
  fleet_stop_server
  [[ -n "$LOOP" ]] && losetup --detach "$LOOP" 2>/dev/null || true
  for l in "${EXTRA_LOOPS[@]}"; do losetup --detach "$l" 2>/dev/null || true; done
  [[ -n "${DISK:-}" ]] && rm -f "$DISK"
}
trap cleanup EXIT
fleet_require_bins
[[ $(id -u) == 0 ]] || fleet_die "needs root (losetup)"
command -v xdelta3 >/dev/null || fleet_die "xdelta3 missing (apt-get install xdelta3)"

rm -rf "$WORK"
mkdir -p "$WORK"
LOG="$WORK/commands.log"

# seconds and peak RSS (KiB) of a command: "SECS KIB"
timed() {
  /usr/bin/time -f "%e %M" -o "$WORK/time.out" "$@" >>"$LOG" 2>&1 || fleet_die "failed: $* (see $LOG)"
  tail -1 "$WORK/time.out"
}

fleet_log "disk image with two partitions of $((MIB + 16)) MiB, attached with losetup -P"
DISK_DIR="${BENCH_DISK_DIR:-$WORK}"
mkdir -p "$DISK_DIR"
DISK="$DISK_DIR/outpost-bench-disk.img"
truncate -s $(((2 * (MIB + 16) + 2) * 1024 * 1024)) "$DISK"
printf 'label: gpt\nsize=%sMiB\nsize=%sMiB\n' $((MIB + 16)) $((MIB + 16)) | sfdisk --quiet "$DISK"
LOOP="$(losetup --find --show --partscan "$DISK")"
for _ in $(seq 30); do [[ -b "${LOOP}p2" ]] && break; sleep 0.1; done
if [[ -b "${LOOP}p2" ]]; then
  PART_A="${LOOP}p1" PART_B="${LOOP}p2" ATTACH="\`losetup -P\`"
else
  # No partition nodes (a container without partition scanning): each partition's
  # byte range of the same disk image gets its own loop device.
  losetup --detach "$LOOP"
  LOOP=""
  mapfile -t RANGES < <(sfdisk --json "$DISK" | python3 -c 'import json,sys; [print(p["start"] * 512, p["size"] * 512) for p in json.load(sys.stdin)["partitiontable"]["partitions"]]')
  read -r off size <<<"${RANGES[0]}"
  PART_A="$(losetup --find --show --offset "$off" --sizelimit "$size" "$DISK")"
  read -r off size <<<"${RANGES[1]}"
  PART_B="$(losetup --find --show --offset "$off" --sizelimit "$size" "$DISK")"
  EXTRA_LOOPS=("$PART_A" "$PART_B")
  ATTACH="\`losetup --offset --sizelimit\` per partition (this kernel made no partition nodes for \`losetup -P\`)"
fi

fleet_log "server and a $MIB MiB image"
fleet_bench_server "$WORK"
V1="$WORK/v1.img"
head -c $((MIB * 1024 * 1024)) /dev/urandom >"$V1"
"$OUTPOST_BIN/outpost" release publish --repo "$WORK/repo" --firmware "$V1" --hardware-class rpi4 \
  --version 1.0.0 --key "$WORK/keys/firmware.key" --server "$SERVER_URL" >>"$LOG" 2>&1

AGENT="$WORK/agent"
fleet_write_agent_config "$AGENT/agent.toml" "$SERVER_URL" "$AGENT/state" "$WORK/repo/metadata/1.root.json" rpi4
mkdir -p "$AGENT/state/boot"
ln -s "$PART_A" "$AGENT/state/boot/slot-a.img"
ln -s "$PART_B" "$AGENT/state/boot/slot-b.img"

fleet_log "limits: openssl dgst -sha256 of the file, dd into partition B (oflag=direct conv=fsync)"
cat "$V1" >/dev/null
read -r HASH_S _ < <(timed openssl dgst -sha256 "$V1")
read -r DD_S _ < <(timed dd if="$V1" of="$PART_B" bs=4M oflag=direct conv=fsync)
dd if=/dev/zero of="$PART_B" bs=1M count=16 conv=fsync status=none

fleet_log "agent: full install into partition B"
sync
cat "$V1" >/dev/null
read -r FULL_S FULL_KIB < <(timed "$OUTPOST_BIN/outpost-agent" --config "$AGENT/agent.toml" --log-level info --json run --once)
grep -q '"committed"' "$LOG" || fleet_die "the full install did not commit (see $LOG)"
[[ "$(head -c $((MIB * 1024 * 1024)) "$PART_B" | openssl dgst -sha256 -r | cut -d' ' -f1)" == \
   "$(openssl dgst -sha256 -r "$V1" | cut -d' ' -f1)" ]] || fleet_die "partition B is not the image"

fleet_log "delta: v2 = v1 with $EDITS rewritten 4 KiB blocks"
V2="$WORK/v2.img"
cp "$V1" "$V2"
for ((i = 0; i < EDITS; i++)); do
  dd if=/dev/urandom of="$V2" bs=4096 count=1 seek=$(( (RANDOM * 32768 + RANDOM) % (MIB * 256) )) conv=notrunc status=none
done
read -r MAKE_S _ < <(timed "$OUTPOST_BIN/outpost" release publish --repo "$WORK/repo" --firmware "$V2" \
  --hardware-class rpi4 --version 2.0.0 --key "$WORK/keys/firmware.key" --server "$SERVER_URL" \
  --delta-from 1.0.0 --delta-base "$V1" --delta-level "$DELTA_LEVEL")
PATCH_BYTES="$(find "$WORK/server-data" -name '*.zst-patch' -printf '%s\n' | head -1)"
sync
read -r DELTA_S DELTA_KIB < <(timed "$OUTPOST_BIN/outpost-agent" --config "$AGENT/agent.toml" --log-level info --json run --once)
[[ "$(grep -c '"committed"' "$LOG")" -ge 2 ]] || fleet_die "the delta install did not commit (see $LOG)"
read -r XMAKE_S _ < <(timed xdelta3 -9 -e -f -s "$V1" "$V2" "$WORK/x.xd")
sync
read -r XAPPLY_S XAPPLY_KIB < <(timed xdelta3 -d -f -s "$V1" "$WORK/x.xd" "$WORK/x.out")
cmp -s "$WORK/x.out" "$V2" || fleet_die "xdelta3 -d did not rebuild v2"
XD_BYTES="$(stat -c %s "$WORK/x.xd")"

BYTES=$((MIB * 1024 * 1024))
py() { python3 -c "print($1)"; }
HASH_MBS="$(py "round($BYTES / $HASH_S / 1e6)")"
DD_MBS="$(py "round($BYTES / $DD_S / 1e6)")"
AGENT_MBS="$(py "round($BYTES / $FULL_S / 1e6)")"
LOWER="$(py "min($HASH_MBS, $DD_MBS)")"
cat <<EOF
## Streamed install into a partition (bench/partition.sh)

$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, binaries from $OUTPOST_BIN; image $MIB MiB (random), partitions of a GPT disk image ($(df --output=source "$DISK_DIR" | tail -1)) attached with $ATTACH.

| what | time | throughput | peak RSS |
|---|---|---|---|
| \`openssl dgst -sha256\` of the image (page cache) | ${HASH_S} s | ${HASH_MBS} MB/s | |
| \`dd bs=4M oflag=direct conv=fsync\` into partition B | ${DD_S} s | ${DD_MBS} MB/s | |
| agent \`run --once\`: download, verify, write partition B, flush, read back, commit | ${FULL_S} s | ${AGENT_MBS} MB/s = **$(py "round($AGENT_MBS / $LOWER, 2)")× the lower limit** (${LOWER} MB/s) | $((FULL_KIB / 1024)) MiB |
| agent delta install into partition A (base read from partition B) | ${DELTA_S} s | | $((DELTA_KIB / 1024)) MiB |
| \`xdelta3 -d\` of the same pair (file to file) | ${XAPPLY_S} s | | $((XAPPLY_KIB / 1024)) MiB |

Delta of $EDITS rewritten 4 KiB blocks: Outpost windowed patch (level $DELTA_LEVEL, made in ${MAKE_S} s with the publish) $PATCH_BYTES B; \`xdelta3 -9\` $XD_BYTES B (made in ${XMAKE_S} s): ratio $(py "round($PATCH_BYTES / $XD_BYTES, 3)").
EOF
