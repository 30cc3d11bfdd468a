#!/bin/bash
# measure-boot.sh -- time a guest boot to the GUEST_BOOT_OK line under QEMU microvm + KVM.
#
# Usage: measure-boot.sh [-k KERNEL] [-i INITRD|-] [-c VCPUS] [-m MIB] [-a "EXTRA APPEND"]
#                        [-t TIMEOUT_S] [-l LOGFILE] [-n] [-T]
#   -k  kernel (vmlinux or bzImage), default ./vmlinux
#   -i  initramfs (uncompressed cpio recommended), default ./initramfs.cpio; "-" for none
#   -c  vCPUs (default 1)        -m  RAM in MiB (default 64)
#   -a  extra kernel parameters appended after the base line
#   -n  do not add pvm-cmdline (the kvm-pvm parameters, read from pvm-cmdline beside this script)
#   -T  use TCG (-M pc) instead of KVM microvm (a quick functional check on any host)
#   -l  log file (default: a temp file; every console line prefixed with wall seconds since start
#       and with the CPU seconds QEMU had used by then)
# Base line: console=ttyS0 reboot=k panic=1 quiet <pvm-cmdline> <extra>
# Prints "BOOT_OK_S=<seconds>" (wall time from QEMU start to GUEST_BOOT_OK) or BOOT_OK_S=none, and
# BOOT_OK_CPU_S (QEMU's user+system CPU time by then: on a loaded host this tracks the emulated
# work better than wall time; on an idle host wall ~= CPU + time the guest sat idle).
# The guest is left to finish (test=poweroff is the init default) or killed at the timeout.
# On a shared machine run it under nice, e.g. `nice -n 19 ./measure-boot.sh ...`.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
KERNEL=./vmlinux; INITRD=./initramfs.cpio; CPUS=1; MEM=64; EXTRA=""; TO=300; LOG=""; PVM=1; ACCEL=kvm
while getopts "k:i:c:m:a:t:l:nT" o; do
  case $o in
    k) KERNEL=$OPTARG ;; i) INITRD=$OPTARG ;; c) CPUS=$OPTARG ;; m) MEM=$OPTARG ;;
    a) EXTRA=$OPTARG ;; t) TO=$OPTARG ;; l) LOG=$OPTARG ;; n) PVM=0 ;; T) ACCEL=tcg ;;
    *) sed -n '2,18p' "$0"; exit 2 ;;
  esac
done
APPEND="console=ttyS0 reboot=k panic=1 quiet"
[ $PVM = 1 ] && APPEND="$APPEND $(cat "$HERE/pvm-cmdline")"
[ -n "$EXTRA" ] && APPEND="$APPEND $EXTRA"
[ -n "$LOG" ] || LOG=$(mktemp /tmp/measure-boot.XXXXXX.log)
# (QEMU 7.2 microvm printed nothing under TCG here, so -T uses the pc machine)
if [ $ACCEL = kvm ]; then M=(-M microvm,accel=kvm -cpu host,-arch-capabilities); else M=(-M pc -accel tcg); fi
CMD=(qemu-system-x86_64 "${M[@]}" -m "$MEM" -smp "$CPUS"
     -nographic -nodefaults -serial stdio -no-reboot -kernel "$KERNEL")
[ "$INITRD" != "-" ] && CMD+=(-initrd "$INITRD")
CMD+=(-append "$APPEND")
python3 - "$TO" "$LOG" "${CMD[@]}" <<'PY'
import subprocess, sys, time, os, signal
to, log, cmd = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
tck = os.sysconf("SC_CLK_TCK")
def cpu():
    # CPU seconds (user+system) QEMU has used so far: on kvm-pvm the emulated guest kernel runs in
    # QEMU's vCPU thread, so this counts emulation work and not time lost to other host load
    try:
        f = open("/proc/%d/stat" % p.pid).read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tck
    except OSError:
        return float("nan")
ok = None; okcpu = None
os.set_blocking(p.stdout.fileno(), False)
buf = b""
with open(log, "w") as f:
    f.write("# " + " ".join(cmd) + "\n")
    while True:
        now = time.monotonic() - t0
        if now > to:
            p.kill(); f.write("%8.2f TIMEOUT\n" % now); break
        try:
            chunk = p.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for l in lines:
                s = l.decode("utf-8", "replace").rstrip("\r")
                c = cpu()
                f.write("%8.2f %8.2f %s\n" % (now, c, s)); f.flush()
                if ok is None and s.endswith("GUEST_BOOT_OK"):
                    ok = now; okcpu = c
        elif p.poll() is not None:
            break
        else:
            time.sleep(0.05)
    if buf:
        f.write("%8.2f %s\n" % (time.monotonic() - t0, buf.decode("utf-8", "replace")))
    p.wait()
    f.write("# qemu rc=%s total=%.2f\n" % (p.returncode, time.monotonic() - t0))
print("LOG=%s" % log)
print("BOOT_OK_S=%s" % ("%.1f" % ok if ok is not None else "none"))
print("BOOT_OK_CPU_S=%s" % ("%.1f" % okcpu if okcpu is not None else "none"))
print("TOTAL_S=%.1f QEMU_RC=%s" % (time.monotonic() - t0, p.returncode))
sys.exit(0 if ok is not None else 1)
PY
