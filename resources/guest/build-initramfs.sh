#!/bin/bash
# build-initramfs.sh -- the test guest initramfs: an UNCOMPRESSED newc cpio (no root needed).
#
# Usage: build-initramfs.sh KERNEL_SRC OUT.cpio
#   KERNEL_SRC  a Linux source tree (for usr/gen_init_cpio.c; build-kernel.sh's WORKDIR/linux-source-6.1)
#   OUT.cpio    output file
# Env: BUSYBOX (default /bin/busybox, Debian busybox-static)
#      LINKS=all  one /bin|/sbin|/usr/... symlink per busybox applet (~390). Default: only links
#                 for the applets init.sh runs. Debian's busybox-static shell finds the other
#                 applets itself (FEATURE_SH_STANDALONE: it execs /proc/self/exe, so once /proc is
#                 mounted), and on kvm-pvm every cpio entry costs emulated kernel time at unpack.
#
# Contents: /bin/busybox + links for init.sh's applets (or all, LINKS=all), /init and /sbin/init =
# init.sh, /etc/fstab (for init's single `mount -a`), /dev/console and /dev/null as device nodes
# written by gen_init_cpio (no mknod, no root), empty proc sys dev tmp mnt root etc run.
# Reproducible: entries in a fixed sorted order, every mtime 0, uid/gid 0, fixed inode numbers.
# Uncompressed on purpose: on kvm-pvm hosts gunzip of 1 MiB costs ~60 s of emulated kernel time.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
[ $# -eq 2 ] || { sed -n '2,13p' "$0"; exit 2; }
KSRC=$1; OUT=$2
BUSYBOX=${BUSYBOX:-/bin/busybox}
export LC_ALL=C
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
gcc -O2 -o "$T/gen_init_cpio" "$KSRC/usr/gen_init_cpio.c"
# gen_init_cpio -t only sets the time of non-file entries; files keep their mtime: use copies at 0
install -m 0755 "$BUSYBOX" "$T/busybox"
install -m 0755 "$HERE/init.sh" "$T/init"
cat >"$T/fstab" <<'EOF'
proc /proc proc defaults 0 0
sysfs /sys sysfs defaults 0 0
devtmpfs /dev devtmpfs defaults 0 0
tmpfs /tmp tmpfs defaults 0 0
EOF
touch -d @0 "$T/busybox" "$T/init" "$T/fstab"
{
  for d in bin dev etc mnt proc root run sbin sys tmp usr usr/bin usr/sbin; do
    if [ $d = tmp ]; then echo "dir /$d 1777 0 0"; else echo "dir /$d 0755 0 0"; fi
  done
  echo "nod /dev/console 0600 0 0 c 5 1"
  echo "nod /dev/null 0666 0 0 c 1 3"
  echo "file /bin/busybox $T/busybox 0755 0 0"
  echo "file /etc/fstab $T/fstab 0644 0 0"
  echo "file /init $T/init 0755 0 0"
  echo "file /sbin/init $T/init 0755 0 0"
  if [ "${LINKS:-}" = all ]; then "$BUSYBOX" --list-full; else
    "$BUSYBOX" --list-full | grep -E '/(awk|cat|cttyhack|dd|dmesg|head|ip|ln|ls|mkdir|mount|nc|poweroff|reboot|setsid|sh|sleep|sync|umount|usleep)$'
  fi | sort -u | while read -r a; do
    case "/$a" in /bin/busybox|/sbin/init|/init) continue ;; esac
    echo "slink /$a /bin/busybox 0777 0 0"
  done
} >"$T/list"
# Renamed into place, not rewritten: running guests may have it mapped (see build-kernel.sh).
"$T/gen_init_cpio" -t 0 "$T/list" >"$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"
ls -l "$OUT"
