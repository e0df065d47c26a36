#!/usr/bin/env bash
# Network-policy benchmark (issue 6), as root: Outpost's eBPF programs against no filter
# and against equivalent nftables rules (a chain and a set) at 10, 1,000 and 10,000
# rules, over a veth pair into a network namespace; and the time to swap in a
# 10,000-rule bundle against `nft -f` replacing the same rules. Method: bench/policy.py.
#
#   bash bench/policy.sh
#
# Environment: OUTPOST_SKIP_SETUP=1, OUTPOST_SKIP_BUILD=1; BENCH_POLICY_ARGS (passed to
# bench/policy.py, e.g. "--rules 10,1000 --seconds 5 --repeat 5").
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
exec </dev/null
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"
[[ $(id -u) -eq 0 ]] || { echo "bench/policy.sh needs root (eBPF, cgroups, namespaces, nftables)" >&2; exit 2; }

if [[ "${OUTPOST_SKIP_SETUP:-0}" != 1 ]]; then
  bash scripts/setup.sh >&2
fi
if [[ "${OUTPOST_SKIP_BUILD:-0}" != 1 ]]; then
  cargo build --release --bins
fi
# shellcheck disable=SC2086
exec .venv/bin/python bench/policy.py ${BENCH_POLICY_ARGS:-}
