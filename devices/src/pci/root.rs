//! The PCI root bus (bus 0) with its host bridge, and the two ways to reach configuration
//! space: mechanism #1 on I/O ports 0xcf8-0xcff and ECAM in MMIO space.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::config::{PciConfig, PciHeader, CONFIG_SPACE_SIZE};
use super::{BarRelocator, BarReprogram, PciDevice, NUM_SLOTS};
use crate::rate_limit::RateLimit;
use crate::BusDevice;

/// The host bridge's ids: Red Hat's "QEMU PCIe host bridge", which guests know needs no quirk.
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// ECAM: 4 KiB of configuration space per function, 8 functions per device, 32 devices.
pub const ECAM_FUNCTION_SHIFT: u64 = 12;
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Config address register: enable bit and the fields below it.
const CF8_ENABLE: u32 = 1 << 31;

/// Device 00:00.0.
struct HostBridge {
    config: PciConfig,
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarReprogram> {
        self.config.write(offset, data)
    }
}

type Slot = Arc<Mutex<dyn PciDevice>>;

fn lock(device: &Mutex<dyn PciDevice>) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciRootError {
    #[error("no free PCI slot on bus 0")]
    NoFreeSlot,
}

pub struct PciRoot {
    slots: RwLock<Vec<Option<Slot>>>,
    relocator: RwLock<Option<Arc<dyn BarRelocator>>>,
    /// Guest accesses to configuration space (each one a vCPU exit), for the boot cost figure.
    config_exits: AtomicU64,
    /// BAR moves the VMM refused (e.g. onto ECAM), which a guest can retry without end.
    refused_bar_moves: RateLimit,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let bridge = HostBridge {
            config: PciConfig::new(PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                revision: 0,
                class: CLASS_HOST_BRIDGE,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        };
        let mut slots: Vec<Option<Slot>> = vec![None; NUM_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(bridge)));
        Self {
            slots: RwLock::new(slots),
            relocator: RwLock::new(None),
            config_exits: AtomicU64::new(0),
            refused_bar_moves: RateLimit::default(),
        }
    }

    /// The first free slot, without taking it.
    pub fn free_slot(&self) -> Result<u8, PciRootError> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .position(Option::is_none)
            .map(|s| s as u8)
            .ok_or(PciRootError::NoFreeSlot)
    }

    /// Puts `device` in the first free slot and returns the slot number.
    pub fn add_device(&self, device: Slot) -> Result<u8, PciRootError> {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciRootError::NoFreeSlot)?;
        slots[slot] = Some(device);
        Ok(slot as u8)
    }

    pub fn set_relocator(&self, relocator: Arc<dyn BarRelocator>) {
        *self.relocator.write().unwrap_or_else(|p| p.into_inner()) = Some(relocator);
    }

    pub fn config_exits(&self) -> u64 {
        self.config_exits.load(Ordering::Relaxed)
    }

    fn device(&self, bus: u8, device: u8, function: u8) -> Option<Slot> {
        if bus != 0 || function != 0 {
            return None;
        }
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots.get(usize::from(device))?.clone()
    }

    /// A configuration read of 1, 2 or 4 bytes that does not cross a dword. Absent functions
    /// and malformed accesses read as all-ones, which is how a guest finds an empty slot.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        if !valid_access(offset, data.len()) {
            return;
        }
        if let Some(dev) = self.device(bus, device, function) {
            if offset < CONFIG_SPACE_SIZE {
                lock(&dev).read_config(offset, data);
            } else {
                // No extended configuration space: no extended capabilities.
                data.fill(0);
            }
        }
    }

    pub fn config_write(&self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        if !valid_access(offset, data.len()) || offset >= CONFIG_SPACE_SIZE {
            return;
        }
        let Some(dev) = self.device(bus, device, function) else {
            return;
        };
        let mut dev = lock(&dev);
        let Some(move_) = dev.write_config(offset, data) else {
            return;
        };
        let relocator = self
            .relocator
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let result = match relocator {
            Some(r) => r.move_bar(&mut *dev, &move_),
            None => Err("BARs cannot move on this bus".into()),
        };
        match result {
            Ok(()) => log::debug!(
                "PCI 00:{device:02x}.0 BAR {} moved {:#x} -> {:#x}",
                move_.index,
                move_.old,
                move_.new
            ),
            Err(e) => {
                if let Some(n) = self.refused_bar_moves.hit() {
                    log::warn!(
                        "PCI 00:{device:02x}.0: cannot move BAR {} to {:#x} ({e}); it stays at {:#x} ({n} refused so far)",
                        move_.index,
                        move_.new,
                        move_.old
                    );
                }
                dev.revert_bar(&move_);
            }
        }
    }

    fn count_exit(&self) {
        self.config_exits.fetch_add(1, Ordering::Relaxed);
    }
}

fn valid_access(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len)
}

/// Configuration mechanism #1: the address register at 0xcf8 and the data window at
/// 0xcfc-0xcff. Inserted on the PIO bus at 0xcf8 with length 8.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root, address: 0 }
    }

    /// (bus, device, function, register offset) the address register selects, if enabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & CF8_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (a & 0xfc) as usize + data_offset as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.root.count_exit();
        match offset {
            // Only whole-dword accesses reach the address register (the probe's byte write to
            // 0xcfb is how Linux tells mechanism #1 from #2).
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some((bus, dev, func, reg)) => self.root.config_read(bus, dev, func, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.root.count_exit();
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                if let Some((bus, dev, func, reg)) = self.target(offset - 4) {
                    self.root.config_write(bus, dev, func, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: configuration space memory-mapped at `bus << 20 | device << 15 | function << 12`.
/// Inserted on the MMIO bus over one bus's worth (1 MiB).
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> ECAM_FUNCTION_SHIFT) & 0x7) as u8,
            (offset & 0xfff) as usize,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.root.count_exit();
        let (bus, dev, func, reg) = Self::decode(offset);
        self.root.config_read(bus, dev, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.root.count_exit();
        let (bus, dev, func, reg) = Self::decode(offset);
        self.root.config_write(bus, dev, func, reg, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cf8(bus: u8, dev: u8, func: u8, reg: u8) -> [u8; 4] {
        (CF8_ENABLE
            | u32::from(bus) << 16
            | u32::from(dev) << 11
            | u32::from(func) << 8
            | u32::from(reg))
        .to_le_bytes()
    }

    fn io_read32(io: &mut PciConfigIo, bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
        io.write(0, &cf8(bus, dev, func, reg));
        let mut d = [0; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn mechanism_one_finds_the_host_bridge_and_nothing_else() {
        let root = Arc::new(PciRoot::new());
        let mut io = PciConfigIo::new(root.clone());
        // Linux's probe: the address register reads back what was written.
        io.write(0, &CF8_ENABLE.to_le_bytes());
        let mut d = [0; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), CF8_ENABLE);
        io.write(3, &[1]);
        io.read(0, &mut d);
        assert_eq!(
            u32::from_le_bytes(d),
            CF8_ENABLE,
            "byte writes do not touch it"
        );

        assert_eq!(io_read32(&mut io, 0, 0, 0, 0), 0x0008_1b36);
        assert_eq!(io_read32(&mut io, 0, 0, 0, 8) >> 8, CLASS_HOST_BRIDGE);
        assert_eq!(io_read32(&mut io, 0, 1, 0, 0), 0xffff_ffff);
        assert_eq!(io_read32(&mut io, 0, 0, 1, 0), 0xffff_ffff);
        assert_eq!(io_read32(&mut io, 1, 0, 0, 0), 0xffff_ffff);
        // Sub-dword reads through 0xcfe.
        io.write(0, &cf8(0, 0, 0, 0));
        let mut w = [0; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008);
        // Disabled address: all-ones.
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(root.config_exits() >= 10);
    }

    #[test]
    fn ecam_reaches_the_same_space() {
        let root = Arc::new(PciRoot::new());
        let mut mmio = PciConfigMmio::new(root.clone());
        let mut d = [0; 4];
        mmio.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        mmio.read(1 << 15, &mut d);
        assert_eq!(d, [0xff; 4], "slot 1 is empty");
        // Command register write through ECAM, read back through cf8.
        mmio.write(4, &[0x06, 0]);
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(io_read32(&mut io, 0, 0, 0, 4) & 0xffff, 0x0006);
        // Extended space reads zero on a present function; misaligned accesses all-ones.
        mmio.read(0x100, &mut d);
        assert_eq!(d, [0; 4]);
        mmio.read(2, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(root.config_exits(), 5 + 2);
    }

    #[test]
    fn slots_fill_in_order() {
        let root = PciRoot::new();
        assert_eq!(root.free_slot(), Ok(1));
        for expected in 1..NUM_SLOTS as u8 {
            let bridge = HostBridge {
                config: PciConfig::new(PciHeader {
                    vendor_id: 1,
                    device_id: 2,
                    revision: 0,
                    class: 0,
                    subsystem_vendor_id: 0,
                    subsystem_id: 0,
                }),
            };
            assert_eq!(root.add_device(Arc::new(Mutex::new(bridge))), Ok(expected));
        }
        assert_eq!(root.free_slot(), Err(PciRootError::NoFreeSlot));
    }
}
