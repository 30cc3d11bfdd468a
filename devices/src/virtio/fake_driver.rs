//! A fake virtio driver for hostile-guest tests and fuzz targets: it lays out split queues in a
//! small guest memory, writes whatever descriptors and avail entries it is told (valid or not),
//! activates a device with those queues, kicks it and turns the device's event loop, as the
//! `vmm` thread would. No KVM, no guest. Built only for tests and the `fake-driver` feature.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::{MsiRouting, MsixVector, VirtioPciDevice};

use super::{
    ActivateError, ActivatedQueue, InterruptKind, QueueNotify, VirtioDevice, VirtioInterrupt,
};

/// Guest memory the driver works in.
pub const MEM_SIZE: u64 = 1 << 20;
/// Queue q's descriptor table, avail ring and used ring: one page each from here.
pub const RING_BASE: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x3000;
/// Where buffers go (anything up to MEM_SIZE).
pub const DATA_BASE: u64 = 0x8_0000;

/// Counts interrupts, as an MSI-X irqfd would deliver them.
#[derive(Default)]
pub struct CountingInterrupt(pub AtomicUsize);

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A read-write file nobody else can reach (unlinked at once), e.g. a pmem backing file.
/// `tag` keeps concurrent users apart.
pub fn unlinked_tempfile(tag: &str) -> std::io::Result<std::fs::File> {
    let name = format!(
        "chapeau-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    );
    let path = std::env::temp_dir().join(name.replace(['(', ')'], ""));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path);
    let _ = std::fs::remove_file(&path);
    file
}

/// MSI routes that go nowhere: the PCI transport without KVM.
pub struct NoMsiRouting;

impl MsiRouting for NoMsiRouting {
    fn set_route(&self, _gsi: u32, _addr: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn clear_route(&self, _gsi: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// `device` behind the virtio-pci transport over `MEM_SIZE` bytes of memory, its BAR at
/// 0xc000_0000, with irqfds nobody listens to.
pub fn pci_transport(device: Arc<Mutex<dyn VirtioDevice>>) -> Result<VirtioPciDevice, String> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .map_err(|e| e.to_string())?;
    let needed = VirtioPciDevice::vectors_needed(&*lock(&device));
    let vectors = (0..needed)
        .map(|i| {
            EventFd::new(libc::EFD_NONBLOCK).map(|irqfd| MsixVector {
                gsi: 24 + i as u32,
                irqfd,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    VirtioPciDevice::new(device, mem, 0xc000_0000, vectors, Arc::new(NoMsiRouting))
        .map_err(|e| e.to_string())
}

/// Addresses of queue `q`: (descriptor table, avail ring, used ring).
pub fn ring_addrs(q: usize) -> (u64, u64, u64) {
    let base = RING_BASE + q as u64 * RING_STRIDE;
    (base, base + 0x1000, base + 0x2000)
}

/// One split-ring descriptor as the driver writes it.
pub fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

pub struct FakeDriver<D: VirtioDevice + 'static> {
    pub device: Arc<Mutex<D>>,
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<CountingInterrupt>,
    manager: EventManager<Subscriber>,
    /// The queues' notify eventfds: one set for the device's life, as the transport keeps.
    notify: Vec<Arc<QueueNotify>>,
}

impl<D: VirtioDevice + 'static> FakeDriver<D> {
    /// Registers `device` with a fresh event loop over `MEM_SIZE` bytes of zeroed memory.
    pub fn new(device: D) -> std::io::Result<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .map_err(std::io::Error::other)?;
        let device = Arc::new(Mutex::new(device));
        let mut manager = EventManager::<Subscriber>::new().map_err(std::io::Error::other)?;
        manager.add_subscriber(device.clone());
        let count = lock(&device).queue_max_sizes().len();
        let notify = (0..count)
            .map(|_| QueueNotify::new().map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(CountingInterrupt::default()),
            manager,
            notify,
        })
    }

    pub fn queue_count(&self) -> usize {
        self.notify.len()
    }

    /// Writes guest memory as a driver may; a write outside memory is ignored.
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        let _ = self.mem.write_slice(bytes, GuestAddress(addr));
    }

    /// Writes descriptor `index` of queue `q`'s table.
    pub fn set_descriptor(&self, q: usize, index: u16, desc: [u8; 16]) {
        self.write(ring_addrs(q).0 + u64::from(index) * 16, &desc);
    }

    /// Posts `heads` on queue `q`'s avail ring from slot `from` (of a ring of `size`) and sets
    /// its index to `idx` (which a hostile driver may set anywhere).
    pub fn post(&self, q: usize, size: u16, from: u16, heads: &[u16], idx: u16) {
        let avail = ring_addrs(q).1;
        for (i, head) in heads.iter().enumerate() {
            let slot = u64::from((from.wrapping_add(i as u16)) % size.max(1));
            self.write(avail + 4 + 2 * slot, &head.to_le_bytes());
        }
        self.write(avail + 2, &idx.to_le_bytes());
    }

    /// The used ring's index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(ring_addrs(q).2 + 2))
            .unwrap_or(0)
    }

    /// FEATURES_OK then DRIVER_OK with every queue of `size` (a power of two) at its place,
    /// on the vCPU side; the event loop notices on the next `run`.
    pub fn activate(&mut self, features: u64, size: u16) -> Result<(), ActivateError> {
        let queues = self
            .notify
            .iter()
            .enumerate()
            .map(|(q, notify)| {
                let (desc, avail, used) = ring_addrs(q);
                let mut queue = Queue::new(size.max(1))
                    .map_err(|_| ActivateError::InvalidQueue { index: q })?;
                let _ = queue.try_set_desc_table_address(GuestAddress(desc));
                let _ = queue.try_set_avail_ring_address(GuestAddress(avail));
                let _ = queue.try_set_used_ring_address(GuestAddress(used));
                queue.set_ready(true);
                Ok(ActivatedQueue {
                    queue,
                    notify: notify.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut device = lock(&self.device);
        let offered = device.avail_features();
        device.set_acked_features(features & offered);
        device.activate(self.mem.clone(), self.interrupt.clone(), queues)
    }

    /// A device reset (status 0) on the vCPU side.
    pub fn reset(&self) -> bool {
        lock(&self.device).reset()
    }

    /// Kicks every queue.
    pub fn kick_all(&self) {
        for fd in &self.notify {
            let _ = fd.write(1);
        }
    }

    /// Turns the event loop until it has nothing ready, at most `turns` times; returns the
    /// events it dispatched.
    pub fn run(&mut self, turns: usize) -> usize {
        let mut events = 0;
        for _ in 0..turns {
            match self.manager.run_with_timeout(0) {
                Ok(0) | Err(_) => break,
                Ok(n) => events += n,
            }
        }
        events
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
