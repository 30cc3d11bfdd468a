//! Type-0 PCI configuration space: the 256-byte header and capability area, with per-bit write
//! masks, BARs that answer size probing, and a capability list.

use super::{BarReprogram, PciBarRegion};

/// Conventional configuration space (no PCIe extended space: reads past it return zero).
pub const CONFIG_SPACE_SIZE: usize = 256;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
pub const NUM_BARS: usize = 6;

const COMMAND_REG: usize = 1;
/// I/O space, memory space, bus master, INTx disable: the command bits a guest may set.
const COMMAND_WRITABLE: u32 = 0x0001 | 0x0002 | 0x0004 | 0x0400;
pub const COMMAND_MEMORY: u32 = 0x0002;
const STATUS_CAP_LIST: u32 = 0x0010 << 16;
const BAR0_REG: usize = 4;
const SUBSYSTEM_REG: usize = 11;
const CAP_PTR_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
const FIRST_CAP_OFFSET: usize = 0x40;

const BAR_MEM_64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;
/// Low bits of a memory BAR that are flags, not address.
const BAR_MEM_FLAGS: u32 = 0xf;

/// Header type 0x00 (a general device); 0x80 would say multi-function.
const HEADER_TYPE_DEVICE: u8 = 0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is taken")]
    BarInUse(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    #[error("BAR address {addr:#x} is not aligned to its size {size:#x}")]
    BarAlignment { addr: u64, size: u64 },
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

#[derive(Debug, Clone, Copy, Default)]
struct Bar {
    size: u64,
    /// Where the VMM has the BAR mapped now; a guest write that changes it is a relocation.
    mapped: u64,
    is_64: bool,
    /// The upper half of a 64-bit BAR: its state lives in the lower one.
    is_upper: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Class code, subclass and programming interface (`0xccsspp`).
    pub class: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

pub struct PciConfig {
    regs: [u32; NUM_REGS],
    wmask: [u32; NUM_REGS],
    bars: [Bar; NUM_BARS],
    /// Offset of the last capability added, to chain the next one.
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfig {
    pub fn new(header: PciHeader) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut wmask = [0u32; NUM_REGS];
        regs[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        regs[2] = header.class << 8 | u32::from(header.revision);
        regs[3] = u32::from(HEADER_TYPE_DEVICE) << 16;
        regs[SUBSYSTEM_REG] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        wmask[COMMAND_REG] = COMMAND_WRITABLE;
        // Interrupt line is scratch space for the OS; no INTx pin (MSI-X only).
        wmask[INTERRUPT_REG] = 0xff;
        Self {
            regs,
            wmask,
            bars: [Bar::default(); NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        }
    }

    /// Adds a 64-bit memory BAR (it takes slots `index` and `index + 1`) at `addr`.
    pub fn add_mem64_bar(
        &mut self,
        index: usize,
        addr: u64,
        size: u64,
        prefetchable: bool,
    ) -> Result<(), ConfigError> {
        if index + 1 >= NUM_BARS || self.bars[index].size != 0 || self.bars[index + 1].size != 0 {
            return Err(ConfigError::BarInUse(index));
        }
        if !size.is_power_of_two() || size < 16 {
            return Err(ConfigError::BarSize(size));
        }
        if addr & (size - 1) != 0 {
            return Err(ConfigError::BarAlignment { addr, size });
        }
        let flags = BAR_MEM_64 | if prefetchable { BAR_PREFETCHABLE } else { 0 };
        let mask = !(size - 1);
        self.regs[BAR0_REG + index] = (addr as u32 & !BAR_MEM_FLAGS) | flags;
        self.regs[BAR0_REG + index + 1] = (addr >> 32) as u32;
        self.wmask[BAR0_REG + index] = mask as u32 & !BAR_MEM_FLAGS;
        self.wmask[BAR0_REG + index + 1] = (mask >> 32) as u32;
        self.bars[index] = Bar {
            size,
            mapped: addr,
            is_64: true,
            is_upper: false,
        };
        self.bars[index + 1] = Bar {
            size,
            is_upper: true,
            ..Bar::default()
        };
        Ok(())
    }

    /// The guest-programmed address of BAR `index` (the lower slot of a 64-bit BAR).
    pub fn bar_address(&self, index: usize) -> u64 {
        let Some(bar) = self.bars.get(index) else {
            return 0;
        };
        let low = u64::from(self.regs[BAR0_REG + index] & !BAR_MEM_FLAGS);
        if bar.is_64 {
            low | u64::from(self.regs[BAR0_REG + index + 1]) << 32
        } else {
            low
        }
    }

    pub fn bar_region(&self, index: usize) -> Option<PciBarRegion> {
        let bar = self.bars.get(index)?;
        (bar.size != 0 && !bar.is_upper).then_some(PciBarRegion {
            index,
            addr: bar.mapped,
            size: bar.size,
        })
    }

    /// Appends a capability: `body` is everything after the ID and next-pointer bytes. Returns
    /// the capability's offset in configuration space.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, ConfigError> {
        let len = body.len() + 2;
        let offset = self.next_cap;
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.set_byte(offset, id);
        self.set_byte(offset + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i, *b);
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.set_byte(CAP_PTR_REG * 4, offset as u8);
                self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = (offset + len).next_multiple_of(4);
        Ok(offset)
    }

    /// Makes the bits of `mask` in the dword at `offset` (4-aligned) writable by the guest.
    pub fn set_writable(&mut self, offset: usize, mask: u32) {
        if let Some(w) = self.wmask.get_mut(offset / 4) {
            *w |= mask;
        }
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | u32::from(value) << shift;
    }

    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Reads `data.len()` bytes at `offset` (any alignment inside the space).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i;
            *b = self
                .regs
                .get(at / 4)
                .map_or(0, |reg| (reg >> ((at % 4) * 8)) as u8);
        }
    }

    pub fn command(&self) -> u32 {
        self.regs[COMMAND_REG] & 0xffff
    }

    /// Writes bytes at `offset` through the write masks. Returns the BAR relocation the write
    /// asks for, if any: a BAR whose new address is complete (not a size probe) and differs
    /// from where it is mapped.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<BarReprogram> {
        let end = offset.checked_add(data.len())?.min(CONFIG_SPACE_SIZE);
        if offset >= end {
            return None;
        }
        for at in offset..end {
            let shift = (at % 4) * 8;
            let mask = (self.wmask[at / 4] >> shift) & 0xff;
            let old = self.regs[at / 4];
            let new = (old & !(mask << shift)) | ((u32::from(data[at - offset]) & mask) << shift);
            self.regs[at / 4] = new;
        }
        let first = offset / 4;
        let last = (end - 1) / 4;
        (first..=last)
            .filter(|reg| (BAR0_REG..BAR0_REG + NUM_BARS).contains(reg))
            .find_map(|reg| self.bar_written(reg - BAR0_REG))
    }

    fn bar_written(&mut self, slot: usize) -> Option<BarReprogram> {
        let bar = self.bars[slot];
        if bar.size == 0 {
            return None;
        }
        let index = if bar.is_upper { slot - 1 } else { slot };
        let reg = BAR0_REG + slot;
        // All address bits set: the guest is probing the size and will restore the old value
        // next; it is not a place to map the BAR.
        if self.wmask[reg] != 0 && self.regs[reg] & self.wmask[reg] == self.wmask[reg] {
            return None;
        }
        let new = self.bar_address(index);
        let old = self.bars[index].mapped;
        if new == old {
            return None;
        }
        self.bars[index].mapped = new;
        Some(BarReprogram {
            index,
            old,
            new,
            size: self.bars[index].size,
        })
    }

    /// Records that a relocation could not be done: the BAR stays where it was mapped.
    pub fn revert_bar(&mut self, move_: &BarReprogram) {
        if let Some(bar) = self.bars.get_mut(move_.index) {
            bar.mapped = move_.old;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfig {
        PciConfig::new(PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision: 1,
            class: 0x00ff00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        })
    }

    fn write32(c: &mut PciConfig, offset: usize, v: u32) -> Option<BarReprogram> {
        c.write(offset, &v.to_le_bytes())
    }

    fn read32(c: &PciConfig, offset: usize) -> u32 {
        let mut b = [0; 4];
        c.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut c = config();
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        assert_eq!(read32(&c, 8), 0x00ff_0001);
        write32(&mut c, 0, 0xdead_beef);
        write32(&mut c, 8, 0);
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        assert_eq!(read32(&c, 8), 0x00ff_0001);
        assert_eq!(read32(&c, 0x2c), 0x0040_1af4);
        // Only the defined command bits stick.
        write32(&mut c, 4, 0xffff);
        assert_eq!(c.command(), COMMAND_WRITABLE);
    }

    #[test]
    fn bar_size_probing_and_relocation() {
        let mut c = config();
        c.add_mem64_bar(0, 0xc000_8000, 0x8000, false).unwrap();
        assert_eq!(read32(&c, 0x10), 0xc000_8004);
        assert_eq!(read32(&c, 0x14), 0);
        // Linux's probe: all-ones, read, restore; for each half.
        assert_eq!(write32(&mut c, 0x10, 0xffff_ffff), None);
        assert_eq!(read32(&c, 0x10), 0xffff_8004);
        assert_eq!(write32(&mut c, 0x10, 0xc000_8004), None);
        assert_eq!(write32(&mut c, 0x14, 0xffff_ffff), None);
        assert_eq!(read32(&c, 0x14), 0xffff_ffff);
        assert_eq!(write32(&mut c, 0x14, 0), None);
        assert_eq!(c.bar_address(0), 0xc000_8000);
        // A real move, low half then high half: two steps.
        let m = write32(&mut c, 0x10, 0x0001_0000).unwrap();
        assert_eq!(
            (m.index, m.old, m.new, m.size),
            (0, 0xc000_8000, 0x1_0000, 0x8000)
        );
        let m = write32(&mut c, 0x14, 0x1).unwrap();
        assert_eq!((m.old, m.new), (0x1_0000, 0x1_0001_0000));
        assert_eq!(c.bar_region(0).unwrap().addr, 0x1_0001_0000);
        assert!(c.bar_region(1).is_none());
        // Misaligned low bits are dropped by the mask.
        assert_eq!(write32(&mut c, 0x10, 0x0001_0123), None);
        assert_eq!(read32(&c, 0x10), 0x0001_0004);
        // Unused BARs read zero and ignore writes.
        write32(&mut c, 0x18, 0xffff_ffff);
        assert_eq!(read32(&c, 0x18), 0);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = config();
        assert_eq!(
            c.add_mem64_bar(0, 0x1000, 0x3000, false),
            Err(ConfigError::BarSize(0x3000))
        );
        assert!(matches!(
            c.add_mem64_bar(0, 0x1000, 0x2000, false),
            Err(ConfigError::BarAlignment { .. })
        ));
        c.add_mem64_bar(0, 0x2000, 0x2000, false).unwrap();
        assert_eq!(
            c.add_mem64_bar(1, 0x4000, 0x2000, false),
            Err(ConfigError::BarInUse(1))
        );
        assert_eq!(
            c.add_mem64_bar(5, 0x4000, 0x2000, false),
            Err(ConfigError::BarInUse(5))
        );
    }

    #[test]
    fn capability_list_walks() {
        let mut c = config();
        assert_eq!(read32(&c, 4) & STATUS_CAP_LIST, 0);
        let a = c.add_capability(0x09, &[3, 1]).unwrap();
        let b = c.add_capability(0x11, &[0; 10]).unwrap();
        assert_ne!(read32(&c, 4) & STATUS_CAP_LIST, 0);
        let mut seen = vec![];
        let mut at = read32(&c, 0x34) as usize & 0xff;
        while at != 0 {
            let mut hdr = [0; 2];
            c.read(at, &mut hdr);
            seen.push((at, hdr[0]));
            at = hdr[1] as usize;
        }
        assert_eq!(seen, vec![(a, 0x09), (b, 0x11)]);
        assert_eq!(a % 4, 0);
        assert_eq!(b % 4, 0);
        // Capabilities are read-only unless made writable.
        write32(&mut c, b, 0xffff_ffff);
        assert_eq!(read32(&c, b) & 0xff, 0x11);
        assert!(c.add_capability(0x09, &[0; 200]).is_err());
    }

    #[test]
    fn accesses_past_the_space_are_harmless() {
        let mut c = config();
        let mut b = [0xaa; 4];
        c.read(254, &mut b);
        assert_eq!(&b[2..], &[0, 0]);
        assert_eq!(c.write(300, &[1, 2]), None);
        assert_eq!(c.write(255, &[1, 2]), None);
    }
}
