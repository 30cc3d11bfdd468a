//! Persistent memory: image files mapped into guest physical memory, which the guest uses
//! directly (NVDIMM or virtio-pmem, DAX). This module checks the files, places them in the
//! layout's pmem window, maps them and gives them KVM memory slots.
//!
//! Read-only means read-only on the host: the file is opened O_RDONLY, mapped PROT_READ and
//! MAP_SHARED (so the page cache of one image is shared by every VM using it) and its KVM slot
//! is KVM_MEM_READONLY, so no guest write can reach the file. A private copy-on-write mapping
//! would let a guest write to memory it then reads back as the image: that is how
//! CVE-2026-24834 gave containers root in Kata guests.
//!
//! The images are not part of the devices' view of guest memory: a virtio buffer pointing into
//! one is refused like any address outside RAM, so no device can write to a read-only image.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use api::{PmemConfig, PmemModel};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use crate::arch::x86_64::layout;
use crate::host_files::{open_regular, Access, HostFileError};

#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error(transparent)]
    File(#[from] HostFileError),
    #[error("pmem image {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pmem image {} is empty", path.display())]
    Empty { path: PathBuf },
    #[error(
        "pmem image {} is {size} bytes: the guest maps persistent memory in 2 MiB units, so \
         the size must be a multiple of 2 MiB (2097152 bytes); pad it with `truncate -s {padded} {}`",
        path.display(),
        path.display()
    )]
    Size {
        path: PathBuf,
        size: u64,
        padded: u64,
    },
    #[error(
        "pmem image {} is given twice ({first} and {second}): one image can back two devices \
         only when both are readonly=on",
        path.display()
    )]
    Conflict {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("pmem images take more guest physical space than the {window} GiB reserved for them")]
    Window { window: u64 },
    #[error("cannot map pmem image {}: {source}", path.display())]
    Map {
        path: PathBuf,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot give pmem image {} a KVM memory slot: {source}", path.display())]
    Slot {
        path: PathBuf,
        source: kvm_ioctls::Error,
    },
}

/// One image, mapped and placed.
pub struct PmemRegion {
    pub config: PmemConfig,
    /// Guest physical address and size of the mapping.
    pub gpa: u64,
    pub size: u64,
    file: File,
    mapping: MmapRegion,
}

impl PmemRegion {
    /// The backing file, for a virtio-pmem device to flush; `None` when read-only.
    pub fn flush_file(&self) -> Result<Option<File>, std::io::Error> {
        if self.config.readonly {
            Ok(None)
        } else {
            self.file.try_clone().map(Some)
        }
    }

    fn describe(config: &PmemConfig) -> String {
        format!(
            "model={}, readonly={}",
            config.model.as_str(),
            if config.readonly { "on" } else { "off" }
        )
    }
}

/// Opens and checks an image: a non-empty regular file whose size is a multiple of 2 MiB.
fn open_image(config: &PmemConfig) -> Result<(File, u64), PmemError> {
    let path = &config.file;
    let access = if config.readonly {
        Access::Read
    } else {
        Access::ReadWrite
    };
    let file = open_regular("pmem image", path, access)?;
    let size = file
        .metadata()
        .map_err(|source| PmemError::Io {
            path: path.clone(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(PmemError::Empty { path: path.clone() });
    }
    if !size.is_multiple_of(layout::PMEM_SIZE_ALIGN) {
        return Err(PmemError::Size {
            path: path.clone(),
            size,
            padded: size.next_multiple_of(layout::PMEM_SIZE_ALIGN),
        });
    }
    Ok((file, size))
}

/// Where Linux's nd_pfn info block sits in a namespace, and what it looks like.
const PFN_INFO_OFFSET: u64 = 4096;
const PFN_SIGNATURE: &[u8; 16] = b"NVDIMM_PFN_INFO\0";
/// Offset of `mode` in struct nd_pfn_sb, and PFN_MODE_PMEM (memmap kept on the device).
const PFN_MODE_OFFSET: usize = 72;
const PFN_MODE_PMEM: u32 = 2;
/// Linux keeps a device's memmap on the device (its altmap) only for whole memory sections.
const MEMORY_SECTION: u64 = 128 << 20;

/// Whether the guest will write its struct-page memmap into this image: a pfn info block in
/// PFN_MODE_PMEM on an image of a memory section or more. Read-only, those writes are dropped
/// and the guest's memmap reads back as the image's bytes.
fn guest_writes_memmap(file: &File, size: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut block = [0u8; PFN_MODE_OFFSET + 4];
    size >= MEMORY_SECTION
        && file.read_exact_at(&mut block, PFN_INFO_OFFSET).is_ok()
        && block[..16] == PFN_SIGNATURE[..]
        && block[PFN_MODE_OFFSET..] == PFN_MODE_PMEM.to_le_bytes()
}

/// Refuses one file behind two devices unless both only read it.
fn check_sharing(configs: &[PmemConfig], opened: &[(File, u64)]) -> Result<(), PmemError> {
    let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
    for (i, (config, (file, _))) in configs.iter().zip(opened).enumerate() {
        let meta = file.metadata().map_err(|source| PmemError::Io {
            path: config.file.clone(),
            source,
        })?;
        if let Some(&first) = seen.get(&(meta.dev(), meta.ino())) {
            let earlier = &configs[first];
            if !(earlier.readonly && config.readonly) {
                return Err(PmemError::Conflict {
                    path: config.file.clone(),
                    first: PmemRegion::describe(earlier),
                    second: PmemRegion::describe(config),
                });
            }
        } else {
            seen.insert((meta.dev(), meta.ino()), i);
        }
    }
    Ok(())
}

fn map_file(path: &Path, file: &File, size: u64, readonly: bool) -> Result<MmapRegion, PmemError> {
    let map_error = |source| PmemError::Map {
        path: path.to_path_buf(),
        source,
    };
    let clone = file.try_clone().map_err(|e| PmemError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let len = usize::try_from(size).map_err(|_| PmemError::Window {
        window: layout::PMEM_WINDOW_SIZE >> 30,
    })?;
    let prot = if readonly {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    MmapRegion::build(
        Some(FileOffset::new(clone, 0)),
        len,
        prot,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
    )
    .map_err(map_error)
}

/// Opens, checks, places and maps the images `configs` describe, in order.
pub fn open_images(configs: &[PmemConfig], mem_size: u64) -> Result<Vec<PmemRegion>, PmemError> {
    let opened = configs
        .iter()
        .map(open_image)
        .collect::<Result<Vec<_>, _>>()?;
    check_sharing(configs, &opened)?;

    let (start, window) = layout::pmem_window(mem_size);
    let window_error = || PmemError::Window {
        window: window >> 30,
    };
    let mut space = AddressAllocator::new(start, window).map_err(|_| window_error())?;
    let mut regions = Vec::with_capacity(configs.len());
    for (config, (file, size)) in configs.iter().zip(opened) {
        let gpa = space
            .allocate(size, layout::PMEM_ALIGN, AllocPolicy::FirstMatch)
            .map_err(|_| window_error())?
            .start();
        if config.readonly && guest_writes_memmap(&file, size) {
            log::warn!(
                "pmem image {}: its nd_pfn info block keeps the guest's memmap on the image \
                 (mode pmem), which is read-only here: the guest cannot use it; rebuild the \
                 image with mode ram (as Kata's nsdax does) or pass readonly=off",
                config.file.display()
            );
        }
        let mapping = map_file(&config.file, &file, size, config.readonly)?;
        let kind = match config.model {
            PmemModel::Nvdimm => "NVDIMM",
            PmemModel::Virtio => "virtio-pmem",
        };
        log::info!(
            "{kind} {} ({} MiB, {}) at guest physical {gpa:#x}",
            config.file.display(),
            size >> 20,
            if config.readonly {
                "read-only"
            } else {
                "writable"
            }
        );
        regions.push(PmemRegion {
            config: config.clone(),
            gpa,
            size,
            file,
            mapping,
        });
    }
    Ok(regions)
}

/// Gives each image a KVM memory slot, numbered from `first_slot`; read-only images get
/// read-only slots (guest writes exit to the VMM, which drops them).
pub fn register_slots(vm: &VmFd, regions: &[PmemRegion], first_slot: u32) -> Result<(), PmemError> {
    for (slot, region) in (first_slot..).zip(regions) {
        let memory_region = kvm_userspace_memory_region {
            slot,
            flags: if region.config.readonly {
                KVM_MEM_READONLY
            } else {
                0
            },
            guest_phys_addr: region.gpa,
            memory_size: region.size,
            userspace_addr: region.mapping.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `region`, which the caller keeps
        // until the VM is gone (both live until the process exits).
        unsafe { vm.set_user_memory_region(memory_region) }.map_err(|source| PmemError::Slot {
            path: region.config.file.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chapeau-pmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn image(name: &str, size: u64) -> PathBuf {
        let path = scratch(name);
        let file = File::create(&path).unwrap();
        file.set_len(size).unwrap();
        path
    }

    fn config(path: &Path, readonly: bool) -> PmemConfig {
        PmemConfig {
            file: path.to_path_buf(),
            model: PmemModel::Nvdimm,
            readonly,
        }
    }

    fn error(configs: &[PmemConfig]) -> String {
        match open_images(configs, 256 << 20) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_images_get_one_precise_error_each() {
        let missing = scratch("missing.img");
        assert!(error(&[config(&missing, true)]).contains("No such file"));
        let dir = scratch("a-dir");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            error(&[config(&dir, true)]),
            format!(
                "pmem image {} is a directory, not a regular file",
                dir.display()
            )
        );
        let empty = image("empty.img", 0);
        assert!(error(&[config(&empty, true)]).ends_with("is empty"));
        let odd = image("odd.img", (3 << 20) + 512);
        let msg = error(&[config(&odd, true)]);
        assert!(
            msg.contains("is 3146240 bytes")
                && msg.contains("multiple of 2 MiB")
                && msg.contains(&format!("truncate -s 4194304 {}", odd.display())),
            "{msg}"
        );
        assert_eq!(
            error(&[config(Path::new("/dev/null"), true)]),
            "pmem image /dev/null is a character device, not a regular file"
        );
    }

    #[test]
    fn one_file_twice_only_when_both_read_only() {
        let img = image("shared.img", 2 << 20);
        let regions = open_images(&[config(&img, true), config(&img, true)], 256 << 20).unwrap();
        assert_eq!(regions.len(), 2);
        let msg = error(&[config(&img, true), config(&img, false)]);
        assert!(
            msg.contains("given twice (model=nvdimm, readonly=on and model=nvdimm, readonly=off)"),
            "{msg}"
        );
        // The same file under another name is the same file.
        let link = scratch("shared-link.img");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&img, &link).unwrap();
        assert!(error(&[config(&img, false), config(&link, true)]).contains("given twice"));
    }

    #[test]
    fn memmap_on_a_section_sized_image_is_spotted() {
        use std::os::unix::fs::FileExt;
        let path = image("pfn.img", 128 << 20);
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let mut block = vec![0u8; 76];
        block[..16].copy_from_slice(PFN_SIGNATURE);
        block[72..76].copy_from_slice(&PFN_MODE_PMEM.to_le_bytes());
        file.write_all_at(&block, PFN_INFO_OFFSET).unwrap();
        assert!(guest_writes_memmap(&file, 128 << 20));
        assert!(!guest_writes_memmap(&file, 64 << 20), "below a section");
        block[72] = 1; // PFN_MODE_RAM
        file.write_all_at(&block, PFN_INFO_OFFSET).unwrap();
        assert!(!guest_writes_memmap(&file, 128 << 20));
    }

    #[test]
    fn images_are_placed_aligned_and_apart_in_the_window() {
        let a = image("a.img", 2 << 20);
        let b = image("b.img", 130 << 20);
        let c = image("c.img", 2 << 20);
        let regions = open_images(
            &[config(&a, true), config(&b, false), config(&c, true)],
            256 << 20,
        )
        .unwrap();
        let (window, _) = layout::pmem_window(256 << 20);
        assert_eq!(regions[0].gpa, window);
        assert_eq!(regions[1].gpa, window + layout::PMEM_ALIGN);
        assert_eq!(regions[2].gpa, window + 3 * layout::PMEM_ALIGN);
        assert!(regions[0].flush_file().unwrap().is_none());
        assert!(regions[1].flush_file().unwrap().is_some());
    }

    #[test]
    fn read_only_mapping_is_not_writable_and_writable_one_reaches_the_file() {
        let img = image("rw.img", 2 << 20);
        let regions = open_images(&[config(&img, true), config(&img, true)], 256 << 20).unwrap();
        assert_eq!(regions[0].mapping.prot(), libc::PROT_READ);
        drop(regions);
        let regions = open_images(&[config(&img, false)], 256 << 20).unwrap();
        let ptr = regions[0].mapping.as_ptr();
        // SAFETY: the mapping is 2 MiB, writable and shared; we write its first byte.
        unsafe { ptr.write_volatile(0xa5) };
        drop(regions);
        assert_eq!(std::fs::read(&img).unwrap()[0], 0xa5);
    }
}
