#!/bin/sh
# chapeau test guest /init (busybox sh).  Same script in initramfs.cpio and in
# kata-rootfs.img (as /init and /sbin/init).
# Prints GUEST_* lines to the console, then acts on test=<mode> from /proc/cmdline.
#
# Written for speed on hosts that emulate guest kernel mode (kvm-pvm, ~1 M instructions/s):
# every external command is a fork+exec (~1-2 s there) and every shell `read` is one system
# call per byte, so the report below uses shell builtins, globs and small sysfs files only.
# Output is the same as ../shared/guest/init.sh's (see README.md).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022

# mounted DIR: is something mounted on DIR?  (builtins only)
mounted() {
  while read -r _d _m _r; do [ "$_m" = "$1" ] && return 0; done </proc/mounts
  return 1
}

if [ -r /etc/fstab ]; then
  # one busybox exec mounts proc, sysfs, devtmpfs and /tmp; entries already mounted are skipped
  mount -a 2>/dev/null
else
  mount -t proc proc /proc 2>/dev/null
  mounted /sys || mount -t sysfs sysfs /sys
  mounted /dev || mount -t devtmpfs devtmpfs /dev
  mounted /tmp || mount -t tmpfs tmpfs /tmp 2>/dev/null
fi
[ -d /dev/pts ] && [ -d /dev/shm ] || mkdir -p /dev/pts /dev/shm 2>/dev/null
mounted /dev/pts || mount -t devpts devpts /dev/pts 2>/dev/null
exec </dev/console >/dev/console 2>&1

read -r CMDLINE </proc/cmdline
# Keep kernel messages from interleaving with our lines unless asked not to.
case " $CMDLINE " in
  *" loglevel="*|*" debug "*|*" ignore_loglevel "*) ;;
  *) echo 1 > /proc/sys/kernel/printk 2>/dev/null ;;
esac

MODE=poweroff
GUEST_IP=""
GUEST_GW=""
KIP=""
for arg in $CMDLINE; do
  case "$arg" in
    test=*) MODE=${arg#test=} ;;
    guest_ip=*) GUEST_IP=${arg#guest_ip=} ;;
    guest_gw=*) GUEST_GW=${arg#guest_gw=} ;;
    ip=*) KIP=${arg#ip=} ;;
  esac
done

# --- virtio-ports symlinks (no udev): /dev/virtio-ports/NAME -> ../vportNpM ---
make_vport_links() {
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    n=""; read -r n <"$p/name" 2>/dev/null
    [ -n "$n" ] || continue
    [ -d /dev/virtio-ports ] || mkdir -p /dev/virtio-ports
    [ -L "/dev/virtio-ports/$n" ] || ln -sf "../${p##*/}" "/dev/virtio-ports/$n"
  done
}
have_named_port() {
  for p in /sys/class/virtio-ports/*; do
    n=""; [ -s "$p/name" ] && read -r n <"$p/name" 2>/dev/null
    [ -n "$n" ] && return 0
  done
  return 1
}
for d in /sys/bus/virtio/drivers/virtio_console/virtio*; do
  [ -e "$d" ] || continue
  i=0
  while [ $i -lt 20 ] && ! have_named_port; do usleep 100000; i=$((i+1)); done
  have_named_port && usleep 100000   # let sibling ports' names arrive too
  break
done
make_vport_links

# --- report ---
echo "GUEST_BOOT_OK"

# online CPUs (= processors in /proc/cpuinfo), from the "0-1,3" list in sysfs
ncpu=0
read -r online </sys/devices/system/cpu/online 2>/dev/null
oldifs=$IFS; IFS=,
for r in $online; do
  case "$r" in
    *-*) ncpu=$((ncpu + ${r#*-} - ${r%-*} + 1)) ;;
    ?*) ncpu=$((ncpu + 1)) ;;
  esac
done
IFS=$oldifs
echo "GUEST_CPUS=$ncpu"
# MemTotal is the first line of /proc/meminfo
read -r _k memkb _u </proc/meminfo
echo "GUEST_MEM_KB=$memkb"

RNGA=""; RNGC=""
IFS= read -r RNGA </sys/class/misc/hw_random/rng_available 2>/dev/null
if [ -n "$RNGA" ]; then
  IFS= read -r RNGC </sys/class/misc/hw_random/rng_current 2>/dev/null
  echo "GUEST_HWRNG=available=$RNGA current=$RNGC"
else
  echo "GUEST_HWRNG=none"
fi

PORTS=""
for p in /dev/virtio-ports/*; do [ -e "$p" ] || [ -L "$p" ] && PORTS="$PORTS ${p##*/}"; done
PORTS=${PORTS# }
echo "GUEST_VIRTIO_PORTS=${PORTS:-none}"

MSIX=no
for f in /sys/bus/pci/devices/*/msi_irqs/*; do
  [ -f "$f" ] || continue
  m=""; read -r m <"$f" 2>/dev/null
  case "$m" in *msix*) MSIX=yes; break ;; esac
done
echo "GUEST_MSIX=$MSIX"

PCI=""
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/vendor" ] || continue
  read -r v <"$d/vendor"; read -r dv <"$d/device"
  PCI="$PCI ${v#0x}:${dv#0x}"
done
PCI=${PCI# }
echo "GUEST_PCI=${PCI:-none}"

PMEM=""
for p in /dev/pmem*; do [ -e "$p" ] && PMEM="$PMEM ${p##*/}"; done
PMEM=${PMEM# }
echo "GUEST_PMEM=${PMEM:-none}"

NET=""
for n in /sys/class/net/*; do
  [ -e "$n" ] || continue
  [ "${n##*/}" = lo ] || NET="$NET ${n##*/}"
done
NET=${NET# }
echo "GUEST_NET=${NET:-none}"

# root filesystem: last "/" entry of /proc/mounts
rfs=""; ropts=""
while read -r _d _m _t _o _r; do
  [ "$_m" = / ] && { rfs=$_t; ropts=$_o; }
done </proc/mounts
case "$rfs" in
  rootfs|ramfs|tmpfs|"") ;;
  *)
    case "$ropts" in
      *dax*) echo "GUEST_ROOT_DAX=yes" ;;
      *) echo "GUEST_ROOT_DAX=no" ;;
    esac ;;
esac

# --- helpers for actions ---
forever() { while :; do sleep 3600; done; }

# busybox poweroff/reboot -f call sync() themselves
do_poweroff() { poweroff -f; forever; }

# The power button (the VMM's SendCtrlAltDel, QEMU's system_powerdown): Linux's ACPI button driver
# reports it as a key on the input device "Power Button". Its evdev node is opened here, before
# returning, so a press from now on is queued even if the reader has not run yet; one event
# (24 bytes: evdev refuses shorter reads) then prints GUEST_POWER_BUTTON=pressed and powers off.
watch_power_button() {
  for i in /sys/class/input/input*; do
    [ -e "$i/name" ] || continue
    n=""; read -r n <"$i/name"
    [ "$n" = "Power Button" ] || continue
    for e in "$i"/event*; do
      dev=/dev/input/${e##*/}
      [ -c "$dev" ] || continue
      # (a failed `exec 3<` would end this shell, PID 1; a group's redirection only fails it)
      { ( dd bs=24 count=1 of=/dev/null <&3 2>/dev/null; echo "GUEST_POWER_BUTTON=pressed"; do_poweroff ) & } 3<"$dev" || continue
      return 0
    done
  done
  return 1
}

echo_loop() {
  port=/dev/virtio-ports/agent.channel.0
  while :; do
    if [ ! -e "$port" ]; then make_vport_links; fi
    if [ -e "$port" ]; then
      # One open for all host sessions, as an agent holds it: Linux discards what a port holds
      # when it is closed, and a `cat` that ends at EOF (no host client yet) and reopens the
      # port lost bytes a client sent while it was closing. Without a client, `cat` reads EOF
      # at once: the inner loop polls every 100 ms.
      { while :; do cat <&3 >&3; usleep 100000; done; } 3<>"$port" 2>/dev/null
    fi
    usleep 100000
  done
}

mask2prefix() {
  # dotted netmask -> prefix length
  n=0
  oldifs=$IFS; IFS=.
  for o in $1; do
    case $o in
      255) n=$((n+8)) ;; 254) n=$((n+7)) ;; 252) n=$((n+6)) ;; 248) n=$((n+5)) ;;
      240) n=$((n+4)) ;; 224) n=$((n+3)) ;; 192) n=$((n+2)) ;; 128) n=$((n+1)) ;;
    esac
  done
  IFS=$oldifs
  echo $n
}

net_up() {
  dev=eth0
  addr=""; gw="$GUEST_GW"
  if [ -n "$GUEST_IP" ]; then
    addr=$GUEST_IP
    case "$addr" in */*) ;; *) addr="$addr/24" ;; esac
  elif [ -n "$KIP" ]; then
    # ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>
    oldifs=$IFS; IFS=:
    set -- $KIP
    IFS=$oldifs
    c=$1; g=$3; m=$4; d=$6
    [ -n "$d" ] && dev=$d
    [ -n "$g" ] && [ -z "$gw" ] && gw=$g
    if [ -n "$c" ] && [ "$c" != "dhcp" ] && [ "$c" != "off" ]; then
      if [ -n "$m" ]; then addr="$c/$(mask2prefix "$m")"; else addr="$c/24"; fi
    fi
  fi
  ip link set lo up 2>/dev/null
  ip link set "$dev" up 2>/dev/null
  [ -n "$addr" ] && ip addr add "$addr" dev "$dev" 2>/dev/null
  [ -n "$gw" ] && ip route add default via "$gw" dev "$dev" 2>/dev/null
  got=$(ip -o -4 addr show dev "$dev" 2>/dev/null | awk '{print $4}' | head -n1)
  echo "GUEST_NET_UP=${got:-fail}"
}

# --- actions ---
# Modes that stay up power off when the power button is pressed.
case "$MODE" in
  hang|wait|shell|echo-port|perf-echo|net|kata) watch_power_button || POWER_BUTTON=none ;;
esac
case "$MODE" in
  poweroff|"")
    echo "GUEST_ACTION=poweroff"
    do_poweroff ;;
  reboot)
    echo "GUEST_ACTION=reboot"
    reboot -f; forever ;;
  panic)
    echo "GUEST_ACTION=panic"
    echo 1 > /proc/sys/kernel/sysrq
    echo c > /proc/sysrq-trigger
    forever ;;
  hang)
    echo "GUEST_ACTION=hang"
    forever ;;
  wait)
    # waits for the power button (GUEST_POWER_BUTTON=pressed, then power-off); says first if
    # there is none, so whoever waits for GUEST_ACTION=wait knows
    [ -z "${POWER_BUTTON:-}" ] || echo "GUEST_POWER_BUTTON=none"
    echo "GUEST_ACTION=wait"
    forever ;;
  shell)
    echo "GUEST_ACTION=shell"
    while :; do setsid cttyhack sh; sleep 1; done ;;
  echo-port|perf-echo)
    echo "GUEST_ACTION=$MODE"
    echo_loop ;;
  pmem-write)
    echo "GUEST_ACTION=pmem-write"
    if [ -b /dev/pmem0 ] && dd if=/dev/zero of=/dev/pmem0 bs=4096 count=1 seek=2048 conv=notrunc,fsync 2>/dev/null; then
      echo "GUEST_PMEM_WRITE=done"
    else
      echo "GUEST_PMEM_WRITE=refused"
    fi
    do_poweroff ;;
  net)
    echo "GUEST_ACTION=net"
    net_up
    nc -ll -p 5000 -e cat &
    forever ;;
  kata)
    # What Kata's agent needs of the VM, in one boot (tests/tests/qemu.rs): the network with
    # a TCP echo server on port 5000, the shared directory (the guest writes a file there),
    # then the agent port's echo until the power button.
    echo "GUEST_ACTION=kata"
    net_up
    nc -ll -p 5000 -e cat &
    [ -d /mnt ] || mkdir -p /mnt 2>/dev/null
    if mount -t 9p -o trans=virtio,version=9p2000.L,cache=none kataShared /mnt &&
      echo "hello-from-guest" > /mnt/guest-wrote.txt && sync; then
      echo "GUEST_9P=ok"
    else
      echo "GUEST_9P=fail"
    fi
    echo_loop ;;
  9p)
    echo "GUEST_ACTION=9p"
    [ -d /mnt ] || mkdir -p /mnt 2>/dev/null
    ok=fail
    if mount -t 9p -o trans=virtio,version=9p2000.L,cache=none kataShared /mnt; then
      if echo "hello-from-guest" > /mnt/guest-wrote.txt && sync; then
        ls -la /mnt
        g=""; read -r g </mnt/guest-wrote.txt
        [ "$g" = "hello-from-guest" ] && ok=ok
      fi
      umount /mnt 2>/dev/null
    fi
    echo "GUEST_9P=$ok"
    do_poweroff ;;
  9p-workload)
    # The scripted 9p workload tests/tests/p9.rs checks from the host: each step prints
    # GUEST_9P_FAIL=<step> when it goes wrong, then GUEST_9P_WORKLOAD=ok|fail.
    echo "GUEST_ACTION=9p-workload"
    [ -d /mnt ] || mkdir -p /mnt 2>/dev/null
    r=ok
    fail() { echo "GUEST_9P_FAIL=$1"; r=fail; }
    if mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none kataShared /mnt; then
      cd /mnt || fail cd
      echo one >f; echo two >>f
      { read -r a; read -r b; } <f; [ "$a $b" = "one two" ] || fail append
      mv f g && [ ! -e f ] && [ -f g ] || fail rename
      mkdir d && [ -d d ] && rmdir d && [ ! -e d ] || fail mkdir-rmdir
      ln -s g s && [ "$(readlink s)" = g ] && { read -r a <s; [ "$a" = one ]; } || fail symlink
      ln g h && [ "$(stat -c %h g)" = 2 ] || fail hardlink
      rm h s && [ ! -e h ] || fail unlink
      chmod 640 g && [ "$(stat -c %a g)" = 640 ] || fail chmod
      truncate -s 3 g && [ "$(stat -c %s g)" = 3 ] || fail truncate
      { read -r a <host-wrote.txt; [ "$a" = from-the-host ]; } || fail host-file
      mkdir many && i=0
      while [ $i -lt 2000 ]; do : >many/entry-$i; i=$((i+1)); done
      [ "$(ls many | wc -l)" = 2000 ] || fail readdir
      # p9_big_mib=N MiB (default 64): 1 MiB of random repeated, so the guest's random number
      # generator (slow where guest kernel code is emulated) makes only one.
      n=64; for arg in $CMDLINE; do case "$arg" in p9_big_mib=*) n=${arg#p9_big_mib=} ;; esac; done
      dd if=/dev/urandom of=/tmp/r bs=1M count=1 2>/dev/null || fail big-seed
      i=0; while [ $i -lt "$n" ]; do cat /tmp/r; i=$((i+1)); done >big || fail big-write
      echo "GUEST_9P_BIG_SHA=$(sha256sum big)"
      echo unlinked-data >u; exec 4<u; rm u
      { read -r a <&4; [ "$a" = unlinked-data ]; } || fail unlinked-open
      exec 4<&-
      # Escape attempts: a host symlink out of the export, a guest symlink to /etc, `..`.
      cat out/secret >/dev/null 2>&1 && fail host-symlink
      echo pwned >out/pwned 2>/dev/null
      ln -s /etc evil && echo pwned >evil/pwned-etc 2>/dev/null
      cat ../../../../outside/secret >/dev/null 2>&1
      echo "GUEST_9P_ESCAPES=tried"
      cd / && umount /mnt || fail umount
    else
      fail mount
    fi
    echo "GUEST_9P_WORKLOAD=$r"
    do_poweroff ;;
  netbench)
    # bench net-guest: /bin/guest-bench (appended to the initramfs by the bench) serves TCP
    # throughput and round trips on port 5001 until the host sends quit.
    echo "GUEST_ACTION=netbench"
    net_up
    /bin/guest-bench net 5001 || echo "GUEST_BENCH=fail"
    do_poweroff ;;
  9p-bench)
    # bench p9-guest: sequential and small-file figures on the 9p share, mounted as Kata does
    # (bench_mib=N MiB, bench_files=N files, from the kernel command line).
    echo "GUEST_ACTION=9p-bench"
    mib=64; files=1000
    for arg in $CMDLINE; do
      case "$arg" in bench_mib=*) mib=${arg#bench_mib=} ;; bench_files=*) files=${arg#bench_files=} ;; esac
    done
    [ -d /mnt ] || mkdir -p /mnt 2>/dev/null
    if mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none kataShared /mnt; then
      /bin/guest-bench fs /mnt "$mib" "$files"
      umount /mnt
    else
      echo "GUEST_P9_BENCH=fail mount"
    fi
    do_poweroff ;;
  mmap-read)
    # DAX read benchmark: /bench.dat through mmap (see mmap-read.c), on the pmem root
    echo "GUEST_ACTION=mmap-read"
    if [ -x /bin/mmap-read ] && [ -f /bench.dat ]; then /bin/mmap-read /bench.dat; else echo "GUEST_MMAP_READ=fail missing"; fi
    do_poweroff ;;
  dmesg)
    # profiling aid: print the kernel log (e.g. with initcall_debug), then power off
    echo "GUEST_ACTION=dmesg"
    dmesg
    do_poweroff ;;
  *)
    echo "GUEST_ACTION=unknown"
    do_poweroff ;;
esac
do_poweroff
