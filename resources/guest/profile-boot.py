#!/usr/bin/env python3
"""profile-boot.py -- where does a guest boot spend its time? Sample the vCPU's RIP from the VMM.

Boots the guest under QEMU microvm (KVM by default), asks QEMU's monitor for `info registers`
every --interval seconds, and maps each sampled RIP to a kernel symbol with System.map.
Samples in user mode (CPL 3) count as "[user]", halted vCPUs as "[idle]". On kvm-pvm hosts
guest kernel mode is emulated, so the kernel-mode samples are the boot time that can be cut.

Usage:
  profile-boot.py --kernel vmlinux --map System.map --initrd initramfs.cpio \
      [--append "..."] [--smp 1] [--mem 64] [--interval 0.02] [--timeout 300] [--out prefix]
The kvm-pvm parameters (pvm-cmdline beside this script) are added unless --no-pvm.
Writes PREFIX.console (timestamped console) and PREFIX.samples, prints a report to stdout:
top symbols overall, and top symbols per phase (before/after the first user-mode sample).
"""
import argparse, bisect, collections, os, re, socket, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))


def load_map(path):
    addrs, names = [], []
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) < 3 or p[1].lower() not in "tw":
                continue
            addrs.append(int(p[0], 16)); names.append(p[2])
    order = sorted(range(len(addrs)), key=lambda i: addrs[i])
    return [addrs[i] for i in order], [names[i] for i in order]


def sym(addrs, names, rip):
    i = bisect.bisect_right(addrs, rip) - 1
    return names[i] if i >= 0 else "?%x" % rip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", required=True); ap.add_argument("--map", required=True)
    ap.add_argument("--initrd"); ap.add_argument("--append", default="")
    ap.add_argument("--smp", default="1"); ap.add_argument("--mem", default="64")
    ap.add_argument("--interval", type=float, default=0.02); ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=None); ap.add_argument("--no-pvm", action="store_true")
    ap.add_argument("--tcg", action="store_true"); ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="profile-boot.") + "/run"
    addrs, names = load_map(a.map)
    append = "console=ttyS0 reboot=k panic=1 quiet"
    if not a.no_pvm:
        append += " " + open(os.path.join(HERE, "pvm-cmdline")).read().strip()
    if a.append:
        append += " " + a.append
    sock = out + ".mon"
    if os.path.exists(sock):
        os.unlink(sock)
    accel = "tcg" if a.tcg else "kvm"
    cmd = ["qemu-system-x86_64", "-M", "microvm,accel=" + accel] + ([] if a.tcg else ["-cpu", "host,-arch-capabilities"]) + [
        "-m", a.mem, "-smp", a.smp, "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
        "-monitor", "unix:%s,server=on,wait=off" % sock, "-kernel", a.kernel, "-append", append]
    if a.initrd:
        cmd += ["-initrd", a.initrd]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    boot_ok = [None]

    def reader():
        with open(out + ".console", "w") as f:
            for raw in p.stdout:
                s = raw.decode("utf-8", "replace").rstrip("\r\n")
                now = time.monotonic() - t0
                f.write("%8.2f %s\n" % (now, s)); f.flush()
                if boot_ok[0] is None and s.endswith("GUEST_BOOT_OK"):
                    boot_ok[0] = now
    th = threading.Thread(target=reader, daemon=True); th.start()
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    m = socket.socket(socket.AF_UNIX); m.connect(sock); m.settimeout(10)
    buf = b""

    def cmd_mon(c):
        nonlocal buf
        m.sendall(c.encode() + b"\n")
        while b"(qemu) " not in buf:
            d = m.recv(65536)
            if not d:
                raise EOFError
            buf += d
        r, _, buf = buf.partition(b"(qemu) ")
        return r.decode("latin-1")
    cmd_mon("")  # banner
    samples = []
    rip_re = re.compile(r"RIP=([0-9a-f]{16})"); cpl_re = re.compile(r"CPL=(\d)"); hlt_re = re.compile(r"HLT=(\d)")
    try:
        while p.poll() is None and time.monotonic() - t0 < a.timeout:
            ts = time.monotonic() - t0
            r = cmd_mon("info registers")
            for cpu in r.split("CPU#")[1:] if "CPU#" in r else [r]:
                mr, mc, mh = rip_re.search(cpu), cpl_re.search(cpu), hlt_re.search(cpu)
                if mr:
                    samples.append((ts, int(mr.group(1), 16), int(mc.group(1)) if mc else -1,
                                    int(mh.group(1)) if mh else 0))
            time.sleep(a.interval)
    except (EOFError, OSError, socket.timeout):
        pass
    if p.poll() is None:
        p.kill()
    p.wait(); th.join(2)
    with open(out + ".samples", "w") as f:
        for ts, rip, cpl, hlt in samples:
            f.write("%.3f %016x %d %d %s\n" % (ts, rip, cpl, hlt, "[idle]" if hlt else "[user]" if cpl == 3 else sym(addrs, names, rip)))

    def label(s):
        return "[idle]" if s[3] else "[user]" if s[2] == 3 else sym(addrs, names, s[1])
    first_user = next((s[0] for s in samples if s[2] == 3 and not s[3]), None)
    print("console: %s.console  samples: %s.samples (%d)" % (out, out, len(samples)))
    print("GUEST_BOOT_OK at %s s; first user-mode sample at %s s" % (
        "%.1f" % boot_ok[0] if boot_ok[0] else "none", "%.1f" % first_user if first_user else "none"))
    phases = [("all samples up to GUEST_BOOT_OK", lambda s: boot_ok[0] is None or s[0] <= boot_ok[0]),
              ("kernel init (before first user sample)", lambda s: first_user is None or s[0] < first_user),
              ("userspace phase (first user sample .. GUEST_BOOT_OK)",
               lambda s: first_user is not None and s[0] >= first_user and (boot_ok[0] is None or s[0] <= boot_ok[0]))]
    for title, pred in phases:
        sel = [s for s in samples if pred(s)]
        if not sel:
            continue
        c = collections.Counter(label(s) for s in sel)
        print("\n== %s: %d samples" % (title, len(sel)))
        for n, k in c.most_common(a.top):
            print("%6d %5.1f%%  %s" % (k, 100.0 * k / len(sel), n))


if __name__ == "__main__":
    main()
