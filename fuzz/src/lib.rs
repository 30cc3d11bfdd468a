//! What the fuzz targets share: a hostile driver whose every move comes from the fuzz input.

use devices::virtio::fake_driver::{descriptor, FakeDriver, DATA_BASE};
use devices::virtio::VirtioDevice;

/// Reads the fuzz input a field at a time; runs dry as zeros.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// Drives `device` as the input says: descriptors, avail entries, raw memory, kicks, resets and
/// re-activations, in any order. Queue sizes are powers of two up to 256.
pub fn drive_device<D: VirtioDevice + 'static>(device: D, features: u64, data: &[u8]) {
    drive_device_with(device, features, data, |_| {});
}

/// [`drive_device`] for a device with its own threads: `settle` runs after every kick and at
/// the end, and returns once the device has served what it was given.
pub fn drive_device_with<D: VirtioDevice + 'static>(
    device: D,
    features: u64,
    data: &[u8],
    settle: impl Fn(&D),
) {
    let Ok(mut driver) = FakeDriver::new(device) else {
        return;
    };
    let settle = |driver: &FakeDriver<D>| settle(&driver.device.lock().unwrap_or_else(|p| p.into_inner()));
    let mut input = Input(data);
    let mut size: u16 = 1 << (input.u8() % 9);
    let queues = driver.queue_count();
    let mut next_slot = vec![0u16; queues];
    let _ = driver.activate(features, size);
    // Bounded: at most one op per input byte.
    while !input.is_empty() {
        let op = input.u8();
        let q = usize::from(input.u8()) % queues;
        match op % 8 {
            0 | 1 => {
                let index = input.u16() % size;
                let addr = match input.u8() % 4 {
                    0 => u64::from(input.u32()) << (input.u8() % 33),
                    _ => DATA_BASE + u64::from(input.u16()),
                };
                let (len, flags, next) = (input.u32() % 0x2_0000, input.u8(), input.u16());
                driver.set_descriptor(q, index, descriptor(addr, len, u16::from(flags & 7), next));
            }
            2 => {
                let head = input.u16();
                let slot = next_slot[q];
                next_slot[q] = slot.wrapping_add(1);
                driver.post(q, size, slot, &[head], next_slot[q]);
            }
            3 => {
                let idx = input.u16();
                next_slot[q] = idx;
                driver.post(q, size, 0, &[], idx);
            }
            4 => {
                let offset = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.bytes(len).to_vec();
                driver.write(DATA_BASE + offset, &bytes);
            }
            5 => {
                driver.kick_all();
                driver.run(4);
                settle(&driver);
            }
            6 => {
                driver.reset();
                next_slot.iter_mut().for_each(|s| *s = 0);
                size = 1 << (input.u8() % 9);
                let _ = driver.activate(features, size);
            }
            _ => {
                driver.run(2);
            }
        }
    }
    driver.kick_all();
    driver.run(8);
    settle(&driver);
}
