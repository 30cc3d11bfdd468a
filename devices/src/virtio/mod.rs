//! Virtio devices and the contract between a device and its transport.
//!
//! A device lives behind `Arc<Mutex<_>>`, shared by two sides:
//! - the transport (virtio-pci, on vCPU threads) negotiates features, reads and writes the
//!   device's config space, and on DRIVER_OK calls [`VirtioDevice::activate`], which must not
//!   block: it only stores the queues and wakes the device's event-loop side;
//! - the event loop (`vmm` thread, event-manager) runs the device's queues: the device is a
//!   [`MutEventSubscriber`] registered at boot, watching its own activate event; on activation
//!   it adds its queue notification eventfds (which KVM signals as ioeventfds, so a guest kick
//!   never stops a vCPU in our code) and its backend fds.
//!
//! This split is why activation cannot deadlock against the event loop (the trap Dragonball
//! documents): a vCPU never waits for the `vmm` thread.

pub mod chain;
pub mod console;
#[cfg(any(test, feature = "fake-driver"))]
pub mod fake_driver;
pub mod net;
pub mod p9;
pub mod pmem;
pub mod rng;
pub mod single_queue;
#[cfg(test)]
mod test_util;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::MutEventSubscriber;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Virtio device ids (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_9P: u32 = 9;
pub const TYPE_PMEM: u32 = 27;

/// Feature bits every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What a device asks its transport to signal to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// Used buffers on queue `n`.
    Queue(u16),
    /// The device's configuration space changed.
    Config,
}

/// Raises interrupts for one device. Implemented by the transport (MSI-X vectors through KVM
/// irqfds); cheap and non-blocking, callable from any thread.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
}

/// A queue handed to the device at activation, with the eventfd the guest's notifications
/// for it arrive on. The transport owns that eventfd for the device's lifetime and hands the
/// same one to every activation: a device keeps it in its epoll set once, and a driver that
/// loops reset/DRIVER_OK creates no file descriptor.
pub struct ActivatedQueue {
    pub queue: Queue,
    pub notify: Arc<QueueNotify>,
}

/// A queue's notification eventfd, which counts the guest's kicks as the device reads them
/// (an eventfd read returns how many signals it coalesced), so the metrics cost the datapath
/// one relaxed add and no lock. Kicks a kernel backend (vhost) reads itself are not seen.
pub struct QueueNotify {
    fd: EventFd,
    /// Signals read, including the device's own wake-ups (`rewake`).
    read: AtomicU64,
    rewakes: AtomicU64,
}

impl QueueNotify {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            fd: EventFd::new(libc::EFD_NONBLOCK)?,
            read: AtomicU64::new(0),
            rewakes: AtomicU64::new(0),
        })
    }

    /// Consumes the pending kicks; returns how many there were.
    pub fn read(&self) -> std::io::Result<u64> {
        let n = self.fd.read()?;
        self.read.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Signals a kick on the guest's behalf (one the transport caught instead of KVM).
    pub fn write(&self, n: u64) -> std::io::Result<()> {
        self.fd.write(n)
    }

    /// Wakes the device's own loop to go on with the queue; not counted as a kick.
    pub fn rewake(&self) -> std::io::Result<()> {
        self.rewakes.fetch_add(1, Ordering::Relaxed);
        self.fd.write(1)
    }

    /// Guest kicks read so far.
    pub fn kicks(&self) -> u64 {
        let rewakes = self.rewakes.load(Ordering::Relaxed);
        self.read.load(Ordering::Relaxed).saturating_sub(rewakes)
    }

    /// The eventfd itself, for KVM (ioeventfd) and vhost (vring kick).
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }
}

impl AsRawFd for QueueNotify {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Named counters for the metrics: `(name, value)` pairs, names in snake_case.
pub type Counters = Vec<(&'static str, u64)>;

/// Reads counters that device threads keep in relaxed atomics.
pub fn load_counters(counters: &[(&'static str, &AtomicU64)]) -> Counters {
    counters
        .iter()
        .map(|(name, counter)| (*name, counter.load(Ordering::Relaxed)))
        .collect()
}

/// What a device reports for the metrics: its own counters, and for a device with parts that
/// count apart (a console's ports) each part's, by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceCounters {
    pub counters: Counters,
    pub ports: Vec<(String, Counters)>,
}

/// The counters of a device without parts.
impl From<Counters> for DeviceCounters {
    fn from(counters: Counters) -> Self {
        DeviceCounters {
            counters,
            ports: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {expected}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {index} is not valid for guest memory")]
    InvalidQueue { index: usize },
    #[error("cannot wake the device's event loop side: {0}")]
    Wake(std::io::Error),
    #[error("device activation failed: {0}")]
    Backend(String),
}

pub trait VirtioDevice: MutEventSubscriber + Send {
    /// One of the `TYPE_*` ids.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Features the driver accepted, a subset of `avail_features` (the transport enforces it),
    /// set once the driver has written FEATURES_OK.
    fn set_acked_features(&mut self, features: u64);
    /// Device-specific configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space; read-only fields ignore writes. The default is a
    /// configuration space that is read-only throughout.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// DRIVER_OK: takes the queues. Called on a vCPU thread: store, signal, return.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device (status 0): drop the queues and return to the state before
    /// activation. Returns false if the device cannot be reset (the transport then keeps it
    /// failed until the VM ends).
    fn reset(&mut self) -> bool;
    /// The VM pauses: when this returns, none of the device's own threads touches guest
    /// memory or raises an interrupt until [`VirtioDevice::resume`]. Work the guest queued
    /// meanwhile waits. Devices served only by the `vmm` event loop need nothing: the loop
    /// stops dispatching device events while the VM is paused.
    fn pause(&mut self) {}
    /// The VM runs again: the device's threads go on, including with work queued meanwhile.
    fn resume(&mut self) {}
    /// The device's counters for the metrics (the transport adds kicks and interrupts). Read
    /// with the device lock held, so a device whose own threads count keeps its counters in
    /// relaxed atomics those threads share, never behind a lock of the datapath.
    fn counters(&self) -> DeviceCounters;
}

/// Confines a device's own thread (`net0-q0`, `9p-1`, …) as the VMM's policy for that kind of
/// thread says (seccomp filter, Landlock). Given to a device at construction by the VMM, which
/// owns the policies; a device thread calls it first, before it touches guest memory, and ends
/// if it fails.
pub trait ThreadConfinement: Send + Sync {
    /// `kind` names the policy: `"net"`, `"9p"`.
    fn confine(&self, kind: &str) -> Result<(), String>;
}

/// Reads `data.len()` bytes of a read-only configuration space `config` at `offset`; bytes past
/// its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// No confinement: for tests and benchmarks that drive a device in-process.
pub struct Unconfined;

impl ThreadConfinement for Unconfined {
    fn confine(&self, _kind: &str) -> Result<(), String> {
        Ok(())
    }
}
