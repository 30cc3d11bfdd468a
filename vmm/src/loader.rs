//! Loading the kernel (ELF vmlinux or bzImage, through linux-loader), the initrd and the command
//! line into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

mod elf;

use crate::arch::x86_64::layout;
use crate::host_files::{open_regular, Access, HostFileError};
use crate::memory;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const BZIMAGE_HDR_OFFSET: u64 = 0x202;
const BZIMAGE_HDR_MAGIC: [u8; 4] = *b"HdrS";
/// The 64-bit entry point sits 0x200 bytes into the protected-mode part of a bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// xloadflags bit: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// For kernels without a setup header: the boot protocol's default initrd ceiling.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    File(#[from] HostFileError),
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} {source}")]
    Elf {
        path: PathBuf,
        source: elf::ElfError,
    },
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat(PathBuf),
    #[error("kernel {path}: {source}")]
    Loader {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel {0} is a bzImage without a 64-bit entry point")]
    No64BitEntry(PathBuf),
    #[error("kernel {path} is a bzImage of {size} bytes, shorter than its {setup_size}-byte setup header says")]
    TruncatedBzImage {
        path: PathBuf,
        size: u64,
        setup_size: u64,
    },
    #[error("initrd {path} is {size} bytes, but only {room} bytes of guest memory are free above the kernel: give the VM more --memory")]
    InitrdTooLarge { path: PathBuf, size: u64, room: u64 },
    #[error("cannot copy {what} {path} into guest memory: {source}")]
    Copy {
        what: &'static str,
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot map {what} {path} into guest memory: {source}")]
    Map {
        what: &'static str,
        path: PathBuf,
        source: memory::MapError,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
}

pub struct LoadedKernel {
    /// Where the 64-bit entry point is.
    pub entry: GuestAddress,
    /// First byte after the kernel image.
    pub end: GuestAddress,
    /// A bzImage's setup header, for the zero page.
    pub setup_header: Option<setup_header>,
}

enum KernelFormat {
    Elf,
    BzImage,
}

/// Reads the 4 bytes at `offset`; `None` when the file is shorter than that.
fn magic_at(file: &mut File, path: &Path, offset: u64) -> Result<Option<[u8; 4]>, LoadError> {
    let read_error = |source| LoadError::Read {
        what: "kernel",
        path: path.into(),
        source,
    };
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(Some(magic)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(read_error(e)),
    }
}

fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, LoadError> {
    if magic_at(file, path, 0)? == Some(ELF_MAGIC) {
        Ok(KernelFormat::Elf)
    } else if magic_at(file, path, BZIMAGE_HDR_OFFSET)? == Some(BZIMAGE_HDR_MAGIC) {
        Ok(KernelFormat::BzImage)
    } else {
        Err(LoadError::UnknownFormat(path.into()))
    }
}

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoadError> {
    let mut file = open_regular("kernel", path, Access::Read)?;
    let format = detect_format(&mut file, path)?;
    let map = mappable(&file, path);
    match format {
        KernelFormat::Elf => load_elf(mem, &mut file, path, map),
        KernelFormat::BzImage => load_bzimage(mem, &mut file, path, map),
    }
}

/// Where a bzImage's setup sectors end and its protected-mode payload begins: after
/// `setup_sects` (byte 0x1f1; 0 means 4) sectors and the boot sector.
const SETUP_SECTS_OFFSET: u64 = 0x1f1;

/// Loads a bzImage: linux-loader checks the setup header (fed only the setup sectors, so it
/// copies nothing), then the payload goes to its load address like an ELF segment (`place`):
/// mapped when allowed and its file offset is page aligned, as with setup sectors of 31 or 7.
fn load_bzimage(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
    map: bool,
) -> Result<LoadedKernel, LoadError> {
    let read_error = |source| LoadError::Read {
        what: "kernel",
        path: path.into(),
        source,
    };
    let size = file_size(file, "kernel", path)?;
    let mut sects = [0u8; 1];
    file.read_exact_at(&mut sects, SETUP_SECTS_OFFSET)
        .map_err(read_error)?;
    let setup_sects = if sects[0] == 0 {
        4
    } else {
        u64::from(sects[0])
    };
    let setup_size = (setup_sects + 1) * 512;
    let mut setup = vec![0u8; usize::try_from(setup_size.min(size)).unwrap_or(0)];
    file.read_exact_at(&mut setup, 0).map_err(read_error)?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let result =
        BzImage::load(mem, None, &mut std::io::Cursor::new(setup), himem).map_err(|source| {
            LoadError::Loader {
                path: path.into(),
                source,
            }
        })?;
    let header = result
        .setup_header
        .ok_or_else(|| LoadError::No64BitEntry(path.into()))?;
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoadError::No64BitEntry(path.into()));
    }
    // linux-loader checked that the file holds the setup sectors.
    // A truncated file's setup sectors can claim more than the file holds (linux-loader
    // refuses that today; the subtraction does not rely on it).
    let payload = size
        .checked_sub(setup_size)
        .ok_or_else(|| LoadError::TruncatedBzImage {
            path: path.into(),
            size,
            setup_size,
        })?;
    let load = result.kernel_load;
    let mut src = Source::new(file, "kernel", path);
    let mapped = place(mem, &mut src, setup_size, load.0, payload, map)?;
    log::debug!(
        "kernel: {mapped} of {payload} payload bytes mapped from the file, the rest copied"
    );
    Ok(LoadedKernel {
        entry: load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
        end: GuestAddress(load.0.saturating_add(payload)),
        setup_header: Some(header),
    })
}

fn file_size(file: &File, what: &'static str, path: &Path) -> Result<u64, LoadError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| LoadError::Read {
            what,
            path: path.into(),
            source,
        })
}

/// Filesystems whose files change only through this host's VFS, where the checks below hold.
/// A network or FUSE filesystem can change a file behind the page cache's back.
const LOCAL_FILESYSTEMS: [i64; 6] = [
    0xEF53,      // ext2/3/4
    0x5846_5342, // xfs
    0x9123_683E, // btrfs
    0x0102_1994, // tmpfs
    0xF2F5_2010, // f2fs
    0x794C_7630, // overlayfs (its layers are local directories of this host)
];

/// Whether a kernel or initrd may be mapped into the guest instead of copied.
///
/// A private mapping keeps reading the file for every page the guest has not written yet, and
/// a truncation removes even the pages it has written (POSIX: a private mapping beyond EOF is
/// SIGBUS). So a file rewritten in place while the VM runs would change or end it: the guest
/// would run a mix of two kernels, KVM_RUN would fail with EFAULT, or a device thread reading
/// such a page would take SIGBUS and end the process. That is the contract pmem images already
/// have, and that executables and shared libraries have: replace the file by a rename (as
/// package managers do), never rewrite it in place. It is acceptable only if no one but a
/// principal who can already end the VMM can rewrite the file, so a file is mapped only when
///   - it is owned by root or by our effective uid (both can kill us anyway),
///   - neither its group nor others may write it (with POSIX ACLs the group bits are the
///     mask, which bounds every named entry), and
///   - it lives on a local filesystem (a network or FUSE file can change under the page cache).
///
/// Otherwise it is copied, as before. Root and our own user can already read and write guest
/// memory (ptrace, /proc/PID/mem), so a later write to the file gives them nothing new over
/// the guest; what the mapping adds for everyone else is that the page cache of one kernel is
/// shared by every VM booted from it (charged to the cgroup that first read it), and guest
/// pages are private copies only once written.
fn mappable(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return false;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let owner_ok = meta.uid() == 0 || meta.uid() == euid;
    let others_cannot_write = meta.mode() & 0o022 == 0;
    // SAFETY: fstatfs writes only the struct we pass, which lives for the call; a zeroed
    // struct statfs is a valid value.
    let fs_type = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(file), &mut fs) != 0 {
            return false;
        }
        fs.f_type
    };
    let local = LOCAL_FILESYSTEMS.contains(&fs_type);
    let map = owner_ok && others_cannot_write && local;
    if !map {
        log::debug!(
            "{}: copied, not mapped (owner uid {} {}, mode {:o}, filesystem {fs_type:#x} {})",
            path.display(),
            meta.uid(),
            if owner_ok {
                "ok"
            } else {
                "is neither root nor us"
            },
            meta.mode() & 0o7777,
            if local {
                "local"
            } else {
                "not known to be local"
            },
        );
    }
    map
}

/// A file being loaded, named in errors as `what` (`kernel`, `initrd`) at `path`.
struct Source<'a> {
    file: &'a mut File,
    what: &'static str,
    path: &'a Path,
}

impl<'a> Source<'a> {
    fn new(file: &'a mut File, what: &'static str, path: &'a Path) -> Self {
        Source { file, what, path }
    }
}

/// Puts `len` bytes of `src` from `offset` at guest address `addr`. With `map`, the whole
/// pages in the range are mapped from the file (`memory::map_file_private`) when `offset` and
/// `addr` lie at the same place in a page; the partial pages at either end are copied, so the
/// bytes around the range stay as they were (zeros, or a neighbouring segment's). Everything
/// else is copied. Returns how many bytes were mapped.
fn place(
    mem: &GuestMemoryMmap,
    src: &mut Source,
    offset: u64,
    addr: u64,
    len: u64,
    map: bool,
) -> Result<u64, LoadError> {
    let (what, path) = (src.what, src.path);
    let end = addr.checked_add(len).ok_or_else(|| LoadError::Copy {
        what,
        path: path.into(),
        source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(addr)),
    })?;
    let (mut head_end, mut tail_start) = (end, end);
    if map && offset % PAGE_SIZE == addr % PAGE_SIZE {
        let first = addr.next_multiple_of(PAGE_SIZE).min(end);
        let last = end - end % PAGE_SIZE;
        if last > first {
            let map_error = |source| LoadError::Map {
                what,
                path: path.into(),
                source,
            };
            // A range beyond RAM fails here, like the copy would.
            let pages = usize::try_from(last - first).map_err(|_| {
                map_error(memory::MapError::OutsideRam {
                    addr: first,
                    len: 0,
                })
            })?;
            memory::map_file_private(
                mem,
                GuestAddress(first),
                src.file,
                offset + (first - addr),
                pages,
            )
            .map_err(map_error)?;
            (head_end, tail_start) = (first, last);
        }
    }
    copy(mem, src, offset, addr, head_end - addr)?;
    let tail_offset = offset + (tail_start - addr);
    copy(mem, src, tail_offset, tail_start, end - tail_start)?;
    Ok(tail_start - head_end)
}

/// Copies `len` bytes of `src` from `offset` to guest address `addr`.
fn copy(
    mem: &GuestMemoryMmap,
    src: &mut Source,
    offset: u64,
    addr: u64,
    len: u64,
) -> Result<(), LoadError> {
    if len == 0 {
        return Ok(());
    }
    let (what, path) = (src.what, src.path);
    let copy_error = |source| LoadError::Copy {
        what,
        path: path.into(),
        source,
    };
    let len = usize::try_from(len).map_err(|_| {
        copy_error(vm_memory::GuestMemoryError::InvalidGuestAddress(
            GuestAddress(addr),
        ))
    })?;
    src.file
        .seek(SeekFrom::Start(offset))
        .map_err(|source| LoadError::Read {
            what,
            path: path.into(),
            source,
        })?;
    memory::prefault(mem, GuestAddress(addr), len);
    mem.read_exact_volatile_from(GuestAddress(addr), src.file, len)
        .map_err(copy_error)
}

/// Loads the checked ELF kernel in `file`: each PT_LOAD segment's file bytes at its physical
/// address (mapped where `map` allows, see `place`); the rest of each segment (its bss) is
/// fresh guest RAM, hence zeros.
fn load_elf(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
    map: bool,
) -> Result<LoadedKernel, LoadError> {
    let size = file_size(file, "kernel", path)?;
    let ram = mem.last_addr().0.saturating_add(1);
    let checked =
        elf::check(file, size, ram, layout::HIMEM_START).map_err(|source| LoadError::Elf {
            path: path.into(),
            source,
        })?;
    let (mut end, mut mapped) = (0, 0);
    let mut src = Source::new(file, "kernel", path);
    for seg in &checked.segments {
        mapped += place(mem, &mut src, seg.offset, seg.paddr, seg.filesz, map)?;
        end = end.max(seg.paddr.saturating_add(seg.memsz));
    }
    log::debug!("kernel: {mapped} bytes mapped from the file, the rest copied");
    Ok(LoadedKernel {
        entry: GuestAddress(checked.entry),
        end: GuestAddress(end),
        setup_header: None,
    })
}

/// Where an initrd of `size` bytes goes: as high as possible in low RAM (below the kernel's
/// `initrd_addr_max`), page aligned, above the kernel.
pub fn initrd_address(
    size: u64,
    kernel_end: GuestAddress,
    low_ram_end: u64,
    initrd_addr_max: u64,
) -> Option<GuestAddress> {
    let ceiling = low_ram_end.min(initrd_addr_max.saturating_add(1));
    let start = ceiling.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= kernel_end.0).then_some(GuestAddress(start))
}

pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(GuestAddress, u64), LoadError> {
    let mut file = open_regular("initrd", path, Access::Read)?;
    let size = file_size(&file, "initrd", path)?;
    let low_ram_end = mem.last_addr().0.min(layout::MMIO_HOLE_START - 1) + 1;
    let addr_max = kernel
        .setup_header
        .map_or(DEFAULT_INITRD_ADDR_MAX, |h| u64::from(h.initrd_addr_max));
    let addr = initrd_address(size, kernel.end, low_ram_end, addr_max).ok_or_else(|| {
        LoadError::InitrdTooLarge {
            path: path.into(),
            size,
            room: low_ram_end.saturating_sub(kernel.end.0),
        }
    })?;
    let map = mappable(&file, path);
    let mut src = Source::new(&mut file, "initrd", path);
    let mapped = place(mem, &mut src, 0, addr.0, size, map)?;
    log::debug!("initrd: {mapped} of {size} bytes mapped from the file, the rest copied");
    Ok((addr, size))
}

/// Writes the command line; returns its length in bytes (without the NUL).
pub fn load_kernel_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, LoadError> {
    let mut line =
        Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    line.insert_str(cmdline)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &line)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    Ok(cmdline.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let addr = initrd_address(
            0x1800,
            GuestAddress(0x200_0000),
            0x1000_0000,
            DEFAULT_INITRD_ADDR_MAX,
        );
        assert_eq!(addr, Some(GuestAddress(0x1000_0000 - 0x2000)));
    }

    #[test]
    fn initrd_respects_the_kernels_ceiling() {
        let addr = initrd_address(0x1000, GuestAddress(0x200_0000), 0xc000_0000, 0x7fff_ffff);
        assert_eq!(addr, Some(GuestAddress(0x8000_0000 - 0x1000)));
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_does_not_fit() {
        assert_eq!(
            initrd_address(0x10_0000, GuestAddress(0x3f0_1000), 0x400_0000, u64::MAX),
            None
        );
        assert_eq!(
            initrd_address(u64::MAX, GuestAddress(0), 0x400_0000, u64::MAX),
            None
        );
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let dir = std::env::temp_dir().join(format!("chapeau-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        for (name, bytes) in [("short", vec![1u8, 2]), ("zeros", vec![0u8; 4096])] {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            assert!(
                matches!(load_kernel(&mem, &path), Err(LoadError::UnknownFormat(_))),
                "{name}"
            );
        }
        assert!(matches!(
            load_kernel(&mem, &dir.join("absent")),
            Err(LoadError::File(HostFileError::Open { .. }))
        ));
        assert_eq!(
            load_kernel(&mem, &dir).err().unwrap().to_string(),
            format!(
                "kernel {} is a directory, not a regular file",
                dir.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_huge_note_in_a_sparse_file_fails_fast() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("chapeau-loader-note-{}", std::process::id()));
        let mut file = File::create(&path).unwrap();
        file.write_all(&elf::tests::header(1)).unwrap();
        file.write_all(&elf::tests::phdr(4, 4096, 0, 1 << 40))
            .unwrap();
        file.set_len((1 << 40) + 4096).unwrap();
        drop(file);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        // Run it aside: before the check, linux-loader walked the 1 TiB of notes for hours.
        let (tx, rx) = std::sync::mpsc::channel();
        let loading = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(load_kernel(&mem, &loading).err().map(|e| e.to_string()));
        });
        let result = rx.recv_timeout(std::time::Duration::from_secs(10));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            result.expect("the loader is still reading notes after 10 s"),
            Some(format!(
                "kernel {} has a note segment of 1099511627776 bytes (segment 0); \
                 at most 65536 are read",
                path.display()
            ))
        );
    }

    #[test]
    fn an_elf_for_another_machine_is_refused() {
        let path = std::env::temp_dir().join(format!("chapeau-loader-arm-{}", std::process::id()));
        let mut bytes = elf::tests::header(0);
        bytes[18] = 183; // EM_AARCH64
        std::fs::write(&path, bytes).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let err = load_kernel(&mem, &path).err().unwrap().to_string();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            err,
            format!(
                "kernel {} is an ELF for AArch64, not x86_64",
                path.display()
            )
        );
    }

    #[test]
    fn an_initrd_must_be_a_regular_file() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100_0000),
            end: GuestAddress(0x200_0000),
            setup_header: None,
        };
        let err = load_initrd(&mem, Path::new("/dev/zero"), &kernel)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            "initrd /dev/zero is a character device, not a regular file"
        );
    }

    #[test]
    fn cmdline_lands_nul_terminated() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let len = load_kernel_cmdline(&mem, "console=ttyS0 panic=1").unwrap();
        let mut buf = vec![0u8; len + 1];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 panic=1\0");
        assert!(load_kernel_cmdline(&mem, &"x".repeat(4096)).is_err());
    }

    /// A temporary file with `bytes`, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> TempFile {
            let path =
                std::env::temp_dir().join(format!("chapeau-loader-{name}-{}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// File bytes no page of zeros could be mistaken for.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 + 1).collect()
    }

    fn ram(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    /// A file of `len` pattern bytes placed whole at `addr` in 1 MiB of RAM, mapping allowed:
    /// the RAM, the file and how many bytes were mapped.
    fn place_file(name: &'static str, len: usize, addr: u64) -> (GuestMemoryMmap, TempFile, u64) {
        let file = TempFile::new(name, &pattern(len));
        let mem = ram(1);
        let mut f = File::open(&file.0).unwrap();
        let mut src = Source::new(&mut f, name, &file.0);
        let mapped = place(&mem, &mut src, 0, addr, len as u64, true).unwrap();
        (mem, file, mapped)
    }

    fn same_bytes(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
        let size = usize::try_from(a.last_addr().0 + 1).unwrap();
        let (mut x, mut y) = (vec![0u8; size], vec![0u8; size]);
        a.read_slice(&mut x, GuestAddress(0)).unwrap();
        b.read_slice(&mut y, GuestAddress(0)).unwrap();
        x == y
    }

    /// An ELF with an aligned segment ending mid-page with a bss, a segment whose file offset
    /// and address lie at different places in a page (copied), and an aligned one that starts
    /// mid-page and shares its first page with the previous segment's last.
    fn elf_with_three_segments() -> Vec<u8> {
        let mut elf = elf::tests::header(3);
        let mut bss = elf::tests::phdr(1, 0x1000, 0x100_0000, 0x2800);
        bss[40..48].copy_from_slice(&0x5000u64.to_le_bytes()); // memsz
        elf.extend(bss);
        elf.extend(elf::tests::phdr(1, 0x5123, 0x110_0456, 0x1f00));
        elf.extend(elf::tests::phdr(1, 0x8800, 0x110_2800, 0x3900));
        let mut file = pattern(0x10000);
        file[..elf.len()].copy_from_slice(&elf);
        file
    }

    #[test]
    fn a_mapped_elf_reads_as_linux_loaders_copy() {
        let file = TempFile::new("elf3", &elf_with_three_segments());
        let (copied, mapped) = (ram(32), ram(32));
        let result = linux_loader::loader::Elf::load(
            &copied,
            None,
            &mut File::open(&file.0).unwrap(),
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .unwrap();
        let kernel = load_elf(&mapped, &mut File::open(&file.0).unwrap(), &file.0, true).unwrap();
        assert!(same_bytes(&copied, &mapped));
        assert_eq!(kernel.entry, result.kernel_load);
        assert_eq!(kernel.end, GuestAddress(result.kernel_end));
        // The bss and the rest of the first segment's last page are zeros; the copied segment
        // starts mid-page at its address with its first file byte.
        let mut buf = vec![0u8; 0x2800];
        mapped
            .read_slice(&mut buf, GuestAddress(0x100_2800))
            .unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        let at = mapped.read_obj::<u8>(GuestAddress(0x110_0456)).unwrap();
        assert_eq!(at, pattern(0x5124)[0x5123]);
    }

    #[test]
    fn mapping_maps_whole_pages_and_copies_the_rest() {
        let file = TempFile::new("place", &pattern(0x9000));
        let mem = ram(4);
        let mut f = File::open(&file.0).unwrap();
        let mut src = Source::new(&mut f, "t", &file.0);
        let want = pattern(0x9000);
        // (file offset, guest address, length, mapping allowed, bytes mapped)
        for (offset, addr, len, allowed, mapped) in [
            // Same place in a page: the three whole pages between the partial ends are mapped.
            (0x800, 0x1800, 0x4000, true, 0x3000),
            // Different places: copied.
            (0x800, 0x10000, 0x4000, true, 0),
            // Not allowed: copied.
            (0x1000, 0x20000, 0x4000, false, 0),
            // Within one page: nothing whole to map.
            (0x10, 0x30010, 0x100, true, 0),
        ] {
            let placed = place(&mem, &mut src, offset, addr, len, allowed);
            assert_eq!(placed.unwrap(), mapped, "{addr:#x}");
            let (start, len) = (offset as usize, len as usize);
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            assert_eq!(buf, want[start..start + len], "{addr:#x}");
        }
        // Around the ranges guest RAM is untouched.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x17ff)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5800)).unwrap(), 0);
        // Beyond RAM: refused, nothing mapped.
        assert!(place(&mem, &mut src, 0, 4 << 20, 0x2000, true).is_err());
    }

    #[test]
    fn guest_writes_to_a_mapped_file_stay_in_the_guest() {
        let (mem, file, mapped) = place_file("cow", 0x3000, 0x1000);
        assert_eq!(mapped, 0x3000);
        mem.write_obj(0u8, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
        assert_eq!(std::fs::read(&file.0).unwrap(), pattern(0x3000));
    }

    #[test]
    fn a_mapped_initrd_ends_in_zeros() {
        // 2.5 pages: two mapped, the half page copied, the rest of that page left zero.
        let (mem, _file, mapped) = place_file("initrd", 0x2800, 0x8000);
        assert_eq!(mapped, 0x2000);
        let mut buf = vec![0xffu8; 0x3000];
        mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
        assert_eq!(buf[..0x2800], pattern(0x2800));
        assert!(buf[0x2800..].iter().all(|b| *b == 0));
    }

    #[test]
    fn only_files_that_only_root_or_we_can_rewrite_are_mapped() {
        use std::os::unix::fs::PermissionsExt;
        let file = TempFile::new("perm", b"x");
        let local = {
            let f = File::open(&file.0).unwrap();
            std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o644)).unwrap();
            mappable(&f, &file.0)
        };
        if !local {
            eprintln!(
                "skipped: {} is not on a filesystem known to be local",
                file.0.display()
            );
            return;
        }
        for (mode, map) in [(0o600, true), (0o755, true), (0o664, false), (0o646, false)] {
            std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(mode)).unwrap();
            let f = File::open(&file.0).unwrap();
            assert_eq!(mappable(&f, &file.0), map, "mode {mode:o}");
        }
    }

    /// A file of the test guest (`CHAPEAU_GUEST_DIR`, else ../shared/guest), when present.
    fn shared_guest_file(name: &str) -> Option<std::path::PathBuf> {
        let dir = std::env::var_os("CHAPEAU_GUEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/guest"));
        let path = dir.join(name);
        if !path.exists() {
            eprintln!("skipped: no {}", path.display());
            return None;
        }
        Some(path)
    }

    /// The shared test guest's bzImage, when present: linux-loader's setup-header handling and
    /// our 64-bit entry (protected-mode code at 1 MiB, entry 0x200 into it).
    #[test]
    fn shared_bzimage_loads_with_a_64bit_entry() {
        let Some(path) = shared_guest_file("bzImage") else {
            return;
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let kernel = load_kernel(&mem, &path).unwrap();
        assert_eq!(kernel.entry, GuestAddress(layout::HIMEM_START + 0x200));
        let header = kernel.setup_header.unwrap();
        assert_eq!({ header.header }, 0x5372_6448);
        assert!({ header.version } >= 0x20c);
        assert_ne!({ header.xloadflags } & XLF_KERNEL_64, 0);
        let (initrd, size) = load_initrd(&mem, &path, &kernel).unwrap();
        assert!(initrd.0 >= kernel.end.0 && initrd.0 + size <= 64 << 20);
        // Mapped, the guest sees what linux-loader's copy gives it.
        let (copied, mapped) = (ram(64), ram(64));
        let result = BzImage::load(
            &copied,
            None,
            &mut File::open(&path).unwrap(),
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .unwrap();
        let kernel = load_bzimage(&mapped, &mut File::open(&path).unwrap(), &path, true).unwrap();
        assert!(same_bytes(&copied, &mapped));
        assert_eq!(kernel.end, GuestAddress(result.kernel_end));
        // Cut inside its setup sectors: refused with a line (linux-loader's, or ours if it
        // ever lets such a header through), never an underflow.
        let short = std::env::temp_dir().join(format!("chapeau-short-bz-{}", std::process::id()));
        std::fs::write(&short, &std::fs::read(&path).unwrap()[..4096]).unwrap();
        let error = load_kernel(&ram(64), &short).err().unwrap().to_string();
        std::fs::remove_file(&short).unwrap();
        assert!(error.contains("bzImage"), "{error}");
    }

    /// The shared test guest's vmlinux, when present, passes the ELF checks and loads.
    #[test]
    fn shared_vmlinux_passes_the_elf_checks() {
        let Some(path) = shared_guest_file("vmlinux") else {
            return;
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
        let kernel = load_kernel(&mem, &path).unwrap();
        assert!(kernel.setup_header.is_none() && kernel.end.0 > kernel.entry.0);
        // Mapped, the guest sees what linux-loader's copy gives it.
        let (copied, mapped) = (ram(64), ram(64));
        linux_loader::loader::Elf::load(
            &copied,
            None,
            &mut File::open(&path).unwrap(),
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .unwrap();
        load_elf(&mapped, &mut File::open(&path).unwrap(), &path, true).unwrap();
        assert!(same_bytes(&copied, &mapped));
    }
}
