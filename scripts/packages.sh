#!/usr/bin/env bash
# Debian packages of Outpost's three binaries with cargo-deb (scripts/setup.sh installs
# it): outpost-agent, outpost-server and outpost (the signer CLI). What each contains
# is declared in [package.metadata.deb] of update-agent/, repo-server/ and signer/
# Cargo.toml (units, configs and maintainer scripts under <crate>/debian/).
#
#   bash scripts/packages.sh [--profile dev|release] [--deb-revision N] [OUT_DIR]
#
# Packages the binaries already built (cargo deb --no-build) in $CARGO_TARGET_DIR
# (default target/) for the profile: scripts/test.sh packages its debug build
# (--profile dev), which costs seconds instead of a second, optimised build of the
# workspace. Release packages: `cargo build --release -p outpost-agent -p
# outpost-server -p outpost-signer`, then `bash scripts/packages.sh --profile release`.
# cargo-deb 3.8.0 (pinned in setup.sh) packages the dev profile with a warning that
# later versions may refuse it: these packages are for the tests only. The release
# path (--dbgsym below) has been tried on the debug binaries, not on a release build.
# OUT_DIR defaults to $CARGO_TARGET_DIR/debian. --deb-revision sets the Debian
# revision (default 1), e.g. a higher one to test upgrades. cargo-deb deletes earlier
# .debs of each package from $CARGO_TARGET_DIR/debian whatever OUT_DIR is: build a
# second set elsewhere first, the one for target/debian last.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

profile=release
revision=1
out=""
while (($#)); do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --deb-revision) revision="$2"; shift 2 ;;
    -*) echo "packages.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
out="${out:-$target_dir/debian}"
case "$profile" in
  # Test packages: compressed --fast. Release packages: [profile.release] keeps some
  # debug info; --dbgsym strips it from the binaries into outpost-*-dbgsym .ddebs.
  dev) bin_dir="$target_dir/debug"; options=(--fast) ;;
  release) bin_dir="$target_dir/release"; options=(--dbgsym) ;;
  *) echo "packages.sh: --profile is dev or release, not $profile" >&2; exit 2 ;;
esac

cargo deb --version >/dev/null 2>&1 || { echo "packages.sh: cargo-deb is missing: run scripts/setup.sh" >&2; exit 1; }
for bin in outpost-agent outpost-server outpost; do
  [[ -x "$bin_dir/$bin" ]] || { echo "packages.sh: $bin_dir/$bin is missing: build the $profile profile first (cargo build --profile $profile -p outpost-agent -p outpost-server -p outpost-signer)" >&2; exit 1; }
done

mkdir -p "$out"
for crate in outpost-agent outpost-server outpost-signer; do
  # --no-build: the binaries above; -q keeps the dev-profile warning out of CI logs.
  cargo deb -q --no-build "${options[@]}" --profile "$profile" --deb-revision "$revision" -p "$crate" --output "$out" >/dev/null
done
ls -1 "$out"/*.deb
