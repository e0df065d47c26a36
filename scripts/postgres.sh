#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for tests and benchmarks (Debian's
# postgresql package; scripts/setup.sh installs it).
#
#   bash scripts/postgres.sh start DIR [PORT]   # prints postgres://outpost@127.0.0.1:PORT
#   bash scripts/postgres.sh stop DIR
#
# The cluster lives in DIR (created; a new cluster when DIR has none). The superuser
# is `outpost`, trusted on loopback only; the URL has no database name, append one
# (`/postgres` exists). PostgreSQL refuses to run as root, so as root the server runs
# as the `postgres` user. Durability settings are PostgreSQL's defaults (fsync and
# synchronous_commit on), so what the benchmark measures is what production gets.
set -euo pipefail

die() { printf '[postgres] ERROR: %s\n' "$*" >&2; exit 1; }

cmd="${1:-}"; dir="${2:-}"
[[ -n "$cmd" && -n "$dir" ]] || die "usage: postgres.sh start|stop DIR [PORT]"

bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
[[ -x "$bindir/pg_ctl" ]] || die "PostgreSQL server binaries not found under /usr/lib/postgresql (run scripts/setup.sh)"

as_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
  start)
    port="${3:-55432}"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    [[ $(id -u) -eq 0 ]] && chown postgres: "$dir"
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
      as_owner "$bindir/initdb" -D "$dir/data" -U outpost --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    fi
    if ! as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
      as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=200" >/dev/null \
        || { tail -n 20 "$dir/server.log" >&2; die "the server did not start (log: $dir/server.log)"; }
    fi
    echo "postgres://outpost@127.0.0.1:$port"
    ;;
  stop)
    [[ -d "$dir/data" ]] || exit 0
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    ;;
  *)
    die "unknown command $cmd (start or stop)"
    ;;
esac
