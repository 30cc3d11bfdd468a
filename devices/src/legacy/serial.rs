//! The 8250/16550 UART at COM1, backed by vm-superio.

use std::io::Write;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::Counters;
use crate::BusDevice;

/// Raises the UART's interrupt through an EventFd that the VMM registers as an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the UART's bytes go; says how many of them it had to drop.
pub trait SerialSink: Write + Send {
    fn dropped(&self) -> u64 {
        0
    }
}

/// `serial off`: output is discarded by choice, not dropped.
impl SerialSink for std::io::Sink {}

/// The UART's writer: counts what the guest transmitted on its way to the output (only the
/// transmit register reaches the writer, so divisor-latch writes are not counted).
struct CountingOutput {
    out: Box<dyn SerialSink>,
    bytes_out: u64,
}

impl Write for CountingOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.bytes_out = self.bytes_out.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

type Uart = vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, CountingOutput>;

pub struct Serial {
    uart: Uart,
    /// The output failed once; said once in the log, not once per byte.
    output_failed: bool,
}

impl Serial {
    pub fn new(interrupt: EventFd, out: Box<dyn SerialSink>) -> Self {
        Self {
            uart: Uart::new(
                EventFdTrigger(interrupt),
                CountingOutput { out, bytes_out: 0 },
            ),
            output_failed: false,
        }
    }

    /// For the metrics: bytes the guest wrote, and how many of them the output dropped (no
    /// room for a slow reader, over a file's cap or rate, or the output failed).
    pub fn counters(&self) -> Counters {
        let writer = self.uart.writer();
        vec![
            ("bytes_out", writer.bytes_out),
            ("bytes_dropped", writer.out.dropped()),
        ]
    }

    /// Queues host input for the guest. Returns how many bytes fit in the FIFO; the rest is
    /// dropped, as a real UART drops characters nobody reads.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider accesses read the first register only.
        let value = u8::try_from(offset).map_or(0xff, |offset| self.uart.read(offset));
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            if !self.output_failed {
                log::warn!("serial output failed, further output is dropped: {e:?}");
                self.output_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl SerialSink for Shared {}

    #[test]
    fn transmits_bytes_and_receives_input() {
        let out = Shared::default();
        let irq = EventFd::new(0).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        serial.write(0, b"h");
        serial.write(0, b"i");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");
        assert_eq!(serial.counters(), [("bytes_out", 2), ("bytes_dropped", 0)]);

        // Enable the received-data interrupt, then feed input.
        serial.write(1, &[0x01]);
        assert_eq!(serial.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut byte = [0u8];
        serial.read(0, &mut byte);
        assert_eq!(byte, *b"x");
    }

    #[test]
    fn out_of_range_offsets_are_harmless() {
        let mut serial = Serial::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        let mut data = [0u8; 4];
        serial.read(u64::MAX, &mut data);
        serial.write(u64::MAX, &[1]);
        serial.write(0, &[]);
    }
}
