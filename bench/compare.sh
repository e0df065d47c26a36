#!/usr/bin/env bash
# Same-run comparison of two builds: is the current tree slower than a base commit?
#
#   bash bench/compare.sh [BASE]        # BASE: a commit [$BENCH_BASE, else 8c0b4cc]
#
# Builds BASE's release binaries in target/bench-base/ (a detached git worktree with its
# own target directory, kept between runs) and this tree's in target/release, then runs
# BENCH_COMPARE_ROUNDS (2) rounds, the two builds in alternating order, of:
# - check-ins (bench/checkins.sh, SQLite, BENCH_CHECKIN_DEVICES [2,000] simulated
#   devices, BENCH_CHECKIN_SECS [10] s as fast as 32 clients go; the simulator is this
#   tree's for both, so the server is what differs);
# - the download (bench/bench.sh part a, a BENCH_IMAGE_MIB [256] MiB image, 3 timed
#   `outpost-agent tuf-client download`s; each build's server and agent).
# Writes the medians and the ratio head ÷ base between <!-- compare:begin --> and
# <!-- compare:end --> in docs/benchmarks.md (BENCH_OUT). A ratio below 1 for
# check-ins/s or download MiB/s, or above 1 for latency, means the tree is slower.
# Not part of the tests: benchmarks measure, tests assert.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
trap 'echo "compare.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

BASE="${1:-${BENCH_BASE:-8c0b4cc}}"
ROUNDS="${BENCH_COMPARE_ROUNDS:-2}"
OUT="${BENCH_OUT:-$REPO_ROOT/docs/benchmarks.md}"
WORK="$REPO_ROOT/target/bench-compare"
BASE_SRC="$REPO_ROOT/target/bench-base/src"
BASE_TARGET="$REPO_ROOT/target/bench-base/target"
BASE_REV="$(git rev-parse --verify "$BASE^{commit}")" || { echo "compare.sh: BASE $BASE is not a commit" >&2; exit 2; }

echo "compare.sh: building this tree (release)" >&2
cargo build --release --bins
if [[ "$(git -C "$BASE_SRC" rev-parse HEAD 2>/dev/null || true)" != "$BASE_REV" ]]; then
  git worktree remove --force "$BASE_SRC" 2>/dev/null || rm -rf "$BASE_SRC"
  git worktree prune
  git worktree add --detach "$BASE_SRC" "$BASE_REV" >&2
fi
echo "compare.sh: building base ${BASE_REV:0:12} (release, target/bench-base/target)" >&2
(cd "$BASE_SRC" && CARGO_TARGET_DIR="$BASE_TARGET" cargo build --release --bins)

rm -rf "$WORK"
mkdir -p "$WORK"
run_one() { # NAME BINDIR ROUND
  local dir="$WORK/$1-$3"
  mkdir -p "$dir"
  echo "compare.sh: round $3, $1: check-ins" >&2
  OUTPOST_SKIP_BUILD=1 OUTPOST_BIN="$2" BENCH_SIM="$REPO_ROOT/target/release/outpost-fleet-sim" \
    BENCH_DIR="$dir/checkins" BENCH_OUT="$dir/checkins.md" BENCH_CHECKIN_BACKENDS=sqlite BENCH_CHECKIN_LARGE=0 \
    BENCH_CHECKIN_DEVICES="${BENCH_CHECKIN_DEVICES:-2000}" BENCH_CHECKIN_SECS="${BENCH_CHECKIN_SECS:-10}" \
    bash bench/checkins.sh >"$dir/checkins.log" 2>&1 || { tail -20 "$dir/checkins.log" >&2; exit 1; }
  echo "compare.sh: round $3, $1: download" >&2
  OUTPOST_SKIP_BUILD=1 OUTPOST_BIN="$2" BENCH_DIR="$dir/download" BENCH_OUT="$dir/download.md" BENCH_PARTS=a \
    BENCH_IMAGE_MIB="${BENCH_IMAGE_MIB:-256}" BENCH_DOWNLOAD_RUNS=3 \
    bash bench/bench.sh >"$dir/download.log" 2>&1 || { tail -20 "$dir/download.log" >&2; exit 1; }
}
for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2)); then order="base head"; else order="head base"; fi
  for who in $order; do
    if [[ "$who" == base ]]; then run_one base "$BASE_TARGET/release" "$r"; else run_one head "$REPO_ROOT/target/release" "$r"; fi
  done
done

python3 - "$WORK" "$OUT" "$BASE_REV" "$ROUNDS" "${BENCH_IMAGE_MIB:-256}" <<'PY'
import json, os, statistics, subprocess, sys
work, out, base_rev, rounds, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def figures(who):
    rate, p50, p99, dl = [], [], [], []
    for r in range(1, rounds + 1):
        c = json.load(open(os.path.join(work, f"{who}-{r}", "checkins", "sqlite", "small-max.json")))
        rate.append(c["checkins_per_s"]); p50.append(c["latency_ms"]["p50"]); p99.append(c["latency_ms"]["p99"])
        for line in open(os.path.join(work, f"{who}-{r}", "download", "results.jsonl")):
            rec = json.loads(line)
            if rec["label"] == "agent_download" and rec.get("rc", 0) == 0:
                dl.append(mib / rec["wall_s"])
    return {"rate": statistics.median(rate), "p50": statistics.median(p50), "p99": statistics.median(p99), "dl": statistics.median(dl)}
base, head = figures("base"), figures("head")
head_rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
rows = [
    ("check-ins/s, as fast as 32 clients go (higher is better)", "rate", "{:,.0f}"),
    ("check-in latency p50, ms (lower is better)", "p50", "{:.1f}"),
    ("check-in latency p99, ms (lower is better)", "p99", "{:.1f}"),
    (f"download of a {mib} MiB image, MiB/s (higher is better)", "dl", "{:,.0f}"),
]
lines = ["<!-- compare:begin -->", "## Same-run comparison with a base commit (bench/compare.sh)", "",
         f"Base `{base_rev[:12]}`, head `{head_rev}`{' with uncommitted changes' if dirty else ''}; {rounds} rounds, the builds in alternating order; medians.", "",
         "| measure | base | head | head ÷ base |", "|---|---:|---:|---:|"]
for label, k, fmt in rows:
    lines.append(f"| {label} | {fmt.format(base[k])} | {fmt.format(head[k])} | {head[k] / base[k]:.2f} |")
lines.append("<!-- compare:end -->")
section = "\n".join(lines)
print(section)
text = open(out).read() if os.path.exists(out) else ""
if "<!-- compare:begin -->" in text:
    a, rest = text.split("<!-- compare:begin -->", 1)
    b = rest.split("<!-- compare:end -->", 1)[1]
    text = a + section + b
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
open(out, "w").write(text)
PY
