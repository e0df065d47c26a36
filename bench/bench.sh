#!/usr/bin/env bash
# Outpost benchmarks against peers, in one run on this machine (see bench/README.md).
#
#   bash bench/bench.sh
#
# (a) publish a 1 GiB random firmware image through a running outpost-server (release
#     build), then time `outpost-agent tuf-client download` of it over loopback; compare
#     its throughput with `openssl dgst -sha256` on the same file; agent peak RSS;
#     `curl -o` of the same URL (no verification) as the transport + page-cache-write reference;
#     `dd oflag=direct conv=fsync` of the image onto the same disk (the disk limit): the
#     download is also reported against the lower of the two limits (hashing, disk).
# (b) a TUF repository with 10,000 targets (written with python-tuf's Metadata API,
#     served by `python3 -m http.server` on loopback): a fresh agent
#     `tuf-client init` + `refresh` versus python-tuf's `Updater(...).refresh()`.
# Prints a Markdown table and writes it to docs/benchmarks.md. Not part of the tests.
#
# Environment (defaults in brackets):
#   OUTPOST_SKIP_BUILD=1     use the existing target/release binaries [build them]
#   BENCH_DIR                scratch directory [<repo>/target/bench], wiped first
#   BENCH_IMAGE_MIB          image size in MiB [1024]
#   BENCH_DOWNLOAD_RUNS      timed downloads / curl / openssl runs [5]
#   BENCH_TARGETS            targets in the big repository [10000]
#   BENCH_REFRESH_RUNS       timed refreshes per client [5]
#   BENCH_OUT                report file [docs/benchmarks.md]
#   BENCH_PARTS              which parts to run, "a b" [both]; the report covers those run
#   OUTPOST_BIN              directory of the binaries [<repo>/target/release]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
trap 'echo "bench.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"
OUTPOST_BIN="${OUTPOST_BIN:-$REPO_ROOT/target/release}"
# shellcheck source=scripts/lib/fleet.sh
source "$REPO_ROOT/scripts/lib/fleet.sh"

WORK="${BENCH_DIR:-$REPO_ROOT/target/bench}"
IMAGE_MIB="${BENCH_IMAGE_MIB:-1024}"
DOWNLOAD_RUNS="${BENCH_DOWNLOAD_RUNS:-5}"
N_TARGETS="${BENCH_TARGETS:-10000}"
REFRESH_RUNS="${BENCH_REFRESH_RUNS:-5}"
OUT="${BENCH_OUT:-$REPO_ROOT/docs/benchmarks.md}"
PY="$REPO_ROOT/.venv/bin/python"
MEASURE=("$PY" "$REPO_ROOT/bench/measure.py")

HTTPD_PID=""
cleanup() {
  fleet_stop_server
  if [[ -n "$HTTPD_PID" ]]; then
    kill "$HTTPD_PID" 2>/dev/null || true
    wait "$HTTPD_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# --------------------------------------------------------------------------- prerequisites
if [[ "${OUTPOST_SKIP_BUILD:-0}" != 1 ]]; then
  fleet_log "building release binaries (cargo build --release)"
  cargo build --release
fi
fleet_require_bins
[[ -x /usr/bin/time ]] || fleet_die "/usr/bin/time missing: run 'bash scripts/setup.sh'"
if ! "$PY" -c 'import tuf' 2>/dev/null; then
  bash scripts/setup.sh
fi
if ! "$PY" -c 'import cryptography' 2>/dev/null; then
  fleet_log "installing bench requirements (bench/requirements.txt) into .venv"
  "$PY" -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
fi

case "$(realpath -m "$WORK")" in
  / | "$REPO_ROOT" | "$HOME") fleet_die "BENCH_DIR=$WORK would wipe too much; choose a scratch directory" ;;
esac
rm -rf "$WORK"
mkdir -p "$WORK"
RECORD="$WORK/results.jsonl"
WARMUP="$WORK/warmup.jsonl"
LOG="$WORK/commands.log"
: >"$RECORD"
echo "bench: scratch directory $WORK (command output in $LOG)" >&2

IMAGE_BYTES=0
TARGETS_JSON_BYTES=0
PARTS=" ${BENCH_PARTS:-a b} "

# ===================================================================== (a) 1 GiB download
if [[ "$PARTS" == *" a "* ]]; then
fleet_log "(a) server + repository for the download benchmark"
KEYS="$WORK/keys"
REPO="$WORK/repo"
fleet_make_keys "$KEYS"
fleet_init_repo "$REPO" "$KEYS"
PORT="$(fleet_free_port)"
SERVER_URL="http://127.0.0.1:$PORT"
fleet_write_server_config "$WORK/server.toml" "$PORT" "$WORK/server-data" "$KEYS" "$REPO"
TOKEN="$(fleet_create_token "$WORK/server.toml" bench-pipeline)"
fleet_start_server "$WORK/server.toml" "$WORK/server.log"
fleet_wait_healthy "$SERVER_URL" 30
"$OUTPOST_BIN/outpost" repo push --repo "$REPO" --server "$SERVER_URL" --token "$TOKEN" >>"$LOG" 2>&1

fleet_log "(a) publishing a $IMAGE_MIB MiB random image"
IMAGE="$WORK/bench.img"
head -c $((IMAGE_MIB * 1024 * 1024)) /dev/urandom >"$IMAGE"
IMAGE_BYTES="$(stat -c %s "$IMAGE")"
TARGET_PATH="firmware/rpi4/1.0.0/bench.img"
"${MEASURE[@]}" time --record "$RECORD" --label publish_image --log "$LOG" -- \
  "$OUTPOST_BIN/outpost" release publish --repo "$REPO" --firmware "$IMAGE" \
  --hardware-class rpi4 --version 1.0.0 --key "$KEYS/firmware.key" \
  --server "$SERVER_URL" --token "$TOKEN"

MD_A="$WORK/agent-a-metadata"
DL="$WORK/download"
"$OUTPOST_BIN/outpost-agent" tuf-client --metadata-dir "$MD_A" init "$REPO/metadata/1.root.json" >>"$LOG" 2>&1
"$OUTPOST_BIN/outpost-agent" tuf-client --metadata-dir "$MD_A" --metadata-url "$SERVER_URL/metadata" refresh >>"$LOG" 2>&1
DL_FILE="$DL/$("$PY" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$TARGET_PATH")"
EXPECTED_SHA="$(openssl dgst -sha256 -r "$IMAGE" | awk '{print $1}')"
# The server's consistent-snapshot name of the image, for the curl reference.
SERVED_PATH="${TARGET_PATH%/*}/$EXPECTED_SHA.${TARGET_PATH##*/}"
SERVED_FILE="$WORK/server-data/repository/targets/$SERVED_PATH"
[[ -f "$SERVED_FILE" ]] || fleet_die "the server's copy $SERVED_FILE is missing"
# Every timed run starts with its input in the page cache (the kernel may reclaim cold
# pages between runs), so all of them measure CPU paths, not the disk.
warm() { cat "$1" >/dev/null; }

# Round 0 is a warm-up, recorded apart like part (b)'s: the first run after the publish
# also pays for paging in the binaries and for the server's first buffers.
for ((i = 0; i <= DOWNLOAD_RUNS; i++)); do
  rec="$RECORD" round="run $i/$DOWNLOAD_RUNS"
  if ((i == 0)); then rec="$WARMUP" round="warm-up (not recorded)"; fi
  echo "  download $round" >&2
  rm -rf "$DL"
  mkdir -p "$DL"
  sync  # flush earlier runs' writes so write-back does not land inside this timed run
  warm "$SERVED_FILE"
  "${MEASURE[@]}" time --record "$rec" --label agent_download --run "$i" --log "$LOG" -- \
    "$OUTPOST_BIN/outpost-agent" tuf-client --metadata-dir "$MD_A" --metadata-url "$SERVER_URL/metadata" \
    --target-name "$TARGET_PATH" --target-base-url "$SERVER_URL/targets" --target-dir "$DL" download
  [[ -f "$DL_FILE" ]] || fleet_die "download reported success but $DL_FILE is missing"
  if ((i == 0)); then
    got="$(openssl dgst -sha256 -r "$DL_FILE" | awk '{print $1}')"
    [[ "$got" == "$EXPECTED_SHA" ]] || fleet_die "downloaded image sha256 $got != published $EXPECTED_SHA"
  fi
  echo "  curl $round (transport + disk-write reference, no verification)" >&2
  rm -rf "$DL"
  mkdir -p "$DL"
  # shellcheck disable=SC2016  # $1/$2 are expanded by the inner sh
  sync  # flush earlier runs' writes so write-back does not land inside this timed run
  warm "$SERVED_FILE"
  "${MEASURE[@]}" time --record "$rec" --label curl_download --run "$i" --log "$LOG" -- \
    sh -c 'curl -fsS -o "$1" "$2"' sh "$DL/curl.img" "$SERVER_URL/targets/$SERVED_PATH"
  echo "  openssl $round" >&2
  sync  # flush earlier runs' writes so write-back does not land inside this timed run
  warm "$IMAGE"
  "${MEASURE[@]}" time --record "$rec" --label openssl_sha256 --run "$i" --log "$LOG" -- \
    openssl dgst -sha256 "$IMAGE"
  echo "  dd $round (the disk limit: the same bytes written to the download disk, direct and fsynced)" >&2
  sync
  warm "$IMAGE"
  "${MEASURE[@]}" time --record "$rec" --label dd_direct --run "$i" --log "$LOG" -- \
    dd if="$IMAGE" of="$WORK/dd-limit.img" bs=4M oflag=direct conv=fsync status=none
  rm -f "$WORK/dd-limit.img"
done
rm -rf "$DL"
fleet_stop_server
fi


# ===================================================================== (b) 10k-target refresh
if [[ "$PARTS" == *" b "* ]]; then
fleet_log "(b) repository with $N_TARGETS targets (python-tuf Metadata API)"
BIG="$WORK/repo-$N_TARGETS"
"$PY" bench/make_repo.py --out "$BIG" --targets "$N_TARGETS" >>"$LOG"
TARGETS_JSON_BYTES="$(stat -c %s "$BIG/metadata/1.targets.json")"
ROOT_FILE="$BIG/metadata/1.root.json"
HPORT="$(fleet_free_port)"
HURL="http://127.0.0.1:$HPORT"
python3 -m http.server --bind 127.0.0.1 --directory "$BIG" "$HPORT" >"$WORK/http.log" 2>&1 &
HTTPD_PID=$!
for ((t = 0; t < 100; t++)); do
  curl -fsS -o /dev/null "$HURL/metadata/timestamp.json" 2>/dev/null && break
  kill -0 "$HTTPD_PID" 2>/dev/null || fleet_die "python3 -m http.server exited (log: $WORK/http.log)"
  sleep 0.1
done

agent_refresh() { # record label run
  local md="$WORK/agent-b-metadata"
  rm -rf "$md"
  "${MEASURE[@]}" time --record "$1" --label agent_init_refresh --run "$2" --log "$LOG" -- \
    "$OUTPOST_BIN/outpost-agent" tuf-client --metadata-dir "$md" init "$ROOT_FILE"
  "${MEASURE[@]}" time --record "$1" --label agent_init_refresh --run "$2" --log "$LOG" -- \
    "$OUTPOST_BIN/outpost-agent" tuf-client --metadata-dir "$md" --metadata-url "$HURL/metadata" refresh
}
python_refresh() { # record run [inprocess-record]
  local md="$WORK/python-b-metadata"
  rm -rf "$md"
  "${MEASURE[@]}" time --record "$1" --label python_tuf_refresh --run "$2" --log "$LOG" -- \
    "$PY" bench/py_refresh.py --metadata-dir "$md" --metadata-url "$HURL/metadata/" --root "$ROOT_FILE" \
    --record "$3" --run "$2"
}

echo "  warm-up (not recorded)" >&2
agent_refresh "$WARMUP" 0
python_refresh "$WARMUP" 0 "$WARMUP"
for ((i = 1; i <= REFRESH_RUNS; i++)); do
  echo "  refresh run $i/$REFRESH_RUNS" >&2
  agent_refresh "$RECORD" "$i"
  python_refresh "$RECORD" "$i" "$RECORD"
done
kill "$HTTPD_PID" 2>/dev/null || true
wait "$HTTPD_PID" 2>/dev/null || true
HTTPD_PID=""
fi

# ===================================================================== report
fleet_log "report"
CPU="$(lscpu 2>/dev/null | awk -F: '/^Model name/ {sub(/^[ \t]+/, "", $2); print $2; exit}')"
[[ -n "$CPU" ]] || CPU="$(awk -F: '/^model name/ {sub(/^[ \t]+/, "", $2); print $2; exit}' /proc/cpuinfo)"
MEM="$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
OS="$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-}")"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo 'none yet')"
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null | head -1)" ]]; then COMMIT="$COMMIT (with uncommitted changes)"; fi
"${MEASURE[@]}" report --record "$RECORD" --out "$OUT" \
  --fact "date=$(date -u '+%Y-%m-%d %H:%M UTC')" \
  --fact "cpu=${CPU:-unknown}" \
  --fact "nproc=$(nproc)" \
  --fact "mem=$MEM" \
  --fact "kernel=$(uname -sr)" \
  --fact "os=$OS" \
  --fact "rustc=$(rustc --version 2>/dev/null || echo unknown)" \
  --fact "openssl=$(openssl version)" \
  --fact "python_tuf=$("$PY" -c 'import tuf; print(tuf.__version__)')" \
  --fact "commit=$COMMIT" \
  --fact "binaries=${OUTPOST_BIN#"$REPO_ROOT"/} (built $(date -u -r "$OUTPOST_BIN/outpost-agent" '+%Y-%m-%d %H:%M UTC'))" \
  --fact "image_bytes=$IMAGE_BYTES" \
  --fact "targets_count=$N_TARGETS" \
  --fact "targets_json_bytes=$TARGETS_JSON_BYTES"
echo "bench: written to ${OUT#"$REPO_ROOT"/}" >&2
