//! Loading the kernel (ELF vmlinux or bzImage, through linux-loader), the initrd and the command
//! line into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
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
    #[error("initrd {path} is {size} bytes, but only {room} bytes of guest memory are free above the kernel: give the VM more --memory")]
    InitrdTooLarge { path: PathBuf, size: u64, room: u64 },
    #[error("cannot copy initrd {path} into guest memory: {source}")]
    InitrdCopy {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
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
    let loader_error = |source| LoadError::Loader {
        path: path.into(),
        source,
    };
    let himem = Some(GuestAddress(layout::HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let size = file
                .metadata()
                .map_err(|source| LoadError::Read {
                    what: "kernel",
                    path: path.into(),
                    source,
                })?
                .len();
            let ram = mem.last_addr().0.saturating_add(1);
            let segments = elf::check(&file, size, ram).map_err(|source| LoadError::Elf {
                path: path.into(),
                source,
            })?;
            for (addr, len) in segments {
                if let Ok(len) = usize::try_from(len) {
                    memory::prefault(mem, GuestAddress(addr), len);
                }
            }
            let result = Elf::load(mem, None, &mut file, himem).map_err(loader_error)?;
            Ok(LoadedKernel {
                entry: result.kernel_load,
                end: GuestAddress(result.kernel_end),
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, himem).map_err(loader_error)?;
            let header = result
                .setup_header
                .ok_or_else(|| LoadError::No64BitEntry(path.into()))?;
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoadError::No64BitEntry(path.into()));
            }
            Ok(LoadedKernel {
                entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                end: GuestAddress(result.kernel_end),
                setup_header: Some(header),
            })
        }
    }
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
    let size = file
        .metadata()
        .map_err(|source| LoadError::Read {
            what: "initrd",
            path: path.into(),
            source,
        })?
        .len();
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
    memory::prefault(mem, addr, size as usize);
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|source| LoadError::InitrdCopy {
            path: path.into(),
            source,
        })?;
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
    }
}
