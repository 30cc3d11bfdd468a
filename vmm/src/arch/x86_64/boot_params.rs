//! The Linux x86 "zero page" (struct boot_params) with its E820 map.
//! See Documentation/arch/x86/boot.rst for the fields we fill.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader id: we are not one of the registered loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The kernel's default physical alignment, for ELF images that carry no setup header.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// loadflags: the protected-mode code is loaded at 0x100000 or above.
const LOADED_HIGH: u8 = 0x01;

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("the E820 map has more than {max} entries")]
    TooManyE820Entries { max: usize },
    #[error("cannot write the zero page into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// What the zero page needs to know about the loaded images.
pub struct BootInfo {
    /// The bzImage's own setup header, when booting one.
    pub setup_header: Option<setup_header>,
    pub cmdline_size: usize,
    pub initrd: Option<(GuestAddress, u64)>,
    pub rsdp: GuestAddress,
    pub mem_size: u64,
}

pub fn build_boot_params(info: &BootInfo) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    match info.setup_header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = info.cmdline_size as u32;
    if let Some((addr, size)) = info.initrd {
        // The layout keeps the initrd below 4 GiB, so the 32-bit fields are enough.
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp.0;

    for (addr, size, kind) in e820_map(info.mem_size) {
        let index = usize::from(params.e820_entries);
        let entry = params
            .e820_table
            .get_mut(index)
            .ok_or(BootParamsError::TooManyE820Entries { max: index })?;
        *entry = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
        params.e820_entries += 1;
    }
    Ok(params)
}

/// The E820 map: conventional memory up to the EBDA, the ACPI area reserved, high RAM below
/// the MMIO hole, and RAM above 4 GiB when the guest is that large.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::RSDP_ADDR,
            layout::ACPI_AREA_END - layout::RSDP_ADDR,
            E820_RESERVED,
        ),
    ];
    for (region_start, len) in layout::ram_regions(mem_size) {
        let end = region_start.0 + len;
        let start = region_start.0.max(layout::HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    params: &boot_params,
) -> Result<(), BootParamsError> {
    mem.write_obj(*params, GuestAddress(layout::ZERO_PAGE_ADDR))
        .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(mem_size: u64) -> BootInfo {
        BootInfo {
            setup_header: None,
            cmdline_size: 42,
            initrd: Some((GuestAddress(0x0f00_0000), 0x10_0000)),
            rsdp: GuestAddress(layout::RSDP_ADDR),
            mem_size,
        }
    }

    #[test]
    fn e820_for_a_small_guest() {
        assert_eq!(
            e820_map(256 << 20),
            vec![
                (0, 0x9_fc00, E820_RAM),
                (0xe_0000, 0x2_0000, E820_RESERVED),
                (0x10_0000, (256 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_for_a_guest_larger_than_the_hole() {
        let map = e820_map(4 << 30);
        assert_eq!(map[2], (0x10_0000, 0xc000_0000 - 0x10_0000, E820_RAM));
        assert_eq!(map[3], (1 << 32, (4 << 30) - 0xc000_0000, E820_RAM));
        assert_eq!(map.len(), 4);
    }

    #[test]
    fn zero_page_fields_for_an_elf_kernel() {
        let params = build_boot_params(&info(256 << 20)).unwrap();
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);
        assert_eq!({ params.hdr.header }, 0x5372_6448);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!({ params.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x10_0000);
        assert_eq!({ params.acpi_rsdp_addr }, layout::RSDP_ADDR);
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (0x10_0000, (256 << 20) - 0x10_0000, 1)
        );
    }

    #[test]
    fn bzimage_header_is_kept() {
        let mut header = setup_header {
            version: 0x20f,
            setup_sects: 30,
            ..Default::default()
        };
        header.header = KERNEL_HDR_MAGIC;
        let params = build_boot_params(&BootInfo {
            setup_header: Some(header),
            ..info(64 << 20)
        })
        .unwrap();
        assert_eq!({ params.hdr.version }, 0x20f);
        assert_eq!(params.hdr.setup_sects, 30);
        assert_eq!(params.hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
    }

    #[test]
    fn zero_page_lands_at_its_address() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let params = build_boot_params(&info(1 << 20)).unwrap();
        write_boot_params(&mem, &params).unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ back.acpi_rsdp_addr }, layout::RSDP_ADDR);
    }
}
