//! Address-range dispatch for PIO and MMIO exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device that answers reads and writes within the range it was inserted at.
/// `offset` is relative to the start of that range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("no device at bus address {0:#x}")]
    NotFound(u64),
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (the PIO space or the MMIO space). Built before the vCPUs start; later
/// changes are rare (a guest moving a PCI BAR), so the map sits behind an `RwLock` that a lookup
/// holds only long enough to clone the device's `Arc`: a device's handler runs with the map
/// unlocked (it may itself move a BAR), under the device's own lock.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Entry>> {
        // Nothing panics while holding the map lock; a poisoned one is still consistent.
        self.devices.read().unwrap_or_else(|p| p.into_inner())
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Entry>> {
        self.devices.write().unwrap_or_else(|p| p.into_inner())
    }

    fn check_free(
        map: &BTreeMap<u64, Entry>,
        base: u64,
        len: u64,
        ignore: Option<u64>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The closest device below `end` (other than `ignore`) is the only one that can overlap.
        if let Some((&other, entry)) = map
            .range(..end)
            .rev()
            .find(|(start, _)| Some(**start) != ignore)
        {
            if other + entry.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        Ok(())
    }

    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let mut map = self.map_mut();
        Self::check_free(&map, base, len, None)?;
        map.insert(base, Entry { len, device });
        Ok(())
    }

    /// Moves the device inserted at `old_base` to `new_base` (same length), e.g. when the guest
    /// reprograms a PCI BAR. On error nothing changes.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let mut map = self.map_mut();
        let len = map.get(&old_base).ok_or(BusError::NotFound(old_base))?.len;
        Self::check_free(&map, new_base, len, Some(old_base))?;
        let entry = map.remove(&old_base).ok_or(BusError::NotFound(old_base))?;
        map.insert(new_base, entry);
        Ok(())
    }

    /// The device claiming the whole access, and the offset into it. The map lock is released
    /// before the caller locks the device.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let map = self.map();
        let (&base, entry) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(size as u64)? <= entry.len).then(|| (offset, entry.device.clone()))
    }

    /// Dispatches a read; returns false when no device claims the address (the caller then
    /// answers like an empty bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock(&device).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock(&device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned panicked while handling an access; its state is still the
/// best we have, and refusing every later access would only turn one bug into a hung guest.
type DeviceGuard<'a> = std::sync::MutexGuard<'a, dyn BusDevice + 'static>;

fn lock<'a>(device: &'a Mutex<dyn BusDevice + 'static>) -> DeviceGuard<'a> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0, vec![0x41])));
        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.read(0x400, &mut data));
    }

    #[test]
    fn access_straddling_the_end_is_not_dispatched() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x60, 1)
            .unwrap();
        assert!(!bus.write(0x60, &[0, 0]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                other: 0x100
            })
        );
        assert!(bus.insert(dev.clone(), 0xf8, 0x10).is_err());
        assert!(bus.insert(dev.clone(), 0x110, 1).is_ok());
        assert!(bus.insert(dev.clone(), 0x200, 0).is_err());
        assert!(bus.insert(dev, u64::MAX, 2).is_err());
    }

    #[test]
    fn relocate_moves_a_device_unless_the_target_is_taken() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x1000, 0x100).unwrap();
        bus.insert(b, 0x2000, 0x100).unwrap();
        // Overlapping its own old range is fine.
        bus.relocate(0x1000, 0x1080).unwrap();
        assert!(!bus.write(0x1000, &[1]));
        assert!(bus.write(0x1081, &[2]));
        assert_eq!(a.lock().unwrap().last_write, Some((1, vec![2])));
        assert!(matches!(
            bus.relocate(0x1080, 0x1f80),
            Err(BusError::Overlap { other: 0x2000, .. })
        ));
        assert_eq!(
            bus.relocate(0x5000, 0x6000),
            Err(BusError::NotFound(0x5000))
        );
        assert!(
            bus.write(0x1081, &[3]),
            "a failed move leaves the device where it was"
        );
    }
}
