#!/bin/bash
# verify.sh -- boot the built guest (vmlinux, bzImage, initramfs.cpio, kata-rootfs.img in OUTDIR,
# as build.sh leaves them) under QEMU TCG and check every GUEST_ line, device and init mode.
# Usage: verify.sh OUTDIR > verify.txt   (logs kept in $VERIFY_TMP or a mktemp dir)
# Never uses KVM: every run is -accel tcg, so it passes on any x86-64 or CI host.
# Exit status 0 only when every check passed; the last line is "# summary: N passed, M failed".
# Env: QEMU (qemu-system-x86_64), TO (timeout per boot, s, default 120), NICE (nice level for QEMU)
set -u
[ $# -ge 1 ] || { sed -n '2,8p' "$0"; exit 2; }
G="$(cd "$1" && pwd)"
INITRD="$G/initramfs.cpio"
for f in vmlinux bzImage initramfs.cpio kata-rootfs.img; do
  [ -f "$G/$f" ] || { echo "missing $G/$f" >&2; exit 2; }
done
QEMU=${QEMU:-qemu-system-x86_64}
TO=${TO:-120}
T=${VERIFY_TMP:-$(mktemp -d /tmp/guestverify.XXXXXX)}
mkdir -p "$T"
BASE=(-no-reboot -nographic -nodefaults -serial stdio)
PASS=0; FAIL=0
declare -a SUMMARY

echo "# chapeau guest verification  $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "# host: $(uname -r)  qemu: $($QEMU --version | head -n1)"
echo "# guest dir: $G   logs: $T   timeout per boot: ${TO}s"
echo

# qrun NAME ARGS...  -> foreground boot, log in $T/NAME.log (CR stripped), rc in $T/NAME.rc
qrun() {
  local name=$1; shift
  local t0=$(date +%s)
  timeout "$TO" nice -n "${NICE:-0}" "$QEMU" "${BASE[@]}" "$@" </dev/null >"$T/$name.raw" 2>&1
  local rc=$?
  tr -d '\r' <"$T/$name.raw" >"$T/$name.log"
  echo "$rc" >"$T/$name.rc"
  echo "$(( $(date +%s) - t0 ))" >"$T/$name.secs"
}
# qstart NAME ARGS... -> background boot; sets QPID
qstart() {
  local name=$1; shift
  date +%s >"$T/$name.t0"
  : >"$T/$name.raw"
  timeout "$TO" nice -n "${NICE:-0}" "$QEMU" "${BASE[@]}" "$@" </dev/null >"$T/$name.raw" 2>&1 &
  QPID=$!
}
qstop() {  # qstop NAME PID
  kill "$2" 2>/dev/null; wait "$2" 2>/dev/null
  tr -d '\r' <"$T/$1.raw" >"$T/$1.log"
  echo "$(( $(date +%s) - $(cat "$T/$1.t0") ))" >"$T/$1.secs"
}
# waitfor NAME REGEX SECS -> 0 when the raw log matches
waitfor() {
  local i=0
  while [ $i -lt $(( $3 * 10 )) ]; do
    tr -d '\r' <"$T/$1.raw" | grep -aqE "$2" && return 0
    sleep 0.1; i=$((i+1))
  done
  return 1
}
mark() { python3 -c 'import sys; f=open(sys.argv[1],"r+b"); f.seek(10<<20); f.write(b"\xa5"*4096)' "$1"; }
markstate() { python3 -c 'import sys; f=open(sys.argv[1],"rb"); f.seek(10<<20); b=f.read(4096); print("marker" if b==b"\xa5"*4096 else "zeros" if b==bytes(4096) else "other")' "$1"; }
has() { grep -aqx -- "$2" "$T/$1.log"; }          # exact line
hasre() { grep -aqE -- "$2" "$T/$1.log"; }        # regex
evidence() {
  echo "  evidence ($1, $(cat "$T/$1.secs" 2>/dev/null)s, qemu rc=$(cat "$T/$1.rc" 2>/dev/null || echo killed)):"
  grep -aE '^(GUEST_[A-Z0-9_]+=.*|GUEST_BOOT_OK)$|Kernel panic|pmem0|Linux version' "$T/$1.log" | sed 's/^/    /'
}
result() {  # result ID DESCRIPTION OK(0/1) [note]
  if [ "$3" = 0 ]; then PASS=$((PASS+1)); st=PASS; else FAIL=$((FAIL+1)); st=FAIL; fi
  echo "[$1] $st: $2${4:+ -- $4}"
  SUMMARY+=("[$1] $st: $2")
}
ok() { "$@" && echo 0 || echo 1; }
all() { for c in "$@"; do eval "$c" || return 1; done; return 0; }

APPEND="console=ttyS0 reboot=k panic=1"
PMEM_APPEND="console=ttyS0 reboot=k panic=1 root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4"

# ---------------------------------------------------------------- a
qrun a -M pc -accel tcg -m 256 -smp 2 -kernel "$G/vmlinux" -initrd "$INITRD" -append "$APPEND"
r=$(ok all 'has a GUEST_BOOT_OK' 'has a GUEST_CPUS=2' '[ "$(cat $T/a.rc)" = 0 ]')
result a "pc, vmlinux (PVH) + initramfs, -smp 2: GUEST_BOOT_OK, GUEST_CPUS=2, QEMU exits" "$r"
evidence a

# ---------------------------------------------------------------- b
qrun b -M pc -accel tcg -m 256 -smp 2 -kernel "$G/bzImage" -initrd "$INITRD" -append "$APPEND"
r=$(ok all 'has b GUEST_BOOT_OK' 'has b GUEST_CPUS=2' '[ "$(cat $T/b.rc)" = 0 ]')
result b "pc, bzImage + initramfs, -smp 2: GUEST_BOOT_OK, GUEST_CPUS=2, QEMU exits" "$r"
evidence b

# ---------------------------------------------------------------- c
VDEV=(-device virtio-rng-pci -device virtio-serial-pci
      -chardev "socket,id=ch0,path=$T/c.sock,server=on,wait=off"
      -device virtserialport,chardev=ch0,name=agent.channel.0)
qrun c -M q35 -accel tcg -m 256 -smp 2 -kernel "$G/vmlinux" -initrd "$INITRD" -append "$APPEND" "${VDEV[@]}"
r=$(ok all 'hasre c "^GUEST_HWRNG=available=.*virtio_rng.* current=virtio_rng"' \
           'hasre c "^GUEST_VIRTIO_PORTS=(.* )?agent\.channel\.0( |$)"' 'has c GUEST_MSIX=yes' \
           '[ "$(cat $T/c.rc)" = 0 ]')
result c "q35 + virtio-rng-pci + virtio-serial-pci/virtserialport: virtio_rng current, agent.channel.0, MSI-X" "$r"
evidence c

# ---------------------------------------------------------------- d
VDEV=(-device virtio-rng-pci -device virtio-serial-pci
      -chardev "socket,id=ch0,path=$T/d.sock,server=on,wait=off"
      -device virtserialport,chardev=ch0,name=agent.channel.0)
qstart d -M q35 -accel tcg -m 256 -smp 2 -kernel "$G/vmlinux" -initrd "$INITRD" \
  -append "$APPEND test=echo-port" "${VDEV[@]}"
DPID=$QPID
if waitfor d '^GUEST_ACTION=echo-port' "$TO"; then
  python3 - "$T/d.sock" >"$T/d.py" 2>&1 <<'PY'
import os, socket, sys, threading, time, hashlib
path = sys.argv[1]
data = os.urandom(64 * 1024)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.settimeout(60)
def sender():
    for i in range(0, len(data), 4096):
        s.sendall(data[i:i + 4096])
t0 = time.time()
th = threading.Thread(target=sender); th.start()
got = bytearray()
try:
    while len(got) < len(data):
        b = s.recv(65536)
        if not b:
            break
        got += b
except socket.timeout:
    pass
th.join(5)
dt = time.time() - t0
print("sent=%d received=%d identical=%s sha256(sent)=%s sha256(recv)=%s %.2fs"
      % (len(data), len(got), bytes(got) == data, hashlib.sha256(data).hexdigest()[:16],
         hashlib.sha256(bytes(got)).hexdigest()[:16], dt))
sys.exit(0 if bytes(got) == data else 1)
PY
  pyrc=$?
else
  echo "guest never reached GUEST_ACTION=echo-port" >"$T/d.py"; pyrc=1
fi
qstop d "$DPID"
result d "echo-port: 64 KiB random bytes through agent.channel.0 come back identical" "$pyrc"
echo "  python: $(cat "$T/d.py")"
evidence d

# ---------------------------------------------------------------- e
cp --sparse=always "$G/kata-rootfs.img" "$T/nv.img"
SHA0=$(sha256sum <"$T/nv.img" | cut -d' ' -f1)
qrun e -M pc,nvdimm=on -accel tcg -m 256,slots=2,maxmem=1G \
  -object "memory-backend-file,id=mem1,share=on,mem-path=$T/nv.img,size=64M,readonly=on" \
  -device nvdimm,id=nv1,memdev=mem1,unarmed=on \
  -kernel "$G/vmlinux" -append "$PMEM_APPEND test=pmem-write"
SHA1=$(sha256sum <"$T/nv.img" | cut -d' ' -f1)
r=$(ok all 'has e GUEST_BOOT_OK' 'has e GUEST_ROOT_DAX=yes' '[ "$SHA0" = "$SHA1" ]' '[ "$(cat $T/e.rc)" = 0 ]')
result e "pc,nvdimm=on + nvdimm(unarmed) on readonly memory-backend-file, root=/dev/pmem0p1 dax, no initrd" "$r"
echo "  image sha256 before=$SHA0 after=$SHA1 $([ "$SHA0" = "$SHA1" ] && echo unchanged || echo CHANGED)"
evidence e

# ---------------------------------------------------------------- f
cp --sparse=always "$G/kata-rootfs.img" "$T/vp.img"
mark "$T/vp.img"   # pmem0 offset 8 MiB = image offset 10 MiB = ext4 journal block 799 (ignored while the journal is clean)
qrun f -M q35 -accel tcg -m 256,slots=2,maxmem=1G \
  -object "memory-backend-file,id=mem2,share=on,mem-path=$T/vp.img,size=64M" \
  -device virtio-pmem-pci,memdev=mem2,id=vp0 \
  -kernel "$G/vmlinux" -append "$PMEM_APPEND test=pmem-write"
r=$(ok all 'has f GUEST_BOOT_OK' 'has f GUEST_ROOT_DAX=yes' '[ "$(cat $T/f.rc)" = 0 ]')
result f "q35 + virtio-pmem-pci on a writable copy, root=/dev/pmem0p1 dax, no initrd" "$r"
echo "  info: 4 KiB 0xA5 marker placed at image offset 10 MiB before boot; after boot it is: $(markstate "$T/vp.img") (zeros = the guest's dd reached the host file through virtio-pmem)"
evidence f

# ---------------------------------------------------------------- g
rm -rf "$T/share"; mkdir -p "$T/share"; echo host-file >"$T/share/from-host.txt"
qrun g -M q35 -accel tcg -m 256 -kernel "$G/vmlinux" -initrd "$INITRD" -append "$APPEND test=9p" \
  -fsdev "local,id=fs0,path=$T/share,security_model=none" -device virtio-9p-pci,fsdev=fs0,mount_tag=kataShared
CONTENT=$(cat "$T/share/guest-wrote.txt" 2>/dev/null)
r=$(ok all 'has g GUEST_9P=ok' '[ "$CONTENT" = hello-from-guest ]' '[ "$(cat $T/g.rc)" = 0 ]')
result g "virtio-9p-pci mount_tag=kataShared: guest writes guest-wrote.txt" "$r"
echo "  host file $T/share/guest-wrote.txt: '$CONTENT'"
evidence g

# ---------------------------------------------------------------- h
HPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
qstart h -M q35 -accel tcg -m 256 -kernel "$G/vmlinux" -initrd "$INITRD" \
  -append "$APPEND test=net guest_ip=10.0.2.15/24" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$HPORT-10.0.2.15:5000" -device virtio-net-pci,netdev=n0
HPID=$QPID
waitfor h '^GUEST_NET_UP=' "$TO"
sleep 2
# bonus (not part of the pass criterion): TCP echo through slirp hostfwd -> guest nc -ll -p 5000 -e cat
ECHO=$(python3 - "$HPORT" 2>&1 <<'PY'
import socket, sys, time
for attempt in range(10):
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
        s.sendall(b"ping-through-virtio-net\n")
        got = b""
        while not got.endswith(b"\n"):
            b = s.recv(100)
            if not b: break
            got += b
        if got:
            print("echo reply=%r" % got); break
    except Exception as e:
        err = e
    time.sleep(1)
else:
    print("no echo reply (%s)" % err)
PY
)
qstop h "$HPID"
r=$(ok all 'hasre h "^GUEST_NET=(.* )?eth0( |$)"' 'hasre h "^GUEST_NET_UP=10\.0\.2\.15/24$"')
result h "virtio-net-pci + user netdev, test=net guest_ip=10.0.2.15/24" "$r"
echo "  bonus TCP echo via hostfwd: $ECHO"
evidence h

# ---------------------------------------------------------------- extras
qrun x1 -M pc -accel tcg -m 256 -kernel "$G/vmlinux" -initrd "$INITRD" -append "$APPEND test=reboot"
r=$(ok all 'has x1 GUEST_ACTION=reboot' '[ "$(cat $T/x1.rc)" = 0 ]')
result x1 "test=reboot ends QEMU (-no-reboot, reboot=k)" "$r"; evidence x1

qrun x2 -M pc -accel tcg -m 256 -kernel "$G/vmlinux" -initrd "$INITRD" -append "$APPEND test=panic"
r=$(ok all 'has x2 GUEST_ACTION=panic' 'hasre x2 "Kernel panic"' '[ "$(cat $T/x2.rc)" = 0 ]')
result x2 "test=panic -> sysrq crash, panic=1 reboot ends QEMU" "$r"; evidence x2

qrun x3 -M pc -accel tcg -m 256 -kernel "$G/vmlinux" -initrd "$INITRD" -append "$APPEND test=bogus"
r=$(ok all 'has x3 GUEST_ACTION=unknown' '[ "$(cat $T/x3.rc)" = 0 ]')
result x3 "unknown test mode -> GUEST_ACTION=unknown + poweroff" "$r"; evidence x3

# Kata-style console on hvc0 (virtconsole), bzImage, kata image on nvdimm
cp --sparse=always "$G/kata-rootfs.img" "$T/nv2.img"
qrun x4 -M pc,nvdimm=on -accel tcg -m 256,slots=2,maxmem=1G \
  -object "memory-backend-file,id=mem1,share=on,mem-path=$T/nv2.img,size=64M,readonly=on" \
  -device nvdimm,id=nv1,memdev=mem1,unarmed=on \
  -device virtio-serial-pci -device virtconsole,chardev=con0 -chardev "file,id=con0,path=$T/x4.hvc" \
  -kernel "$G/bzImage" -append "console=hvc0 reboot=k panic=1 root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4"
tr -d '\r' <"$T/x4.hvc" >>"$T/x4.log" 2>/dev/null
r=$(ok all 'has x4 GUEST_BOOT_OK' 'has x4 GUEST_ROOT_DAX=yes' '[ "$(cat $T/x4.rc)" = 0 ]')
result x4 "bzImage, console=hvc0 (virtconsole), kata image on nvdimm" "$r"; evidence x4

# nvdimm read-only proof with a visible marker: the guest's dd must not reach the file
cp --sparse=always "$G/kata-rootfs.img" "$T/nv3.img"; mark "$T/nv3.img"
SHA0=$(sha256sum <"$T/nv3.img" | cut -d' ' -f1)
qrun x5 -M pc,nvdimm=on -accel tcg -m 256,slots=2,maxmem=1G \
  -object "memory-backend-file,id=mem1,share=on,mem-path=$T/nv3.img,size=64M,readonly=on" \
  -device nvdimm,id=nv1,memdev=mem1,unarmed=on \
  -kernel "$G/vmlinux" -append "$PMEM_APPEND test=pmem-write"
SHA1=$(sha256sum <"$T/nv3.img" | cut -d' ' -f1)
r=$(ok all 'has x5 GUEST_PMEM_WRITE=refused' '[ "$SHA0" = "$SHA1" ]' '[ "$(markstate $T/nv3.img)" = marker ]')
result x5 "nvdimm unarmed+readonly: guest write refused, 0xA5 marker at pmem0+8MiB intact, sha unchanged" "$r"
echo "  marker after boot: $(markstate "$T/nv3.img"); sha256 before=$SHA0 after=$SHA1"; evidence x5

# kernel-style ip= instead of guest_ip= (IP_PNP may already configure it; init reads it back)
qstart x6 -M q35 -accel tcg -m 256 -kernel "$G/vmlinux" -initrd "$INITRD" \
  -append "$APPEND test=net ip=10.0.2.16::10.0.2.2:255.255.255.0::eth0:off" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0
X6PID=$QPID; waitfor x6 '^GUEST_NET_UP=' "$TO"; qstop x6 "$X6PID"
r=$(ok hasre x6 "^GUEST_NET_UP=10\.0\.2\.16/24$")
result x6 "test=net with ip=<client>::<gw>:<mask>::eth0:off" "$r"; evidence x6

# hang keeps the guest alive
qstart x7 -M pc -accel tcg -m 256 -kernel "$G/vmlinux" -initrd "$INITRD" -append "$APPEND test=hang"
X7PID=$QPID; waitfor x7 '^GUEST_ACTION=hang' "$TO"; sleep 3
if kill -0 "$X7PID" 2>/dev/null; then alive=0; else alive=1; fi
qstop x7 "$X7PID"
r=$(ok all 'has x7 GUEST_ACTION=hang' '[ $alive = 0 ]')
result x7 "test=hang: guest idles, QEMU still running 3 s after GUEST_ACTION=hang" "$r"; evidence x7

# shell on the serial console, commands fed through QEMU's stdin
t0=$(date +%s)
( sleep 10; printf 'echo SHELL_OK; grep " / " /proc/mounts; poweroff -f\n'; sleep 30 ) |
  timeout "$TO" nice -n "${NICE:-0}" "$QEMU" "${BASE[@]}" -M pc -accel tcg -m 256 -kernel "$G/vmlinux" -initrd "$INITRD" \
  -append "$APPEND test=shell" >"$T/x8.raw" 2>&1
echo "${PIPESTATUS[1]}" >"$T/x8.rc"; tr -d '\r' <"$T/x8.raw" >"$T/x8.log"; echo "$(( $(date +%s) - t0 ))" >"$T/x8.secs"
r=$(ok all 'has x8 GUEST_ACTION=shell' 'has x8 SHELL_OK')
result x8 "test=shell: interactive busybox sh on the console (input via serial)" "$r"; evidence x8
grep -a -A1 '^SHELL_OK' "$T/x8.log" | sed 's/^/    /'

echo
echo "# summary: $PASS passed, $FAIL failed"
for l in "${SUMMARY[@]}"; do echo "#   $l"; done
[ "$FAIL" = 0 ]
