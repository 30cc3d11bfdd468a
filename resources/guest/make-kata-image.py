#!/usr/bin/env python3
"""make-kata-image.py -- chapeau's builder for a Kata-Containers-layout guest rootfs image.

The image can be handed to a guest as an NVDIMM (ACPI NFIT) or virtio-pmem device and booted with
root=/dev/pmem0p1 rootflags=dax,... : the kernel's nd_pfn driver finds an "info block" at offset
4 KiB, keeps the struct-page memmap for the device in guest RAM, skips the first 2 MiB and exposes the rest as
/dev/pmem0, whose own MBR puts /dev/pmem0p1 (ext4, 4 KiB blocks so DAX works) at image offset
3 MiB. A first MBR at offset 0 describes the same partition for plain block devices.

    offset   what
    0        MBR A: one partition, type 0x83, LBA 6144 (3 MiB) .. end of image
    4 KiB    struct nd_pfn_sb (Linux drivers/nvdimm/pfn.h, 4096 bytes, little endian)
    2 MiB    MBR B: one partition, type 0x83, LBA 2048 (1 MiB after 2 MiB) .. end of image
    3 MiB    ext4 filesystem: busybox, /init = /sbin/init = init.sh, /etc/fstab, /dev nodes

The info block (fields in struct order): signature "NVDIMM_PFN_INFO\\0"; uuid (fixed, derived
from a name); parent_uuid all zero (what nd_dev_to_uuid() reports for a label-less "io"
namespace, which nd_pfn_validate() compares against); flags 0; version 1.4; dataoff 2 MiB
(where pfn data starts, relative to the namespace); npfns = (size - dataoff) / 4096; mode 1
(PFN_MODE_RAM: the guest keeps the struct-page memmap in its RAM, as Kata's own nsdax tool
does; with PFN_MODE_PMEM the guest writes its memmap into the image, which a host that maps the
image read-only drops, leaving the guest with a zeroed memmap once the image reaches a memory
section, 128 MiB); start_pad 0; end_trunc 0; align 2 MiB;
page_size 4096; page_struct_size 64 (MAX_STRUCT_PAGE_SIZE); zero padding; checksum =
nd_fletcher64 over the 4096 bytes with the checksum field (last 8 bytes) taken as zero
(drivers/nvdimm/claim.c nd_sb_checksum, core.c nd_fletcher64).

Reproducible byte for byte: no timestamps (E2FSPROGS_FAKE_TIME, every inode time pinned to 0 with
debugfs), fixed filesystem UUID and directory hash seed, fixed pfn uuid and disk signatures,
sorted population (mke2fs -d sorts with scandir/alphasort; LC_ALL=C), device nodes made with
debugfs (so root is not needed and root and non-root builds are identical).

Needs: python3, e2fsprogs (mkfs.ext4, debugfs, e2fsck), fdisk (sfdisk, only for --check).

Usage:
  make-kata-image.py [--busybox /bin/busybox] [--init init.sh] [--size-mib 64]
                     [--add SRC:/DEST ...] OUT.img
  make-kata-image.py --check IMG
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512

INFO_OFFSET = 4 * KiB            # nd_pfn_validate() reads the info block at namespace + 4 KiB
DATA_OFFSET = 2 * MiB            # pfn "dataoff": /dev/pmem0 starts here; memmap lives before it
FS_OFFSET_IN_PMEM = 1 * MiB      # /dev/pmem0p1 start inside /dev/pmem0
FS_OFFSET = DATA_OFFSET + FS_OFFSET_IN_PMEM
PAGE = 4096

PFN_SIGNATURE = b"NVDIMM_PFN_INFO\x00"
PFN_MODE_RAM = 1
PFN_VERSION = (1, 4)
PFN_ALIGN = 2 * MiB
STRUCT_PAGE_MAX = 64             # MAX_STRUCT_PAGE_SIZE, drivers/nvdimm/nd.h

PFN_UUID = uuid.uuid5(uuid.NAMESPACE_DNS, "pfn0.kata-rootfs.chapeau")
FS_UUID = "c4a9e0a1-5eed-4c0d-8a7a-6b6174610001"
FS_HASH_SEED = "c4a9e0a1-5eed-4c0d-8a7a-6b6174610002"
FS_LABEL = "kata-rootfs"
MBR_SIGNATURES = (0x43484150, 0x43484151)    # "PAHC", "QAHC" little endian; any fixed value

# (name, struct format, value or None for "computed") in struct nd_pfn_sb order
PFN_FIELDS = [
    ("signature", "16s", PFN_SIGNATURE),
    ("uuid", "16s", PFN_UUID.bytes),
    ("parent_uuid", "16s", bytes(16)),
    ("flags", "I", 0),
    ("version_major", "H", PFN_VERSION[0]),
    ("version_minor", "H", PFN_VERSION[1]),
    ("dataoff", "Q", DATA_OFFSET),
    ("npfns", "Q", None),
    ("mode", "I", PFN_MODE_RAM),
    ("start_pad", "I", 0),
    ("end_trunc", "I", 0),
    ("align", "I", PFN_ALIGN),
    ("page_size", "I", PAGE),
    ("page_struct_size", "H", STRUCT_PAGE_MAX),
]
PFN_HEAD = "<" + "".join(f for _, f, _ in PFN_FIELDS)   # packed: no implicit padding with "<"
PFN_SB_SIZE = 4096
PFN_CSUM_OFFSET = PFN_SB_SIZE - 8


def fletcher64(data: bytes) -> int:
    """nd_fletcher64(): 32-bit little-endian words; lo is a u32 running sum, hi a u64 sum of lo."""
    if len(data) % 4:
        raise ValueError("length must be a multiple of 4")
    lo = hi = 0
    for word in struct.unpack("<%dI" % (len(data) // 4), data):
        lo = (lo + word) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFFFFFFFFFF
    return ((hi << 32) | lo) & 0xFFFFFFFFFFFFFFFF


def pfn_checksum(block: bytes) -> int:
    return fletcher64(block[:PFN_CSUM_OFFSET] + bytes(8))


def pfn_info_block(image_size: int) -> bytes:
    values = []
    for name, _, value in PFN_FIELDS:
        if name == "npfns":
            value = (image_size - DATA_OFFSET) // PAGE
        values.append(value)
    block = bytearray(PFN_SB_SIZE)
    struct.pack_into(PFN_HEAD, block, 0, *values)
    struct.pack_into("<Q", block, PFN_CSUM_OFFSET, pfn_checksum(bytes(block)))
    return bytes(block)


def parse_pfn_info_block(block: bytes) -> dict:
    vals = struct.unpack_from(PFN_HEAD, block, 0)
    d = {name: v for (name, _, _), v in zip(PFN_FIELDS, vals)}
    d["checksum"] = struct.unpack_from("<Q", block, PFN_CSUM_OFFSET)[0]
    d["padding_zero"] = not any(block[struct.calcsize(PFN_HEAD):PFN_CSUM_OFFSET])
    return d


def chs(lba: int) -> bytes:
    """CHS triple for an MBR entry (255 heads, 63 sectors); past cylinder 1023: fe ff ff."""
    cyl, rem = divmod(lba, 255 * 63)
    head, sec = divmod(rem, 63)
    if cyl > 1023:
        return b"\xfe\xff\xff"
    return bytes([head, (sec + 1) | ((cyl >> 8) << 6), cyl & 0xFF])


def mbr(signature: int, first_lba: int, sectors: int) -> bytes:
    sector = bytearray(SECTOR)
    struct.pack_into("<I", sector, 440, signature)
    entry = bytes([0x00]) + chs(first_lba) + bytes([0x83]) + chs(first_lba + sectors - 1)
    entry += struct.pack("<II", first_lba, sectors)
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def run(cmd, **kw):
    env = dict(os.environ, LC_ALL="C", TZ="UTC", E2FSPROGS_FAKE_TIME="1")
    return subprocess.run(cmd, check=True, env=env, **kw)


FSTAB = ("proc /proc proc defaults 0 0\n"
         "sysfs /sys sysfs defaults 0 0\n"
         "devtmpfs /dev devtmpfs defaults 0 0\n"
         "tmpfs /tmp tmpfs defaults 0 0\n")


def stage_tree(root: str, busybox: str, init: str, extra: list) -> None:
    for d in ["bin", "dev", "etc", "mnt", "proc", "root", "run", "sbin", "sys", "tmp",
              "usr/bin", "usr/sbin"]:
        os.makedirs(os.path.join(root, d), mode=0o755, exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    shutil.copyfile(busybox, os.path.join(root, "bin/busybox"))
    os.chmod(os.path.join(root, "bin/busybox"), 0o755)
    for dst in ("init", "sbin/init"):
        shutil.copyfile(init, os.path.join(root, dst))
        os.chmod(os.path.join(root, dst), 0o755)
    with open(os.path.join(root, "etc/fstab"), "w") as f:
        f.write(FSTAB)
    os.chmod(os.path.join(root, "etc/fstab"), 0o644)
    listing = run([busybox, "--list-full"], capture_output=True, text=True).stdout.split()
    for applet in sorted(set(listing)):
        path = os.path.join(root, applet)
        if applet in ("bin/busybox", "sbin/init", "init") or os.path.lexists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink("/bin/busybox", path)
    # extra files (benchmarks): copied with their mode; timestamps are pinned like the rest
    for src, dst in extra:
        path = os.path.join(root, dst.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(src, path)
        os.chmod(path, os.stat(src).st_mode & 0o755)


def tree_paths(root: str) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            out.append("/" + os.path.relpath(os.path.join(dirpath, n), root))
    return out


def make_ext4(path: str, size: int, root: str) -> None:
    run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-L", FS_LABEL,
         "-U", FS_UUID, "-E", "hash_seed=%s,root_owner=0:0" % FS_HASH_SEED,
         "-d", root, path, "%dk" % (size // KiB)], stdout=subprocess.DEVNULL)
    # device nodes without mknod(2); then pin every inode's times (mke2fs -d copies the staging
    # files' ctime, which is "now") so the bytes do not depend on when the image was built
    cmds = ["cd /dev", "mknod console c 5 1", "mknod null c 1 3", "cd /",
            "sif /dev/console mode 020600", "sif /dev/null mode 020666"]
    for p in ["/"] + tree_paths(root) + ["/dev/console", "/dev/null"]:
        for field in ("atime", "mtime", "ctime", "crtime"):
            cmds.append('sif "%s" %s @0' % (p, field))
    script = path + ".debugfs"
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", script, path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.unlink(script)
    run(["e2fsck", "-fn", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def build(out: str, busybox: str, init: str, size_mib: int, extra: list = ()) -> None:
    size = size_mib * MiB
    if size < FS_OFFSET + 16 * MiB or size % PFN_ALIGN:
        sys.exit("size must be a multiple of 2 MiB and at least %d MiB" % ((FS_OFFSET >> 20) + 16))
    fs_size = size - FS_OFFSET
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "root")
        os.mkdir(root)
        stage_tree(root, busybox, init, list(extra))
        fs = os.path.join(tmp, "fs.img")
        make_ext4(fs, fs_size, root)
        tmp_out = out + ".tmp"
        with open(tmp_out, "wb") as img, open(fs, "rb") as src:
            img.truncate(size)
            img.seek(0)
            img.write(mbr(MBR_SIGNATURES[0], FS_OFFSET // SECTOR, fs_size // SECTOR))
            img.seek(INFO_OFFSET)
            img.write(pfn_info_block(size))
            img.seek(DATA_OFFSET)
            img.write(mbr(MBR_SIGNATURES[1], FS_OFFSET_IN_PMEM // SECTOR, fs_size // SECTOR))
            pos = FS_OFFSET
            while True:
                chunk = src.read(MiB)
                if not chunk:
                    break
                for i in range(0, len(chunk), 64 * KiB):    # keep all-zero 64 KiB runs sparse
                    piece = chunk[i:i + 64 * KiB]
                    if any(piece):
                        img.seek(pos + i)
                        img.write(piece)
                pos += len(chunk)
        os.replace(tmp_out, out)
    check(out)


def sfdisk_layout(path: str) -> list:
    r = run(["sfdisk", "--json", path], capture_output=True, text=True)
    return [(p["start"], p["size"], p["type"]) for p in json.loads(r.stdout)["partitiontable"]["partitions"]]


def check(path: str) -> None:
    size = os.path.getsize(path)
    problems = []
    with open(path, "rb") as f:
        head = f.read(FS_OFFSET + 2 * KiB)
    info = parse_pfn_info_block(head[INFO_OFFSET:INFO_OFFSET + PFN_SB_SIZE])
    want = {name: value for name, _, value in PFN_FIELDS if value is not None and name != "uuid"}
    want["npfns"] = (size - DATA_OFFSET) // PAGE
    for k, v in want.items():
        if info[k] != v:
            problems.append("pfn %s=%r, want %r" % (k, info[k], v))
    calc = pfn_checksum(head[INFO_OFFSET:INFO_OFFSET + PFN_SB_SIZE])
    if info["checksum"] != calc:
        problems.append("pfn checksum 0x%016x, computed 0x%016x" % (info["checksum"], calc))
    if not info["padding_zero"]:
        problems.append("pfn padding not zero")
    print("pfn info block @%#x: version %d.%d mode %d dataoff %#x npfns %d align %#x page_size %d "
          "page_struct_size %d uuid %s checksum 0x%016x (computed 0x%016x)"
          % (INFO_OFFSET, info["version_major"], info["version_minor"], info["mode"], info["dataoff"],
             info["npfns"], info["align"], info["page_size"], info["page_struct_size"],
             uuid.UUID(bytes=info["uuid"]), info["checksum"], calc))
    sectors = (size - FS_OFFSET) // SECTOR
    a = sfdisk_layout(path)
    with tempfile.NamedTemporaryFile() as view:     # what the guest sees as /dev/pmem0
        view.write(head[DATA_OFFSET:])
        view.truncate(size - DATA_OFFSET)
        view.flush()
        b = sfdisk_layout(view.name)
    print("MBR A (whole image): %s" % a)
    print("MBR B (/dev/pmem0 view from %#x): %s" % (DATA_OFFSET, b))
    if a != [(FS_OFFSET // SECTOR, sectors, "83")]:
        problems.append("MBR A layout %r" % a)
    if b != [(FS_OFFSET_IN_PMEM // SECTOR, sectors, "83")]:
        problems.append("MBR B layout %r" % b)
    sb = head[FS_OFFSET + 1024:FS_OFFSET + 2048]
    magic, = struct.unpack_from("<H", sb, 0x38)
    log_block, = struct.unpack_from("<I", sb, 0x18)
    print("ext4 @%#x: magic %#06x block size %d" % (FS_OFFSET, magic, 1024 << log_block))
    if magic != 0xEF53 or 1024 << log_block != PAGE:
        problems.append("ext4 superblock (magic %#x, block size %d)" % (magic, 1024 << log_block))
    if problems:
        sys.exit("CHECK FAILED: " + "; ".join(problems))
    print("CHECK OK")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--busybox", default="/bin/busybox")
    ap.add_argument("--init", default=os.path.join(here, "init.sh"))
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--check", action="store_true", help="verify an existing image only")
    ap.add_argument("--add", action="append", default=[], metavar="SRC:/DEST",
                    help="also put host file SRC at /DEST in the filesystem (repeatable)")
    a = ap.parse_args()
    if a.check:
        check(a.image)
    else:
        extra = []
        for spec in a.add:
            src, sep, dst = spec.partition(":")
            if not sep or not dst.startswith("/"):
                sys.exit("--add wants SRC:/DEST, got %r" % spec)
            extra.append((src, dst))
        build(a.image, a.busybox, a.init, a.size_mib, extra)


if __name__ == "__main__":
    main()
