//! The guest's ACPI tables: RSDP → XSDT → {FADT → DSDT, MADT, MCFG, NFIT}.
//!
//! The platform is *hardware-reduced* ACPI (FADT flag HW_REDUCED_ACPI): no PM1 event/control
//! blocks, no SCI, no GPEs, no FACS. Linux then powers off by writing `SLP_TYP << 2 | SLP_EN` to
//! the FADT's SLEEP_CONTROL_REG (one I/O byte, served by `devices::legacy::AcpiPowerDevice`), with
//! SLP_TYP taken from the DSDT's `\_S5_` package, and resets by writing RESET_VALUE to RESET_REG
//! (the same byte). That is one tiny device instead of a PIIX4/ICH9 PM block.
//!
//! Events the other way (the power button) go through a Generic Event Device (`ACPI0013`, served
//! by `devices::legacy::AcpiGed`): its interrupt runs the DSDT's `_EVT`, which reads the event
//! status and notifies `\_SB_.PWRB`.
//!
//! Tables are built in host memory with the `acpi_tables` crate, placed contiguously (8-byte
//! aligned) from `ACPI_TABLES_START`, checked to fit below `ACPI_AREA_END` (which the E820 map
//! reserves), and only then written into guest memory.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use devices::legacy::{ACPI_GED_EVENT_POWER_BUTTON, ACPI_GED_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout;

/// OEM ID in every table header (6 bytes, the RSDP's too).
const OEM_ID: [u8; 6] = *b"CHAPEA";
const OEM_REVISION: u32 = 1;
/// FADT HYPERVISOR_VENDOR_IDENTITY: lets a guest tell which VMM built its tables.
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"CHAPEAU ";

/// FADT IAPC_BOOT_ARCH bits (ACPI 6.5, table 5.11).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// MADT header flag: a dual 8259 PIC is present (KVM's in-kernel one), which the OS must mask
/// before it uses the I/O APIC.
const MADT_PCAT_COMPAT: u32 = 1;
/// Length of the MADT header (the SDT header + local APIC address + flags).
const MADT_HEADER_LEN: u32 = 44;
/// MADT revision of ACPI 6.3 onwards.
const MADT_REVISION: u8 = 5;
/// DSDT revision 2 and above means 64-bit AML integers.
const DSDT_REVISION: u8 = 2;
/// Every SDT starts with this 36-byte header.
const SDT_HEADER_LEN: u32 = 36;

/// xAPIC ids are 8 bits and 0xff is the broadcast id, so 254 vCPUs at most (ids 0..=253, and the
/// I/O APIC takes id `num_cpus`).
const MAX_CPUS: u8 = 254;

/// Tables are placed on this alignment (the spec asks for none, 8 keeps 64-bit fields aligned).
const TABLE_ALIGN: u64 = 8;

// The 36-byte RSDP fits before the first table, which starts aligned.
const _: () = assert!(layout::RSDP_ADDR + 36 <= layout::ACPI_TABLES_START);
const _: () = assert!(layout::ACPI_TABLES_START & (TABLE_ALIGN - 1) == 0);
// The MADT stores 32-bit APIC addresses.
const _: () = assert!(layout::IOAPIC_ADDR <= u32::MAX as u64);
const _: () = assert!(layout::LAPIC_ADDR <= u32::MAX as u64);
// An ISA IRQ (the IRQNoFlags mask is 16 bits) and a 3-bit SLP_TYP.
const _: () = assert!(layout::COM1_IRQ < 16 && layout::I8042_KEYBOARD_IRQ < 16);
const _: () = assert!(layout::ACPI_S5_SLEEP_TYPE < 8);

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("cannot describe {0} vCPUs in the ACPI MADT: 1 to {MAX_CPUS} are supported")]
    CpuCount(u8),
    #[error("ACPI tables would end at {end:#x}, past the reserved ACPI area's end {limit:#x}")]
    TooLarge { end: u64, limit: u64 },
    #[error("cannot write ACPI table {table} at {addr:#x} into guest memory: {source}")]
    Write {
        table: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// A persistent-memory range the guest should see as an NVDIMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nvdimm {
    pub gpa: u64,
    pub size: u64,
    /// Described as not armed (QEMU's `unarmed=on`): Linux then makes the region read-only.
    pub readonly: bool,
}

/// What the tables describe besides CPUs and the fixed legacy devices.
#[derive(Debug, Default, Clone)]
pub struct Platform {
    /// The PCI bus (MCFG, the DSDT's host bridge).
    pub pci: bool,
    /// NVDIMMs (NFIT, the DSDT's NVDIMM root device).
    pub nvdimms: Vec<Nvdimm>,
}

/// Builds the ACPI tables for `num_cpus` vCPUs into `mem` and returns the RSDP's address (for the
/// zero page's `acpi_rsdp_addr`; the RSDP also sits in the BIOS area the kernel scans).
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    platform: &Platform,
) -> Result<GuestAddress, AcpiError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(AcpiError::CpuCount(num_cpus));
    }

    // The 64-bit PCI window follows the end of RAM.
    let mem_size = mem.iter().map(|region| region.len()).sum();
    let mmio64 = layout::pci_mmio64_window(mem_size);
    let mut tables = TablePlacer::new(layout::ACPI_TABLES_START);
    let dsdt = tables.place(
        "DSDT",
        dsdt(platform.pci.then_some(mmio64), platform.nvdimms.len()),
    )?;
    let fadt = tables.place("FACP", fadt(dsdt))?;
    let madt = tables.place("APIC", madt(num_cpus))?;
    let mut listed = vec![fadt, madt];
    if platform.pci {
        listed.push(tables.place("MCFG", mcfg())?);
    }
    if !platform.nvdimms.is_empty() {
        listed.push(tables.place("NFIT", nfit(&platform.nvdimms))?);
    }
    let xsdt = tables.place("XSDT", xsdt(&listed))?;

    for (table, addr, bytes) in &tables.placed {
        write(mem, table, *addr, bytes)?;
    }
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt));
    write(mem, "RSDP", layout::RSDP_ADDR, &rsdp)?;
    Ok(GuestAddress(layout::RSDP_ADDR))
}

/// Hands out 8-byte-aligned addresses from `next` on, refusing to cross `ACPI_AREA_END`.
struct TablePlacer {
    next: u64,
    placed: Vec<(&'static str, u64, Vec<u8>)>,
}

impl TablePlacer {
    fn new(start: u64) -> Self {
        Self {
            next: start,
            placed: Vec::new(),
        }
    }

    /// Reserves room for `bytes` and returns the guest physical address the table will have.
    fn place(&mut self, table: &'static str, bytes: Vec<u8>) -> Result<u64, AcpiError> {
        let addr = self.next;
        let end = addr.saturating_add(bytes.len() as u64);
        if end > layout::ACPI_AREA_END {
            return Err(AcpiError::TooLarge {
                end,
                limit: layout::ACPI_AREA_END,
            });
        }
        self.next = end.next_multiple_of(TABLE_ALIGN);
        self.placed.push((table, addr, bytes));
        Ok(addr)
    }
}

fn write(
    mem: &GuestMemoryMmap,
    table: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), AcpiError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| AcpiError::Write {
            table,
            addr,
            source,
        })
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// An 8-bit system-I/O register, the shape of all our FADT registers.
fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// FADT (signature FACP), revision 6.5, hardware-reduced.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"CHAPFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    // The i8042 is what `reboot=k` pokes (its CPU-reset command); no VGA, so the kernel does not
    // probe for one.
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT).into();
    fadt.reset_reg = io_byte_register(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_byte_register(layout::ACPI_SLEEP_CONTROL_PORT);
    // Linux offers S5 in reduced-hardware mode only when both sleep registers are non-zero.
    fadt.sleep_status_reg = io_byte_register(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    aml_bytes(&fadt.finalize())
}

/// MADT entry type 4: the LINT pin wired to NMI on the given processors.
struct LocalApicNmi {
    /// 0xff: all processors.
    processor_uid: u8,
    /// MPS INTI flags; 0 = conforms to the bus (edge, active high for NMI).
    flags: u16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        const TYPE: u8 = 4;
        const LENGTH: u8 = 6;
        sink.byte(TYPE);
        sink.byte(LENGTH);
        sink.byte(self.processor_uid);
        sink.word(self.flags);
        sink.byte(self.lint);
    }
}

/// MADT (signature APIC). Built on the generic `Sdt` because the crate's `MADT` type cannot set
/// the header flags (PCAT_COMPAT) and has no Local APIC NMI entry.
fn madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"CHAPAPIC",
        OEM_REVISION,
    );
    madt.write_u32(SDT_HEADER_LEN as usize, layout::LAPIC_ADDR as u32);
    madt.write_u32(SDT_HEADER_LEN as usize + 4, MADT_PCAT_COMPAT);
    // APIC id = ACPI processor uid = vCPU index: the CPUID topology and the vCPU setup use the
    // same numbering.
    for cpu in 0..num_cpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    // One I/O APIC with 24 pins from GSI 0. No interrupt source overrides: KVM's default GSI
    // routing sends ISA IRQ n to IOAPIC pin n, IRQ0 included.
    madt.append_slice(&aml_bytes(&IoApic::new(
        num_cpus,
        layout::IOAPIC_ADDR as u32,
        0,
    )));
    // LINT1 is NMI on every CPU, as on real PCs (the vCPU setup programs LVT LINT1 the same way).
    madt.append_slice(&aml_bytes(&LocalApicNmi {
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    }));
    madt.as_slice().to_vec()
}

/// MCFG: ECAM for segment 0, bus 0 only (so the guest never probes other buses).
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"CHAPMCFG", OEM_REVISION);
    mcfg.add_ecam(layout::PCI_MMCONFIG_START, 0, 0, 0);
    aml_bytes(&mcfg)
}

/// XSDT listing the given tables (the FADT first, as the spec asks).
fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, *b"CHAPXSDT", OEM_REVISION);
    for &table in tables {
        xsdt.add_entry(table);
    }
    aml_bytes(&xsdt)
}

/// NFIT structure types and sizes (ACPI 6.5, section 5.2.26).
const NFIT_SPA_RANGE: u16 = 0;
const NFIT_SPA_RANGE_LEN: u16 = 56;
const NFIT_MEMORY_MAP: u16 = 1;
const NFIT_MEMORY_MAP_LEN: u16 = 48;
const NFIT_CONTROL_REGION: u16 = 4;
const NFIT_CONTROL_REGION_LEN: u16 = 80;
/// The persistent-memory address range type, GUID 66F0D379-B4F3-4074-AC43-0D3318B78CDB as
/// stored (the first three fields little-endian).
const NFIT_GUID_PERSISTENT_MEMORY: [u8; 16] = [
    0x79, 0xd3, 0xf0, 0x66, 0xf3, 0xb4, 0x74, 0x40, 0xac, 0x43, 0x0d, 0x33, 0x18, 0xb7, 0x8c, 0xdb,
];
/// EFI_MEMORY_WB | EFI_MEMORY_NV: write-back cacheable, non-volatile.
const NFIT_MAPPING_ATTRIBUTES: u64 = 0x8 | 0x8000;
/// Memory device state flag ACPI_NFIT_MEM_NOT_ARMED: the device will not persist writes,
/// which Linux answers by making the region read-only.
const NFIT_STATE_NOT_ARMED: u16 = 1 << 3;
/// Region format interface code 0x0301: byte-addressable persistent memory, no energy-backed
/// interface (what Linux's pmem driver expects of a plain NVDIMM).
const NFIT_FORMAT_BYTE_ADDRESSABLE: u16 = 0x0301;
/// Control-region vendor: the virtio (Red Hat) PCI vendor id, as for our other virtual hardware.
const NFIT_VENDOR_ID: u16 = 0x1af4;
const NFIT_DEVICE_ID: u16 = 1;
const NFIT_REVISION: u8 = 1;

/// The NFIT device handle of NVDIMM `index`; the DSDT's `NVxx` device has it as `_ADR`.
fn nvdimm_handle(index: usize) -> u32 {
    index as u32 + 1
}

/// NFIT: for each NVDIMM a system-physical-address range (persistent memory), its control
/// region, and the map between the two (no interleaving, no block windows, no labels: Linux
/// makes one label-less namespace of each range and finds a pfn info block inside on its own).
fn nfit(nvdimms: &[Nvdimm]) -> Vec<u8> {
    let mut nfit = Sdt::new(
        *b"NFIT",
        SDT_HEADER_LEN + 4,
        NFIT_REVISION,
        OEM_ID,
        *b"CHAPNFIT",
        OEM_REVISION,
    );
    for (i, nvdimm) in nvdimms.iter().enumerate() {
        // Structure indexes are per structure type and must not be 0.
        let index = i as u16 + 1;
        let handle = nvdimm_handle(i);

        let spa = nfit.len();
        nfit.append_slice(&[0; NFIT_SPA_RANGE_LEN as usize]);
        nfit.write_u16(spa, NFIT_SPA_RANGE);
        nfit.write_u16(spa + 2, NFIT_SPA_RANGE_LEN);
        nfit.write_u16(spa + 4, index);
        nfit.write_bytes(spa + 16, &NFIT_GUID_PERSISTENT_MEMORY);
        nfit.write_u64(spa + 32, nvdimm.gpa);
        nfit.write_u64(spa + 40, nvdimm.size);
        nfit.write_u64(spa + 48, NFIT_MAPPING_ATTRIBUTES);

        let map = nfit.len();
        nfit.append_slice(&[0; NFIT_MEMORY_MAP_LEN as usize]);
        nfit.write_u16(map, NFIT_MEMORY_MAP);
        nfit.write_u16(map + 2, NFIT_MEMORY_MAP_LEN);
        nfit.write_u32(map + 4, handle);
        nfit.write_u16(map + 8, index); // physical id
        nfit.write_u16(map + 12, index); // SPA range index
        nfit.write_u16(map + 14, index); // control region index
        nfit.write_u64(map + 16, nvdimm.size); // region size; offset and DPA stay 0
        nfit.write_u16(map + 42, 1); // interleave ways
        if nvdimm.readonly {
            nfit.write_u16(map + 44, NFIT_STATE_NOT_ARMED);
        }

        let dcr = nfit.len();
        nfit.append_slice(&[0; NFIT_CONTROL_REGION_LEN as usize]);
        nfit.write_u16(dcr, NFIT_CONTROL_REGION);
        nfit.write_u16(dcr + 2, NFIT_CONTROL_REGION_LEN);
        nfit.write_u16(dcr + 4, index);
        nfit.write_u16(dcr + 6, NFIT_VENDOR_ID);
        nfit.write_u16(dcr + 8, NFIT_DEVICE_ID);
        nfit.write_u16(dcr + 10, 1); // revision
        nfit.write_u32(dcr + 24, handle); // serial number: unique per NVDIMM
        nfit.write_u16(dcr + 28, NFIT_FORMAT_BYTE_ADDRESSABLE);
    }
    nfit.update_checksum();
    nfit.as_slice().to_vec()
}

/// `\_SB_.NVDR`, the NVDIMM root device Linux's ACPI NFIT driver binds to, with one child per
/// NVDIMM whose `_ADR` is its NFIT device handle. No `_DSM`: the NVDIMMs have no labels and
/// no health or firmware commands.
fn nvdimm_root(sink: &mut dyn AmlSink, count: usize) {
    let hid = aml::Name::new("_HID".into(), &"ACPI0012");
    let children: Vec<(aml::Name, String)> = (0..count)
        .map(|i| {
            (
                aml::Name::new("_ADR".into(), &nvdimm_handle(i)),
                format!("NV{i:02X}"),
            )
        })
        .collect();
    let devices: Vec<aml::Device> = children
        .iter()
        .map(|(adr, name)| aml::Device::new(name.as_str().into(), vec![adr as &dyn Aml]))
        .collect();
    let mut contents: Vec<&dyn Aml> = vec![&hid];
    contents.extend(devices.iter().map(|d| d as &dyn Aml));
    aml::Device::new("NVDR".into(), contents).to_aml_bytes(sink);
}

/// DSDT: the header around `dsdt_body`.
fn dsdt(pci_mmio64: Option<(u64, u64)>, nvdimms: usize) -> Vec<u8> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"CHAPDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt_body(pci_mmio64, nvdimms));
    dsdt.as_slice().to_vec()
}

/// Small IRQ descriptor without flags (`IRQNoFlags () {n}`): edge-triggered, active high,
/// exclusive, which is how ISA devices are described. The crate only has the extended form.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Small resource item 0x04 (IRQ), length 2: the IRQ mask only.
        const IRQ_NO_FLAGS: u8 = (0x04 << 3) | 2;
        sink.byte(IRQ_NO_FLAGS);
        sink.word(1u16 << self.0);
    }
}

/// A fixed I/O range (`IO (Decode16, port, port, 1, len)`).
fn fixed_io(port: u16, len: u8) -> aml::IO {
    aml::IO::new(port, port, 1, len)
}

/// An ISA-style device `Device (name) { _HID, _UID 0, _CRS }`, appended to `sink` as AML.
fn isa_device(sink: &mut dyn AmlSink, name: &str, hid: &str, resources: Vec<&dyn Aml>) {
    let hid = aml::EISAName::new(hid);
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::ResourceTemplate::new(resources);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(name.into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

/// ACPI notification value for a button device: the button was pressed.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// `\_SB_.PWRB`, the power button: Linux's ACPI button driver binds to `PNP0C0C` and, notified
/// with 0x80, reports KEY_POWER from its "Power Button" input device. `\_SB_.GED_`, the Generic
/// Event Device that notifies it: Linux's GED driver runs `_EVT` on each edge of the GED's
/// interrupt; `_EVT` reads the event status register (reading clears it) and notifies the
/// device of each set bit.
fn power_button_and_ged(sink: &mut dyn AmlSink) {
    let hid = aml::EISAName::new("PNP0C0C");
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new("PWRB".into(), vec![&hid, &uid]).to_aml_bytes(sink);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    // Only interrupts may appear in a GED's _CRS (Linux gives up on the device otherwise).
    let irq = aml::Interrupt::new(true, true, false, false, layout::ACPI_GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let port = usize::from(layout::ACPI_GED_PORT);
    let len = ACPI_GED_LEN as usize;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    // Local0 = GDAT; Local1 = Local0 & POWER_BUTTON; If (Local1 == POWER_BUTTON) { Notify }
    let status = aml::Path::new("GDAT");
    let read_status = aml::Store::new(&aml::Local(0), &status);
    let pressed = aml::And::new(&aml::Local(1), &aml::Local(0), &ACPI_GED_EVENT_POWER_BUTTON);
    let is_pressed = aml::Equal::new(&aml::Local(1), &ACPI_GED_EVENT_POWER_BUTTON);
    let button = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&button, &NOTIFY_BUTTON_PRESSED);
    let if_pressed = aml::If::new(&is_pressed, vec![&notify]);
    // Serialized: two interrupts' _EVT never interleave their reads of the register.
    let evt = aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read_status, &pressed, &if_pressed],
    );
    aml::Device::new("GED_".into(), vec![&hid, &uid, &crs, &region, &field, &evt])
        .to_aml_bytes(sink);
}

/// `\_SB_.PCI0`, the PCI host bridge: bus 0 only, the config ports, and the two BAR windows.
/// Linux keeps the BARs we assigned because they lie inside these windows. No _PRT: our
/// devices interrupt through MSI-X only.
fn pci_host_bridge(sink: &mut dyn AmlSink, mmio64: (u64, u64)) {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let hid = aml::Name::new("_HID".into(), &hid);
    let cid = aml::Name::new("_CID".into(), &cid);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let buses = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = fixed_io(layout::PCI_CONFIG_IO_PORT, layout::PCI_CONFIG_IO_LEN as u8);
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64.0,
        mmio64.0 + mmio64.1 - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&buses, &config_ports, &mmio32, &mmio64]);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new("PCI0".into(), vec![&hid, &cid, &seg, &uid, &bbn, &crs]).to_aml_bytes(sink);
}

/// The DSDT's AML: what the guest's ACPI interpreter enumerates. Devices go into `\_SB_` here.
fn dsdt_body(pci_mmio64: Option<(u64, u64)>, nvdimms: usize) -> Vec<u8> {
    let mut body = Vec::new();

    // `\_S5_`: {SLP_TYPa, SLP_TYPb, reserved, reserved}. Linux offers ACPI power-off only when
    // this exists; it then writes SLP_TYPa << 2 | SLP_EN to SLEEP_CONTROL_REG.
    let s5 = [
        &layout::ACPI_S5_SLEEP_TYPE as &dyn Aml,
        &aml::ZERO,
        &aml::ZERO,
        &aml::ZERO,
    ];
    aml::Name::new("_S5_".into(), &aml::Package::new(s5.to_vec())).to_aml_bytes(&mut body);

    let mut system_bus = Vec::new();
    // COM1, the 16550 the kernel console uses.
    isa_device(
        &mut system_bus,
        "COM1",
        "PNP0501",
        vec![
            &fixed_io(layout::COM1_PORT, 8),
            &IrqNoFlags(layout::COM1_IRQ as u8),
        ],
    );
    // The PS/2 controller: an i8042 whose CPU-reset command ends the VM (`reboot=k`), with a
    // keyboard that can type Ctrl-Alt-Del.
    isa_device(
        &mut system_bus,
        "KBD_",
        "PNP0303",
        vec![
            &fixed_io(layout::I8042_DATA_PORT, 1),
            &fixed_io(layout::I8042_COMMAND_PORT, 1),
            &IrqNoFlags(layout::I8042_KEYBOARD_IRQ as u8),
        ],
    );
    power_button_and_ged(&mut system_bus);
    if let Some(mmio64) = pci_mmio64 {
        pci_host_bridge(&mut system_bus, mmio64);
        // Motherboard resources: the ECAM window. Linux uses MMCONFIG only where firmware
        // reserves it, here or in the E820 map.
        let mmconfig = aml::Memory32Fixed::new(
            true,
            layout::PCI_MMCONFIG_START as u32,
            layout::PCI_MMCONFIG_SIZE as u32,
        );
        isa_device(&mut system_bus, "MBRD", "PNP0C02", vec![&mmconfig]);
    }
    if nvdimms > 0 {
        nvdimm_root(&mut system_bus, nvdimms);
    }
    body.extend(aml::Scope::raw("\\_SB_".into(), system_bus));
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    /// FADT field offsets (ACPI 6.5, table 5.9).
    const FADT_DSDT: usize = 40;
    const FADT_IAPC_BOOT_ARCH: usize = 109;
    const FADT_FLAGS: usize = 112;
    const FADT_RESET_REG: usize = 116;
    const FADT_RESET_VALUE: usize = 128;
    const FADT_MINOR_VERSION: usize = 131;
    const FADT_X_DSDT: usize = 140;
    const FADT_SLEEP_CONTROL_REG: usize = 244;
    const FADT_SLEEP_STATUS_REG: usize = 256;
    const FADT_HYPERVISOR_VENDOR_ID: usize = 268;
    const FADT_LEN: usize = 276;
    const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    /// Reads the SDT at `addr`, checking what every table must satisfy: its signature, that it
    /// lies inside the ACPI area, 8-byte aligned, and sums to zero over its length field.
    fn read_sdt(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        assert_eq!(
            addr % 8,
            0,
            "{signature:?} at {addr:#x} is not 8-byte aligned"
        );
        let header = read(mem, addr, SDT_HEADER_LEN as usize);
        assert_eq!(&header[0..4], signature);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= SDT_HEADER_LEN as usize);
        assert!(addr >= layout::ACPI_TABLES_START && addr + len as u64 <= layout::ACPI_AREA_END);
        let table = read(mem, addr, len);
        assert_eq!(sum(&table), 0, "{signature:?} checksum");
        assert_eq!(&table[10..16], &OEM_ID);
        table
    }

    /// All tables reachable from the RSDP, by signature, with their addresses.
    struct Tables {
        rsdp: Vec<u8>,
        xsdt: (u64, Vec<u8>),
        fadt: (u64, Vec<u8>),
        madt: (u64, Vec<u8>),
        dsdt: (u64, Vec<u8>),
        mcfg: (u64, Vec<u8>),
        nfit: (u64, Vec<u8>),
    }

    /// Two NVDIMMs, the second read-only.
    const NVDIMMS: [Nvdimm; 2] = [
        Nvdimm {
            gpa: 20 << 30,
            size: 64 << 20,
            readonly: false,
        },
        Nvdimm {
            gpa: (20 << 30) + (128 << 20),
            size: 2 << 20,
            readonly: true,
        },
    ];

    fn with_pci() -> Platform {
        Platform {
            pci: true,
            nvdimms: vec![],
        }
    }

    fn build(num_cpus: u8) -> Tables {
        let mem = guest_memory();
        let platform = Platform {
            pci: true,
            nvdimms: NVDIMMS.to_vec(),
        };
        let rsdp_addr = create_acpi_tables(&mem, num_cpus, &platform).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(layout::RSDP_ADDR));

        let rsdp = read(&mem, layout::RSDP_ADDR, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 16), 0, "no RSDT");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");

        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_sdt(&mem, xsdt_addr, b"XSDT");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|e| u64::from_le_bytes(e.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 4);
        let fadt_addr = entries[0];
        let madt_addr = entries[1];
        let mcfg_addr = entries[2];
        let nfit_addr = entries[3];
        let fadt = read_sdt(&mem, fadt_addr, b"FACP");
        let madt = read_sdt(&mem, madt_addr, b"APIC");
        let mcfg = read_sdt(&mem, mcfg_addr, b"MCFG");
        let nfit = read_sdt(&mem, nfit_addr, b"NFIT");
        let dsdt_addr = u64_at(&fadt, FADT_X_DSDT);
        let dsdt = read_sdt(&mem, dsdt_addr, b"DSDT");

        // Contiguous and disjoint: each table starts at the previous one's end rounded up to 8.
        let mut spans = [
            (xsdt_addr, xsdt.len()),
            (fadt_addr, fadt.len()),
            (madt_addr, madt.len()),
            (dsdt_addr, dsdt.len()),
            (mcfg_addr, mcfg.len()),
            (nfit_addr, nfit.len()),
        ];
        spans.sort();
        assert_eq!(spans[0].0, layout::ACPI_TABLES_START);
        for pair in spans.windows(2) {
            assert_eq!(
                (pair[0].0 + pair[0].1 as u64).next_multiple_of(8),
                pair[1].0
            );
        }

        Tables {
            rsdp,
            xsdt: (xsdt_addr, xsdt),
            fadt: (fadt_addr, fadt),
            madt: (madt_addr, madt),
            dsdt: (dsdt_addr, dsdt),
            mcfg: (mcfg_addr, mcfg),
            nfit: (nfit_addr, nfit),
        }
    }

    fn assert_io_byte_gas(fadt: &[u8], offset: usize, port: u16) {
        let gas = &fadt[offset..offset + 12];
        assert_eq!(gas[0], 1, "system I/O space");
        assert_eq!(gas[1], 8, "bit width");
        assert_eq!(gas[2], 0, "bit offset");
        assert_eq!(gas[3], 1, "byte access");
        assert_eq!(u64_at(gas, 4), u64::from(port));
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let tables = build(1);
        let (_, fadt) = &tables.fadt;
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(fadt[8], 6, "FADT major revision");
        assert_eq!(fadt[FADT_MINOR_VERSION] & 0xf, 5, "FADT minor revision");
        assert_eq!(u32_at(fadt, FADT_DSDT), 0, "only X_DSDT is used");
        assert_eq!(u64_at(fadt, FADT_X_DSDT), tables.dsdt.0);
        let flags = u32_at(fadt, FADT_FLAGS);
        assert_eq!(flags, FLAG_HW_REDUCED_ACPI | FLAG_RESET_REG_SUP);
        assert_eq!(
            u16_at(fadt, FADT_IAPC_BOOT_ARCH),
            0b110,
            "8042 present, no VGA"
        );
        assert_io_byte_gas(fadt, FADT_RESET_REG, layout::ACPI_SLEEP_CONTROL_PORT);
        assert_eq!(fadt[FADT_RESET_VALUE], layout::ACPI_RESET_VALUE);
        assert_io_byte_gas(
            fadt,
            FADT_SLEEP_CONTROL_REG,
            layout::ACPI_SLEEP_CONTROL_PORT,
        );
        assert_io_byte_gas(fadt, FADT_SLEEP_STATUS_REG, layout::ACPI_SLEEP_STATUS_PORT);
        assert_eq!(
            &fadt[FADT_HYPERVISOR_VENDOR_ID..FADT_HYPERVISOR_VENDOR_ID + 8],
            b"CHAPEAU "
        );
        // The RSDP and XSDT are the ones handed out.
        assert_eq!(u64_at(&tables.rsdp, 24), tables.xsdt.0);
    }

    /// Walks the MADT's interrupt controller structures: (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut entries = Vec::new();
        let mut offset = MADT_HEADER_LEN as usize;
        while offset < madt.len() {
            let len = madt[offset + 1] as usize;
            assert!(len >= 2 && offset + len <= madt.len());
            entries.push((madt[offset], &madt[offset..offset + len]));
            offset += len;
        }
        assert_eq!(offset, madt.len());
        entries
    }

    fn check_madt(num_cpus: u8) {
        let tables = build(num_cpus);
        let (_, madt) = &tables.madt;
        assert_eq!(madt.len(), 44 + 8 * num_cpus as usize + 12 + 6);
        assert_eq!(u32_at(madt, 36) as u64, layout::LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);

        let entries = madt_entries(madt);
        assert_eq!(entries.len(), num_cpus as usize + 2);
        let lapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 0).collect();
        assert_eq!(lapics.len(), num_cpus as usize);
        for (i, (_, lapic)) in lapics.iter().enumerate() {
            assert_eq!(lapic.len(), 8);
            assert_eq!(lapic[2] as usize, i, "processor uid");
            assert_eq!(lapic[3] as usize, i, "apic id");
            assert_eq!(u32_at(lapic, 4), 1, "enabled");
        }
        let ioapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 1).collect();
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0].1;
        assert_eq!(ioapic[2], num_cpus, "I/O APIC id");
        assert_eq!(u32_at(ioapic, 4) as u64, layout::IOAPIC_ADDR);
        assert_eq!(u32_at(ioapic, 8), 0, "GSI base");
        let nmis: Vec<_> = entries.iter().filter(|(t, _)| *t == 4).collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!(nmis[0].1, &[4, 6, 0xff, 0, 0, 1]);
        assert!(
            entries.iter().all(|(t, _)| *t != 2),
            "no interrupt source override"
        );
    }

    #[test]
    fn madt_describes_one_cpu() {
        check_madt(1);
    }

    #[test]
    fn madt_describes_four_cpus() {
        check_madt(4);
    }

    #[test]
    fn madt_describes_the_most_cpus() {
        check_madt(MAX_CPUS);
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_has_s5_com1_and_the_keyboard_controller() {
        let tables = build(2);
        let (_, dsdt) = &tables.dsdt;
        assert_eq!(dsdt[8], DSDT_REVISION);
        // Name (_S5_, Package (4) {5, 0, 0, 0}).
        assert!(contains(
            dsdt,
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 5, 0, 0, 0]
        ));
        assert!(contains(dsdt, b"_SB_"));
        assert!(contains(dsdt, b"COM1"));
        assert!(contains(dsdt, b"KBD_"));
        // IO (Decode16, 0x3f8, 0x3f8, 1, 8), then IRQNoFlags () {4}.
        assert!(contains(
            dsdt,
            &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8, 0x22, 0x10, 0x00]
        ));
        // IO (Decode16, 0x60, 0x60, 1, 1) and 0x64, then IRQNoFlags () {1}.
        assert!(contains(
            dsdt,
            &[0x47, 1, 0x60, 0, 0x60, 0, 1, 1, 0x47, 1, 0x64, 0, 0x64, 0, 1, 1, 0x22, 2, 0]
        ));
    }

    #[test]
    fn dsdt_has_the_power_button_and_the_generic_event_device() {
        let tables = build(1);
        let (_, dsdt) = &tables.dsdt;
        // The power button's EISA id PNP0C0C, compressed.
        assert!(contains(dsdt, b"PWRB"));
        assert!(contains(dsdt, &[0x0c, 0x41, 0xd0, 0x0c, 0x0c]));
        assert!(contains(dsdt, b"ACPI0013\0"));
        // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {5}.
        assert!(contains(
            dsdt,
            &[0x89, 6, 0, 0b0011, 1, layout::ACPI_GED_IRQ as u8, 0, 0, 0]
        ));
        // OperationRegion (GDST, SystemIO, 0x602, One).
        let [lo, hi] = layout::ACPI_GED_PORT.to_le_bytes();
        assert!(contains(
            dsdt,
            &[0x5b, 0x80, b'G', b'D', b'S', b'T', 1, 0x0b, lo, hi, 1]
        ));
        // Notify (\_SB_.PWRB, 0x80).
        assert!(contains(dsdt, b"\x86\\\x2e_SB_PWRB\x0a\x80"));
    }

    #[test]
    fn mcfg_maps_bus_zero_and_the_dsdt_has_the_host_bridge() {
        let tables = build(1);
        let (_, mcfg) = &tables.mcfg;
        // Header, 8 reserved bytes, one 16-byte allocation.
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        let entry = &mcfg[44..];
        assert_eq!(u64_at(entry, 0), layout::PCI_MMCONFIG_START);
        assert_eq!(u16_at(entry, 8), 0, "segment");
        assert_eq!((entry[10], entry[11]), (0, 0), "buses 0-0");
        let (_, dsdt) = &tables.dsdt;
        assert!(contains(dsdt, b"PCI0"));
        assert!(contains(dsdt, b"MBRD"));
        // IO (Decode16, 0xcf8, 0xcf8, 1, 8).
        assert!(contains(dsdt, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        // Memory32Fixed (ReadWrite, 0xe0000000, 0x100000).
        assert!(contains(
            dsdt,
            &[0x86, 9, 0, 1, 0, 0, 0, 0xe0, 0, 0, 0x10, 0]
        ));
    }

    #[test]
    fn without_pci_there_is_no_mcfg_and_no_host_bridge() {
        let mem = guest_memory();
        create_acpi_tables(&mem, 1, &Platform::default()).unwrap();
        let rsdp = read(&mem, layout::RSDP_ADDR, 36);
        let xsdt = read_sdt(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8, "FADT and MADT only");
        assert!(!contains(&xsdt, b"NFIT"));
        let fadt = read_sdt(&mem, u64_at(&xsdt, 36), b"FACP");
        let dsdt = read_sdt(&mem, u64_at(&fadt, FADT_X_DSDT), b"DSDT");
        assert!(!contains(&dsdt, b"PCI0"));
        assert!(!contains(&dsdt, b"MBRD"));
        assert!(contains(&dsdt, b"COM1"));
    }

    #[test]
    fn nfit_describes_each_nvdimm_and_the_dsdt_has_their_devices() {
        let tables = build(1);
        let (_, nfit) = &tables.nfit;
        assert_eq!(nfit.len(), 40 + 2 * (56 + 48 + 80));
        for (i, nvdimm) in NVDIMMS.iter().enumerate() {
            let spa = &nfit[40 + i * 184..];
            assert_eq!((u16_at(spa, 0), u16_at(spa, 2)), (0, 56));
            assert_eq!(u16_at(spa, 4), i as u16 + 1);
            assert_eq!(spa[16..32], NFIT_GUID_PERSISTENT_MEMORY);
            assert_eq!(
                (u64_at(spa, 32), u64_at(spa, 40)),
                (nvdimm.gpa, nvdimm.size)
            );
            let map = &spa[56..];
            assert_eq!((u16_at(map, 0), u16_at(map, 2)), (1, 48));
            assert_eq!(u32_at(map, 4), i as u32 + 1, "device handle");
            assert_eq!(
                (u16_at(map, 12), u16_at(map, 14)),
                (i as u16 + 1, i as u16 + 1)
            );
            assert_eq!(u64_at(map, 16), nvdimm.size);
            let not_armed = if nvdimm.readonly { 1 << 3 } else { 0 };
            assert_eq!(u16_at(map, 44), not_armed);
            let dcr = &map[48..];
            assert_eq!((u16_at(dcr, 0), u16_at(dcr, 2)), (4, 80));
            assert_eq!(u16_at(dcr, 28), 0x0301);
        }
        let (_, dsdt) = &tables.dsdt;
        for name in [&b"NVDR"[..], b"ACPI0012", b"NV00", b"NV01"] {
            assert!(contains(dsdt, name));
        }
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        let mem = guest_memory();
        assert!(matches!(
            create_acpi_tables(&mem, 0, &with_pci()),
            Err(AcpiError::CpuCount(0))
        ));
        assert!(matches!(
            create_acpi_tables(&mem, 255, &with_pci()),
            Err(AcpiError::CpuCount(255))
        ));
    }

    #[test]
    fn memory_without_the_acpi_area_is_an_error() {
        // 512 KiB of RAM: the ACPI area at 0xe0000 does not exist.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 512 << 10)]).unwrap();
        let err = create_acpi_tables(&mem, 1, &with_pci()).unwrap_err();
        assert!(matches!(err, AcpiError::Write { .. }), "{err}");
    }

    #[test]
    fn placer_refuses_to_cross_the_area_end() {
        let mut placer = TablePlacer::new(layout::ACPI_AREA_END - 16);
        assert_eq!(
            placer.place("A", vec![0; 9]).unwrap(),
            layout::ACPI_AREA_END - 16
        );
        let err = placer.place("B", vec![0; 9]).unwrap_err();
        assert!(
            matches!(err, AcpiError::TooLarge { end, .. } if end == layout::ACPI_AREA_END + 9),
            "{err}"
        );
    }

    /// A scratch directory removed when the test ends, pass or fail.
    struct ScratchDir(std::path::PathBuf);

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs `iasl -d` on every table: iasl decodes each one and reports malformed fields, bad
    /// checksums and AML it cannot parse. The DSDT's disassembly is then compiled back and must
    /// give the same AML, so the bytes mean exactly what the decoded ASL says.
    #[test]
    fn iasl_decodes_every_table() {
        if Command::new("iasl").arg("-v").output().is_err() {
            eprintln!("iasl not found (apt-get install acpica-tools): skipping the decode check");
            return;
        }
        let tables = build(4);
        let dir = ScratchDir(
            std::env::temp_dir().join(format!("chapeau-acpi-test-{}", std::process::id())),
        );
        std::fs::create_dir_all(&dir.0).unwrap();
        let named = [
            ("xsdt", &tables.xsdt.1),
            ("facp", &tables.fadt.1),
            ("apic", &tables.madt.1),
            ("mcfg", &tables.mcfg.1),
            ("dsdt", &tables.dsdt.1),
            ("nfit", &tables.nfit.1),
        ];
        let mut decoded = String::new();
        for (name, bytes) in named {
            let dat = dir.0.join(format!("{name}.dat"));
            std::fs::write(&dat, bytes).unwrap();
            decoded += &iasl(&dir.0, &["-d", &format!("{name}.dat")]);
            decoded += &std::fs::read_to_string(dat.with_extension("dsl")).unwrap();
        }

        for expected in [
            "Hardware Reduced (V5) : 1",
            "Reset Register Supported (V2) : 1",
            "8042 Present on ports 60/64 (V2) : 1",
            "VGA Not Present (V4) : 1",
            "Sleep Control Register : [Generic Address Structure]",
            "Sleep Status Register : [Generic Address Structure]",
            "Address : 0000000000000601",
            "Name (_S5, Package (0x04)",
            "EisaId (\"PNP0501\")",
            "EisaId (\"PNP0303\")",
            "IRQNoFlags ()",
            "Local Apic Address : FEE00000",
            "PC-AT Compatibility : 1",
            "I/O Apic ID : 04",
            "Address : FEC00000",
            "Subtable Type : 04 [Local APIC NMI]",
            "Interrupt Input LINT : 01",
            "Base Address : 00000000E0000000",
            "End Bus Number : 00",
            "EisaId (\"PNP0A08\")",
            "EisaId (\"PNP0A03\")",
            "EisaId (\"PNP0C02\")",
            "WordBusNumber (ResourceProducer",
            "0xDFFFFFFF",
            "QWordMemory (ResourceProducer",
            "0x00000004FFFFFFFF",
            "Memory32Fixed (ReadWrite",
            "Name (_HID, \"ACPI0012\" /* NVDIMM Root Device */)",
            "Name (_ADR, 0x02)",
            "Subtable Type : 0000 [System Physical Address Range]",
            "Region Type GUID : 66F0D379-B4F3-4074-AC43-0D3318B78CDB",
            "Address Range Base : 0000000508000000",
            "Subtable Type : 0001 [Memory Range Map]",
            "Device not armed : 1",
            "Subtable Type : 0004 [NVDIMM Control Region]",
            "IRQNoFlags ()\n                    {1}",
            "EisaId (\"PNP0C0C\") /* Power Button Device */",
            "Name (_HID, \"ACPI0013\" /* Generic Event Device */)",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
            "0x00000005,",
            "Local0 = GDAT /* \\_SB_.GED_.GDAT */",
            "If ((Local1 == One))",
            "OperationRegion (GDST, SystemIO, 0x0602, One)",
            "Method (_EVT, 1, Serialized)",
            "Notify (\\_SB.PWRB, 0x80) // Status Change",
        ] {
            assert!(
                decoded.contains(expected),
                "iasl output lacks {expected:?}:\n{decoded}"
            );
        }

        // -oa: no optimizations, so iasl keeps our encoding choices (e.g. the `\_SB_` prefix).
        iasl(&dir.0, &["-oa", "-p", "recompiled", "dsdt.dsl"]);
        let recompiled = std::fs::read(dir.0.join("recompiled.aml")).unwrap();
        let header = SDT_HEADER_LEN as usize;
        assert_eq!(
            recompiled[header..],
            tables.dsdt.1[header..],
            "DSDT AML round trip"
        );
    }

    /// Runs iasl in `dir`, asserting it succeeds without errors or warnings; returns its log.
    fn iasl(dir: &Path, args: &[&str]) -> String {
        let output = Command::new("iasl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "iasl {args:?} failed:\n{log}");
        let lower = log.to_lowercase();
        assert!(
            !lower.contains("error") || lower.contains(" 0 errors"),
            "iasl {args:?}:\n{log}"
        );
        assert!(
            !lower.contains("warning") || lower.contains(" 0 warnings"),
            "iasl {args:?}:\n{log}"
        );
        log
    }
}
