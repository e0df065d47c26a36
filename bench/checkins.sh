#!/usr/bin/env bash
# Check-in load benchmark and the rollout scenario (issue 5), with the fleet simulator.
#
#   bash bench/checkins.sh
#
# 1. Builds the release binaries (unless OUTPOST_SKIP_BUILD=1).
# 2. Starts outpost-server (SQLite) on loopback and publishes releases 1.0.0 and 2.0.0.
# 3. Enrolls BENCH_CHECKIN_DEVICES (10,000) SIMULATED devices (software keys in place of
#    a TPM; everything else is the real enrollment and check-in protocol) running 1.0.0.
# 4. Load: attested check-ins (nonce + quote + verdict + director assignment) as fast as
#    BENCH_CHECKIN_CONCURRENCY (32) clients go, for BENCH_CHECKIN_SECS (20) seconds; then
#    at a fixed 1,100/s (what 1 M devices at a 15-minute interval need) for the same time.
# 5. Scenario: a rollout of 2.0.0 (waves 1/10/50/100 %, failure threshold 10 %, min 5
#    devices) that fails on 30 % of devices: check-ins until every device checked in
#    three times; the rollout must pause in wave 0 and no device outside it be assigned
#    (the 1 % wave needs enough devices to see failures: use at least 2,000).
# 6. With BENCH_CHECKIN_LARGE=1 (default), enrolls more devices up to 100,000 and runs
#    the load step again.
# 7. Writes a section between <!-- checkins:begin --> and <!-- checkins:end --> in
#    docs/benchmarks.md (the rest of the file is kept).
#
# The machine has 2 cores: the simulator and the server share them, so the figures are
# a floor for a server with its own cores.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
trap 'echo "checkins.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

OUTPOST_BIN="$REPO_ROOT/target/release"
# shellcheck source=scripts/lib/fleet.sh
source "$REPO_ROOT/scripts/lib/fleet.sh"
trap 'fleet_stop_server' EXIT

N="${BENCH_CHECKIN_DEVICES:-10000}"
LARGE="${BENCH_CHECKIN_LARGE:-1}"
LARGE_N="${BENCH_CHECKIN_LARGE_DEVICES:-100000}"
C="${BENCH_CHECKIN_CONCURRENCY:-32}"
SECS="${BENCH_CHECKIN_SECS:-20}"
OUT="${BENCH_OUT:-$REPO_ROOT/docs/benchmarks.md}"
WORK="$REPO_ROOT/target/bench-checkins"
SIM="$OUTPOST_BIN/outpost-fleet-sim"

if [[ "${OUTPOST_SKIP_BUILD:-0}" != 1 ]]; then
  fleet_log "building release binaries"
  cargo build --release --bins
fi
fleet_require_bins
[[ -x "$SIM" ]] || fleet_die "$SIM missing: cargo build --release --bins"
command -v jq >/dev/null || fleet_die "jq not found: run 'bash scripts/setup.sh'"

rm -rf "$WORK"
mkdir -p "$WORK"
fleet_log "repository, server, releases 1.0.0 and 2.0.0"
fleet_bench_server "$WORK"
for v in 1.0.0 2.0.0; do
  head -c $((1 << 16)) /dev/urandom >"$WORK/fw-$v.img"
  "$OUTPOST_BIN/outpost" release publish --repo "$WORK/repo" --firmware "$WORK/fw-$v.img" --hardware-class rpi4 \
    --version "$v" --key "$WORK/keys/firmware.key" --server "$SERVER_URL" >/dev/null
done
V1_SHA="$(sha256sum "$WORK/fw-1.0.0.img" | awk '{print $1}')"

enroll() { # COUNT [--append]
  local t0; t0="$(date +%s.%N)"
  "$SIM" enroll --server "$SERVER_URL" --token "$OPERATOR" --devices "$1" --hardware-class rpi4 \
    --image-sha256 "$V1_SHA" --version 1.0.0 --state "$WORK/fleet.json" --concurrency 8 "${@:2}"
  python3 -c "import sys,time; print(f'{int(sys.argv[1]) / (time.time() - float(sys.argv[2])):.0f}')" "$1" "$t0"
}
load() { # TAG
  "$SIM" run --state "$WORK/fleet.json" --duration "${SECS}s" --concurrency "$C" --json >"$WORK/$1-max.json"
  "$SIM" run --state "$WORK/fleet.json" --duration "${SECS}s" --concurrency "$C" --rate 1100 --json >"$WORK/$1-1100.json"
  jq -c '{devices, checkins_per_s, latency_ms, errors, failed_verdicts}' "$WORK/$1-max.json" "$WORK/$1-1100.json" >&2
}

fleet_log "enrolling $N simulated devices"
ENROLL_RATE="$(enroll "$N")"
DB_BYTES_SMALL="$(du -sb "$WORK/server-data" | awk '{print $1}')"
fleet_log "load with $N devices: as fast as $C clients go, then 1,100/s"
load small

fleet_log "scenario: 2.0.0 fails on 30 % of devices; waves 1/10/50/100 %, failure threshold 10 %"
RID="$("$OUTPOST_BIN/outpost" rollout create --version 2.0.0 --hardware-class rpi4 --waves 1,10,50,100 \
  --failure-threshold 0.1 --success-threshold 0.9 --min-devices 5 --soak 1h --start --json \
  --server "$SERVER_URL" --token "$OPERATOR" | jq -r .id)"
"$SIM" run --state "$WORK/fleet.json" --duration 600s --concurrency "$C" --max-checkins $((3 * N)) \
  --fail 2.0.0=0.3 --json >"$WORK/scenario.json"
"$OUTPOST_BIN/outpost" rollout status "$RID" --devices --json --server "$SERVER_URL" --token "$OPERATOR" >"$WORK/scenario-status.json"
"$OUTPOST_BIN/outpost" rollout status "$RID" --server "$SERVER_URL" --token "$OPERATOR" >&2
[[ "$(jq -r .state_name "$WORK/scenario-status.json")" == paused ]] || fleet_die "the rollout did not pause"
[[ "$(jq -r .state.wave "$WORK/scenario-status.json")" == 0 ]] || fleet_die "the rollout paused outside wave 0"
[[ "$(jq '[.devices[] | select(.wave != 0)] | length' "$WORK/scenario-status.json")" == 0 ]] \
  || fleet_die "a device outside wave 0 was assigned the failing release"

LARGE_RATE=""
if [[ "$LARGE" == 1 ]]; then
  fleet_log "enrolling $((LARGE_N - N)) more simulated devices (to $LARGE_N)"
  LARGE_RATE="$(enroll $((LARGE_N - N)) --append)"
  fleet_log "load with $LARGE_N devices"
  load large
fi

python3 - "$WORK" "$OUT" "$N" "$LARGE_N" "$LARGE" "$C" "$SECS" "$ENROLL_RATE" "$LARGE_RATE" "$DB_BYTES_SMALL" <<'PY'
import json, os, subprocess, sys, time
work, out, n, large_n, large, c, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6]), sys.argv[7]
enroll_rate, large_rate, db_small = sys.argv[8], sys.argv[9], int(sys.argv[10])
def sh(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
def j(name):
    return json.load(open(os.path.join(work, name)))
commit = sh("git rev-parse --short HEAD") + (" (with uncommitted changes)" if sh("git status --porcelain --untracked-files=no") else "")
rows = []
for tag, devices in [("small", n)] + ([("large", large_n)] if large else []):
    for mode, label in [("max", f"as fast as {c} clients go"), ("1100", "offered 1,100/s")]:
        r = j(f"{tag}-{mode}.json")
        rows.append(f"| {devices:,} | SQLite | {label} | **{r['checkins_per_s']:,.0f}/s** | {r['latency_ms']['p50']:.1f} ms | {r['latency_ms']['p99']:.1f} ms "
                    f"| {r['checkins_per_s'] / 1100:.2f} | {r['checkins_per_s'] / 5000:.2f} | {r['errors']} errors, {r['failed_verdicts']} failed verdicts |")
sc, st = j("scenario.json"), j("scenario-status.json")
w0 = st["waves"][0]
lines = [
    "<!-- checkins:begin -->",
    "## Check-ins under load and the rollout scenario (issue 5)",
    "",
    f"Generated by `bash bench/checkins.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; one run on one machine "
    f"({os.cpu_count()} cores shared by the server and the simulator; outpost commit {commit}). "
    "SIMULATED devices (software keys in place of a TPM; every message is the real protocol, verified by the server as a TPM's would be): "
    "each check-in is a nonce request and a quoted report; the server verifies the quote, replays the event log, checks expected "
    "measurements, records the verdict, runs the rollout engine and signs the device's director targets. Latency is the device's "
    "view of both requests. Ratios are against what 1 M devices at a 15-minute interval need (1,100/s) and against the issue's goal (5,000/s).",
    "",
    "| registered devices | store | load | check-ins | p50 | p99 | vs 1,100/s | vs 5,000/s goal | notes |",
    "|---|---|---|---|---|---|---|---|---|",
    *rows,
    "",
    f"Enrollment through the API (one-time token, credential activation): {enroll_rate} devices/s"
    + (f" for the first {n:,}, {large_rate}/s up to {large_n:,}" if large else "") + f". Database after {n:,} enrollments: {db_small / 1e6:.1f} MB.",
    "",
    f"Scenario: {n:,} simulated devices, release 2.0.0 failing on 30 % of them, waves 1/10/50/100 %, failure threshold 10 %: "
    f"after {sc['checkins']:,} check-ins the rollout is **{st['state_name']} in wave {st['state'].get('wave')}** "
    f"({w0['rolled_back']} of {w0['assigned']} assigned devices failed); {len(st['devices'])} devices were ever assigned, "
    f"{sum(1 for d in st['devices'] if d['wave'] != 0)} of them outside wave 0.",
    "",
    "Not measured yet: PostgreSQL (the backend is not built).",
    "<!-- checkins:end -->",
]
section = "\n".join(lines) + "\n"
text = open(out).read() if os.path.exists(out) else "# Benchmarks\n"
begin, end = "<!-- checkins:begin -->", "<!-- checkins:end -->"
if begin in text and end in text:
    text = text[: text.index(begin)] + section.rstrip("\n") + text[text.index(end) + len(end):]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(out, "w").write(text)
print(section)
PY
