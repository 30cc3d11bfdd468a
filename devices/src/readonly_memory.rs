//! Guest writes to read-only memory (a read-only pmem image): KVM serves reads from its
//! read-only memory slot and turns each write into an MMIO exit that lands here. The write is
//! dropped, so it never reaches the file, and logged without flooding the log: a guest that
//! keeps writing only moves a counter.

use crate::bus::BusDevice;

pub struct ReadOnlyMemory {
    name: String,
    base: u64,
    dropped_writes: u64,
}

impl ReadOnlyMemory {
    /// `name` says which memory it is in the log (e.g. the image path); `base` is the guest
    /// physical address of the range, for the log too.
    pub fn new(name: String, base: u64) -> Self {
        Self {
            name,
            base,
            dropped_writes: 0,
        }
    }

    pub fn dropped_writes(&self) -> u64 {
        self.dropped_writes
    }
}

impl BusDevice for ReadOnlyMemory {
    /// Reads are KVM's (the slot is readable); one arriving here is answered like an empty bus.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.dropped_writes += 1;
        // The 1st, 2nd, 4th, 8th, ... write: enough to notice, bounded for a hostile guest.
        if self.dropped_writes.is_power_of_two() {
            log::warn!(
                "guest wrote {} bytes to read-only {} at {:#x}: dropped ({} writes dropped so far)",
                data.len(),
                self.name,
                self.base.saturating_add(offset),
                self.dropped_writes
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_counted_and_dropped() {
        let mut memory = ReadOnlyMemory::new("pmem image /img".into(), 0x1_0000_0000);
        for _ in 0..5 {
            memory.write(0x10, &[0; 8]);
        }
        assert_eq!(memory.dropped_writes(), 5);
        let mut data = [0u8; 4];
        memory.read(0, &mut data);
        assert_eq!(data, [0xff; 4]);
    }
}
