//! The boot vCPU's state for the 64-bit Linux boot protocol: a flat GDT, identity-mapped page
//! tables for the first GiB, long mode enabled, RSI pointing at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PAGE_PRESENT: u64 = 1 << 0;
const PAGE_WRITABLE: u64 = 1 << 1;
const PAGE_HUGE: u64 = 1 << 7;

/// Null, 64-bit code, data, TSS: the selectors below index this table.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_SELECTOR: u16 = 1 << 3;
const DATA_SELECTOR: u16 = 2 << 3;
const TSS_SELECTOR: u16 = 3 << 3;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot tables into guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
    #[error("cannot set vCPU registers: {0}")]
    Kvm(kvm_ioctls::Error),
}

/// A GDT descriptor from its flags (access byte + granularity nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The `kvm_segment` KVM wants for a GDT entry, which it cannot read from guest memory itself.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            // With 4 KiB granularity the limit counts pages.
            if bit(55) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: index << 3,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity-map page tables into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_ADDR + 8 * i as u64))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(RegsError::Memory)?;
    let table_entry = |next: u64| next | PAGE_PRESENT | PAGE_WRITABLE;
    mem.write_obj(
        table_entry(layout::PDPT_ADDR),
        GuestAddress(layout::PML4_ADDR),
    )
    .map_err(RegsError::Memory)?;
    mem.write_obj(
        table_entry(layout::PD_ADDR),
        GuestAddress(layout::PDPT_ADDR),
    )
    .map_err(RegsError::Memory)?;
    // 512 2 MiB pages: the first GiB, which holds the kernel, zero page and command line. The
    // kernel builds its own page tables before it touches anything above.
    for i in 0..512u64 {
        let entry = (i << 21) | PAGE_PRESENT | PAGE_WRITABLE | PAGE_HUGE;
        mem.write_obj(entry, GuestAddress(layout::PD_ADDR + i * 8))
            .map_err(RegsError::Memory)?;
    }
    Ok(())
}

pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[1], CODE_SELECTOR >> 3);
    let data = segment_from_gdt(GDT[2], DATA_SELECTOR >> 3);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(GDT[3], TSS_SELECTOR >> 3);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry.0,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// The FPU as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Puts the boot vCPU into 64-bit mode at `entry`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(RegsError::Kvm)?;
    vcpu.set_sregs(&boot_sregs(sregs)).map_err(RegsError::Kvm)?;
    vcpu.set_regs(&boot_regs(entry)).map_err(RegsError::Kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        let code = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (code.l, code.db, code.present, code.s, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.selector, CODE_SELECTOR);
        let data = segment_from_gdt(GDT[2], 2);
        assert_eq!((data.l, data.db, data.type_, data.unusable), (0, 1, 0x3, 0));
        let tss = segment_from_gdt(GDT[3], 3);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_ADDR)).unwrap();
        assert_eq!(pml4, layout::PDPT_ADDR | 3);
        let pdpt: u64 = mem.read_obj(GuestAddress(layout::PDPT_ADDR)).unwrap();
        assert_eq!(pdpt, layout::PD_ADDR | 3);
        let first: u64 = mem.read_obj(GuestAddress(layout::PD_ADDR)).unwrap();
        assert_eq!(first, 0x83);
        let last: u64 = mem
            .read_obj(GuestAddress(layout::PD_ADDR + 511 * 8))
            .unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn long_mode_registers() {
        let sregs = boot_sregs(kvm_sregs::default());
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, layout::PML4_ADDR);
        assert_eq!(sregs.gdt.limit, 31);
        let regs = boot_regs(GuestAddress(0x100_0000));
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0000, layout::ZERO_PAGE_ADDR, 2)
        );
    }
}
