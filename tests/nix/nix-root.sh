#!/bin/sh
# Make DIR a Debian trixie root with Nix 2.26 (Debian's nix-bin), git and CA certificates, for
# evaluating the flake where no modern Nix is installed (tests/test_flake.py does this itself):
#
#   sudo tests/nix/nix-root.sh .nix-root          # a minute or two, ~290 MB; needs mmdebstrap
#   sudo unshare --mount --fork --mount-proc=.nix-root/proc chroot .nix-root nix --version
#
# Nix needs /proc; unshare mounts one in a private mount namespace that ends with the command, so
# nothing stays mounted under the checkout (a leftover mount makes the directory impossible to remove).
# Idempotent: a root that already has nix is kept. Needs root and `apt-get install mmdebstrap`.
set -eu

dir=${1:?usage: nix-root.sh DIR}
suite=trixie

if [ "$(id -u)" != 0 ]; then
  echo "nix-root.sh: needs root (mmdebstrap, mount, chroot)" >&2
  exit 2
fi

if [ ! -x "$dir/usr/bin/nix" ]; then
  if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "nix-root.sh: mmdebstrap is not installed (apt-get install mmdebstrap)" >&2
    exit 2
  fi
  # Build beside DIR and move it in place only when complete, so an interrupted run never leaves
  # a half-made root that looks finished.
  partial="$dir.partial"
  rm -rf "$partial"
  mmdebstrap --quiet --variant=apt --include=nix-bin,git,ca-certificates "$suite" "$partial"
  if [ -d "$dir" ]; then
    rmdir "$dir" # refuses unless empty: never replace anything else
  fi
  mv "$partial" "$dir"
fi

unshare --mount --fork --mount-proc="$dir/proc" chroot "$dir" nix --version
