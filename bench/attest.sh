#!/usr/bin/env bash
# Attestation benchmark (issue 4): how many check-ins one server core verifies, and the
# end-to-end check-in latency of a device with a software TPM.
#
#   bash bench/attest.sh
#
# 1. Builds the release binaries and the attest_bench example (unless OUTPOST_SKIP_BUILD=1).
# 2. Starts outpost-server (SQLite) on loopback, publishes a signed release, starts one
#    swtpm, enrolls a device with a one-time token (credential activation) and boots it
#    once (`outpost-agent run --once`: slot measured into PCR 23, attested check-in).
# 3. Runs update-agent/examples/attest_bench.rs: N sequential check-ins timed end to end
#    (nonce, TPM quote, POST, verdict); K check-ins prepared in batches of 16 and posted
#    back to back while the server's CPU time is read from /proc; the server's pure verification work in one
#    thread for S seconds.
# 4. Baseline in the same run: `openssl speed ecdsap256` verifications per second on one
#    core (a check-in's verification is one ECDSA P-256 verify plus parsing and hashing).
# 5. Writes a section between <!-- attest:begin --> and <!-- attest:end --> in
#    docs/benchmarks.md (the rest of the file is kept).
#
# Environment: BENCH_ATTEST_LATENCY [200], BENCH_ATTEST_BATCH [400],
# BENCH_ATTEST_VERIFY_SECS [5], BENCH_OUT [docs/benchmarks.md], OUTPOST_SKIP_BUILD=1.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
trap 'echo "attest.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

OUTPOST_BIN="$REPO_ROOT/target/release"
# shellcheck source=scripts/lib/fleet.sh
source "$REPO_ROOT/scripts/lib/fleet.sh"
trap 'fleet_stop_server; fleet_stop_swtpms' EXIT

N="${BENCH_ATTEST_LATENCY:-200}"
K="${BENCH_ATTEST_BATCH:-400}"
S="${BENCH_ATTEST_VERIFY_SECS:-5}"
OUT="${BENCH_OUT:-$REPO_ROOT/docs/benchmarks.md}"
WORK="$REPO_ROOT/target/bench-attest"

if [[ "${OUTPOST_SKIP_BUILD:-0}" != 1 ]]; then
  fleet_log "building release binaries and the attest_bench example"
  cargo build --release --bins --examples
fi
fleet_require_bins
[[ -x "$OUTPOST_BIN/examples/attest_bench" ]] || fleet_die "target/release/examples/attest_bench missing: cargo build --release --examples"
for tool in swtpm swtpm_setup openssl jq python3; do
  command -v "$tool" >/dev/null || fleet_die "$tool not found: run 'bash scripts/setup.sh'"
done

rm -rf "$WORK"
mkdir -p "$WORK"
fleet_log "repository, server, release"
fleet_bench_server "$WORK"
head -c $((1 << 20)) /dev/urandom >"$WORK/fw.img"
"$OUTPOST_BIN/outpost" release publish --repo "$WORK/repo" --firmware "$WORK/fw.img" --hardware-class rpi4 \
  --version 1.0.0 --key "$WORK/keys/firmware.key" --server "$SERVER_URL" >/dev/null

fleet_log "device: swtpm, enrollment, first boot"
DEV="$WORK/device"
mkdir -p "$DEV/state/boot"
cp "$WORK/fw.img" "$DEV/state/boot/slot-a.img"
TPM_PORT="$(fleet_free_port_pair)"
fleet_start_swtpm "$DEV/tpm" "$TPM_PORT"
printf '%s\n' "server_url = \"$SERVER_URL\"" 'hardware_class = "rpi4"' 'state_dir = "state"' \
  "trusted_root = \"$WORK/repo/metadata/1.root.json\"" '[tpm]' \
  "tcti = \"swtpm:host=127.0.0.1,port=$TPM_PORT\"" 'pcr = 23' >"$DEV/agent.toml"
TOKEN="$("$OUTPOST_BIN/outpost" device token create --hardware-class rpi4 --server "$SERVER_URL" --token "$OPERATOR" --json | jq -r .token)"
"$OUTPOST_BIN/outpost-agent" --config "$DEV/agent.toml" --json enroll --token "$TOKEN" >/dev/null
"$OUTPOST_BIN/outpost-agent" --config "$DEV/agent.toml" --json run --once >"$DEV/first-run.json"
jq -se 'map(select(.verdict == "attested")) | length == 1' "$DEV/first-run.json" >/dev/null \
  || fleet_die "the device's first check-in was not attested: $(cat "$DEV/first-run.json")"

fleet_log "baseline: openssl speed ecdsap256 (one core)"
openssl speed -seconds 3 ecdsap256 >"$WORK/openssl-speed.txt" 2>/dev/null
OPENSSL_VERIFY="$(awk '/nistp256/ { v = $NF } END { print v }' "$WORK/openssl-speed.txt")"
[[ -n "$OPENSSL_VERIFY" ]] || fleet_die "could not read openssl speed's verify/s"

fleet_log "attest_bench: $N timed check-ins, $K prepared check-ins, ${S}s of verification"
"$OUTPOST_BIN/examples/attest_bench" "$DEV/agent.toml" "$FLEET_SERVER_PID" "$N" "$K" "$S" >"$WORK/result.json"
cat "$WORK/result.json" | jq '{latency_p50_ms, latency_p99_ms, verdicts, batch, verify}' >&2

python3 - "$WORK/result.json" "$OPENSSL_VERIFY" "$OUT" "$N" "$K" "$S" <<'PY'
import json, os, platform, statistics, subprocess, sys, time
res = json.load(open(sys.argv[1]))
openssl = float(sys.argv[2])
out, n, k, s = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
commit = sh("git rev-parse --short HEAD") + (" (with uncommitted changes)" if sh("git status --porcelain --untracked-files=no") else "")
lat = res["latency_ms"]
verify = res["verify"]["per_s"]
server = res["batch"]["per_server_cpu_s"]
interval = 15 * 60
wall_rate = k / res["batch"]["post_wall_s"]
lines = [
    "<!-- attest:begin -->",
    "## Attestation: check-in verification and latency (issue 4)",
    "",
    f"Generated by `bash bench/attest.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; one run on one machine "
    f"({os.cpu_count()} cores; outpost commit {commit}; {sh('swtpm --version | head -1')}; {sh('openssl version')}). "
    "One enrolled device with its own swtpm on loopback; the server on SQLite.",
    "",
    "| measurement | outpost | baseline (same run) | ratio |",
    "|---|---|---|---|",
    f"| server-side verification of one check-in, one thread, no I/O (parse AK, verify the quote's ECDSA P-256 signature and its binding to the report, parse the report, replay the event log, look up expected measurements) | **{verify:,.0f} check-ins/s** ({res['verify']['iterations']:,} in {res['verify']['seconds']:.1f} s) | `openssl speed ecdsap256`: {openssl:,.0f} verify/s | {verify / openssl:.2f} of raw ECDSA verify speed |",
    f"| whole check-in handled by `outpost-server` over HTTP (the above plus JSON, SQLite: nonce use-once, verdict, history; nonce requests included; {k} check-ins prepared in batches of 16, each batch then posted back to back) | **{server:,.0f} check-ins per server CPU-second** ({res['batch']['nonce_cpu_s']:.2f} s CPU issuing nonces + {res['batch']['server_cpu_s']:.2f} s CPU judging; posting took {res['batch']['post_wall_s']:.2f} s wall) | raw ECDSA verify | {server / openssl:.2f} |",
    f"| end-to-end check-in latency, device side (nonce request, TPM2_Quote in swtpm incl. loading the AK under the EK, POST, verdict), {n} sequential | p50 **{res['latency_p50_ms']:.1f} ms**, p99 **{res['latency_p99_ms']:.1f} ms** (min {min(lat):.1f}, max {max(lat):.1f}) | | |",
    "",
    f"At a 15-minute check-in interval one server core's CPU suffices for **{server * interval:,.0f} devices** ({server:,.0f} check-ins per CPU-second × 900 s) with the whole HTTP + SQLite path, "
    f"or {verify * interval:,.0f} counting only the cryptographic verification. One sequential client posted the prepared check-ins at {wall_rate:,.0f}/s of wall time "
    "(without the nonce round trip; each waits for SQLite's durable commit). Issuing a nonce costs the server about as much CPU as judging a check-in "
    "(both are an HTTP request and a durable SQLite write). For scale: Keylime's verifier is reported to struggle at about "
    f"2,500 agents polling every 2 s (1,250 quotes/s); by CPU this server needs {1250 / server:.2f} cores for that load. Verdicts in this run: {res['verdicts']}.",
    "",
    "Method: [bench/README.md](../bench/README.md) (section *Attestation*). The device-side latency is dominated by swtpm's "
    "TPM commands (the agent opens a TPM context, re-derives the EK and loads the AK for every quote); the server's wall time per check-in includes SQLite's durable commits (WAL, synchronous=FULL).",
    "<!-- attest:end -->",
]
section = "\n".join(lines) + "\n"
text = open(out, encoding="utf-8").read() if os.path.exists(out) else ""
b, e = text.find("<!-- attest:begin -->"), text.find("<!-- attest:end -->")
if b != -1 and e != -1:
    text = text[:b] + section + text[e + len("<!-- attest:end -->") + 1:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(out, "w", encoding="utf-8").write(text)
print(section)
PY
echo "attest.sh: section written to $OUT" >&2
