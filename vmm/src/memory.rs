//! Guest RAM: anonymous memory laid out by the layout module.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::x86_64::layout;

const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("--memory {requested_mib} MiB is more than this host has ({host_mib} MiB)")]
    MoreThanHost { requested_mib: u64, host_mib: u64 },
    #[error("cannot read the host's memory size (sysinfo): {0}")]
    HostSize(std::io::Error),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Total RAM of the host in MiB (/proc/meminfo's MemTotal), from sysinfo(2): under
/// chapeau-jailer there is no /proc to read.
pub fn host_memory_mib() -> Result<u64, MemoryError> {
    // SAFETY: sysinfo(2) only writes the struct we pass, which lives for the call; a zeroed
    // struct sysinfo is a valid value.
    let info = unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) != 0 {
            return Err(MemoryError::HostSize(std::io::Error::last_os_error()));
        }
        info
    };
    Ok(info.totalram.saturating_mul(u64::from(info.mem_unit)) >> 20)
}

/// Guest RAM of `memory_mib` MiB, laid out by the layout module; with `thp`, advised for
/// transparent huge pages.
pub fn create_guest_memory(memory_mib: u64, thp: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let host_mib = host_memory_mib()?;
    if memory_mib > host_mib {
        return Err(MemoryError::MoreThanHost {
            requested_mib: memory_mib,
            host_mib,
        });
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(memory_mib << 20)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: memory_mib,
        source,
    })?;
    if thp {
        for region in mem.iter() {
            advise_huge_pages(region.as_ptr(), region.size());
        }
    }
    Ok(mem)
}

/// Asks for transparent huge pages on guest RAM: loading the kernel then faults a few 2 MiB
/// pages instead of thousands of 4 KiB ones, and the guest's TLB reach grows. Only advice:
/// a host without THP ignores it and nothing changes.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: madvise only changes paging policy of a mapping this process owns; it neither
    // reads nor writes the memory.
    let ret = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE) on guest memory: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Faults in the guest pages of `len` bytes at `addr`, which are about to be written whole (the
/// kernel, the initrd): one MADV_POPULATE_WRITE instead of a page fault per 4 KiB page during
/// the copy, about 15% of the kernel load. Only advice: where it is refused (Linux before 5.14)
/// or the range is not in one region, the copy faults the pages in as before.
pub fn prefault(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) {
    let Ok(slice) = mem.get_slice(addr, len) else {
        return;
    };
    let guard = slice.ptr_guard_mut();
    let start = guard.as_ptr() as usize;
    let page = start & !(PAGE_SIZE - 1);
    // SAFETY: the range lies inside one guest RAM mapping this process owns (`get_slice`
    // checked it), widened down to its page start, which is in the same page-aligned mapping.
    // MADV_POPULATE_WRITE faults pages in as a write would and changes no byte.
    let ret = unsafe {
        libc::madvise(
            page as *mut libc::c_void,
            len + (start - page),
            libc::MADV_POPULATE_WRITE,
        )
    };
    if ret != 0 {
        log::debug!(
            "madvise(MADV_POPULATE_WRITE) on guest memory: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error(
        "{len:#x} bytes at guest address {addr:#x} (file offset {offset:#x}) are not whole pages"
    )]
    Unaligned { addr: u64, offset: u64, len: usize },
    #[error("{len:#x} bytes at guest address {addr:#x} are not inside one guest RAM region")]
    OutsideRam { addr: u64, len: usize },
    #[error("mmap over guest RAM: {0}")]
    Mmap(std::io::Error),
}

/// Maps `len` bytes of `file` from `offset` over guest RAM at `addr`, private and
/// copy-on-write, instead of copying them: the guest reads the file's page-cache pages until it
/// writes a page, which then becomes its own (and the page cache stays shared by every VM
/// booted from the same file).
///
/// Why this is sound for a VM: the range stays guest RAM at the same host address. The KVM
/// memory slot and vhost's memory table name guest RAM by host virtual address, not by the
/// mapping behind it, and KVM follows a change of mapping through its MMU notifiers (mmap
/// MAP_FIXED first unmaps the anonymous pages, which invalidates anything KVM had built on
/// them). The new mapping has the same protection (read and write) and lies inside the region,
/// so the region's munmap on drop removes it too. Devices reach guest memory only through
/// vm-memory's volatile accessors, so no Rust reference to the replaced bytes exists.
/// The caller decides whether the file may be mapped at all (see `loader::mappable`).
pub fn map_file_private(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> Result<(), MapError> {
    let page = PAGE_SIZE as u64;
    if !addr.0.is_multiple_of(page)
        || !offset.is_multiple_of(page)
        || !len.is_multiple_of(PAGE_SIZE)
        || len == 0
    {
        return Err(MapError::Unaligned {
            addr: addr.0,
            offset,
            len,
        });
    }
    let outside = || MapError::OutsideRam { addr: addr.0, len };
    let offset = libc::off_t::try_from(offset).map_err(|_| outside())?;
    // One region holds the whole range, or this fails.
    let slice = mem.get_slice(addr, len).map_err(|_| outside())?;
    let guard = slice.ptr_guard_mut();
    let host = guard.as_ptr().cast::<libc::c_void>();
    // SAFETY: `host..host + len` lies inside one guest RAM mapping that `mem` owns and keeps
    // until it is dropped (`get_slice` checked the bounds); `host` is page aligned because the
    // regions are and `addr` is. MAP_FIXED replaces exactly those pages with a private mapping
    // of the same protection; no Rust reference points into guest RAM (it is only accessed
    // volatile, by address), and see the function's comment for KVM and vhost.
    let mapped = unsafe {
        libc::mmap(
            host,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            std::os::fd::AsRawFd::as_raw_fd(file),
            offset,
        )
    };
    if mapped == libc::MAP_FAILED {
        // A failed MAP_FIXED may have unmapped part of the range already: the caller must
        // fail the build (it does), never fall back to copying into a hole.
        return Err(MapError::Mmap(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_is_memtotal() {
        // The first line of /proc/meminfo is "MemTotal: <KiB> kB".
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let first: Vec<&str> = meminfo.split_whitespace().take(2).collect();
        assert_eq!(first[0], "MemTotal:");
        assert_eq!(
            host_memory_mib().unwrap(),
            first[1].parse::<u64>().unwrap() / 1024
        );
    }
}
