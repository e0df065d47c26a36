#!/usr/bin/env bash
# A cached minimal Debian 12 root filesystem for the package tests
# (tests/test_packages.py): debootstrap --variant=minbase bookworm, plus the packages
# named on the command line (the Outpost packages' dependencies, so that `dpkg -i`
# of the .debs needs no network). Prints the cache directory.
#
#   bash scripts/deb-chroot.sh [PACKAGE...]
#
# The cache lives under /var/cache/outpost-vm/chroot-<hash>/, the hash taken over
# everything that decides its content (suite, mirror, variant, the sorted package
# list, the recipe version below), so a changed input makes a new one and an
# unchanged one is reused. It is made in a temporary directory and renamed into place
# only when debootstrap succeeded: a directory under that name is always complete.
# Callers copy it (cp -a) and never change it. Downloaded .debs are shared with the
# VM image scripts through /var/cache/outpost-vm/debs. Needs root, debootstrap and,
# the first time, the network.
set -euo pipefail

SUITE=bookworm
MIRROR=http://deb.debian.org/debian
VARIANT=minbase
RECIPE=1   # bump when the way the tree is made changes
CACHE_ROOT="${OUTPOST_VM_CACHE:-/var/cache/outpost-vm}"

die() { printf 'deb-chroot: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap (scripts/setup.sh does)"

packages="$(printf '%s\n' "$@" | sed '/^$/d' | sort -u | paste -sd, -)"
key="$(printf 'recipe=%s\nsuite=%s\nmirror=%s\nvariant=%s\ninclude=%s\n' \
  "$RECIPE" "$SUITE" "$MIRROR" "$VARIANT" "$packages" | sha256sum | cut -c1-16)"
dir="$CACHE_ROOT/chroot-$key"
if [[ -d "$dir" ]]; then
  echo "$dir"
  exit 0
fi

mkdir -p "$CACHE_ROOT/debs"
# One builder per cache directory: a second caller waits, then finds it made.
exec 9>"$CACHE_ROOT/chroot-$key.lock"
flock 9
if [[ ! -d "$dir" ]]; then
  tmp="$(mktemp -d "$CACHE_ROOT/.chroot-$key.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  printf 'deb-chroot: debootstrap %s %s (%s) into %s\n' "$VARIANT" "$SUITE" "${packages:-no extra packages}" "$dir" >&2
  debootstrap --variant="$VARIANT" ${packages:+--include="$packages"} \
    --cache-dir="$CACHE_ROOT/debs" "$SUITE" "$tmp" "$MIRROR" >"$tmp.log" 2>&1 \
    || { tail -n 30 "$tmp.log" >&2; rm -f "$tmp.log"; die "debootstrap failed (log above)"; }
  rm -f "$tmp.log"
  # The package lists are not needed (dpkg -i works offline) and go stale.
  rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin
  mv -T "$tmp" "$dir"
  trap - EXIT
fi
echo "$dir"
