#!/usr/bin/env bash
# boot.sh -- build chapeau and boot the test guest with it (2 vCPUs, 256 MiB, the console on
# this terminal). The guest prints GUEST_... lines and powers off; chapeau exits 0.
# Uses our guest in target/guest when it is built and current, else the prebuilt one in
# ../shared/guest when present, else builds ours first (ensure-built.sh: ~20 min the first time).
# Usage: resources/guest/boot.sh [extra kernel parameters, e.g. test=hang]
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
cargo build --release -q
inputs=$(cd resources/guest && cat build.sh build-kernel.sh build-initramfs.sh \
  make-kata-image.py init.sh kata-guest.fragment ./*.patch | sha256sum | cut -c1-16)
if [ "$(cat target/guest/.inputs 2>/dev/null)" = "$inputs" ]; then
  guest=target/guest
  initrd=$guest/initramfs.cpio
elif [ -e ../shared/guest/vmlinux ]; then
  guest=../shared/guest
  initrd=target/shared-initramfs.cpio
  [ -e "$initrd" ] || zcat "$guest/initramfs.cpio.gz" > "$initrd"
else
  guest=$(resources/guest/ensure-built.sh)
  initrd=$guest/initramfs.cpio
fi
echo "booting $guest/vmlinux (on a PVM host the guest kernel is emulated: ~1 min to GUEST_BOOT_OK)" >&2
exec target/x86_64-unknown-linux-gnu/release/chapeau --kernel "$guest/vmlinux" --initrd "$initrd" \
  --cmdline "console=ttyS0 reboot=k panic=1 $*" --cpus 2 --memory 256
