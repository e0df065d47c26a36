#!/usr/bin/env bash
# Check-in load benchmark and the rollout scenario (issue 5), with the fleet simulator.
#
#   bash bench/checkins.sh
#
# 1. Builds the release binaries (unless OUTPOST_SKIP_BUILD=1).
# For each store in BENCH_CHECKIN_BACKENDS ("sqlite postgres"; PostgreSQL is a
# throwaway server started with scripts/postgres.sh, durable defaults):
# 2. Starts outpost-server on that store on loopback and publishes 1.0.0 and 2.0.0.
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
# Then writes a section between <!-- checkins:begin --> and <!-- checkins:end --> in
# docs/benchmarks.md (the rest of the file is kept).
# OUTPOST_BIN (binaries [target/release]) and BENCH_DIR (scratch [target/bench-checkins],
# wiped first) let bench/compare.sh run it against two builds.
#
# The machine has 2 cores: the simulator and the server share them, so the figures are
# a floor for a server with its own cores.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
trap 'echo "checkins.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

OUTPOST_BIN="${OUTPOST_BIN:-$REPO_ROOT/target/release}"
# shellcheck source=scripts/lib/fleet.sh
source "$REPO_ROOT/scripts/lib/fleet.sh"

N="${BENCH_CHECKIN_DEVICES:-10000}"
LARGE="${BENCH_CHECKIN_LARGE:-1}"
LARGE_N="${BENCH_CHECKIN_LARGE_DEVICES:-100000}"
C="${BENCH_CHECKIN_CONCURRENCY:-32}"
SECS="${BENCH_CHECKIN_SECS:-20}"
OUT="${BENCH_OUT:-$REPO_ROOT/docs/benchmarks.md}"
WORK="${BENCH_DIR:-$REPO_ROOT/target/bench-checkins}"
SIM="${BENCH_SIM:-$OUTPOST_BIN/outpost-fleet-sim}"
# Simulated devices carry no EK certificate: their server opts in explicitly.
export FLEET_EK_TRUST=uncertified

if [[ "${OUTPOST_SKIP_BUILD:-0}" != 1 ]]; then
  fleet_log "building release binaries"
  cargo build --release --bins
fi
fleet_require_bins
[[ -x "$SIM" ]] || fleet_die "$SIM missing: cargo build --release --bins"
command -v jq >/dev/null || fleet_die "jq not found: run 'bash scripts/setup.sh'"

rm -rf "$WORK"
mkdir -p "$WORK"
BACKENDS="${BENCH_CHECKIN_BACKENDS:-sqlite postgres}"
PG_DIR="$WORK/postgres-cluster"
cleanup() {
  fleet_stop_server
  [[ -d "$PG_DIR" ]] && bash "$REPO_ROOT/scripts/postgres.sh" stop "$PG_DIR"
  return 0
}
trap cleanup EXIT

enroll() { # DIR COUNT [--append]
  local t0; t0="$(date +%s.%N)"
  "$SIM" enroll --server "$SERVER_URL" --token "$OPERATOR" --devices "$2" --hardware-class rpi4 \
    --image-sha256 "$V1_SHA" --version 1.0.0 --state "$1/fleet.json" --concurrency 8 "${@:3}"
  python3 -c "import sys,time; print(f'{int(sys.argv[1]) / (time.time() - float(sys.argv[2])):.0f}')" "$2" "$t0"
}
cpu_ticks() { # print "PID TICKS" (user + system clock ticks) for the server and this run's PostgreSQL cluster
  local p db=""
  if [[ -n "${FLEET_POSTGRES_URL:-}" && -r "$PG_DIR/data/postmaster.pid" ]]; then
    local postmaster
    postmaster="$(head -n1 "$PG_DIR/data/postmaster.pid")"
    db="$postmaster $(ps -o pid= --ppid "$postmaster")"
  fi
  for p in $FLEET_SERVER_PID $db; do
    [[ -r /proc/$p/stat ]] && awk -v p="$p" '{ sub(/^.*\) /, ""); print p, $12 + $13 }' "/proc/$p/stat"
  done
  return 0
}
load() { # DIR TAG; also the CPU seconds the server, the database server and the simulator used
  local mode
  for mode in max 1100; do
    local rate=0
    [[ "$mode" == 1100 ]] && rate=1100
    cpu_ticks >"$1/$2-$mode.cpu0"
    /usr/bin/time -f '%U %S' -o "$1/$2-$mode.simcpu" \
      "$SIM" run --state "$1/fleet.json" --duration "${SECS}s" --concurrency "$C" --rate "$rate" --json >"$1/$2-$mode.json"
    cpu_ticks >"$1/$2-$mode.cpu1"
  done
  echo "$FLEET_SERVER_PID" >"$1/server.pid"
  jq -c '{devices, checkins_per_s, latency_ms, errors, failed_verdicts}' "$1/$2-max.json" "$1/$2-1100.json" >&2
}

bench_backend() { # BACKEND: one server on that store, the whole sequence
  local backend="$1" dir="$WORK/$1"
  mkdir -p "$dir"
  if [[ "$backend" == postgres ]]; then
    local base
    base="$(bash "$REPO_ROOT/scripts/postgres.sh" start "$PG_DIR" "${BENCH_POSTGRES_PORT:-55439}")"
    psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS outpost_bench" -c "CREATE DATABASE outpost_bench"
    export FLEET_POSTGRES_URL="$base/outpost_bench"
  else
    unset FLEET_POSTGRES_URL
  fi
  fleet_log "[$backend] repository, server, releases 1.0.0 and 2.0.0"
  fleet_bench_server "$dir"
  for v in 1.0.0 2.0.0; do
    head -c $((1 << 16)) /dev/urandom >"$dir/fw-$v.img"
    "$OUTPOST_BIN/outpost" release publish --repo "$dir/repo" --firmware "$dir/fw-$v.img" --hardware-class rpi4 \
      --version "$v" --key "$dir/keys/firmware.key" --server "$SERVER_URL" >/dev/null
  done
  V1_SHA="$(sha256sum "$dir/fw-1.0.0.img" | awk '{print $1}')"

  fleet_log "[$backend] enrolling $N simulated devices"
  enroll "$dir" "$N" >"$dir/enroll-rate"
  if [[ "$backend" == postgres ]]; then
    psql -qtA "$FLEET_POSTGRES_URL" -c "SELECT pg_database_size(current_database())" >"$dir/db-bytes"
  else
    du -sb "$dir/server-data" | awk '{print $1}' >"$dir/db-bytes"
  fi
  fleet_log "[$backend] load with $N devices: as fast as $C clients go, then 1,100/s"
  load "$dir" small

  fleet_log "[$backend] scenario: 2.0.0 fails on 30 % of devices; waves 1/10/50/100 %, failure threshold 10 %"
  local rid
  rid="$("$OUTPOST_BIN/outpost" rollout create --version 2.0.0 --hardware-class rpi4 --waves 1,10,50,100 \
    --failure-threshold 0.1 --success-threshold 0.9 --min-devices 5 --soak 1h --start --json \
    --server "$SERVER_URL" --token "$OPERATOR" | jq -r .id)"
  "$SIM" run --state "$dir/fleet.json" --duration 600s --concurrency "$C" --max-checkins $((3 * N)) \
    --fail 2.0.0=0.3 --json >"$dir/scenario.json"
  "$OUTPOST_BIN/outpost" rollout status "$rid" --devices --json --server "$SERVER_URL" --token "$OPERATOR" >"$dir/scenario-status.json"
  "$OUTPOST_BIN/outpost" rollout status "$rid" --server "$SERVER_URL" --token "$OPERATOR" >&2
  [[ "$(jq -r .state_name "$dir/scenario-status.json")" == paused ]] || fleet_die "[$backend] the rollout did not pause"
  [[ "$(jq -r .state.wave "$dir/scenario-status.json")" == 0 ]] || fleet_die "[$backend] the rollout paused outside wave 0"
  [[ "$(jq '[.devices[] | select(.wave != 0)] | length' "$dir/scenario-status.json")" == 0 ]] \
    || fleet_die "[$backend] a device outside wave 0 was assigned the failing release"

  if [[ "$LARGE" == 1 ]]; then
    fleet_log "[$backend] enrolling $((LARGE_N - N)) more simulated devices (to $LARGE_N)"
    enroll "$dir" $((LARGE_N - N)) --append >"$dir/large-enroll-rate"
    fleet_log "[$backend] load with $LARGE_N devices"
    load "$dir" large
  fi
  fleet_stop_server
}

for backend in $BACKENDS; do
  case "$backend" in
    sqlite | postgres) bench_backend "$backend" ;;
    *) fleet_die "BENCH_CHECKIN_BACKENDS: unknown backend $backend (sqlite, postgres)" ;;
  esac
done

python3 - "$WORK" "$OUT" "$N" "$LARGE_N" "$LARGE" "$C" "$SECS" "$BACKENDS" <<'PY'
import json, os, subprocess, sys, time
work, out, n, large_n, large, c, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6]), sys.argv[7]
backends = sys.argv[8].split()
names = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
def sh(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
def j(backend, name):
    return json.load(open(os.path.join(work, backend, name)))
def text(backend, name):
    return open(os.path.join(work, backend, name)).read().strip()
TICK = os.sysconf("SC_CLK_TCK")
def ticks(path):
    return {int(p): int(t) for p, t in (line.split() for line in open(path) if line.strip())}
def cpu(backend, stem):
    """CPU seconds during one load run: the server, the database server's processes,
    and the simulator."""
    before, after = ticks(os.path.join(work, backend, stem + ".cpu0")), ticks(os.path.join(work, backend, stem + ".cpu1"))
    server = int(text(backend, "server.pid"))
    server_s = (after.get(server, 0) - before.get(server, 0)) / TICK
    db_s = sum(t - before.get(p, 0) for p, t in after.items() if p != server) / TICK
    user, system = text(backend, stem + ".simcpu").split()[-2:]
    return server_s, db_s, float(user) + float(system)
commit = sh("git rev-parse --short HEAD") + (" (with uncommitted changes)" if sh("git status --porcelain --untracked-files=no") else "")
rows, notes, capacity = [], [], []
for b in backends:
    for tag, devices in [("small", n)] + ([("large", large_n)] if large else []):
        for mode, label in [("max", f"as fast as {c} clients go"), ("1100", "offered 1,100/s")]:
            r = j(b, f"{tag}-{mode}.json")
            server_s, db_s, sim_s = cpu(b, f"{tag}-{mode}")
            per = lambda s: f"{s / r['checkins'] * 1e6:,.0f} µs" if s is not None else "–"
            rows.append(f"| {devices:,} | {names[b]} | {label} | **{r['checkins_per_s']:,.0f}/s** | {r['latency_ms']['p50']:.1f} ms | {r['latency_ms']['p99']:.1f} ms "
                        f"| {r['checkins_per_s'] / 1100:.2f} | {r['checkins_per_s'] / 5000:.2f} | {per(server_s)} | {per(db_s) if b == 'postgres' else '–'} | {per(sim_s)} "
                        f"| {r['errors']} errors, {r['failed_verdicts']} failed verdicts |")
            if mode == "max":
                server_plus_db = server_s + (db_s if b == "postgres" else 0)
                capacity.append(f"{names[b]}, {devices:,} devices: {r['checkins'] / server_plus_db:,.0f} check-ins per CPU-second of server"
                                + (" and database" if b == "postgres" else ""))
    sc, st = j(b, "scenario.json"), j(b, "scenario-status.json")
    w0 = st["waves"][0]
    notes.append(
        f"- **{names[b]}**: enrollment through the API (one-time token, credential activation) {text(b, 'enroll-rate')} devices/s"
        + (f" for the first {n:,}, {text(b, 'large-enroll-rate')}/s up to {large_n:,}" if large else "")
        + f"; database after {n:,} enrollments {int(text(b, 'db-bytes')) / 1e6:.1f} MB. "
        f"Scenario ({n:,} devices, 2.0.0 failing on 30 %, waves 1/10/50/100 %, failure threshold 10 %): after {sc['checkins']:,} check-ins "
        f"the rollout is **{st['state_name']} in wave {st['state'].get('wave')}** ({w0['rolled_back']} of {w0['assigned']} assigned devices failed); "
        f"{len(st['devices'])} devices were ever assigned, {sum(1 for d in st['devices'] if d['wave'] != 0)} of them outside wave 0.")
lines = [
    "<!-- checkins:begin -->",
    "## Check-ins under load and the rollout scenario (issue 5)",
    "",
    f"Generated by `bash bench/checkins.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; one run on one machine "
    f"({os.cpu_count()} cores shared by the server, the simulator and, for PostgreSQL, the database server; outpost commit {commit}). "
    "SIMULATED devices (software keys in place of a TPM; every message is the real protocol, verified by the server as a TPM's would be): "
    "each check-in is a nonce request and a quoted report; the server verifies the quote, replays the event log, checks expected "
    "measurements, records the verdict, runs the rollout engine and signs the device's director targets. Latency is the device's "
    "view of both requests. Ratios are against what 1 M devices at a 15-minute interval need (1,100/s) and against the issue's goal (5,000/s). "
    "Both stores commit durably (SQLite WAL with `synchronous = FULL`; PostgreSQL's defaults, `fsync` and `synchronous_commit` on, "
    "over loopback TCP from a pool of 16 connections).",
    "",
    "| registered devices | store | load | check-ins | p50 | p99 | vs 1,100/s | vs 5,000/s goal | server CPU per check-in | database server CPU per check-in | simulator CPU per check-in | notes |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
    *rows,
    "",
    "CPU per check-in is CPU time (user + system, from /proc and GNU time) over the run divided by the check-ins it completed; "
    "the three together are what one check-in costs this machine. Capacity of a dedicated core, at full load: "
    + "; ".join(capacity) + ".",
    "",
    *notes,
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
