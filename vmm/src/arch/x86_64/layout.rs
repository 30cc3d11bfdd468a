//! The guest physical memory map, written once. Every other module asks here.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (RAM, untouched)
//! 0x0000_0500  GDT, then IDT (boot only)
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT, PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  RSDP and ACPI tables (reserved, up to 1 MiB)
//! 0x0010_0000  high memory: kernel, then initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole (3 GiB .. 4 GiB): PCI BARs, MMCONFIG, IOAPIC, LAPIC
//!   0xc000_0000  32-bit PCI BAR window (512 MiB)
//!   0xe000_0000  PCI MMCONFIG (ECAM), bus 0 only (1 MiB)
//! 0x1_0000_0000 RAM above the hole
//! above RAM, 1 GiB aligned: the 64-bit PCI BAR window (16 GiB)
//! after it, 1 GiB aligned: persistent memory (NVDIMM and virtio-pmem images)
//! ```

use vm_memory::GuestAddress;

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The x86 kernel's COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the RSDP lives: inside the BIOS area the kernel scans, and also passed in boot_params.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// ACPI tables follow the RSDP; the area up to 1 MiB is reserved in the E820 map.
pub const ACPI_TABLES_START: u64 = RSDP_ADDR + 0x100;
pub const ACPI_AREA_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; low RAM ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM_SET_TSS_ADDR needs three free pages below 4 GiB; KVM_SET_IDENTITY_MAP_ADDR one more.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const RAM_HIGH_START: u64 = MMIO_HOLE_END;

/// PCI: BARs below 4 GiB come from this window, which the DSDT's host bridge describes.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_SIZE: u64 = 512 << 20;
/// ECAM for bus 0 (one bus: 32 devices x 8 functions x 4 KiB), described by the MCFG.
pub const PCI_MMCONFIG_START: u64 = 0xe000_0000;
pub const PCI_MMCONFIG_SIZE: u64 = 1 << 20;
/// Configuration mechanism #1 ports (address 0xcf8, data 0xcfc-0xcff).
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u16 = 8;
/// The 64-bit BAR window: above RAM, aligned, this large.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
pub const PCI_MMIO64_SIZE: u64 = 16 << 30;
/// Persistent memory images start on a Linux memory-section boundary (128 MiB), so every
/// kernel's memremap_pages can map them, whatever its subsection support.
pub const PMEM_ALIGN: u64 = 128 << 20;
/// An image's size must be a multiple of this: the unit (a memory subsection) in which Linux
/// maps device memory.
pub const PMEM_SIZE_ALIGN: u64 = 2 << 20;
/// Room for all images together, beyond anything Kata uses (its rootfs image is ~128 MiB).
pub const PMEM_WINDOW_SIZE: u64 = 1 << 40;

/// GSIs 0-23 are the IOAPIC's pins; MSI vectors get GSIs from here on.
pub const MSI_GSI_START: u32 = 24;
/// KVM's routing table holds at most 4096 entries; stay well inside.
pub const MSI_GSI_END: u32 = 1023;

/// I/O ports of the legacy devices and of our ACPI sleep/reset register.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The keyboard's interrupt, as on every PC.
pub const I8042_KEYBOARD_IRQ: u32 = 1;
/// Hardware-reduced ACPI: FADT's SLEEP_CONTROL_REG (write) and RESET_REG both point here,
/// SLEEP_STATUS_REG is the next byte.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// The value written to RESET_REG to reset the machine.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP we advertise for S5 in the DSDT `_S5_` package.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// The ACPI Generic Event Device's event status register (one byte, after the sleep registers)
/// and its interrupt: an ISA IRQ no PC device claims (and no other chapeau device uses),
/// edge-triggered, active high, as ISA IRQs are without an interrupt source override.
pub const ACPI_GED_PORT: u16 = 0x602;
pub const ACPI_GED_IRQ: u32 = 5;

/// The RAM regions (start, length) for a guest with `mem_size` bytes of memory: below the
/// 32-bit MMIO hole first, the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low)];
    if mem_size > low {
        regions.push((GuestAddress(RAM_HIGH_START), mem_size - low));
    }
    regions
}

/// The 64-bit PCI BAR window (start, size) for a guest with `mem_size` bytes of RAM.
pub fn pci_mmio64_window(mem_size: u64) -> (u64, u64) {
    let ram_end = ram_regions(mem_size)
        .last()
        .map_or(RAM_HIGH_START, |(start, len)| start.0 + len)
        .max(RAM_HIGH_START);
    (ram_end.next_multiple_of(PCI_MMIO64_ALIGN), PCI_MMIO64_SIZE)
}

/// The persistent-memory window (start, size): after the 64-bit PCI window, so a guest moving
/// its BARs never meets it.
pub fn pmem_window(mem_size: u64) -> (u64, u64) {
    let (pci_start, pci_size) = pci_mmio64_window(mem_size);
    (
        (pci_start + pci_size).next_multiple_of(PCI_MMIO64_ALIGN),
        PMEM_WINDOW_SIZE,
    )
}

/// The end (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

// Fixed relations between the constants, checked at compile time.
const _: () = assert!(BOOT_STACK_POINTER < PML4_ADDR && BOOT_STACK_POINTER > ZERO_PAGE_ADDR + 4096);
const _: () = assert!(RSDP_ADDR < ACPI_TABLES_START && ACPI_TABLES_START < ACPI_AREA_END);
const _: () = assert!(KVM_IDENTITY_MAP_ADDR + 4096 <= KVM_TSS_ADDR);
const _: () =
    assert!(KVM_TSS_ADDR >= LAPIC_ADDR + 4096 && KVM_TSS_ADDR + 3 * 4096 <= MMIO_HOLE_END);
// The PCI windows sit in the hole, apart from each other and from the IOAPIC.
const _: () = assert!(PCI_MMIO32_START >= MMIO_HOLE_START);
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_MMCONFIG_START);
const _: () = assert!(PCI_MMCONFIG_START + PCI_MMCONFIG_SIZE <= IOAPIC_ADDR);
const _: () = assert!(PCI_MMCONFIG_START.is_multiple_of(PCI_MMCONFIG_SIZE));
// The GED register follows the two sleep/reset bytes; the legacy IRQs differ.
const _: () = assert!(ACPI_GED_PORT > ACPI_SLEEP_STATUS_PORT);
const _: () = assert!(ACPI_GED_IRQ != COM1_IRQ && ACPI_GED_IRQ != I8042_KEYBOARD_IRQ);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(low_ram_end(256 << 20), 256 << 20);
    }

    #[test]
    fn large_guest_skips_the_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(
            regions[1],
            (GuestAddress(1 << 32), (4 << 30) - MMIO_HOLE_START)
        );
        assert_eq!(low_ram_end(4 << 30), MMIO_HOLE_START);
    }

    #[test]
    fn pci_64_bit_window_is_above_ram_and_aligned() {
        assert_eq!(pci_mmio64_window(256 << 20), (1 << 32, PCI_MMIO64_SIZE));
        assert_eq!(pci_mmio64_window(4 << 30), (5 << 30, PCI_MMIO64_SIZE));
        let (start, _) = pci_mmio64_window((4 << 30) + 1);
        assert_eq!(start, 6 << 30);
    }

    #[test]
    fn pmem_window_follows_the_pci_window() {
        for mem in [64 << 20, 4 << 30, 100 << 30] {
            let (pci, pci_size) = pci_mmio64_window(mem);
            let (pmem, _) = pmem_window(mem);
            assert!(pmem >= pci + pci_size);
            assert!(pmem.is_multiple_of(PMEM_ALIGN));
        }
        assert_eq!(pmem_window(256 << 20).0, 20 << 30);
    }

    #[test]
    fn boot_structures_fit_below_the_ebda_and_do_not_overlap() {
        let spots = [
            (GDT_ADDR, 4 * 8),
            (IDT_ADDR, 8),
            (ZERO_PAGE_ADDR, 4096),
            (PML4_ADDR, 4096),
            (PDPT_ADDR, 4096),
            (PD_ADDR, 4096),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, (a, alen)) in spots.iter().enumerate() {
            assert!(a + alen <= EBDA_START);
            for (b, blen) in spots.iter().skip(i + 1) {
                assert!(a + alen <= *b || b + blen <= *a, "{a:#x} overlaps {b:#x}");
            }
        }
    }
}
