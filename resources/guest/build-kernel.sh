#!/bin/bash
# build-kernel.sh -- build the chapeau test guest kernel from Debian's linux-source-6.1.
#
# Usage: build-kernel.sh WORKDIR OUTDIR
#   WORKDIR  where linux-source-6.1/ is extracted and built (reused if present: incremental)
#   OUTDIR   gets vmlinux (stripped of debug info, .symtab kept), bzImage, System.map,
#            config (the full .config) and config-check.txt (fragment: wanted vs. actual)
# Env: JOBS (default: nproc), SRC_TAR (default /usr/src/linux-source-6.1.tar.xz),
#      KCFLAGS (default -mstringop-strategy=libcall, see below)
# Needs (Debian 12): linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
#
# Config = x86_64_defconfig + kvm_guest.config + kata-guest.fragment, then olddefconfig.
# Reproducible: KBUILD_BUILD_{TIMESTAMP,USER,HOST,VERSION} are fixed below, so two builds from
# the same sources/toolchain give the same vmlinux/bzImage bytes.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
[ $# -eq 2 ] || { sed -n '2,14p' "$0"; exit 2; }
mkdir -p "$1" "$2"
WORK="$(cd "$1" && pwd)"
OUT="$(cd "$2" && pwd)"
SRC_TAR=${SRC_TAR:-/usr/src/linux-source-6.1.tar.xz}
JOBS=${JOBS:-$(nproc)}
export KBUILD_BUILD_TIMESTAMP="Thu Jan  1 00:00:00 UTC 1970"
export KBUILD_BUILD_USER=chapeau KBUILD_BUILD_HOST=chapeau KBUILD_BUILD_VERSION=1
export LC_ALL=C TZ=UTC
# gcc expands memset/memcpy of unknown size in cold (__init) code as byte-wise "rep stosb/movsb",
# e.g. the zeroing in clear_bss() and memblock_alloc*(): ~1 emulated iteration per byte on kvm-pvm
# (several seconds of boot). With libcall they call the kernel's memset/memcpy, which use
# "rep stosq/movsq" (clearcpuid=erms) or unrolled 8-byte loops. Same semantics everywhere.
export KCFLAGS=${KCFLAGS--mstringop-strategy=libcall}

# Kernel patches, applied in this order. Each one is a no-op unless noted (README.md).
PATCHES=(
  pvm-skip-int3-selftest.patch   # skips int3_selftest() (INT3 not emulated on kvm-pvm)
  pvm-fpu-drop-no-fwait.patch    # fpu__drop(): no FWAIT (not emulated on kvm-pvm)
  pvm-syscall-via-pf.patch       # "pvm_syscall" boot parameter only
  mpparse-scan-map-once.patch    # speed only, same result: map the MP-table scan area once
  tick-skip-missed-periodic.patch # count missed periodic ticks at once (no endless replay on kvm-pvm)
)

cd "$WORK"
if [ ! -d linux-source-6.1 ]; then
  echo "extracting $SRC_TAR"
  tar xf "$SRC_TAR"
fi
cd linux-source-6.1
for p in "${PATCHES[@]}"; do
  if patch -p1 -R --dry-run -s -f < "$HERE/$p" >/dev/null 2>&1; then
    echo "patch $p: already applied"
  else
    patch -p1 -s -f --no-backup-if-mismatch < "$HERE/$p"
    echo "patch $p: applied"
  fi
done

# The tools/ build (objtool) records absolute paths in its .cmd files. In a work tree copied or
# moved from elsewhere they would differ, objtool would be rebuilt and, as every kernel object
# depends on the objtool binary, so would the whole kernel. Point the records at this tree:
# objtool's output does not depend on where it was built, so results stay byte-identical.
# A fresh tree has no record yet: nothing to update (and no failing pipeline under pipefail).
built_in=
if [ -f tools/objtool/.weak.o.cmd ]; then
  built_in=$(sed -n 's|.*-Wp,-MD,\(/[^ ]*\)/tools/objtool/.*|\1|p;T;q' tools/objtool/.weak.o.cmd)
fi
if [ -n "$built_in" ] && [ "$built_in" != "$PWD" ]; then
  echo "work tree moved from $built_in: updating objtool's build records"
  { grep -rlF --include='.*.cmd' "$built_in" tools || true; } | while read -r f; do
    sed -i "s|$built_in|$PWD|g" "$f"
  done
fi

# Configure into a scratch file first so an unchanged config keeps .config's mtime (no rebuild).
cp .config .config.prev 2>/dev/null || true
make -s x86_64_defconfig
make -s kvm_guest.config
scripts/kconfig/merge_config.sh -m .config "$HERE/kata-guest.fragment" >/dev/null
make -s olddefconfig
if [ -f .config.prev ] && cmp -s .config .config.prev; then
  touch -r .config.prev .config
fi
rm -f .config.prev
cp .config "$OUT/config"

# config-check.txt: every option named in the fragment, wanted value vs. final .config
CHK="$OUT/config-check.txt"
{
  echo "# option want=<fragment> got=<.config> status"
  grep -E '^(CONFIG_[A-Za-z0-9_]+=.*|# CONFIG_[A-Za-z0-9_]+ is not set)' "$HERE/kata-guest.fragment" |
  while read -r line; do
    if [[ $line == "# "* ]]; then opt=$(echo "$line" | awk '{print $2}'); want=n
    else opt=${line%%=*}; want=${line#*=}; fi
    act=$(grep -E "^$opt=" .config | cut -d= -f2- || true)
    [ -n "$act" ] || act=n
    if [ "$want" = "$act" ]; then st=OK; else st=MISMATCH; fi
    echo "$opt want=$want got=$act $st"
  done
} > "$CHK"
nok=$(grep -c ' OK$' "$CHK" || true); nbad=$(grep -c ' MISMATCH$' "$CHK" || true)
echo "# summary: $nok OK, $nbad MISMATCH" >> "$CHK"
echo "config check: $nok OK, $nbad MISMATCH"
if [ "$nbad" != 0 ]; then grep MISMATCH "$CHK"; echo "config check failed" >&2; exit 1; fi

make -j"$JOBS" vmlinux bzImage
# Installed by rename, never rewritten in place: chapeau maps the kernel into running guests
# (copy-on-write), and a file truncated and rewritten under them would change or end them.
cp arch/x86/boot/bzImage "$OUT/bzImage.tmp"
mv -f "$OUT/bzImage.tmp" "$OUT/bzImage"
cp System.map "$OUT/System.map"
# No DWARF is built (DEBUG_INFO_NONE); strip anyway; .symtab stays for RIP -> symbol mapping.
objcopy --strip-debug vmlinux "$OUT/vmlinux.tmp"
mv -f "$OUT/vmlinux.tmp" "$OUT/vmlinux"
ls -l "$OUT/vmlinux" "$OUT/bzImage"
