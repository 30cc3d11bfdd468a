//! Guest RAM: anonymous memory laid out by the layout module.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::x86_64::layout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("--memory {requested_mib} MiB is more than this host has ({host_mib} MiB)")]
    MoreThanHost { requested_mib: u64, host_mib: u64 },
    #[error("cannot read host memory size from /proc/meminfo: {0}")]
    HostSize(std::io::Error),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Total RAM of the host in MiB (MemTotal).
pub fn host_memory_mib() -> Result<u64, MemoryError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(MemoryError::HostSize)?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib / 1024)
        .ok_or_else(|| MemoryError::HostSize(std::io::Error::other("no MemTotal line")))
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
