//! The multiport control protocol (virtio 1.2, 5.3.6.2): `struct virtio_console_control
//! { le32 id; le16 event; le16 value; }`, optionally followed by a payload (PORT_NAME).

/// Driver → device: the driver is ready (value 1) to receive port announcements.
pub const DEVICE_READY: u16 = 0;
/// Device → driver: a port exists (the spec's DEVICE_ADD).
pub const PORT_ADD: u16 = 1;
/// Device → driver: a port went away (the spec's DEVICE_REMOVE). Unused: ports are fixed.
#[allow(dead_code)]
pub const PORT_REMOVE: u16 = 2;
/// Driver → device: the driver set up port `id` (value 1) or failed to (value 0).
pub const PORT_READY: u16 = 3;
/// Device → driver: port `id` is a console (hvc).
pub const CONSOLE_PORT: u16 = 4;
/// Device → driver: console size change. Unused: cols/rows are 0.
#[allow(dead_code)]
pub const RESIZE: u16 = 5;
/// Both ways: the sender's end of port `id` is open (value 1) or closed (value 0).
pub const PORT_OPEN: u16 = 6;
/// Device → driver: port `id`'s name follows the header.
pub const PORT_NAME: u16 = 7;

/// Size of the control header; driver messages are exactly this long.
pub const HEADER_LEN: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub id: u32,
    pub event: u16,
    pub value: u16,
}

impl Control {
    pub fn new(id: u32, event: u16, value: u16) -> Self {
        Control { id, event, value }
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.event.to_le_bytes());
        b[6..].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        Control {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    /// The message as the driver reads it, with an optional payload.
    pub fn message(self, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
        v.extend_from_slice(&self.to_bytes());
        v.extend_from_slice(payload);
        v
    }
}

pub use crate::rate_limit::RateLimit;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = Control::new(0x0102_0304, PORT_OPEN, 1);
        assert_eq!(c.to_bytes(), [4, 3, 2, 1, 6, 0, 1, 0]);
        assert_eq!(Control::from_bytes(&c.to_bytes()), c);
        assert_eq!(c.message(b"ab").len(), 10);
    }
}
