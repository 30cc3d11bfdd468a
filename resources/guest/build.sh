#!/bin/bash
# build.sh -- build the whole chapeau test guest into OUTDIR.
#
# Usage: build.sh OUTDIR [WORKDIR]
#   OUTDIR   gets vmlinux, bzImage, System.map, config, config-check.txt, initramfs.cpio,
#            kata-rootfs.img (sparse) and SHA256SUMS
#   WORKDIR  kernel source/build tree (default OUTDIR/.work; reused for incremental builds)
# Env: JOBS (make -j, default nproc), BUSYBOX (default /bin/busybox)
#
# On a fresh Debian 12 machine:
#   apt-get update && apt-get install -y linux-source-6.1 busybox-static build-essential flex \
#     bison bc libelf-dev libssl-dev cpio e2fsprogs fdisk python3
# A full kernel build takes ~15-20 min on 2 cores; the initramfs and the image take seconds.
# Then `verify.sh OUTDIR` (needs qemu-system-x86) boots everything under QEMU TCG.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
[ $# -ge 1 ] || { sed -n '2,15p' "$0"; exit 2; }
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
WORK="${2:-$OUT/.work}"
"$HERE/build-kernel.sh" "$WORK" "$OUT"
"$HERE/build-initramfs.sh" "$WORK/linux-source-6.1" "$OUT/initramfs.cpio"
"$HERE/make-kata-image.py" --busybox "${BUSYBOX:-/bin/busybox}" --init "$HERE/init.sh" "$OUT/kata-rootfs.img"
(cd "$OUT" && sha256sum vmlinux bzImage System.map config initramfs.cpio kata-rootfs.img > SHA256SUMS)
cat "$OUT/SHA256SUMS"
