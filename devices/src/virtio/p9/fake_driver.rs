//! A fake virtio-9p driver for tests and the in-process benchmark: a split ring in a
//! `GuestMemoryMmap`, request/reply buffer pairs in fixed slots, kicks straight to the
//! device's workers (what the event loop does on a guest notification) and completions
//! awaited on a condition variable the device's interrupt signals.

use std::num::Wrapping;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::server::ServerOptions;
use super::wire::{Encoder, QID_SIZE};
use super::{P9Error, P9};
use crate::virtio::{ActivatedQueue, InterruptKind, Unconfined, VirtioDevice, VirtioInterrupt};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Slot `i`'s request buffer is at `SLOTS + 2 * i * SLOT_SIZE`, its reply buffer right after.
const SLOTS: u64 = 1 << 20;
pub const SLOT_SIZE: u64 = 1 << 20;
/// Requests the driver keeps in flight at most.
pub const MAX_SLOTS: u16 = 16;
const MEM_SIZE: usize = (SLOTS + 2 * MAX_SLOTS as u64 * SLOT_SIZE) as usize;
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
const STALL: Duration = Duration::from_secs(20);

/// Counts interrupts and wakes whoever waits for one.
#[derive(Default)]
pub struct WaitingInterrupt {
    count: Mutex<u64>,
    raised: Condvar,
}

impl VirtioInterrupt for WaitingInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.raised.notify_all();
        Ok(())
    }
}

pub struct FakeDriver {
    pub mem: GuestMemoryMmap,
    pub device: P9,
    interrupt: Arc<WaitingInterrupt>,
    next_avail: Wrapping<u16>,
    last_used: Wrapping<u16>,
}

impl FakeDriver {
    /// A device exporting `export`, activated on a fresh queue.
    pub fn new(export: &Path, options: ServerOptions) -> Result<Self, P9Error> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| P9Error::EventFd(std::io::Error::other(e.to_string())))?;
        let mut device = P9::new("test", export, options, Arc::new(Unconfined))?;
        let mut queue = Queue::new(super::QUEUE_SIZE)
            .map_err(|e| P9Error::EventFd(std::io::Error::other(format!("{e:?}"))))?;
        queue.set_size(super::QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        let interrupt = Arc::new(WaitingInterrupt::default());
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(P9Error::EventFd)?;
        device
            .activate(
                mem.clone(),
                interrupt.clone(),
                vec![ActivatedQueue { queue, notify }],
            )
            .map_err(|e| P9Error::EventFd(std::io::Error::other(e.to_string())))?;
        Ok(FakeDriver {
            mem,
            device,
            interrupt,
            next_avail: Wrapping(0),
            last_used: Wrapping(0),
        })
    }

    pub fn request_addr(slot: u16) -> u64 {
        SLOTS + 2 * u64::from(slot) * SLOT_SIZE
    }

    pub fn reply_addr(slot: u16) -> u64 {
        Self::request_addr(slot) + SLOT_SIZE
    }

    /// Posts a chain of `(addr, len, flags)` descriptors (next links added) at descriptor
    /// index `first`, without kicking.
    pub fn post_chain(&mut self, first: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = first + i as u16;
            let (flags, next) = if i + 1 < descs.len() {
                (flags | VRING_DESC_F_NEXT, index + 1)
            } else {
                (flags, 0)
            };
            let mut desc = [0u8; 16];
            desc[..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            desc[12..14].copy_from_slice(&flags.to_le_bytes());
            desc[14..].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&desc, GuestAddress(DESC + 16 * u64::from(index)))
                .expect("descriptor in guest memory");
        }
        let ring = u64::from(self.next_avail.0 % super::QUEUE_SIZE);
        self.mem
            .write_obj(first.to_le(), GuestAddress(AVAIL + 4 + 2 * ring))
            .expect("avail ring in guest memory");
        self.next_avail += 1;
    }

    /// Publishes what was posted and wakes the device.
    pub fn kick(&mut self) {
        self.mem
            .store(
                self.next_avail.0.to_le(),
                GuestAddress(AVAIL + 2),
                Ordering::Release,
            )
            .expect("avail index in guest memory");
        self.device.kick();
    }

    /// Posts `message` in slot `slot` with a reply buffer of `reply_len` bytes.
    pub fn submit(&mut self, slot: u16, message: &[u8], reply_len: u32) {
        let request = Self::request_addr(slot);
        self.mem
            .write_slice(message, GuestAddress(request))
            .expect("request buffer in guest memory");
        self.post_chain(
            2 * slot,
            &[
                (request, message.len() as u32, 0),
                (Self::reply_addr(slot), reply_len, VRING_DESC_F_WRITE),
            ],
        );
    }

    /// The next completion: (descriptor head, bytes written), waiting for it.
    pub fn complete(&mut self) -> (u16, u32) {
        let mut count = self
            .interrupt
            .count
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            let idx: u16 = self
                .mem
                .load(GuestAddress(USED + 2), Ordering::Acquire)
                .expect("used index in guest memory");
            if idx != self.last_used.0 {
                break;
            }
            let (guard, timeout) = self
                .interrupt
                .raised
                .wait_timeout(count, STALL)
                .unwrap_or_else(|e| e.into_inner());
            assert!(!timeout.timed_out(), "the device completed nothing");
            count = guard;
        }
        drop(count);
        let at = USED + 4 + 8 * u64::from(self.last_used.0 % super::QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used ring");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used ring");
        self.last_used += 1;
        (id as u16, len)
    }

    /// The reply slot `slot` holds, `len` bytes.
    pub fn reply(&self, slot: u16, len: u32) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(Self::reply_addr(slot)))
            .expect("reply buffer in guest memory");
        out
    }

    /// Sends one message and returns its reply.
    pub fn call(&mut self, message: &[u8]) -> Vec<u8> {
        self.submit(0, message, SLOT_SIZE as u32);
        self.kick();
        let (head, len) = self.complete();
        assert_eq!(head, 0);
        self.reply(0, len)
    }
}

/// Builds a T-message: `build` appends the body.
pub fn message(kind: u8, tag: u16, build: impl FnOnce(&mut Encoder)) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut enc = Encoder::new(&mut buf, kind, tag);
    build(&mut enc);
    enc.finish();
    buf
}

/// A reply's type and body, checked against its header.
pub fn parse_reply(reply: &[u8]) -> (u8, &[u8]) {
    assert!(reply.len() >= 7, "short reply {reply:?}");
    let size = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize;
    assert_eq!(size, reply.len(), "reply size field");
    (reply[4], &reply[7..])
}

/// The errno of an Rlerror, or None for any other reply.
pub fn error_of(reply: &[u8]) -> Option<u32> {
    let (kind, body) = parse_reply(reply);
    (kind == super::wire::RLERROR).then(|| u32::from_le_bytes([body[0], body[1], body[2], body[3]]))
}

/// The first qid's path in a reply body that starts with one.
pub fn qid_path(body: &[u8]) -> u64 {
    let mut path = [0u8; 8];
    path.copy_from_slice(&body[5..QID_SIZE]);
    u64::from_le_bytes(path)
}
