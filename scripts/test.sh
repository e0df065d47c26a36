#!/usr/bin/env bash
# Set up the machine and run the whole test suite (what CI runs).
#
#   bash scripts/test.sh
#
# 1. scripts/setup.sh (Debian packages, Rust check, Python venv)
# 2. cargo build --all-targets (the default members: every host crate; ebpf/programs
#    is built for the BPF target by ebpf/loader's build script)
# 3. a throwaway PostgreSQL server (scripts/postgres.sh) for the store suite
# 4. scripts/layering.py (the shape rules of docs/architecture.md), then cargo test
# 5. the Debian packages (scripts/packages.sh) into target/debian, for tests/test_packages.py
# 6. scripts/fuzz.sh: every cargo-fuzz target for OUTPOST_FUZZ_SECONDS (default 20) each
# 7. pytest on tests/ (black-box tests against the built binaries and packages)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null   # nothing here may wait for input (CI has no stdin)

step() { printf '\n==> %s\n' "$*"; }
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A one-shot build gains nothing from incremental state (over 1 GB under target/).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "setup"
df -h "$REPO_ROOT" /tmp 2>/dev/null || true
# A full run needs about 20 GiB (target/ ~15 GiB, VM images, test disks): say so
# plainly up front rather than let a linker die of SIGBUS on a full disk later.
free_kib="$(df --output=avail -k "$REPO_ROOT" | tail -1 | tr -d ' ')"
if [[ "$free_kib" =~ ^[0-9]+$ ]] && (( free_kib < 20 * 1024 * 1024 )); then
  echo "test.sh: warning: only $(( free_kib / 1024 )) MiB free under $REPO_ROOT; the suite needs about 20 GiB" >&2
fi
bash scripts/setup.sh
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

step "cargo build --all-targets"
cargo build --all-targets

# A PostgreSQL server for the store suite (Rust) and the two-servers test (pytest);
# stopped when this script ends.
step "PostgreSQL for the store suite"
PG_DIR="$(mktemp -d /tmp/outpost-test-pg.XXXXXX)"
trap 'bash scripts/postgres.sh stop "$PG_DIR"; rm -rf "$PG_DIR"' EXIT
OUTPOST_TEST_POSTGRES="$(bash scripts/postgres.sh start "$PG_DIR" "${OUTPOST_TEST_POSTGRES_PORT:-55433}")"
export OUTPOST_TEST_POSTGRES
echo "PostgreSQL at $OUTPOST_TEST_POSTGRES"

step "layering (scripts/layering.py: no module circles, layer rules, file and function sizes, no state compared as text)"
python3 scripts/layering.py

step "cargo test"
cargo test

step "the agent without eBPF (--no-default-features, stable toolchain only; its own target dir)"
RUSTUP_TOOLCHAIN=stable cargo build -p outpost-agent --no-default-features --target-dir target/no-ebpf

# cargo deb --no-build from the debug build above (seconds; a release build of the
# workspace would add many minutes). The revision-2 set is the upgrade that
# tests/test_packages.py installs over the first; built first, because cargo-deb
# deletes earlier .debs of a package from target/debian.
step "Debian packages (scripts/packages.sh: cargo deb --no-build of the debug build into target/debian)"
bash scripts/packages.sh --profile dev --deb-revision 2 "${CARGO_TARGET_DIR:-target}/debian/revision-2" >/dev/null
bash scripts/packages.sh --profile dev

step "fuzz (scripts/fuzz.sh, ${OUTPOST_FUZZ_SECONDS:-20} s per target)"
bash scripts/fuzz.sh "${OUTPOST_FUZZ_SECONDS:-20}"

step "pytest tests/"
set +e
.venv/bin/python -m pytest -q tests/
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests under tests/: treating this as a failure" >&2
  exit 1
elif [[ $rc -ne 0 ]]; then
  echo "pytest failed (exit $rc)" >&2
  exit "$rc"
fi

echo
echo "test.sh: all steps passed (setup, cargo build, cargo test, fuzz, pytest)"
