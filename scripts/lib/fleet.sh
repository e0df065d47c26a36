# shellcheck shell=bash
# Helpers shared by scripts/main-job.sh and bench/bench.sh: a one-machine Outpost
# deployment (offline keys + repository, a running outpost-server, agent configs).
# Source it after `set -euo pipefail`; it defines functions and a few variables only.
#
# Callers set:
#   OUTPOST_BIN   directory holding outpost, outpost-server, outpost-agent
# Functions:
#   fleet_log MSG...                  step banner on stderr
#   fleet_die MSG...                  error and exit 1
#   fleet_require_bins                check the three binaries exist
#   fleet_free_port                   print a free TCP port on 127.0.0.1
#   fleet_make_keys DIR               ed25519 keys: root1..3, targets, snapshot, timestamp, firmware
#   fleet_init_repo REPO KEYS         repo init 2-of-3 root (snapshot/timestamp as .pub: server-held)
#                                     + delegation 'firmware' for firmware/rpi4/*/*
#   fleet_make_pki DIR                a private CA, the server's TLS certificate from it and
#                                     the device CA (openssl; outpost-server device-ca init)
#   fleet_write_server_config FILE PORT DATA_DIR KEYS REPO
#                                     (the state store is SQLite, or PostgreSQL at
#                                     $FLEET_POSTGRES_URL when that is set; TLS with the
#                                     device CA when $FLEET_PKI names fleet_make_pki's DIR,
#                                     else plain HTTP on loopback)
#   fleet_create_token CONFIG NAME    print a pipeline token
#   fleet_start_server CONFIG LOG     start `outpost-server serve` in the background; sets
#                                     FLEET_SERVER_PID. Callers: `trap fleet_stop_server EXIT` first
#   fleet_stop_server                 stop it (TERM, then KILL after 5 s); safe to call twice
#   fleet_wait_healthy URL [SECS]     wait for GET URL/healthz
#   fleet_write_agent_config FILE SERVER_URL STATE_DIR TRUSTED_ROOT HWCLASS
#                                     ($FLEET_PKI set: trusts only its CA)
#   fleet_scheme                      https with $FLEET_PKI, else http

FLEET_SERVER_PID=""
FLEET_SERVER_LOG=""

fleet_log() { printf '\n==> %s\n' "$*" >&2; }
fleet_die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# Run one of the binaries, echoing the command line first (so the demo teaches).
fleet_run() {
  printf '  $ %s\n' "$*" >&2
  "$@"
}

fleet_require_bins() {
  local b
  for b in outpost outpost-server outpost-agent; do
    [[ -x "$OUTPOST_BIN/$b" ]] || fleet_die "$OUTPOST_BIN/$b not found: build with 'cargo build --release'"
  done
}

fleet_free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

fleet_make_keys() {
  local dir="$1" name id
  mkdir -p "$dir"
  chmod 700 "$dir"
  for name in root1 root2 root3 targets snapshot timestamp firmware director-root director; do
    id="$("$OUTPOST_BIN/outpost" --json keys generate --out "$dir/$name.key" | jq -r '.keyid // empty')" \
      || fleet_die "outpost keys generate --out $dir/$name.key failed"
    [[ -n "$id" ]] || fleet_die "outpost keys generate printed no key id"
    printf '  %-10s key id %s\n' "$name" "$id" >&2
  done
}

fleet_init_repo() {
  local repo="$1" keys="$2"
  fleet_run "$OUTPOST_BIN/outpost" repo init --repo "$repo" \
    --root-key "$keys/root1.key" --root-key "$keys/root2.key" --root-key "$keys/root3.key" \
    --threshold 2 \
    --targets-key "$keys/targets.key" \
    --snapshot-key "$keys/snapshot.key.pub" \
    --timestamp-key "$keys/timestamp.key.pub" >&2
  fleet_run "$OUTPOST_BIN/outpost" repo delegate --repo "$repo" --role firmware \
    --delegate-key "$keys/firmware.key" --threshold 1 \
    --paths 'firmware/rpi4/*/*' \
    --sign-key "$keys/targets.key" >&2
  # The director's trust anchor, offline: devices learn the director from it.
  fleet_run "$OUTPOST_BIN/outpost" director init --repo "$repo" \
    --root-key "$keys/director-root.key" --director-key "$keys/director.key.pub" \
    --sign-key "$keys/targets.key" >&2
}

fleet_make_pki() { # DIR: the fleet's private CA (ca.pem), the server's TLS certificate
  # from it (server.pem, server.key; for 127.0.0.1, localhost and 10.0.2.100, where the
  # virtual device reaches the server) and the device CA (device-ca/ca.pem, ca.key).
  local dir="$1"
  command -v openssl >/dev/null || fleet_die "openssl not found: run 'bash scripts/setup.sh'"
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=Outpost fleet CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>"$dir/openssl.log" || fleet_die "openssl: the CA (see $dir/openssl.log)"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=outpost-server" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>>"$dir/openssl.log" || fleet_die "openssl: the server key (see $dir/openssl.log)"
  printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.2.100' 'extendedKeyUsage=serverAuth' \
    'basicConstraints=critical,CA:FALSE' >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 30 \
    -extfile "$dir/server.ext" -out "$dir/server.pem" 2>>"$dir/openssl.log" || fleet_die "openssl: the server certificate (see $dir/openssl.log)"
  chmod 600 "$dir/ca.key" "$dir/server.key"
  "$OUTPOST_BIN/outpost-server" device-ca init --trust-domain fleet.outpost.test --out "$dir/device-ca" >/dev/null \
    || fleet_die "outpost-server device-ca init failed"
  printf '  CA %s; server certificate %s; device CA %s\n' "$dir/ca.pem" "$dir/server.pem" "$dir/device-ca/ca.pem" >&2
}

fleet_scheme() { if [[ -n "${FLEET_PKI:-}" ]]; then echo https; else echo http; fi; }

fleet_server_tls() { # server.toml's TLS and device CA from $FLEET_PKI (fleet_make_pki)
  cat <<EOF
[tls]
certificate = "$FLEET_PKI/server.pem"
key = "$FLEET_PKI/server.key"

# Attested devices get short-lived client certificates for their TPM-resident keys and
# present them. Devices without a TPM (simulated or file-slot devices) still check in
# without one, so device routes require certificates only with
# FLEET_REQUIRE_CLIENT_CERTIFICATE=true (bench/tls.sh).
[device_ca]
certificate = "$FLEET_PKI/device-ca/ca.pem"
key = "$FLEET_PKI/device-ca/ca.key"
trust_domain = "fleet.outpost.test"
require_client_certificate = ${FLEET_REQUIRE_CLIENT_CERTIFICATE:-false}
EOF
}

fleet_write_server_config() {
  local file="$1" port="$2" data_dir="$3" keys="$4" repo="$5"
  mkdir -p "$data_dir"
  cat >"$file" <<EOF
# outpost-server configuration written by $(basename "$0") (see docs/examples/server.toml)
listen = "127.0.0.1:$port"
data_dir = "$data_dir"
$([[ -n "${FLEET_PKI:-}" ]] || echo 'plain_http = true  # the loopback fleet without TLS, said explicitly')

[database]
$(if [[ -n "${FLEET_POSTGRES_URL:-}" ]]; then printf 'postgres = "%s"\n' "$FLEET_POSTGRES_URL"; else printf 'sqlite = "outpost.db"\n'; fi)

[repository]
trusted_root = "$repo/metadata/1.root.json"
snapshot_key = "$keys/snapshot.key"
timestamp_key = "$keys/timestamp.key"

[attestation]
$(if [[ "${FLEET_EK_TRUST:-localca}" == uncertified ]]; then
    echo '# Simulated devices (software keys, no EK certificate): an explicit opt-in.'
    echo 'accept_uncertified_eks = true'
  else
    echo "# The swtpms' EK certificates come from swtpm's local CA (swtpm_setup --create-ek-cert)."
    echo "ek_ca_certificates = [$(fleet_swtpm_localca)]"
  fi)

[director]
# The online director key director root v1 names (made offline by fleet_make_keys).
key = "$keys/director.key"

$([[ -z "${FLEET_PKI:-}" ]] || fleet_server_tls)

# The agent measures its slot into PCR 23, which software can reset: a testbed.
[attestation.classes."*"]
pcrs = [23]
event_types = ["slot_boot"]
testbed = true
EOF
}

fleet_swtpm_localca() { # the CA files swtpm_setup --create-ek-cert signs with, as a TOML list body
  local statedir=/var/lib/swtpm-localca tmp
  if [[ -r /etc/swtpm-localca.conf ]]; then
    statedir="$(awk -F= '$1 ~ /^[[:space:]]*statedir[[:space:]]*$/ { gsub(/[[:space:]]/, "", $2); print $2 }' /etc/swtpm-localca.conf)"
    statedir="${statedir:-/var/lib/swtpm-localca}"
  fi
  if [[ ! -e "$statedir/issuercert.pem" ]]; then
    # The local CA is made by the first swtpm_setup --create-ek-cert on this machine.
    tmp="$(mktemp -d)"
    swtpm_setup --tpm2 --tpmstate "$tmp" --create-ek-cert --overwrite >/dev/null 2>&1 \
      || fleet_die "swtpm_setup --create-ek-cert failed: cannot make swtpm's local CA"
    rm -rf "$tmp"
  fi
  printf '"%s", "%s"' "$statedir/swtpm-localca-rootca-cert.pem" "$statedir/issuercert.pem"
}

fleet_create_token() { # CONFIG NAME [ROLE (pipeline)]
  local config="$1" name="$2" role="${3:-pipeline}" out token
  out="$("$OUTPOST_BIN/outpost-server" --config "$config" token create --role "$role" --name "$name")" \
    || fleet_die "outpost-server token create failed"
  # The token is printed once; take the last word of the last non-empty line.
  token="$(printf '%s\n' "$out" | awk 'NF { last = $NF } END { print last }')"
  [[ -n "$token" ]] || fleet_die "outpost-server token create printed no token"
  printf '%s\n' "$token"
}

fleet_stop_server() {
  if [[ -n "$FLEET_SERVER_PID" ]] && kill -0 "$FLEET_SERVER_PID" 2>/dev/null; then
    kill "$FLEET_SERVER_PID" 2>/dev/null || true
    local i
    for i in $(seq 1 50); do
      kill -0 "$FLEET_SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$FLEET_SERVER_PID" 2>/dev/null || true
    wait "$FLEET_SERVER_PID" 2>/dev/null || true
  fi
  FLEET_SERVER_PID=""
}

fleet_start_server() {
  local config="$1" log="$2"
  FLEET_SERVER_LOG="$log"
  printf '  $ %s --config %s serve  (background, log: %s)\n' "$OUTPOST_BIN/outpost-server" "$config" "$log" >&2
  NO_COLOR=1 "$OUTPOST_BIN/outpost-server" --config "$config" serve >"$log" 2>&1 </dev/null &
  FLEET_SERVER_PID=$!
}

fleet_wait_healthy() {
  local url="$1" secs="${2:-30}" i
  for ((i = 0; i < secs * 10; i++)); do
    if curl -fsS -o /dev/null --max-time 2 "$url/healthz" 2>/dev/null; then
      return 0
    fi
    if [[ -n "$FLEET_SERVER_PID" ]] && ! kill -0 "$FLEET_SERVER_PID" 2>/dev/null; then
      [[ -n "$FLEET_SERVER_LOG" ]] && tail -n 30 "$FLEET_SERVER_LOG" >&2
      fleet_die "outpost-server exited before it became healthy (log above: $FLEET_SERVER_LOG)"
    fi
    sleep 0.1
  done
  [[ -n "$FLEET_SERVER_LOG" ]] && tail -n 30 "$FLEET_SERVER_LOG" >&2
  fleet_die "outpost-server not healthy at $url/healthz after ${secs}s"
}

fleet_write_agent_config() {
  local file="$1" server_url="$2" state_dir="$3" trusted_root="$4" hw="$5"
  mkdir -p "$state_dir"
  cat >"$file" <<EOF
# outpost-agent configuration written by $(basename "$0") (see docs/examples/agent.toml)
server_url = "$server_url"
hardware_class = "$hw"
state_dir = "$state_dir"
trusted_root = "$trusted_root"

[http]
timeout = "30s"
$([[ -z "${FLEET_PKI:-}" ]] || printf 'ca_certificates = "%s"' "$FLEET_PKI/ca.pem")
EOF
}

# --------------------------------------------------------------------------- swtpm
FLEET_SWTPM_PIDS=()

fleet_start_swtpm() { # STATE_DIR PORT: a software TPM 2.0 on 127.0.0.1:PORT (control PORT+1)
  local dir="$1" port="$2" i
  mkdir -p "$dir"
  if [[ ! -e "$dir/tpm2-00.permall" ]]; then
    # Manufacture it like a real TPM: EK and an EK certificate from swtpm's local CA.
    swtpm_setup --tpm2 --tpmstate "$dir" --create-ek-cert --create-platform-cert --overwrite >"$dir/setup.log" 2>&1 \
      || fleet_die "swtpm_setup failed (see $dir/setup.log)"
  fi
  swtpm socket --tpm2 --tpmstate "dir=$dir" --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
    --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" --flags not-need-init,startup-clear \
    --log "file=$dir/swtpm.log" </dev/null >/dev/null 2>&1 &
  FLEET_SWTPM_PIDS+=("$!")
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.05
  done
  fleet_die "swtpm did not listen on 127.0.0.1:$port"
}

fleet_free_port_pair() { # a free loopback port P with P+1 free too (both bind)
  python3 - <<'PY' || fleet_die "no two consecutive free ports"
import socket, sys
for _ in range(200):
    a = socket.socket()
    a.bind(("127.0.0.1", 0))
    p = a.getsockname()[1]
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 1))
    except OSError:
        a.close(); b.close()
        continue
    a.close(); b.close()
    print(p)
    sys.exit(0)
sys.exit(1)
PY
}

fleet_stop_swtpms() {
  local pid
  for pid in "${FLEET_SWTPM_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  FLEET_SWTPM_PIDS=()
}

fleet_bench_server() { # WORK: keys, repository, a running server on loopback with the
  # repository pushed; sets SERVER_URL, OUTPOST_TOKEN (pipeline, exported) and OPERATOR.
  local work="$1" port
  fleet_make_keys "$work/keys"
  fleet_init_repo "$work/repo" "$work/keys"
  port="$(fleet_free_port)"
  SERVER_URL="$(fleet_scheme)://127.0.0.1:$port"
  fleet_write_server_config "$work/server.toml" "$port" "$work/server-data" "$work/keys" "$work/repo"
  OUTPOST_TOKEN="$(fleet_create_token "$work/server.toml" bench-pipeline)"
  export OUTPOST_TOKEN
  OPERATOR="$(fleet_create_token "$work/server.toml" bench-operator operator)"
  fleet_start_server "$work/server.toml" "$work/server.log"
  fleet_wait_healthy "$SERVER_URL" 30
  "$OUTPOST_BIN/outpost" repo push --repo "$work/repo" --server "$SERVER_URL" >/dev/null
}
