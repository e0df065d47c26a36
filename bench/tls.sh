#!/usr/bin/env bash
# TLS benchmark (issue 19): what TLS, mutual TLS with a TPM-resident device key, and
# session resumption cost against plain HTTP, measured in one run.
#
#   bash bench/tls.sh
#
# 1. Builds the release binaries and the tls_bench example (unless OUTPOST_SKIP_BUILD=1).
# 2. Starts two outpost-server (SQLite) on loopback: one plain_http, one with [tls]
#    (a private CA's certificate for 127.0.0.1) and [device_ca] with
#    require_client_certificate = true. Publishes the same signed release on both.
# 3. For each server one device (its own state directory, AK and enrollment), both on
#    one swtpm so that TPM costs are alike on both sides: enrollment (credential
#    activation), one boot (`outpost-agent run --once`: slot measured into PCR 23,
#    attested check-in; the TLS device gets its client certificate for its
#    TPM-resident key there).
# 4. Runs update-agent/examples/tls_bench.rs: TPM signing through rustls' signer against
#    ring's ECDSA P-256; new connections per second in five modes (plain HTTP, TLS full,
#    TLS resumed, mutual TLS full signed by the TPM, mutual TLS resumed = the agent's own
#    client) with the server's CPU; how many other connections a device's TLS session
#    outlives in the server's session store; sequential attested check-ins on both
#    servers; certificate re-issue by a check-in. TPM commands are counted (and timed)
#    at the TPM's socket.
# 5. Writes a section between <!-- tls:begin --> and <!-- tls:end --> in
#    docs/benchmarks.md (the rest of the file is kept).
#
# Environment: BENCH_TLS_SECS [5] seconds per connection mode and round,
# BENCH_TLS_ROUNDS [3], BENCH_TLS_CHECKINS [150] per server, BENCH_TLS_RENEWALS [10],
# BENCH_TLS_SIGNS [100] TPM signatures, BENCH_OUT [docs/benchmarks.md], OUTPOST_SKIP_BUILD=1.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
trap 'echo "tls.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

OUTPOST_BIN="$REPO_ROOT/target/release"
# shellcheck source=scripts/lib/fleet.sh
source "$REPO_ROOT/scripts/lib/fleet.sh"
PLAIN_PID=""
stop_all() {
  fleet_stop_server
  FLEET_SERVER_PID="$PLAIN_PID"
  fleet_stop_server
  fleet_stop_swtpms
}
trap stop_all EXIT

SECS="${BENCH_TLS_SECS:-5}"
ROUNDS="${BENCH_TLS_ROUNDS:-3}"
CHECKINS="${BENCH_TLS_CHECKINS:-150}"
RENEWALS="${BENCH_TLS_RENEWALS:-10}"
SIGNS="${BENCH_TLS_SIGNS:-100}"
OUT="${BENCH_OUT:-$REPO_ROOT/docs/benchmarks.md}"
WORK="$REPO_ROOT/target/bench-tls"

if [[ "${OUTPOST_SKIP_BUILD:-0}" != 1 ]]; then
  fleet_log "building release binaries and the tls_bench example"
  cargo build --release --bins --examples
fi
fleet_require_bins
[[ -x "$OUTPOST_BIN/examples/tls_bench" ]] || fleet_die "target/release/examples/tls_bench missing: cargo build --release --examples"
for tool in swtpm swtpm_setup openssl jq python3 curl; do
  command -v "$tool" >/dev/null || fleet_die "$tool not found: run 'bash scripts/setup.sh'"
done

start_server() { # DIR: fleet_bench_server in DIR (with $FLEET_PKI: TLS, and device routes
  # that require the device's client certificate), then release 1.0.0 of $WORK/fw.img.
  local dir="$1"
  FLEET_REQUIRE_CLIENT_CERTIFICATE=true fleet_bench_server "$dir"
  "$OUTPOST_BIN/outpost" release publish --repo "$dir/repo" --firmware "$WORK/fw.img" --hardware-class rpi4 \
    --version 1.0.0 --key "$dir/keys/firmware.key" --server "$SERVER_URL" >/dev/null
}

start_device() { # DIR REPO [CA]: agent.toml for $SERVER_URL and the swtpm at $TPM_PORT,
  # enrollment, first boot
  local dev="$1" repo="$2" ca="${3:-}" token
  mkdir -p "$dev/state/boot"
  cp "$WORK/fw.img" "$dev/state/boot/slot-a.img"
  printf '%s\n' "server_url = \"$SERVER_URL\"" 'hardware_class = "rpi4"' 'state_dir = "state"' \
    "trusted_root = \"$repo/metadata/1.root.json\"" '[tpm]' \
    "tcti = \"swtpm:host=127.0.0.1,port=$TPM_PORT\"" 'pcr = 23' >"$dev/agent.toml"
  [[ -z "$ca" ]] || printf '%s\n' '[http]' "ca_certificates = \"$ca\"" >>"$dev/agent.toml"
  token="$("$OUTPOST_BIN/outpost" device token create --hardware-class rpi4 --server "$SERVER_URL" --token "$OPERATOR" --json | jq -r .token)"
  "$OUTPOST_BIN/outpost-agent" --config "$dev/agent.toml" --json enroll --token "$token" >/dev/null
  "$OUTPOST_BIN/outpost-agent" --config "$dev/agent.toml" --json run --once >"$dev/first-run.json"
  jq -se 'map(select(.verdict == "attested")) | length == 1' "$dev/first-run.json" >/dev/null \
    || fleet_die "the device's first check-in was not attested: $(cat "$dev/first-run.json")"
}

rm -rf "$WORK"
mkdir -p "$WORK"
head -c $((1 << 20)) /dev/urandom >"$WORK/fw.img"
TPM_PORT="$(fleet_free_port_pair)"
fleet_start_swtpm "$WORK/tpm" "$TPM_PORT"

fleet_log "plain HTTP server and its device"
FLEET_PKI=""
start_server "$WORK/plain"
PLAIN_PID="$FLEET_SERVER_PID"
PLAIN_URL="$SERVER_URL"
start_device "$WORK/plain/device" "$WORK/plain/repo"
FLEET_SERVER_PID=""

fleet_log "TLS server (device CA, client certificates required) and its device"
FLEET_PKI="$WORK/pki"
fleet_make_pki "$FLEET_PKI"
# The CLI and curl (fleet_wait_healthy) trust the private CA.
export OUTPOST_CA_FILE="$FLEET_PKI/ca.pem" CURL_CA_BUNDLE="$FLEET_PKI/ca.pem"
start_server "$WORK/tls"
TLS_PID="$FLEET_SERVER_PID"
start_device "$WORK/tls/device" "$WORK/tls/repo" "$FLEET_PKI/ca.pem"
[[ -s "$WORK/tls/device/state/client-certificate.json" ]] \
  || fleet_die "the TLS device got no client certificate in its first attested check-in"
fleet_log "servers: $PLAIN_URL (pid $PLAIN_PID), $SERVER_URL (pid $TLS_PID)"

fleet_log "tls_bench: ${SIGNS} TPM signatures, ${ROUNDS}x${SECS}s per connection mode, $CHECKINS check-ins per server, $RENEWALS re-issues"
"$OUTPOST_BIN/examples/tls_bench" "$WORK/plain/device/agent.toml" "$WORK/tls/device/agent.toml" "$PLAIN_PID" "$TLS_PID" \
  "$FLEET_PKI/ca.pem" "$SECS" "$ROUNDS" "$CHECKINS" "$RENEWALS" "$SIGNS" >"$WORK/result.json"
jq '{signing, connections, renewals, checkins: (.checkins | {plain: (.plain | del(.latency_ms)), tls: (.tls | del(.latency_ms))})}' "$WORK/result.json" >&2

python3 - "$WORK/result.json" "$OUT" <<'PY'
import json, os, re, subprocess, sys, time
res, out = json.load(open(sys.argv[1])), sys.argv[2]
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
commit = sh("git rev-parse --short HEAD") + (" (with uncommitted changes)" if sh("git status --porcelain --untracked-files=no") else "")
lock = open("Cargo.lock").read()
rustls = (re.search(r'name = "rustls"\nversion = "([^"]+)"', lock) or [None, "?"])[1]
modes = {m["name"]: m for m in res["connections"]}
plain = modes["plain_http"]
sg, ck, rn = res["signing"], res["checkins"], res["renewals"]
cp, ct = ck["plain"], ck["tls"]
what = {
    "plain_http": "plain HTTP (baseline)",
    "tls_full": "TLS 1.3 full handshake, no client certificate (resumption disabled)",
    "tls_resumed": "TLS 1.3 resumed (client session cache)",
    "mtls_full": "mutual TLS full handshake, CertificateVerify signed by the TPM (resumption disabled)",
    "mtls_resumed": "mutual TLS resumed: the agent's own client (TPM key, session cache)",
}
def ratio(r):
    return f"{r:.2f}" if r >= 0.1 else f"{r:.2g}"
def handshakes(m):
    full = "n/a" if m["full_handshakes"] is None else f"{m['full_handshakes']:,}"
    return f"{full} / {m['tpm_signs']:,}"
rows = [
    f"| {what[name]} | {m['connections']:,} | **{m['per_s']:,.0f}** | {ratio(m['per_s'] / plain['per_s'])} | {m['server_cpu_ms_per_connection']:.3f} | {m['server_cpu_ms_per_connection'] / plain['server_cpu_ms_per_connection']:.2f} | {handshakes(m)} |"
    for name, m in modes.items()
]
extra_ms = 1000 / modes["mtls_full"]["per_s"] - 1000 / modes["tls_full"]["per_s"]
tpm, ring = sg["tpm"], sg["ring"]
by, nsig = sg["relay_counted"]["by_command"], sg["tpm_via_relay"]["count"]
per = lambda name: by.get(name, {}).get("ms", 0) / nsig
others = [k for k in by if k not in ("CreatePrimary", "Load", "Sign")]
other_ms = sum(by[k]["ms"] for k in others) / nsig
cmds = sum(v["count"] for v in by.values()) / nsig
outside = sg["tpm_via_relay"]["mean_ms"] - sum(v["ms"] for v in by.values()) / nsig
tpm_ms = lambda c: sum(v["ms"] for v in c["tpm"]["by_command"].values()) / c["count"]
ev = res["eviction"]
kept = max([e["other_connections"] for e in ev if e["tpm_signs"] == 0], default=0)
lost = min([e["other_connections"] for e in ev if e["tpm_signs"] > 0], default="none of the probes")
probes = ", ".join(f"{e['other_connections']} → {e['tpm_signs']}" for e in ev)
plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")
head = (f"The resumed modes did {plural(modes['tls_resumed']['full_handshakes'], 'full handshake')} (TLS) and "
        f"{plural(modes['mtls_resumed']['tpm_signs'], 'TPM signature')} (mutual TLS) in {res['rounds']} rounds")
if lost == "none of the probes":
    resumption = (head + ": the server issues stateless TLS 1.3 session tickets (and keeps 16,384 sessions for TLS 1.2), so a device's session "
                  f"does not depend on how many others connect. Measured: after up to {kept:,} other clients' connections the agent's next connection still "
                  f"resumed with no TPM signature (probes: {probes}). Before the tickets (rustls' default in-memory store of 256 sessions, two per connection) "
                  "the same probe lost the session after 136 other connections, about 60 other devices' check-ins: at fleet scale every steady-state "
                  "check-in would have paid a full handshake and a TPM signature (this benchmark, 2026-12-06 09:45 UTC, commit 78d0fde). "
                  "The check-in figures below are of one device.")
else:
    resumption = (head + ": when a round came back to them, the other modes' connections in between had pushed their sessions out of the server's "
                  f"session store. Measured: after {kept} other clients' connections the agent's next connection still resumed (no TPM signature), after {lost} "
                  f"it was a full handshake signed by the TPM (probes: {probes}). A check-in is two connections, so a device's session outlives only about "
                  f"{kept // 2} other devices' check-ins. The check-in figures below are of one device.")
verdicts = lambda c: ", ".join(f"{n} of {c['count']} {v}" for v, n in c["verdicts"].items())
lines = [
    "<!-- tls:begin -->",
    "## TLS, mutual TLS with a TPM-resident key, session resumption (issue 19)",
    "",
    f"Generated by `bash bench/tls.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; one run on one machine "
    f"({os.cpu_count()} cores, shared; outpost commit {commit}; rustls {rustls} with ring; {sh('swtpm --version | head -1')}). "
    "Two `outpost-server` on loopback (SQLite): one `plain_http`, one with `[tls]` (ECDSA P-256 certificate from a private CA) and `[device_ca]` "
    "with `require_client_certificate = true`; one enrolled device on each (own state directory, AK and enrollment), both on the same swtpm so that TPM costs are alike. "
    "Every TPM command of the devices passed a relay that counts and times them; the full handshakes and TPM signatures below are counts, "
    "and the run fails when a mode did not do what its name says.",
    "",
    f"**Connections**: each a new TCP connection doing `GET /healthz` from one sequential client; {res['rounds']} rounds of {res['secs']:.0f} s per mode, modes interleaved.",
    "",
    "| mode | connections | connections/s (client wall) | ÷ plain | server CPU-ms per connection | ÷ plain | full handshakes / TPM signatures |",
    "|---|---:|---:|---:|---:|---:|---:|",
    *rows,
    "",
    resumption,
    "",
    f"**TPM signing cost per handshake** ({tpm['count']} signatures of a CertificateVerify-sized message through rustls' `SigningKey`/`Signer`, the path handshakes take; "
    f"each verified): the device's TPM key in swtpm p50 **{tpm['p50_ms']:.1f} ms** (p99 {tpm['p99_ms']:.1f}) "
    f"against ring's in-process ECDSA P-256 p50 **{ring['p50_ms'] * 1000:.1f} µs** ({ring['count']:,} signatures): **{tpm['p50_ms'] / ring['p50_ms']:,.0f}×**. "
    f"One signature is {cmds:.0f} TPM commands (the agent opens a TPM context, re-derives the RSA-2048 EK, loads the key under it, signs, flushes); "
    f"timed at the relay, per signature: CreatePrimary of the EK {per('CreatePrimary'):.1f} ms, Load {per('Load'):.1f} ms, TPM2_Sign {per('Sign'):.1f} ms, "
    f"the other {len(others)} kinds of command {other_ms:.1f} ms; through the relay a signature took p50 {sg['tpm_via_relay']['p50_ms']:.1f} ms in all "
    f"(mean {sg['tpm_via_relay']['mean_ms']:.1f} ms, of which {outside:.1f} ms outside TPM commands: the TSS and the TCTI connection opened for every TPM operation). "
    "Most of a handshake's TPM cost is re-deriving the EK, not the signature. "
    f"A mutual-TLS full handshake took {extra_ms:.1f} ms longer than a TLS full handshake without a client certificate (difference of the per-connection times above).",
    "",
    f"**Attested check-ins**: {cp['count']} sequential full check-ins per server (nonce request quoted by the AK, TPM2_Quote over the report, POST, verdict), "
    f"in {res['rounds']} rounds alternating between the servers, each with the agent's own client (no connection kept, so every request connects; over TLS it resumes).",
    "",
    "| | plain HTTP | TLS, device certificate | TLS ÷ plain |",
    "|---|---:|---:|---:|",
    f"| latency p50 | {cp['p50_ms']:.1f} ms | {ct['p50_ms']:.1f} ms | {ct['p50_ms'] / cp['p50_ms']:.2f} |",
    f"| latency p99 | {cp['p99_ms']:.1f} ms | {ct['p99_ms']:.1f} ms | {ct['p99_ms'] / cp['p99_ms']:.2f} |",
    f"| check-ins/s (one device, sequential) | **{cp['per_s']:.1f}** | **{ct['per_s']:.1f}** | {ct['per_s'] / cp['per_s']:.2f} |",
    f"| server CPU-ms per check-in | {cp['server_cpu_ms_per_checkin']:.2f} | {ct['server_cpu_ms_per_checkin']:.2f} | {ct['server_cpu_ms_per_checkin'] / cp['server_cpu_ms_per_checkin']:.2f} |",
    f"| TPM commands: quotes / TPM2_Sign / TPM2_Certify | {cp['tpm']['quote']} / {cp['tpm']['sign']} / {cp['tpm']['certify']} | {ct['tpm']['quote']} / {ct['tpm']['sign']} / {ct['tpm']['certify']} | |",
    f"| TPM time per check-in (at the relay) | {tpm_ms(cp):.1f} ms | {tpm_ms(ct):.1f} ms | {tpm_ms(ct) / tpm_ms(cp):.2f} |",
    "",
    f"Verdicts: plain {verdicts(cp)}, TLS {verdicts(ct)}. The TLS server requires the device's certificate: the same device checking in over TLS without it was refused "
    f"(HTTP 401: \"{ck['refused_without_certificate'][:110]}…\").",
    "",
    f"**Certificate re-issue** ({rn['count']} times: the certificate dropped, then an attested check-in that asks for one, as a device whose certificate lapsed offline does): "
    f"the re-issuing check-in p50 {rn['renewal']['p50_ms']:.1f} ms with {rn['renewal_tpm']['certify']} TPM2_Certify and {rn['renewal_tpm']['sign']} TPM2_Sign in all; "
    f"the next check-in p50 {rn['next']['p50_ms']:.1f} ms with {rn['next_tpm']['sign']} TPM2_Sign in all (the session cache is emptied when the certificate changes, "
    "so the first connection after it is a full handshake that presents the new certificate; later ones resume).",
    "",
    "Method: [bench/README.md](../bench/README.md) (section *TLS*).",
    "<!-- tls:end -->",
]
section = "\n".join(lines) + "\n"
text = open(out, encoding="utf-8").read() if os.path.exists(out) else ""
b, e = text.find("<!-- tls:begin -->"), text.find("<!-- tls:end -->")
if b != -1 and e != -1:
    text = text[:b] + section + text[e + len("<!-- tls:end -->") + 1:]
elif "<!-- attest:end -->\n" in text:
    anchor = text.find("<!-- attest:end -->\n") + len("<!-- attest:end -->\n")
    text = text[:anchor] + "\n" + section + text[anchor:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(out, "w", encoding="utf-8").write(text)
print(section)
PY
echo "tls.sh: section written to $OUT" >&2
