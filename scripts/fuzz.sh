#!/usr/bin/env bash
# Build every cargo-fuzz target (fuzz/) and run each for SECONDS (default 20), from the
# seed corpus in fuzz/corpus/<target>/. Fails if any target crashes, panics, leaks,
# times out on one input or runs out of memory; the input that did it is kept in
# fuzz/artifacts/<target>/ and the command to reproduce it is printed.
#
#   bash scripts/fuzz.sh            # what CI runs (scripts/test.sh): 20 s per target
#   bash scripts/fuzz.sh 600        # a longer run
#   bash scripts/fuzz.sh 60 codec   # some targets only
#
# New inputs the fuzzer finds go to a temporary directory, not into fuzz/corpus (add
# the interesting ones by hand; see docs/fuzzing.md). Needs the nightly toolchain and
# cargo-fuzz (scripts/setup.sh installs cargo-fuzz). Build output goes to
# $CARGO_TARGET_DIR when set, else fuzz/target.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
[[ -d "$HOME/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]] && export PATH="$HOME/.cargo/bin:$PATH"

die() { printf '[fuzz] ERROR: %s\n' "$*" >&2; exit 1; }
log() { printf '[fuzz] %s\n' "$*"; }

SECONDS_PER_TARGET="${1:-20}"
[[ "$SECONDS_PER_TARGET" =~ ^[1-9][0-9]*$ ]] || die "SECONDS must be a positive integer, got '$SECONDS_PER_TARGET'"
shift || true

cargo fuzz --version >/dev/null 2>&1 || die "cargo-fuzz is not installed: run bash scripts/setup.sh"
rustup toolchain list | grep -q '^nightly' || die "the nightly toolchain is missing (cargo-fuzz builds with it)"

FUZZ_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/fuzz/target}"
if (($#)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
((${#targets[@]})) || die "cargo fuzz list found no targets"

started=$(date +%s)
log "building ${#targets[@]} targets (nightly, AddressSanitizer, release with debug assertions)"
build_log="$(mktemp /tmp/outpost-fuzz-build.XXXXXX)"
build=(cargo +nightly fuzz build --target-dir "$FUZZ_TARGET_DIR")
# cargo fuzz build takes one target or none (all of them).
((${#targets[@]} == 1)) && build+=("${targets[0]}")
if ! "${build[@]}" >"$build_log" 2>&1; then
  tail -40 "$build_log" >&2
  die "cargo fuzz build failed (log above)"
fi
rm -f "$build_log"
built=$(date +%s)
BIN_DIR="$FUZZ_TARGET_DIR/x86_64-unknown-linux-gnu/release"

work="$(mktemp -d /tmp/outpost-fuzz.XXXXXX)"
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
  [[ -x "$BIN_DIR/$t" ]] || die "no fuzz binary $BIN_DIR/$t (is '$t' in fuzz/Cargo.toml?)"
  [[ -d "fuzz/corpus/$t" ]] || die "no seed corpus fuzz/corpus/$t"
  mkdir -p "$work/new/$t" "$work/artifacts/$t"
  t0=$(date +%s)
  set +e
  "$BIN_DIR/$t" "$work/new/$t" "fuzz/corpus/$t" \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$work/artifacts/$t/" -print_final_stats=1 >"$work/$t.log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
  cov=$(grep -oE 'cov: [0-9]+' "$work/$t.log" | tail -1)
  if ((rc != 0)); then
    failed+=("$t")
    mkdir -p "fuzz/artifacts/$t"
    cp "$work/artifacts/$t/"* "fuzz/artifacts/$t/" 2>/dev/null || true
    log "$t FAILED (exit $rc) after $(($(date +%s) - t0)) s:"
    grep -E 'panicked at|ERROR: |SUMMARY: |^ *[#]?[0-9]+ .* in outpost_|assertion' "$work/$t.log" | head -20 >&2 || true
    for a in "fuzz/artifacts/$t/"*; do
      [[ -e "$a" ]] && log "  reproduce: cargo +nightly fuzz run $t $a"
    done
  else
    log "$t ok: ${runs:-?} inputs in $(($(date +%s) - t0)) s, ${cov:-cov: ?}, $(ls "$work/new/$t" | wc -l) new"
  fi
done
finished=$(date +%s)
log "build $((built - started)) s, runs $((finished - built)) s, total $((finished - started)) s"
if ((${#failed[@]})); then
  die "crashes in: ${failed[*]} (inputs kept in fuzz/artifacts/; each one becomes a regression test, docs/fuzzing.md)"
fi
log "${#targets[@]} passed, 0 failed"
