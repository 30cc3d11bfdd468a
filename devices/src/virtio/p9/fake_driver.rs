//! A fake virtio-9p driver for tests and the in-process benchmark: a split ring in a
//! `GuestMemoryMmap`, request/reply buffer pairs in fixed slots, kicks straight to the
//! device's workers (what the event loop does on a guest notification) and completions
//! awaited on a condition variable the device's interrupt signals.
//!
//! It negotiates what Linux's driver does unless told otherwise: with EVENT_IDX it kicks only
//! when the device's avail_event asks for it and publishes used_event as it consumes
//! completions (as virtio_ring.c does); with indirect descriptors on, each request goes in
//! an indirect table, its two buffers whole or, with `split_pages`, cut in pages as Linux's
//! zero-copy requests are.

use std::num::Wrapping;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::server::ServerOptions;
use super::server::{Ownership, MAX_MSIZE};
use super::wire::*;
use super::{P9Error, P9};
use crate::virtio::chain::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::virtio::{
    ActivatedQueue, InterruptKind, QueueNotify, ThreadConfinement, Unconfined, VirtioDevice,
    VirtioInterrupt,
};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Slot `i`'s request buffer is at `SLOTS + 2 * i * SLOT_SIZE`, its reply buffer right after.
const SLOTS: u64 = 1 << 20;
/// Slot `i`'s indirect table (4 KiB: 256 descriptors) is at `TABLES + i * 4096`.
const TABLES: u64 = 0x1_0000;
/// Where [`FakeDriver::post_indirect`] may put a table of its own (up to `SLOTS`).
pub const SPARE_TABLE: u64 = 0x2_0000;
/// avail_event (after the used ring) and used_event (after the avail ring).
const AVAIL_EVENT: u64 = USED + 4 + 8 * super::QUEUE_SIZE as u64;
const USED_EVENT: u64 = AVAIL + 4 + 2 * super::QUEUE_SIZE as u64;
pub const SLOT_SIZE: u64 = 1 << 20;
/// Requests the driver keeps in flight at most.
pub const MAX_SLOTS: u16 = 16;
const MEM_SIZE: usize = (SLOTS + 2 * MAX_SLOTS as u64 * SLOT_SIZE) as usize;
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// What Linux's driver negotiates with our device.
pub const LINUX_FEATURES: u64 = crate::virtio::VIRTIO_F_VERSION_1
    | super::VIRTIO_9P_F_MOUNT_TAG
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC;
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

impl WaitingInterrupt {
    pub fn count(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct FakeDriver {
    pub mem: GuestMemoryMmap,
    pub device: P9,
    pub interrupt: Arc<WaitingInterrupt>,
    next_avail: Wrapping<u16>,
    last_used: Wrapping<u16>,
    /// The avail index the last kick published.
    kicked_avail: Wrapping<u16>,
    features: u64,
    /// Kicks that reached the device.
    pub kicks: u64,
    /// With indirect descriptors: cut each buffer in pages (at most 128 pieces).
    pub split_pages: bool,
}

impl FakeDriver {
    /// A device exporting `export`, its workers confined by `confinement`, activated on a
    /// fresh queue with [`LINUX_FEATURES`].
    pub fn new(
        export: &Path,
        options: ServerOptions,
        confinement: Arc<dyn ThreadConfinement>,
    ) -> Result<Self, P9Error> {
        Self::with_features(export, options, confinement, LINUX_FEATURES)
    }

    /// As [`FakeDriver::new`], the driver accepting `features` of what the device offers.
    pub fn with_features(
        export: &Path,
        options: ServerOptions,
        confinement: Arc<dyn ThreadConfinement>,
        features: u64,
    ) -> Result<Self, P9Error> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| P9Error::EventFd(std::io::Error::other(e.to_string())))?;
        let mut device = P9::new("test", export, options, confinement)?;
        let mut queue = Queue::new(super::QUEUE_SIZE)
            .map_err(|e| P9Error::EventFd(std::io::Error::other(format!("{e:?}"))))?;
        queue.set_size(super::QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        let features = features & device.avail_features();
        device.set_acked_features(features);
        // What the transport does at DRIVER_OK.
        queue.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        let interrupt = Arc::new(WaitingInterrupt::default());
        let notify = QueueNotify::new().map_err(P9Error::EventFd)?;
        device
            .activate(
                mem.clone(),
                interrupt.clone(),
                vec![ActivatedQueue {
                    queue,
                    notify: Arc::new(notify),
                }],
            )
            .map_err(|e| P9Error::EventFd(std::io::Error::other(e.to_string())))?;
        Ok(FakeDriver {
            mem,
            device,
            interrupt,
            next_avail: Wrapping(0),
            last_used: Wrapping(0),
            kicked_avail: Wrapping(0),
            features,
            kicks: 0,
            split_pages: false,
        })
    }

    fn event_idx(&self) -> bool {
        self.features & VIRTIO_RING_F_EVENT_IDX != 0
    }

    pub fn request_addr(slot: u16) -> u64 {
        SLOTS + 2 * u64::from(slot) * SLOT_SIZE
    }

    pub fn reply_addr(slot: u16) -> u64 {
        Self::request_addr(slot) + SLOT_SIZE
    }

    /// Writes `descs` as a chain (next links added, indices from `first`) in the table at
    /// `table`.
    fn write_table(&self, table: u64, first: u16, descs: &[(u64, u32, u16)]) {
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
                .write_slice(&desc, GuestAddress(table + 16 * u64::from(index)))
                .expect("descriptor in guest memory");
        }
    }

    /// Posts a chain of `(addr, len, flags)` descriptors (next links added) at descriptor
    /// index `first`, without kicking.
    pub fn post_chain(&mut self, first: u16, descs: &[(u64, u32, u16)]) {
        self.write_table(DESC, first, descs);
        self.post_head(first);
    }

    /// Posts `descs` as an indirect table at `table`, its one ring descriptor at index `head`,
    /// without kicking.
    pub fn post_indirect(&mut self, head: u16, table: u64, descs: &[(u64, u32, u16)]) {
        self.write_table(table, 0, descs);
        self.write_table(
            DESC,
            head,
            &[(table, 16 * descs.len() as u32, VRING_DESC_F_INDIRECT)],
        );
        self.post_head(head);
    }

    /// Puts `head` on the avail ring (not yet published).
    fn post_head(&mut self, head: u16) {
        let first = head;
        let ring = u64::from(self.next_avail.0 % super::QUEUE_SIZE);
        self.mem
            .write_obj(first.to_le(), GuestAddress(AVAIL + 4 + 2 * ring))
            .expect("avail ring in guest memory");
        self.next_avail += 1;
    }

    /// Publishes what was posted and wakes the device if it asked for it (virtio_ring.c's
    /// virtqueue_kick_prepare: avail_event with EVENT_IDX, else the used ring's NO_NOTIFY).
    pub fn kick(&mut self) {
        self.mem
            .store(
                self.next_avail.0.to_le(),
                GuestAddress(AVAIL + 2),
                Ordering::Release,
            )
            .expect("avail index in guest memory");
        std::sync::atomic::fence(Ordering::SeqCst);
        let (new, old) = (self.next_avail, self.kicked_avail);
        self.kicked_avail = new;
        let wanted = if self.event_idx() {
            let event: u16 = self
                .mem
                .load(GuestAddress(AVAIL_EVENT), Ordering::Acquire)
                .expect("avail_event in guest memory");
            // vring_need_event(event, new, old)
            new - Wrapping(event) - Wrapping(1) < new - old
        } else {
            let flags: u16 = self
                .mem
                .load(GuestAddress(USED), Ordering::Acquire)
                .expect("used flags in guest memory");
            flags & 1 == 0
        };
        if wanted {
            self.kicks += 1;
            self.device.kick();
        }
    }

    /// Sets used_event: the device interrupts once the used index passes `event`.
    pub fn set_used_event(&self, event: u16) {
        self.mem
            .store(event.to_le(), GuestAddress(USED_EVENT), Ordering::Release)
            .expect("used_event in guest memory");
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .load(GuestAddress(USED + 2), Ordering::Acquire)
            .expect("used index in guest memory")
    }

    /// The device's avail_event.
    pub fn avail_event(&self) -> u16 {
        self.mem
            .load(GuestAddress(AVAIL_EVENT), Ordering::Acquire)
            .expect("avail_event in guest memory")
    }

    /// Posts `message` in slot `slot` with a reply buffer of `reply_len` bytes: two ring
    /// descriptors, or with indirect descriptors negotiated an indirect table of both buffers
    /// (cut in pages with `split_pages`).
    pub fn submit(&mut self, slot: u16, message: &[u8], reply_len: u32) {
        let request = Self::request_addr(slot);
        self.mem
            .write_slice(message, GuestAddress(request))
            .expect("request buffer in guest memory");
        if self.features & VIRTIO_RING_F_INDIRECT_DESC == 0 {
            self.post_chain(
                2 * slot,
                &[
                    (request, message.len() as u32, 0),
                    (Self::reply_addr(slot), reply_len, VRING_DESC_F_WRITE),
                ],
            );
            return;
        }
        let mut descs = Vec::new();
        if self.split_pages {
            pages(&mut descs, request, message.len() as u32, 0);
            pages(
                &mut descs,
                Self::reply_addr(slot),
                reply_len,
                VRING_DESC_F_WRITE,
            );
        } else {
            descs.push((request, message.len() as u32, 0));
            descs.push((Self::reply_addr(slot), reply_len, VRING_DESC_F_WRITE));
        }
        self.post_indirect(2 * slot, TABLES + 4096 * u64::from(slot), &descs);
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
        if self.event_idx() {
            // Interrupt for the next one (virtqueue_get_buf does the same).
            self.set_used_event(self.last_used.0);
        }
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

/// Appends `len` bytes at `addr` as descriptors of at most 128 pieces, each a multiple of
/// 4 KiB (the last one shorter).
fn pages(descs: &mut Vec<(u64, u32, u16)>, addr: u64, len: u32, flags: u16) {
    let piece = len.div_ceil(128).next_multiple_of(4096).max(4096);
    let mut done = 0;
    while done < len {
        let n = piece.min(len - done);
        descs.push((addr + u64::from(done), n, flags));
        done += n;
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

pub const ROOT: u32 = 1;
pub const O_RDONLY: u32 = 0;
pub const O_RDWR: u32 = 2;
pub const O_CREAT: u32 = 0o100;
pub const O_DIRECTORY: u32 = 0o200000;
pub const AT_REMOVEDIR: u32 = 0x200;

/// A 9P client over the fake driver.
pub struct Client {
    pub driver: FakeDriver,
    tag: u16,
    next_fid: u32,
}

pub type Reply = Result<Vec<u8>, u32>;

impl Client {
    /// A client of an unconfined device exporting `export`, attached as fid [`ROOT`].
    pub fn new(export: &Path, readonly: bool) -> Client {
        let options = ServerOptions {
            ownership: Ownership::Vmm,
            readonly,
        };
        Client::over(FakeDriver::new(export, options, Arc::new(Unconfined)).unwrap())
    }

    /// A client over `driver`, attached as fid [`ROOT`].
    pub fn over(driver: FakeDriver) -> Client {
        let mut client = Client {
            driver,
            tag: 0,
            next_fid: 100,
        };
        client.version(MAX_MSIZE, "9P2000.L").unwrap();
        client.attach(ROOT).unwrap();
        client
    }

    pub fn call(&mut self, kind: u8, build: impl FnOnce(&mut Encoder)) -> Reply {
        self.tag = self.tag.wrapping_add(1) % 0xfffe;
        let tag = self.tag;
        let reply = self.driver.call(&message(kind, tag, build));
        let (rkind, body) = parse_reply(&reply);
        assert_eq!(u16::from_le_bytes([reply[5], reply[6]]), tag);
        if let Some(errno) = error_of(&reply) {
            return Err(errno);
        }
        assert_eq!(rkind, kind + 1);
        Ok(body.to_vec())
    }

    pub fn fid(&mut self) -> u32 {
        self.next_fid += 1;
        self.next_fid
    }

    pub fn version(&mut self, msize: u32, version: &str) -> Result<(u32, Vec<u8>), u32> {
        let body = self.call(TVERSION, |e| {
            e.u32(msize).string(version.as_bytes());
        })?;
        let mut dec = Decoder::new(&body);
        Ok((dec.u32().unwrap(), dec.string().unwrap().to_vec()))
    }

    pub fn attach(&mut self, fid: u32) -> Reply {
        self.call(TATTACH, |e| {
            e.u32(fid).u32(u32::MAX).string(b"root").string(b"").u32(0);
        })
    }

    /// Walks `names` from `from` to a new fid; returns it and the qids' count.
    pub fn walk(&mut self, from: u32, names: &[&[u8]]) -> Result<(u32, usize), u32> {
        let newfid = self.fid();
        let body = self.call(TWALK, |e| {
            e.u32(from).u32(newfid).u16(names.len() as u16);
            for n in names {
                e.string(n);
            }
        })?;
        let count = u16::from_le_bytes([body[0], body[1]]) as usize;
        assert_eq!(body.len(), 2 + count * QID_SIZE);
        Ok((newfid, count))
    }

    pub fn open(&mut self, path: &[&[u8]], flags: u32) -> Result<u32, u32> {
        let (fid, n) = self.walk(ROOT, path)?;
        if n != path.len() {
            return Err(libc::ENOENT as u32);
        }
        self.call(TLOPEN, |e| {
            e.u32(fid).u32(flags);
        })?;
        Ok(fid)
    }

    pub fn create(&mut self, dir: &[&[u8]], name: &[u8], mode: u32) -> Result<u32, u32> {
        let (fid, _) = self.walk(ROOT, dir)?;
        self.call(TLCREATE, |e| {
            e.u32(fid)
                .string(name)
                .u32(O_RDWR | O_CREAT)
                .u32(mode)
                .u32(0);
        })?;
        Ok(fid)
    }

    pub fn write(&mut self, fid: u32, offset: u64, data: &[u8]) -> Result<u32, u32> {
        let body = self.call(TWRITE, |e| {
            e.u32(fid).u64(offset).u32(data.len() as u32).bytes(data);
        })?;
        Ok(Decoder::new(&body).u32().unwrap())
    }

    pub fn read(&mut self, fid: u32, offset: u64, count: u32) -> Reply {
        let body = self.call(TREAD, |e| {
            e.u32(fid).u64(offset).u32(count);
        })?;
        let n = Decoder::new(&body).u32().unwrap() as usize;
        assert_eq!(body.len(), 4 + n);
        Ok(body[4..].to_vec())
    }

    pub fn clunk(&mut self, fid: u32) -> Reply {
        self.call(TCLUNK, |e| {
            e.u32(fid);
        })
    }

    /// (mode, size, nlink) of a fid.
    pub fn getattr(&mut self, fid: u32) -> Result<(u32, u64, u64), u32> {
        let body = self.call(TGETATTR, |e| {
            e.u32(fid).u64(0x7ff);
        })?;
        let mut dec = Decoder::new(&body);
        dec.u64().unwrap();
        dec.bytes(QID_SIZE).unwrap();
        let mode = dec.u32().unwrap();
        dec.u32().unwrap();
        dec.u32().unwrap();
        let nlink = dec.u64().unwrap();
        dec.u64().unwrap();
        let size = dec.u64().unwrap();
        Ok((mode, size, nlink))
    }

    pub fn setattr(
        &mut self,
        fid: u32,
        valid: u32,
        mode: u32,
        size: u64,
        times: [u64; 4],
    ) -> Reply {
        self.call(TSETATTR, |e| {
            e.u32(fid).u32(valid).u32(mode).u32(0).u32(0).u64(size);
            for t in times {
                e.u64(t);
            }
        })
    }

    pub fn mkdir(&mut self, dir: u32, name: &[u8]) -> Reply {
        self.call(TMKDIR, |e| {
            e.u32(dir).string(name).u32(0o755).u32(0);
        })
    }

    pub fn unlinkat(&mut self, dir: u32, name: &[u8], flags: u32) -> Reply {
        self.call(TUNLINKAT, |e| {
            e.u32(dir).string(name).u32(flags);
        })
    }

    pub fn symlink(&mut self, dir: u32, name: &[u8], target: &[u8]) -> Reply {
        self.call(TSYMLINK, |e| {
            e.u32(dir).string(name).string(target).u32(0);
        })
    }

    /// Every name in directory fid `dir`, reading `count` bytes per call.
    pub fn list(&mut self, dir: u32, count: u32) -> Vec<String> {
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let body = self
                .call(TREADDIR, |e| {
                    e.u32(dir).u64(offset).u32(count);
                })
                .unwrap();
            let mut dec = Decoder::new(&body);
            let len = dec.u32().unwrap() as usize;
            assert!(len <= count as usize);
            if len == 0 {
                return names;
            }
            while dec.remaining() > 0 {
                dec.bytes(QID_SIZE).unwrap();
                offset = dec.u64().unwrap();
                dec.u8().unwrap();
                names.push(String::from_utf8(dec.string().unwrap().to_vec()).unwrap());
            }
        }
    }
}

/// Every operation once, under `dir/` of the export (which it leaves empty): the syscalls a
/// worker makes, for checking its seccomp policy.
pub fn exercise(c: &mut Client) {
    c.mkdir(ROOT, b"dir").unwrap();
    let (d, _) = c.walk(ROOT, &[b"dir"]).unwrap();
    let f = c.create(&[b"dir"], b"file", 0o644).unwrap();
    c.write(f, 0, &[5u8; 70_000]).unwrap();
    assert_eq!(c.read(f, 0, 70_000).unwrap().len(), 70_000);
    c.call(TFSYNC, |e| {
        e.u32(f).u32(1);
    })
    .unwrap();
    c.getattr(f).unwrap();
    c.setattr(f, 1 | 2 | 4 | 8 | 0x10 | 0x20, 0o600, 10, [0; 4])
        .unwrap();
    c.call(TLOCK, |e| {
        e.u32(f).u8(1).u32(0).u64(0).u64(0).u32(1).string(b"c");
    })
    .unwrap();
    c.call(TGETLOCK, |e| {
        e.u32(f).u8(1).u64(0).u64(0).u32(1).string(b"c");
    })
    .unwrap();
    let (x, _) = c.walk(d, &[b"file"]).unwrap();
    c.call(TXATTRCREATE, |e| {
        e.u32(x).string(b"user.k").u64(1).u32(0);
    })
    .unwrap();
    c.write(x, 0, b"v").unwrap();
    let _ = c.clunk(x);
    let lx = c.fid();
    let _ = c.call(TXATTRWALK, |e| {
        e.u32(f).u32(lx).string(b"");
    });
    c.symlink(d, b"link", b"file").unwrap();
    let (l, _) = c.walk(d, &[b"link"]).unwrap();
    c.call(TREADLINK, |e| {
        e.u32(l);
    })
    .unwrap();
    c.call(TLINK, |e| {
        e.u32(d).u32(f).string(b"hard");
    })
    .unwrap();
    c.call(TRENAMEAT, |e| {
        e.u32(d).string(b"hard").u32(d).string(b"hard2");
    })
    .unwrap();
    c.call(TMKNOD, |e| {
        e.u32(d).string(b"fifo").u32(0o010644).u32(0).u32(0).u32(0);
    })
    .unwrap();
    c.call(TSTATFS, |e| {
        e.u32(d);
    })
    .unwrap();
    let listing = c.open(&[b"dir"], O_RDONLY | O_DIRECTORY).unwrap();
    assert_eq!(c.list(listing, 4096).len(), 6);
    for name in [b"file".as_slice(), b"hard2", b"link", b"fifo"] {
        c.unlinkat(d, name, 0).unwrap();
    }
    c.unlinkat(ROOT, b"dir", AT_REMOVEDIR).unwrap();
    for fid in [f, l, d, listing] {
        c.clunk(fid).unwrap();
    }
}
