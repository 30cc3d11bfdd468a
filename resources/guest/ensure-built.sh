#!/usr/bin/env bash
# ensure-built.sh -- make sure our test guest in target/guest matches resources/guest, building
# it when it does not (installing the Debian packages the build needs). The first build takes
# ~20 min on 2 cores (the kernel); later ones only redo what changed. Prints the directory.
# Usage: resources/guest/ensure-built.sh   (from anywhere in the repo; as root for apt-get)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="$repo/target/guest"
inputs=$(cd "$repo/resources/guest" && cat build.sh build-kernel.sh build-initramfs.sh \
  make-kata-image.py init.sh kata-guest.fragment ./*.patch | sha256sum | cut -c1-16)
if [ "$(cat "$out/.inputs" 2>/dev/null)" != "$inputs" ]; then
  if [ -e "$out/vmlinux" ]; then
    echo "resources/guest changed: rebuilding the test guest in $out (only what changed)" >&2
  else
    echo "building the test guest in $out from Debian's packages: about 20 minutes on 2 cores" >&2
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends linux-source-6.1 busybox-static \
    build-essential flex bison bc libelf-dev libssl-dev cpio e2fsprogs fdisk python3 xz-utils >&2
  start=$(date +%s)
  "$repo/resources/guest/build.sh" "$out" "$repo/target/guest-work" >&2
  echo "$inputs" > "$out/.inputs"
  echo "test guest built in $(( $(date +%s) - start )) s" >&2
fi
echo "$out"
