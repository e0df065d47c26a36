#!/usr/bin/env bash
# Set up and run the local fleet demo on embedded defaults (SQLite, local files).
#
#   bash scripts/main-job.sh
#
# Builds the release binaries, then, under <repo>/.fleet (wiped first):
#   1. generates offline keys (3 root, targets, firmware) and online keys (snapshot, timestamp),
#   2. creates a TUF repository (root 2-of-3) with a 'firmware' delegation for rpi4,
#   3. makes a private CA, the server's TLS certificate and the device CA, and starts
#      outpost-server with TLS on a free loopback port with a pipeline token (every
#      client below trusts only that CA; attested devices get client certificates),
#   4. publishes an 8 MiB firmware image as a signed release,
#   5. runs `outpost-agent update` for an rpi4 device, which verifies and downloads it,
#   6. prints what happened and checks the agent's file against the published digest,
#   7. an A/B device: 1.1.0 committed, 1.2.0 rolled back by its health check, 1.3.0 by delta,
#   8. six devices with their own swtpm: enrolled with one-time tokens (credential
#      activation), attested check-ins (quotes over the measured boot), then one device's
#      slot image is tampered with and the server quarantines it,
#   9. canary rollouts through the director: 1.4.0 to every attested device, then a
#      broken 1.5.0 in waves of 20/60/100 % that pauses itself in its first wave,
#  10. network policy: a bundle signed under the 'policy' delegation, enforced with eBPF
#      by rpi4-tpm-1 on a workload in a network namespace: an allowed and a blocked
#      connection, the counters, and the policy status in its attested check-in (root),
#  11. a virtual device (QEMU, OVMF, GRUB, swtpm; roots under dm-verity): enrolled,
#      attested by its boot chain, 2.0.0 across a real reboot, and its measured-boot
#      events beside the golden values (testbeds/vm/demo.py).
# Exits non-zero if any step fails. Environment:
#   OUTPOST_SKIP_SETUP=1   do not run scripts/setup.sh first
#   OUTPOST_SKIP_BUILD=1   use the existing target/release binaries
#   OUTPOST_FLEET_DIR=DIR  work directory (default <repo>/.fleet)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
trap 'echo "main-job.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"
OUTPOST_BIN="$REPO_ROOT/target/release"
# shellcheck source=scripts/lib/fleet.sh
source "$REPO_ROOT/scripts/lib/fleet.sh"
trap 'fleet_stop_server; fleet_stop_swtpms' EXIT

FLEET="${OUTPOST_FLEET_DIR:-$REPO_ROOT/.fleet}"
HW_CLASS="rpi4"
VERSION="1.0.0"
IMAGE_NAME="outpost-demo-$HW_CLASS.img"
TARGET_PATH="firmware/$HW_CLASS/$VERSION/$IMAGE_NAME"

# --------------------------------------------------------------------------- setup + build
# Installs what the demo needs (Debian packages incl. swtpm and libtss2-dev, the Rust
# toolchain check, the Python venv); idempotent and quick on a ready machine.
if [[ "${OUTPOST_SKIP_SETUP:-0}" != 1 ]]; then
  fleet_log "setting up the machine (scripts/setup.sh)"
  bash "$REPO_ROOT/scripts/setup.sh" >&2
  [[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if [[ "${OUTPOST_SKIP_BUILD:-0}" != 1 ]]; then
  fleet_log "building release binaries (cargo build --release)"
  command -v cargo >/dev/null || fleet_die "cargo not found: run 'bash scripts/setup.sh' (needs the stable Rust toolchain)"
  for pkg in curl jq; do
    command -v "$pkg" >/dev/null || fleet_die "$pkg not found: run 'bash scripts/setup.sh'"
  done
  cargo build --release
fi
fleet_require_bins

# --------------------------------------------------------------------------- keys + repo
fleet_log "fresh demo directory: $FLEET"
case "$(realpath -m "$FLEET")" in
  / | "$REPO_ROOT" | "$HOME") fleet_die "OUTPOST_FLEET_DIR=$FLEET would wipe too much; choose a scratch directory" ;;
esac
rm -rf "$FLEET"
mkdir -p "$FLEET"
KEYS="$FLEET/keys"
REPO="$FLEET/repo"

fleet_log "generating ed25519 keys (offline: root x3, targets, firmware, director root; online: snapshot, timestamp, director)"
fleet_make_keys "$KEYS"

fleet_log "creating the TUF repository (root threshold 2 of 3), the 'firmware' delegation and director root v1"
fleet_init_repo "$REPO" "$KEYS"
# The virtual device's class (step 11) has its own delegation for its firmware paths.
fleet_run "$OUTPOST_BIN/outpost" repo delegate --repo "$REPO" --role vm-firmware \
  --delegate-key "$KEYS/firmware.key" --threshold 1 --paths 'firmware/qemu-x86_64/*/*' \
  --sign-key "$KEYS/targets.key" >&2

# --------------------------------------------------------------------------- TLS
# Everything below speaks TLS: the server's certificate comes from the fleet's private
# CA, which the CLI (OUTPOST_CA_FILE), the agents ([http] ca_certificates) and curl
# (CURL_CA_BUNDLE) trust alone; the device CA issues attested devices' client
# certificates for their TPM-resident keys.
fleet_log "PKI: a private CA, the server's TLS certificate, the device CA"
FLEET_PKI="$FLEET/pki"
fleet_make_pki "$FLEET_PKI"
export OUTPOST_CA_FILE="$FLEET_PKI/ca.pem" CURL_CA_BUNDLE="$FLEET_PKI/ca.pem"

# --------------------------------------------------------------------------- server
PORT="$(fleet_free_port)"
SERVER_URL="https://127.0.0.1:$PORT"
fleet_log "starting outpost-server on $SERVER_URL"
fleet_write_server_config "$FLEET/server.toml" "$PORT" "$FLEET/server-data" "$KEYS" "$REPO"
# The virtual device is judged by its boot chain: the firmware's event log against the
# golden values signed into its releases (the rpi4 devices keep PCR 23, a testbed).
printf '\n[attestation.classes."qemu-x86_64"]\nboot_event_log = true\n' >>"$FLEET/server.toml"
# The CLI reads OUTPOST_TOKEN in place of --token (keeps the token out of the command lines shown).
OUTPOST_TOKEN="$(fleet_create_token "$FLEET/server.toml" demo-pipeline)"
export OUTPOST_TOKEN
echo "  pipeline token created (${#OUTPOST_TOKEN} characters, passed as OUTPOST_TOKEN)" >&2
fleet_start_server "$FLEET/server.toml" "$FLEET/server.log"
fleet_wait_healthy "$SERVER_URL" 30
echo "  healthy: $(curl -fsS "$SERVER_URL/healthz")" >&2

fleet_log "pushing the offline-signed repository to the server"
fleet_run "$OUTPOST_BIN/outpost" repo push --repo "$REPO" --server "$SERVER_URL" >&2

# --------------------------------------------------------------------------- release
fleet_log "publishing release $VERSION for $HW_CLASS (8 MiB image)"
IMAGE="$FLEET/$IMAGE_NAME"
head -c $((8 * 1024 * 1024)) /dev/urandom >"$IMAGE"
IMAGE_SHA256="$(sha256sum "$IMAGE" | awk '{print $1}')"
fleet_run "$OUTPOST_BIN/outpost" release publish --repo "$REPO" --firmware "$IMAGE" \
  --hardware-class "$HW_CLASS" --version "$VERSION" --key "$KEYS/firmware.key" \
  --server "$SERVER_URL" >&2

# What the offline-signed metadata says (the delegated 'firmware' role signs it).
SIGNED_SHA256="$(jq -r --arg p "$TARGET_PATH" '.signed.targets[$p].hashes.sha256 // empty' "$REPO/metadata/firmware.json")"
SIGNED_LENGTH="$(jq -r --arg p "$TARGET_PATH" '.signed.targets[$p].length // empty' "$REPO/metadata/firmware.json")"
[[ "$SIGNED_SHA256" == "$IMAGE_SHA256" ]] \
  || fleet_die "firmware.json does not list $TARGET_PATH with sha256 $IMAGE_SHA256 (got '${SIGNED_SHA256}')"

# --------------------------------------------------------------------------- agent
fleet_log "running the agent for an $HW_CLASS device"
AGENT_STATE="$FLEET/agent-state"
fleet_write_agent_config "$FLEET/agent.toml" "$SERVER_URL" "$AGENT_STATE" "$REPO/metadata/1.root.json" "$HW_CLASS"
AGENT_OUT="$FLEET/agent-update.json"
fleet_run "$OUTPOST_BIN/outpost-agent" --config "$FLEET/agent.toml" update --json >"$AGENT_OUT"
echo "  agent report ($AGENT_OUT):" >&2
sed 's/^/    /' "$AGENT_OUT" >&2
jq -e . "$AGENT_OUT" >/dev/null || fleet_die "outpost-agent update --json did not print JSON"
agent() { jq -r "$1" "$AGENT_OUT"; }

AGENT_FILE="$(agent '.path // empty')"
[[ -n "$AGENT_FILE" && -f "$AGENT_FILE" ]] || fleet_die "the agent reported success but its file '$AGENT_FILE' does not exist"
[[ "$(agent .target)" == "$TARGET_PATH" ]] || fleet_die "the agent chose $(agent .target), expected $TARGET_PATH"
[[ "$(agent .version)" == "$VERSION" ]] || fleet_die "the agent chose version $(agent .version), expected $VERSION"
[[ "$(agent .sha256)" == "$SIGNED_SHA256" ]] || fleet_die "the agent's sha256 $(agent .sha256) differs from the signed $SIGNED_SHA256"
AGENT_SHA256="$(sha256sum "$AGENT_FILE" | awk '{print $1}')"
[[ "$AGENT_SHA256" == "$IMAGE_SHA256" ]] || fleet_die "agent file $AGENT_FILE has sha256 $AGENT_SHA256, expected $IMAGE_SHA256"

# --------------------------------------------------------------------------- A/B install
# A second device installs into A/B slots: 1.1.0 committed, 1.2.0 rolled back by its
# signed health check, 1.3.0 installed by a zstd delta from 1.1.0.
AB="$FLEET/device-ab"
mkdir -p "$AB"
fleet_log "A/B device rpi4-ab-1: building three firmware images"
python3 - "$AB" <<'PY'
import os, sys
d = sys.argv[1]
body = os.urandom(12 << 20)
def img(name, marker, body):
    with open(os.path.join(d, name), "wb") as f:
        f.write(marker.ljust(32, b" ") + body)
img("fw-1.1.0.img", b"OUTPOST-HEALTHY", body)
img("fw-1.2.0.img", b"BROKEN-BUILD", body[: 6 << 20] + os.urandom(64 << 10) + body[6 << 20 :])
img("fw-1.3.0.img", b"OUTPOST-HEALTHY", body[: 3 << 20] + os.urandom(16 << 10) + body[3 << 20 :])
PY
HEALTH='head -c 32 "$OUTPOST_SLOT_PATH" | grep -q OUTPOST-HEALTHY'
printf '%s\n' \
  "server_url = \"$SERVER_URL\"" \
  "hardware_class = \"$HW_CLASS\"" \
  'state_dir = "state"' \
  "trusted_root = \"$REPO/metadata/1.root.json\"" \
  'device_id = "rpi4-ab-1"' \
  '[install]' \
  'trial_attempts = 2' \
  'trial_deadline = "30s"' \
  '[http]' "ca_certificates = \"$FLEET_PKI/ca.pem\"" >"$AB/agent.toml"
ab_run() { # run the device agent once; print its JSON results, keep its log
  "$OUTPOST_BIN/outpost-agent" --config "$AB/agent.toml" --log-level info --json run --once 2>>"$AB/agent.log"
}
ab_publish() { # VERSION [extra publish args]
  local v="$1"; shift
  fleet_run "$OUTPOST_BIN/outpost" release publish --repo "$REPO" --firmware "$AB/fw-$v.img" \
    --hardware-class "$HW_CLASS" --version "$v" --key "$KEYS/firmware.key" --server "$SERVER_URL" \
    --health-command "$HEALTH" --trial-deadline 30s "$@" >&2
}
active_slot() { jq -r .active "$AB/state/boot/bootenv.json"; }
active_sha() { sha256sum "$AB/state/boot/slot-$(active_slot | tr AB ab).img" | awk '{print $1}'; }
image_sha() { sha256sum "$AB/fw-$1.img" | awk '{print $1}'; }

fleet_log "publishing 1.1.0 (health check: the image starts with OUTPOST-HEALTHY) and installing it"
ab_publish 1.1.0
OUT1="$(ab_run)"; echo "$OUT1" | sed 's/^/    /' >&2
echo "$OUT1" | jq -se 'map(select(.result == "committed" and .version == "1.1.0")) | length == 1' >/dev/null \
  || fleet_die "1.1.0 was not committed: $OUT1"
[[ "$(active_sha)" == "$(image_sha 1.1.0)" ]] || fleet_die "the active slot does not hold 1.1.0"
ACTIVE_11="$(active_slot)"

fleet_log "publishing 1.2.0 (a broken build: its health check fails) - the device must roll back"
ab_publish 1.2.0
OUT2="$(ab_run)"; echo "$OUT2" | sed 's/^/    /' >&2
echo "$OUT2" | jq -se 'map(select(.result == "rolled_back" and .version == "1.2.0")) | length == 1' >/dev/null \
  || fleet_die "1.2.0 was not rolled back: $OUT2"
[[ "$(active_slot)" == "$ACTIVE_11" ]] || fleet_die "the rollback did not return to slot $ACTIVE_11"
[[ "$(active_sha)" == "$(image_sha 1.1.0)" ]] || fleet_die "the active slot does not hold 1.1.0 after the rollback"
ROLLBACK_REASON="$(echo "$OUT2" | jq -sr 'map(select(.result == "rolled_back"))[0].reason')"

fleet_log "publishing 1.3.0 with a delta from 1.1.0 - the device installs it by delta"
ab_publish 1.3.0 --delta-from 1.1.0 --delta-base "$AB/fw-1.1.0.img"
OUT3="$(ab_run)"; echo "$OUT3" | sed 's/^/    /' >&2
echo "$OUT3" | jq -se 'map(select(.result == "committed" and .version == "1.3.0")) | length == 1' >/dev/null \
  || fleet_die "1.3.0 was not committed: $OUT3"
[[ "$(active_sha)" == "$(image_sha 1.3.0)" ]] || fleet_die "the active slot does not hold 1.3.0"
DELTA_LINE="$(grep 'download verified' "$AB/agent.log" | tail -1)"
[[ "$DELTA_LINE" == *zst-patch* ]] || fleet_die "1.3.0 was not installed by delta: $DELTA_LINE"
DELTA_BYTES="$(echo "$DELTA_LINE" | sed -n 's/.*received=\([0-9]*\).*/\1/p')"
# Fleet state is read with an operator token (pipeline tokens only publish).
OPERATOR_TOKEN="$(fleet_create_token "$FLEET/server.toml" demo-operator operator)"
REPORTS="$(curl -fsS -H "Authorization: Bearer $OPERATOR_TOKEN" "$SERVER_URL/api/v1/reports?device=rpi4-ab-1")"

# --------------------------------------------------------------------------- attestation
# Three rpi4 devices, each with its own software TPM, shipped with release 1.3.0 in slot A.
fleet_log "attestation: six devices with their own swtpm, enrolled with one-time tokens"
for tool in swtpm swtpm_setup; do
  command -v "$tool" >/dev/null || fleet_die "$tool not found: run 'bash scripts/setup.sh'"
done
ATT="$FLEET/attested"
DEVICES=(rpi4-tpm-1 rpi4-tpm-2 rpi4-tpm-3 rpi4-tpm-4 rpi4-tpm-5 rpi4-tpm-6)
declare -A DEVICE_ID
for name in "${DEVICES[@]}"; do
  d="$ATT/$name"
  mkdir -p "$d/state/boot"
  cp "$AB/fw-1.3.0.img" "$d/state/boot/slot-a.img"
  port="$(fleet_free_port_pair)"
  fleet_start_swtpm "$d/tpm" "$port"
  printf '%s\n' \
    "server_url = \"$SERVER_URL\"" \
    "hardware_class = \"$HW_CLASS\"" \
    'state_dir = "state"' \
    "trusted_root = \"$REPO/metadata/1.root.json\"" \
    '[tpm]' \
    "tcti = \"swtpm:host=127.0.0.1,port=$port\"" \
    'pcr = 23' \
    '[http]' "ca_certificates = \"$FLEET_PKI/ca.pem\"" >"$d/agent.toml"
  token="$("$OUTPOST_BIN/outpost" device token create --hardware-class "$HW_CLASS" --ttl 15m \
    --server "$SERVER_URL" --token "$OPERATOR_TOKEN" --json | jq -r .token)"
  enrolled="$("$OUTPOST_BIN/outpost-agent" --config "$d/agent.toml" --json enroll --token "$token" 2>>"$d/agent.log")" \
    || fleet_die "$name could not enroll (see $d/agent.log)"
  DEVICE_ID[$name]="$(echo "$enrolled" | jq -r .device_id)"
  echo "  $name: swtpm on 127.0.0.1:$port, enrolled as ${DEVICE_ID[$name]} (EK + AK proven by credential activation)" >&2
done
att_run() { "$OUTPOST_BIN/outpost-agent" --config "$ATT/$1/agent.toml" --log-level info --json run --once 2>>"$ATT/$1/agent.log"; }

fleet_log "attestation: each device boots (slot measured into PCR 23) and checks in with a quote"
for name in "${DEVICES[@]}"; do
  out="$(att_run "$name")" || fleet_die "$name: run failed: $out"
  verdict="$(echo "$out" | jq -sr 'map(select(.verdict))[0].verdict')"
  echo "  $name: check-in $verdict" >&2
  [[ "$verdict" == attested ]] || fleet_die "$name was not attested: $out"
done

TAMPERED=rpi4-tpm-3
fleet_log "attestation: someone rewrites one byte of $TAMPERED's slot image; it reboots and checks in"
printf 'X' | dd of="$ATT/$TAMPERED/state/boot/slot-a.img" bs=1 seek=4096 conv=notrunc status=none
out="$(att_run "$TAMPERED")" || fleet_die "$TAMPERED: run failed: $out"
echo "$out" | jq -c 'del(.director_targets)' | sed 's/^/    /' >&2
echo "$out" | jq -se 'map(select(.verdict == "failed" and .quarantined)) | length == 1' >/dev/null \
  || fleet_die "$TAMPERED was not quarantined: $out"
QUARANTINE_REASON="$(echo "$out" | jq -sr 'map(select(.verdict))[0].reason')"
HEALTHY=()
for name in "${DEVICES[@]}"; do [[ "$name" != "$TAMPERED" ]] && HEALTHY+=("$name"); done
for name in "${HEALTHY[@]}"; do
  out="$(att_run "$name")"
  [[ "$(echo "$out" | jq -sr 'map(select(.verdict))[0].verdict')" == attested ]] || fleet_die "$name lost its attestation: $out"
done

fleet_log "channels: each attested device holds a short-lived client certificate for a key in its TPM"
CERTS=()
for name in "${HEALTHY[@]}"; do
  cert="$ATT/$name/state/client-certificate.json"
  [[ -s "$cert" ]] || fleet_die "$name has no client certificate after its attested check-ins (see $ATT/$name/agent.log)"
  spiffe="$(jq -r .spiffe_id "$cert")"
  [[ "$spiffe" == "spiffe://fleet.outpost.test/device/${DEVICE_ID[$name]}" ]] || fleet_die "$name's certificate names $spiffe"
  [[ -s "$ATT/$name/state/tls-key.json" ]] || fleet_die "$name has no TPM key blob"
  CERTS+=("$name: $spiffe, serial $(jq -r .serial "$cert"), until $(jq -r .not_after "$cert")")
  echo "  ${CERTS[-1]}" >&2
done
DEVICE_LIST="$("$OUTPOST_BIN/outpost" device list --server "$SERVER_URL" --token "$OPERATOR_TOKEN")"
echo "$DEVICE_LIST" | sed 's/^/    /' >&2
[[ "$(echo "$DEVICE_LIST" | grep -c QUARANTINED)" == 1 ]] || fleet_die "expected exactly one quarantined device"

# --------------------------------------------------------------------------- canary rollouts
# The director assigns releases to enrolled devices through rollouts; each device
# installs only what its signed assignment and the offline-signed image repository
# agree on. 1.4.0 goes to everyone; 1.5.0 is a broken build that must stop itself in
# its first wave.
ro() { "$OUTPOST_BIN/outpost" rollout "$@" --server "$SERVER_URL" --token "$OPERATOR_TOKEN"; }
version_of() { "$OUTPOST_BIN/outpost" device list --server "$SERVER_URL" --token "$OPERATOR_TOKEN" --json \
  | jq -r --arg id "${DEVICE_ID[$1]}" '.devices[] | select(.device_id == $id) | .version'; }
python3 - "$AB" <<'PY'
import os, sys
d = sys.argv[1]
base = open(os.path.join(d, "fw-1.3.0.img"), "rb").read()[32:]
for name, marker in (("fw-1.4.0.img", b"OUTPOST-HEALTHY"), ("fw-1.5.0.img", b"BROKEN-BUILD")):
    with open(os.path.join(d, name), "wb") as f:
        f.write(marker.ljust(32, b" ") + base[: 5 << 20] + os.urandom(32 << 10) + base[5 << 20 :])
PY
ab_publish 1.4.0
ab_publish 1.5.0

fleet_log "rollouts: 1.4.0 to the ${#HEALTHY[@]} attested devices in one wave; $TAMPERED is quarantined and gets nothing"
GOOD_ID="$(ro create --version 1.4.0 --hardware-class "$HW_CLASS" --waves 100 --soak 0s --success-threshold 1 \
  --failure-threshold 0.5 --min-devices "${#HEALTHY[@]}" --start --json | jq -r .id)"
for name in "${HEALTHY[@]}"; do
  out="$(att_run "$name")" || fleet_die "$name: run failed: $out"
  echo "$out" | jq -se 'map(select(.result == "committed" and .version == "1.4.0")) | length == 1' >/dev/null \
    || fleet_die "$name did not commit 1.4.0: $out"
  echo "  $name: 1.4.0 assigned by the director, installed, trial boot measured, committed" >&2
done
out="$(att_run "$TAMPERED")"
echo "$out" | jq -se 'map(select(.result == "quarantined")) | length == 1' >/dev/null || fleet_die "$TAMPERED was not kept out: $out"
GOOD_STATUS="$(ro status "$GOOD_ID")"
echo "$GOOD_STATUS" | sed 's/^/    /' >&2
[[ "$(ro status "$GOOD_ID" --json | jq -r .state_name)" == completed ]] || fleet_die "rollout $GOOD_ID did not complete"

fleet_log "rollouts: 1.5.0 (a broken build) in canary waves of 20% / 60% / 100%, pausing at 30% failures"
BAD_ID="$(ro create --version 1.5.0 --hardware-class "$HW_CLASS" --waves 20,60,100 --soak 10m \
  --success-threshold 0.95 --failure-threshold 0.3 --min-devices 1 --json | jq -r .id)"
PLAN="$(ro status "$BAD_ID" --plan --json)"
echo "  plan: $(echo "$PLAN" | jq -c '[.waves[] | {wave, percent, devices: .planned}]')" >&2
FIRST="$(echo "$PLAN" | jq '[.waves[].planned] | to_entries | map(select(.value > 0))[0].key')"
ro start "$BAD_ID" >/dev/null
for ((w = 0; w < FIRST; w++)); do
  echo "  wave $w holds none of this small fleet's devices: the operator advances past it" >&2
  ro advance "$BAD_ID" >/dev/null
done
for name in "${HEALTHY[@]}"; do
  out="$(att_run "$name")" || fleet_die "$name: run failed: $out"
  result="$(echo "$out" | jq -sr 'map(select(.result)) | (map(select(.result == "rolled_back"))[0] // .[-1])
    | "\(.result) \(.version // "") \(.reason // "")"')"
  echo "  $name: $result" >&2
done
BAD_STATUS="$(ro status "$BAD_ID" --devices)"
echo "$BAD_STATUS" | sed 's/^/    /' >&2
BAD_JSON="$(ro status "$BAD_ID" --devices --json)"
[[ "$(echo "$BAD_JSON" | jq -r .state_name)" == paused ]] || fleet_die "rollout $BAD_ID did not pause itself"
[[ "$(echo "$BAD_JSON" | jq -r .state.reason.kind)" == failure_threshold ]] || fleet_die "rollout $BAD_ID paused for another reason"
[[ "$(echo "$BAD_JSON" | jq "[.devices[] | select(.wave != $FIRST)] | length")" == 0 ]] \
  || fleet_die "a device outside wave $FIRST was assigned 1.5.0"
EXPOSED="$(echo "$BAD_JSON" | jq '.devices | length')"
for name in "${HEALTHY[@]}"; do
  [[ "$(version_of "$name")" == 1.4.0 ]] || fleet_die "$name does not run 1.4.0 after the paused rollout"
done

# --------------------------------------------------------------------------- network policy
# A policy bundle signed under its own 'policy' delegation (a key that is not the
# firmware key) reaches rpi4-tpm-1 through TUF; the agent enforces it with eBPF on a
# workload cgroup whose processes live in a network namespace joined by a veth pair.
fleet_log "network policy: a 'policy' delegation with its own key, and a bundle for the telemetry workload"
[[ $(id -u) -eq 0 ]] || fleet_die "the network-policy step needs root (eBPF programs, cgroups, network namespaces)"
CG_ROOT="$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)"
[[ -n "$CG_ROOT" ]] || fleet_die "no cgroup v2 hierarchy mounted"
PNS="outpost-demo-$$"
PIF_HOST="opdemo$(( $$ % 10000 ))a"
PIF_NS="opdemo$(( $$ % 10000 ))b"
PHOST=10.250.1.1
PNSIP=10.250.1.2
PCG="outpost-demo-$$/telemetry"
PPIN="/sys/fs/bpf/outpost-demo-$$"
POLICY_PIDS=()
policy_cleanup() {
  for p in "${POLICY_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${POLICY_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  "$OUTPOST_BIN/outpost-agent" policy detach --pin-dir "$PPIN" >/dev/null 2>&1 || true
  ip link del "$PIF_HOST" 2>/dev/null || true
  ip netns del "$PNS" 2>/dev/null || true
  rmdir "$CG_ROOT/$PCG" "$CG_ROOT/outpost-demo-$$" 2>/dev/null || true
}
trap 'policy_cleanup; fleet_stop_server; fleet_stop_swtpms' EXIT
ip netns add "$PNS"
ip link add "$PIF_HOST" type veth peer name "$PIF_NS"
ip link set "$PIF_NS" netns "$PNS"
ip addr add "$PHOST/24" dev "$PIF_HOST" && ip link set "$PIF_HOST" up
ip netns exec "$PNS" ip addr add "$PNSIP/24" dev "$PIF_NS"
ip netns exec "$PNS" ip link set "$PIF_NS" up
ip netns exec "$PNS" ip link set lo up
mkdir -p "$CG_ROOT/$PCG"
mkdir -p "$FLEET/www"
echo "telemetry endpoint" >"$FLEET/www/index.html"
for p in 8443 9000; do
  python3 -m http.server "$p" --bind "$PHOST" --directory "$FLEET/www" >/dev/null 2>&1 &
  POLICY_PIDS+=($!)
done
echo "  namespace $PNS ($PNSIP) <-> host $PHOST over veth; workload cgroup $CG_ROOT/$PCG; HTTP on $PHOST:8443 and :9000" >&2

fleet_run "$OUTPOST_BIN/outpost" keys generate --out "$KEYS/policy.key" >&2
fleet_run "$OUTPOST_BIN/outpost" repo delegate --repo "$REPO" --role policy --delegate-key "$KEYS/policy.key" \
  --threshold 1 --paths 'policy/*/*' --sign-key "$KEYS/targets.key" >&2
fleet_run "$OUTPOST_BIN/outpost" repo push --repo "$REPO" --server "$SERVER_URL" >&2
cat >"$FLEET/edge-policy.yaml" <<EOF
schema: outpost.policy/v1
name: edge-telemetry
version: 1
mode: enforce
not_after: $(date -u -d '+30 days' +%Y-%m-%dT%H:%M:%SZ)
workloads:
  - name: telemetry
    cgroup: $PCG
    rules:
      - {name: upload, direction: egress, cidr: $PHOST/32, protocol: tcp, ports: 8443}
essential:
  workloads:
    - name: telemetry
      cgroup: $PCG
      rules:
        - {name: upload, direction: egress, cidr: $PHOST/32, protocol: tcp, ports: 8443}
EOF
fleet_run "$OUTPOST_BIN/outpost" policy publish --repo "$REPO" --key "$KEYS/policy.key" \
  --hardware-class "$HW_CLASS" --server "$SERVER_URL" "$FLEET/edge-policy.yaml" >&2

PDEV="$ATT/rpi4-tpm-1"
PMETRICS="$(fleet_free_port)"
printf '%s\n' '' '[install]' 'check_interval = "2s"' '' '[policy]' "cgroup_root = \"$CG_ROOT\"" \
  "metrics_listen = \"127.0.0.1:$PMETRICS\"" "pin_dir = \"$PPIN\"" >>"$PDEV/agent.toml"
fleet_log "network policy: rpi4-tpm-1 fetches the bundle through TUF and enforces it (outpost-agent policy run)"
"$OUTPOST_BIN/outpost-agent" --config "$PDEV/agent.toml" --log-level info policy run >>"$PDEV/policy.log" 2>&1 &
POLICY_PIDS+=($!)
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$PMETRICS/metrics" 2>/dev/null | grep -q 'outpost_policy_info{name="edge-telemetry",version="1"' && break
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$PMETRICS/metrics" | grep -q 'outpost_policy_enforcing 1' \
  || fleet_die "the agent does not enforce the policy (see $PDEV/policy.log)"
# Join the cgroup first: `ip netns exec` remounts /sys, which hides the cgroup tree.
in_workload() { sh -c 'cg="$0"; ns="$1"; shift; echo $$ > "$cg/cgroup.procs" && exec ip netns exec "$ns" "$@"' "$CG_ROOT/$PCG" "$PNS" "$@"; }
ALLOWED="$(in_workload curl -s -m 3 -o /dev/null -w '%{http_code}' "http://$PHOST:8443/" || true)"
BLOCKED="$(in_workload curl -s -m 3 -o /dev/null -w '%{http_code}' "http://$PHOST:9000/" || true)"
echo "  telemetry -> $PHOST:8443 (allowed by rule 'upload'): HTTP $ALLOWED" >&2
echo "  telemetry -> $PHOST:9000 (no rule: denied by default): ${BLOCKED/000/no answer (dropped; curl timed out after 3 s)}" >&2
[[ "$ALLOWED" == 200 ]] || fleet_die "the allowed connection failed"
[[ "$BLOCKED" == 000 ]] || fleet_die "the blocked connection got through (HTTP $BLOCKED)"
POLICY_METRICS="$(curl -fsS "http://127.0.0.1:$PMETRICS/metrics" | grep -v '^#')"
echo "$POLICY_METRICS" | sed 's/^/    /' >&2
out="$("$OUTPOST_BIN/outpost-agent" --config "$PDEV/agent.toml" --json checkin 2>>"$PDEV/agent.log")" || fleet_die "check-in failed: $out"
POLICY_REPORTED="$(curl -fsS -H "Authorization: Bearer $OPERATOR_TOKEN" "$SERVER_URL/api/v1/devices/${DEVICE_ID[rpi4-tpm-1]}" \
  | jq -c '.device.policy | {name, version, applied, mode, enforcing, verdicts}')"
echo "  the server's record of rpi4-tpm-1 after its attested check-in: $POLICY_REPORTED" >&2
[[ "$(echo "$POLICY_REPORTED" | jq -r .enforcing)" == true ]] || fleet_die "the check-in did not carry the policy status"
kill -KILL "${POLICY_PIDS[-1]}" && wait "${POLICY_PIDS[-1]}" 2>/dev/null || true
STILL="$(in_workload curl -s -m 3 -o /dev/null -w '%{http_code}' "http://$PHOST:9000/" || true)"
echo "  agent killed (SIGKILL): the programs and maps are pinned in $PPIN; telemetry -> :9000: ${STILL/000/still dropped}" >&2
[[ "$STILL" == 000 ]] || fleet_die "the policy stopped with the agent (HTTP $STILL)"
"$OUTPOST_BIN/outpost-agent" policy detach --pin-dir "$PPIN" >&2
AFTER="$(in_workload curl -s -m 3 -o /dev/null -w '%{http_code}' "http://$PHOST:9000/" || true)"
echo "  outpost-agent policy detach: enforcement removed explicitly; telemetry -> :9000 now answers HTTP $AFTER" >&2

# --------------------------------------------------------------------------- virtual device
# One machine that boots for real (testbeds/vm/demo.py): QEMU under TCG with OVMF,
# GRUB's try-once boot count, A/B root partitions under dm-verity, a swtpm TPM. It is
# attested by its boot chain, takes 2.0.0 across a real reboot, and its measured-boot
# events are shown beside the golden values (several minutes under TCG).
fleet_log "virtual device: QEMU + OVMF + GRUB + swtpm; 2.0.0 across a real reboot, attested by the boot chain"
bash "$REPO_ROOT/scripts/packages.sh" --profile release >"$FLEET/packages.log" 2>&1 \
  || fleet_die "building the .deb packages failed (see $FLEET/packages.log)"
AGENT_DEB="$(ls "$REPO_ROOT"/target/debian/outpost-agent_*_amd64.deb | head -1)"
VM_SUMMARY="$("$REPO_ROOT/.venv/bin/python" "$REPO_ROOT/testbeds/vm/demo.py" --bin "$OUTPOST_BIN" \
  --server-url "$SERVER_URL" --server-port "$PORT" --ca-file "$FLEET_PKI/ca.pem" --operator-token "$OPERATOR_TOKEN" --pipeline-token "$OUTPOST_TOKEN" \
  --repo "$REPO" --root "$REPO/metadata/1.root.json" --key "$KEYS/firmware.key" \
  --agent-deb "$AGENT_DEB" --work "$FLEET/vm")" || fleet_die "the virtual device step failed"

# --------------------------------------------------------------------------- summary
cat <<EOF

================================================================== demo summary
Server      $SERVER_URL  (outpost-server; SQLite + files in $FLEET/server-data)
  TLS       certificate $FLEET_PKI/server.pem from the fleet's CA $FLEET_PKI/ca.pem, which the
            CLI, the agents and curl trust alone; plain HTTP is off
Repository  $REPO
            root: 2 of 3 offline keys; targets delegates firmware/rpi4/*/* to role 'firmware'
Published   version $VERSION for hardware class $HW_CLASS
  target    $TARGET_PATH
  length    $SIGNED_LENGTH bytes
  sha256    $SIGNED_SHA256
            signed offline by the 'firmware' key; snapshot + timestamp signed by the server
Agent       outpost-agent --config $FLEET/agent.toml update
  trusted   $REPO/metadata/1.root.json
  verified  root v$(agent .root_version) (2-of-3 signatures), timestamp v$(agent .timestamp_version), snapshot v$(agent .snapshot_version),
            targets -> '$(agent .signed_by_role)' delegation; picked the newest firmware for $(agent .hardware_class):
            version $(agent .version), $(agent .length) bytes, sha256 checked while streaming
            (expected TPM measurement: sha256 $(agent .expected_measurement))
  wrote     $AGENT_FILE
sha256sum   (agent's file, then the image the pipeline published)
  $(sha256sum "$AGENT_FILE")
  $(sha256sum "$IMAGE")
Result      OK: the device holds exactly the image the offline keys signed.

A/B device  rpi4-ab-1 (file boot backend: $AB/state/boot)
  1.1.0     installed into the inactive slot, trial boot, health check passed: committed (slot $ACTIVE_11)
  1.2.0     installed, trial boot, health check failed: rolled back to slot $ACTIVE_11
            reason: $ROLLBACK_REASON
  1.3.0     installed by delta from 1.1.0: $DELTA_BYTES bytes downloaded for a $(stat -c %s "$AB/fw-1.3.0.img")-byte image; committed
  server    install reports: $(echo "$REPORTS" | jq -c '[.reports[] | {version, outcome}]')
EOF
cat <<EOF

Attestation six rpi4 devices, one swtpm each, enrolled with one-time tokens
  check-ins quotes over PCR 23 (the measured boot) verified by the server against the
            event log and the offline-signed expected measurements
  tampered  $TAMPERED: one byte of its slot image changed -> quarantined
            reason: $QUARANTINE_REASON
  devices   (outpost device list)
$(echo "$DEVICE_LIST" | sed 's/^/            /')
  mTLS      client certificates from the device CA, issued in the answers to attested check-ins
            for ECDSA keys made in each device's TPM (proven by TPM2_Certify with its AK):
$(printf '%s\n' "${CERTS[@]}" | sed 's/^/            /')
EOF
cat <<EOF

Rollouts    the director signs each device's assignment at its attested check-in
  $GOOD_ID  1.4.0 to every attested device in one wave: committed on ${#HEALTHY[@]}, completed
            ($TAMPERED stayed quarantined and was never assigned)
  $BAD_ID  1.5.0 (broken build) in waves 20% / 60% / 100%: the first device of wave $FIRST
            rolled back, the failure threshold paused the rollout; $EXPOSED device(s) ever assigned,
            none outside wave $FIRST; the fleet stays on 1.4.0
$(echo "$BAD_STATUS" | sed 's/^/            /')
EOF
cat <<EOF

Policy      bundle edge-telemetry v1, signed by the 'policy' key (not the firmware key),
            fetched through TUF and enforced with eBPF (cgroup_skb) by rpi4-tpm-1
  allowed   telemetry -> $PHOST:8443: HTTP $ALLOWED
  blocked   telemetry -> $PHOST:9000: no answer (dropped; deny by default)
  counters  $(echo "$POLICY_METRICS" | grep -E 'packets_total\{verdict="(allowed|denied|reply)"' | tr '\n' ' ')
  reported  $POLICY_REPORTED
EOF
cat <<EOF

$VM_SUMMARY
EOF
