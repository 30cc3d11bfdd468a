//! The modern (virtio 1.x) PCI transport: any [`VirtioDevice`] as a PCI function with one
//! 64-bit memory BAR holding the common, ISR, device and notify structures, the MSI-X table
//! and the PBA.
//!
//! Everything here runs on vCPU threads and only flips registers: queue notifications reach
//! the device as ioeventfds KVM signals (the notify addresses are registered by the VMM), and
//! DRIVER_OK hands the queues over through the non-blocking [`VirtioDevice::activate`].
//!
//! Not implemented: the VIRTIO_PCI_CAP_PCI_CFG window (Linux never uses it), INTx (no
//! interrupt pin: drivers must use MSI-X, which Linux's virtio-pci does), queue reset.

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::config::{PciConfig, PciHeader};
use super::msix::{MsiRouting, Msix, MsixVector, MAX_VECTORS, MSIX_CAP_ID};
use super::{BarReprogram, PciDevice, VIRTIO_VENDOR_ID};
use crate::rate_limit::RateLimit;
use crate::virtio::chain::{queue_in_memory, VIRTIO_RING_F_EVENT_IDX};
use crate::virtio::{
    ActivatedQueue, Counters, InterruptKind, QueueNotify, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::BusDevice;

/// Modern virtio device ids are 0x1040 + the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;
const REVISION_MODERN: u8 = 1;
const SUBSYSTEM_ID: u16 = 0x1100;

/// "No vector" in config_msix_vector and queue_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Vendor-specific capability carrying a virtio structure's location.
const CAP_VENDOR: u8 = 0x09;
const CFG_TYPE_COMMON: u8 = 1;
const CFG_TYPE_NOTIFY: u8 = 2;
const CFG_TYPE_ISR: u8 = 3;
const CFG_TYPE_DEVICE: u8 = 4;

/// The one BAR and what sits where in it (4 KiB apart, so a guest can map them separately).
pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
/// Covers virtio 1.2's common structure (0x3c bytes) and then some.
const COMMON_LEN: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 1;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// notify_off_multiplier: queue n is kicked at NOTIFY_OFFSET + 4 * n.
const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_LEN: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;

/// Queues a device may have: one notify address each in the notify region, and a vector each
/// plus one for configuration changes.
pub const MAX_QUEUES: usize = (MAX_VECTORS as usize) - 1;
const _: () = assert!(MAX_QUEUES as u64 * NOTIFY_MULTIPLIER as u64 <= NOTIFY_LEN);
const _: () = assert!(MSIX_TABLE_OFFSET + MAX_VECTORS as u64 * 16 <= MSIX_PBA_OFFSET);
const _: () = assert!(MSIX_PBA_OFFSET + MAX_VECTORS as u64 / 8 <= BAR_SIZE);

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("a virtio device with {0} queues (1 to {MAX_QUEUES} are supported)")]
    QueueCount(usize),
    #[error("a virtio device with queue {0} of size 0")]
    QueueSize(usize),
    #[error("{needed} MSI-X vectors needed, {got} given")]
    Vectors { needed: usize, got: usize },
    #[error("PCI configuration: {0}")]
    Config(#[from] super::config::ConfigError),
    #[error("cannot create a queue notification eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("invalid queue: {0:?}")]
    Queue(virtio_queue::Error),
}

/// PCI class code for a virtio device type.
fn class_code(device_type: u32) -> u32 {
    use crate::virtio::{TYPE_BLOCK, TYPE_CONSOLE, TYPE_NET};
    match device_type {
        TYPE_NET => 0x02_00_00,
        TYPE_BLOCK => 0x01_80_00,
        TYPE_CONSOLE => 0x07_80_00,
        // "Unclassified device" for the rest (rng, pmem, 9p, ...).
        _ => 0x00_ff_00,
    }
}

/// Vector assignments and the ISR, shared between the transport and its interrupt.
struct Shared {
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU8,
    config_generation: AtomicU8,
    /// Interrupts sent to the driver (queue and configuration), for the metrics.
    interrupts: AtomicU64,
}

/// What every virtio device's metrics get from its transport: the guest's kicks the device
/// read, and the interrupts raised for it. Reads relaxed atomics: never takes a lock.
pub struct TransportCounters {
    shared: Arc<Shared>,
    notify: Vec<Arc<QueueNotify>>,
}

impl TransportCounters {
    pub fn counters(&self) -> Counters {
        let kicks = self.notify.iter().map(|n| n.kicks()).sum();
        let interrupts = self.shared.interrupts.load(Ordering::Relaxed);
        vec![("kicks", kicks), ("interrupts", interrupts)]
    }
}

/// The transport's [`VirtioInterrupt`]: MSI-X vectors through KVM irqfds.
struct PciInterrupt {
    msix: Msix,
    shared: Arc<Shared>,
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let vector = match kind {
            InterruptKind::Queue(q) => {
                self.shared.isr.fetch_or(1, Ordering::AcqRel);
                self.shared
                    .queue_vectors
                    .get(usize::from(q))
                    .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
            }
            InterruptKind::Config => {
                self.shared.config_generation.fetch_add(1, Ordering::AcqRel);
                self.shared.isr.fetch_or(2, Ordering::AcqRel);
                self.shared.config_vector.load(Ordering::Acquire)
            }
        };
        if vector != VIRTIO_MSI_NO_VECTOR {
            self.shared.interrupts.fetch_add(1, Ordering::Relaxed);
            self.msix.trigger(vector);
        }
        Ok(())
    }
}

pub struct VirtioPciDevice {
    config: PciConfig,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    msix: Msix,
    msix_cap: usize,
    shared: Arc<Shared>,
    avail_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queue_max_sizes: Vec<u16>,
    queues: Vec<Queue>,
    /// Queue notification eventfds, for the device's lifetime: KVM signals them as ioeventfds
    /// and every activation shares them with the device (never a duplicate per DRIVER_OK).
    notify: Vec<Arc<QueueNotify>>,
    activated: bool,
    /// Driver mistakes a guest can repeat, logged at a bounded rate.
    refused_features: RateLimit,
    failed_activations: RateLimit,
    /// The device could not be reset: it stays failed until the VM ends.
    broken: bool,
}

impl VirtioPciDevice {
    /// The device's kicks and interrupts, readable without the transport's lock.
    pub fn counters(&self) -> TransportCounters {
        TransportCounters {
            shared: self.shared.clone(),
            notify: self.notify.clone(),
        }
    }

    /// MSI-X vectors a device needs: one per queue and one for configuration changes.
    pub fn vectors_needed(device: &dyn VirtioDevice) -> usize {
        device.queue_max_sizes().len() + 1
    }

    /// Wraps `device`; its BAR starts at `bar_addr` (aligned to `BAR_SIZE`). `vectors` are
    /// the MSI-X vectors (`vectors_needed` of them) the VMM allocated and wired to KVM.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        bar_addr: u64,
        vectors: Vec<MsixVector>,
        routing: Arc<dyn MsiRouting>,
    ) -> Result<Self, VirtioPciError> {
        let (device_type, queue_max_sizes, avail_features) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            (
                d.device_type(),
                d.queue_max_sizes().to_vec(),
                d.avail_features(),
            )
        };
        let num_queues = queue_max_sizes.len();
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(num_queues));
        }
        if let Some(q) = queue_max_sizes.iter().position(|s| *s == 0) {
            return Err(VirtioPciError::QueueSize(q));
        }
        if vectors.len() != num_queues + 1 {
            return Err(VirtioPciError::Vectors {
                needed: num_queues + 1,
                got: vectors.len(),
            });
        }
        let mut config = PciConfig::new(PciHeader {
            vendor_id: VIRTIO_VENDOR_ID,
            device_id: DEVICE_ID_BASE + device_type as u16,
            revision: REVISION_MODERN,
            class: class_code(device_type),
            subsystem_vendor_id: VIRTIO_VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
        });
        config.add_mem64_bar(BAR_INDEX, bar_addr, BAR_SIZE, false)?;
        let notify_len = num_queues as u64 * u64::from(NOTIFY_MULTIPLIER);
        for (cfg_type, offset, len) in [
            (CFG_TYPE_COMMON, COMMON_OFFSET, COMMON_LEN),
            (CFG_TYPE_ISR, ISR_OFFSET, ISR_LEN),
            (CFG_TYPE_DEVICE, DEVICE_OFFSET, DEVICE_LEN),
        ] {
            config.add_capability(CAP_VENDOR, &virtio_cap(cfg_type, offset, len, None))?;
        }
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(
                CFG_TYPE_NOTIFY,
                NOTIFY_OFFSET,
                notify_len,
                Some(NOTIFY_MULTIPLIER),
            ),
        )?;
        let msix = Msix::new(vectors, routing);
        let msix_cap = config.add_capability(
            MSIX_CAP_ID,
            &msix.capability_body(
                BAR_INDEX as u8,
                MSIX_TABLE_OFFSET as u32,
                MSIX_PBA_OFFSET as u32,
            ),
        )?;
        config.set_writable(msix_cap, Msix::CAP_WRITABLE);

        let queues = queue_max_sizes
            .iter()
            .map(|max| Queue::new(*max).map_err(VirtioPciError::Queue))
            .collect::<Result<Vec<_>, _>>()?;
        let notify = (0..num_queues)
            .map(|_| {
                QueueNotify::new()
                    .map(Arc::new)
                    .map_err(VirtioPciError::EventFd)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            interrupts: AtomicU64::new(0),
        });
        Ok(Self {
            config,
            device,
            mem,
            msix,
            msix_cap,
            shared,
            avail_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queue_max_sizes,
            queues,
            notify,
            activated: false,
            refused_features: RateLimit::default(),
            failed_activations: RateLimit::default(),
            broken: false,
        })
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    fn lock_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Queue configuration may change only before the driver enables the queue or the device.
    fn selected_mut(&mut self) -> Option<&mut Queue> {
        let locked = self.status & STATUS_DRIVER_OK != 0;
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !locked && !q.ready())
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let q = self.selected();
        let qv = self
            .shared
            .queue_vectors
            .get(usize::from(self.queue_select));
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.avail_features & 0xffff_ffff,
                1 => self.avail_features >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.shared.config_vector.load(Ordering::Acquire)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.shared.config_generation.load(Ordering::Acquire)),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size())),
            (0x1a, 2) => qv.map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |v| {
                u64::from(v.load(Ordering::Acquire))
            }),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.ready())),
            // queue_notify_off: queue n's notify address is n * multiplier.
            (0x1e, 2) => q.map_or(0, |_| u64::from(self.queue_select)),
            (0x20, 4) => q.map_or(0, |q| q.desc_table() & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc_table() >> 32),
            (0x28, 4) => q.map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.avail_ring() >> 32),
            (0x30, 4) => q.map_or(0, |q| q.used_ring() & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let v32 = value as u32;
        let v16 = value as u16;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            // Features are fixed once FEATURES_OK is set.
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                let (shift, keep) = match self.driver_feature_select {
                    0 => (0, 0xffff_ffff_0000_0000),
                    1 => (32, 0x0000_0000_ffff_ffff),
                    _ => return,
                };
                self.driver_features = (self.driver_features & keep) | u64::from(v32) << shift;
            }
            (0x10, 2) => {
                let vector = self.valid_vector(v16);
                self.shared.config_vector.store(vector, Ordering::Release);
            }
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = v16,
            (0x18, 2) => {
                if let Some(q) = self.selected_mut() {
                    // Sizes that are not powers of two or exceed the maximum are ignored (the
                    // try_ setters, unlike virtio-queue's plain ones, log nothing a guest could
                    // repeat).
                    let _ = q.try_set_size(v16);
                }
            }
            (0x1a, 2) => {
                let vector = self.valid_vector(v16);
                if let Some(v) = self
                    .shared
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    v.store(vector, Ordering::Release);
                }
            }
            // Only enabling is defined; disabling takes a reset.
            (0x1c, 2) if v16 == 1 => {
                if let Some(q) = self.selected_mut() {
                    q.set_ready(true);
                }
            }
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) => {
                self.with_queue(|q| set_ring_address(q, offset, v32));
            }
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_mut() {
            f(q);
        }
    }

    /// A vector the driver may use, or NO_VECTOR (which the driver reads back as refusal).
    fn valid_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.num_vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.broken {
            return;
        }
        let old = self.status;
        if old & !value & !STATUS_NEEDS_RESET != 0 {
            // Only a reset clears status bits.
            log::debug!("virtio-pci: status {old:#x} -> {value:#x} ignored");
            return;
        }
        let mut new = value | (old & STATUS_NEEDS_RESET);
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 {
            let unoffered = self.driver_features & !self.avail_features;
            if unoffered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                if let Some(n) = self.refused_features.hit() {
                    log::warn!(
                        "virtio-pci: driver features {:#x} refused (offered {:#x}; {n} refusals so far)",
                        self.driver_features,
                        self.avail_features
                    );
                }
                new &= !STATUS_FEATURES_OK;
            } else {
                let features = self.driver_features;
                self.lock_device().set_acked_features(features);
            }
        }
        if added & STATUS_DRIVER_OK != 0 {
            if new & STATUS_FEATURES_OK == 0 || self.activated {
                new &= !STATUS_DRIVER_OK;
            } else if let Err(e) = self.activate() {
                if let Some(n) = self.failed_activations.hit() {
                    log::error!("virtio-pci: cannot activate the device: {e} ({n} so far)");
                }
                new = (new & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
                self.status = new;
                let _ = self.interrupt().trigger(InterruptKind::Config);
                return;
            }
        }
        self.status = new;
    }

    fn interrupt(&self) -> PciInterrupt {
        PciInterrupt {
            msix: self.msix.clone(),
            shared: self.shared.clone(),
        }
    }

    fn activate(&mut self) -> Result<(), crate::virtio::ActivateError> {
        use crate::virtio::ActivateError;
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut activated = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && !queue_in_memory(q, &self.mem) {
                return Err(ActivateError::InvalidQueue { index });
            }
            q.set_event_idx(event_idx);
            // The device gets its own copy; ours keeps answering the driver's reads.
            let queue =
                Queue::try_from(q.state()).map_err(|_| ActivateError::InvalidQueue { index })?;
            let notify = self.notify[index].clone();
            activated.push(ActivatedQueue { queue, notify });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(self.interrupt());
        let mem = self.mem.clone();
        self.lock_device().activate(mem, interrupt, activated)?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.broken {
            return;
        }
        if self.activated {
            let ok = self.lock_device().reset();
            self.activated = false;
            if !ok {
                log::error!("virtio-pci: the device cannot be reset; it stays failed");
                self.broken = true;
                self.status = STATUS_NEEDS_RESET | STATUS_FAILED;
                return;
            }
        }
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for (q, max) in self.queues.iter_mut().zip(&self.queue_max_sizes) {
            if let Ok(fresh) = Queue::new(*max) {
                *q = fresh;
            }
        }
        self.shared
            .config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for v in &self.shared.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
        self.shared.isr.store(0, Ordering::Release);
    }
}

/// `struct virtio_pci_cap` after the ID and next bytes (plus notify_off_multiplier for the
/// notify capability).
fn virtio_cap(cfg_type: u8, offset: u64, len: u64, multiplier: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if multiplier.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, BAR_INDEX as u8, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(m) = multiplier {
        body.extend_from_slice(&m.to_le_bytes());
    }
    body
}

/// A write to one half of a queue's descriptor table, avail ring or used ring address
/// (common configuration offsets 0x20 to 0x37). Misaligned addresses are ignored, quietly.
fn set_ring_address(q: &mut Queue, offset: u64, half: u32) {
    let current = match offset {
        0x20 | 0x24 => q.desc_table(),
        0x28 | 0x2c => q.avail_ring(),
        _ => q.used_ring(),
    };
    let addr = GuestAddress(if offset.is_multiple_of(8) {
        (current & !0xffff_ffff) | u64::from(half)
    } else {
        (current & 0xffff_ffff) | u64::from(half) << 32
    });
    let _ = match offset {
        0x20 | 0x24 => q.try_set_desc_table_address(addr),
        0x28 | 0x2c => q.try_set_avail_ring_address(addr),
        _ => q.try_set_used_ring_address(addr),
    };
}

fn in_region(offset: u64, len: usize, start: u64, size: u64) -> Option<u64> {
    let rel = offset.checked_sub(start)?;
    (rel.checked_add(len as u64)? <= size).then_some(rel)
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // MMIO accesses are 1 to 8 bytes; anything else is not ours to answer.
        if data.is_empty() || data.len() > 8 {
            return;
        }
        if let Some(rel) = in_region(offset, data.len(), COMMON_OFFSET, COMMON_LEN) {
            self.read_common(rel, data);
        } else if in_region(offset, data.len(), ISR_OFFSET, ISR_LEN).is_some() {
            // Reading the ISR acknowledges it.
            data[0] = self.shared.isr.swap(0, Ordering::AcqRel);
        } else if let Some(rel) = in_region(offset, data.len(), DEVICE_OFFSET, DEVICE_LEN) {
            self.lock_device().read_config(rel, data);
        } else if let Some(rel) = in_region(
            offset,
            data.len(),
            MSIX_TABLE_OFFSET,
            self.msix.table_size(),
        ) {
            self.msix.read_table(rel, data);
        } else if let Some(rel) =
            in_region(offset, data.len(), MSIX_PBA_OFFSET, self.msix.pba_size())
        {
            self.msix.read_pba(rel, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() || data.len() > 8 {
            return;
        }
        if let Some(rel) = in_region(offset, data.len(), COMMON_OFFSET, COMMON_LEN) {
            self.write_common(rel, data);
        } else if let Some(rel) = in_region(offset, data.len(), DEVICE_OFFSET, DEVICE_LEN) {
            self.lock_device().write_config(rel, data);
        } else if let Some(rel) = in_region(offset, data.len(), NOTIFY_OFFSET, NOTIFY_LEN) {
            // Normally KVM catches kicks as ioeventfds; one that reaches us (an odd-sized
            // access, or before the VMM registered them) is forwarded the same way.
            let queue = (rel / u64::from(NOTIFY_MULTIPLIER)) as usize;
            if let Some(fd) = self.notify.get(queue) {
                let _ = fd.write(1);
            }
        } else if let Some(rel) = in_region(
            offset,
            data.len(),
            MSIX_TABLE_OFFSET,
            self.msix.table_size(),
        ) {
            self.msix.write_table(rel, data);
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarReprogram> {
        let moved = self.config.write(offset, data);
        // Message control is the upper half of the MSI-X capability's first dword.
        let ctl_at = self.msix_cap + 2;
        if offset < ctl_at + 2 && offset + data.len() > ctl_at {
            let mut ctl = [0u8; 2];
            self.config.read(ctl_at, &mut ctl);
            self.msix.set_control(u16::from_le_bytes(ctl));
        }
        moved
    }

    fn ioeventfds(&self, bar: usize, base: u64) -> Vec<(u64, &EventFd)> {
        if bar != BAR_INDEX {
            return Vec::new();
        }
        self.notify
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                (
                    base + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER),
                    fd.eventfd(),
                )
            })
            .collect()
    }

    fn revert_bar(&mut self, move_: &BarReprogram) {
        self.config.revert_bar(move_);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::tests::{vectors, FakeRouting};
    use crate::virtio::ActivateError;
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct FakeDevice {
        acked: u64,
        activations: usize,
        resets: usize,
        queues: Vec<ActivatedQueue>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        refuse_reset: bool,
        config: [u8; 8],
    }

    impl MutEventSubscriber for FakeDevice {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
        fn init(&mut self, _ops: &mut EventOps) {}
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            crate::virtio::TYPE_RNG
        }
        fn counters(&self) -> crate::virtio::DeviceCounters {
            crate::virtio::DeviceCounters::default()
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 3
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(b) = self.config.get_mut(offset as usize) {
                *b = data[0];
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActivatedQueue>,
        ) -> Result<(), ActivateError> {
            self.activations += 1;
            self.queues = queues;
            self.interrupt = Some(interrupt);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.queues.clear();
            !self.refuse_reset
        }
    }

    struct Rig {
        pci: VirtioPciDevice,
        dev: Arc<Mutex<FakeDevice>>,
        routing: Arc<FakeRouting>,
    }

    fn rig() -> Rig {
        let dev = Arc::new(Mutex::new(FakeDevice::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let routing = Arc::new(FakeRouting::default());
        let pci = VirtioPciDevice::new(dev.clone(), mem, 0xc000_0000, vectors(3), routing.clone())
            .unwrap();
        Rig { pci, dev, routing }
    }

    fn r(pci: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        pci.read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(pci: &mut VirtioPciDevice, offset: u64, len: usize, v: u64) {
        pci.write(offset, &v.to_le_bytes()[..len]);
    }

    fn cfg32(pci: &mut VirtioPciDevice, offset: usize) -> u32 {
        let mut b = [0; 4];
        pci.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Negotiates `features` and returns the status the device shows afterwards.
    fn negotiate(pci: &mut VirtioPciDevice, features: u64) -> u64 {
        w(pci, 0x14, 1, u64::from(STATUS_ACKNOWLEDGE));
        w(pci, 0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        w(pci, 0x08, 4, 0);
        w(pci, 0x0c, 4, features & 0xffff_ffff);
        w(pci, 0x08, 4, 1);
        w(pci, 0x0c, 4, features >> 32);
        w(
            pci,
            0x14,
            1,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
        );
        r(pci, 0x14, 1)
    }

    /// Places queue `index` (of `size`) at `base` in guest memory and enables it.
    fn setup_queue(pci: &mut VirtioPciDevice, index: u16, size: u16, base: u64) {
        w(pci, 0x16, 2, u64::from(index));
        w(pci, 0x18, 2, u64::from(size));
        w(pci, 0x20, 4, base);
        w(pci, 0x24, 4, 0);
        w(pci, 0x28, 4, base + 0x1000);
        w(pci, 0x30, 4, base + 0x2000);
        w(pci, 0x1a, 2, u64::from(index) + 1);
        w(pci, 0x1c, 2, 1);
    }

    #[test]
    fn identity_and_capabilities() {
        let mut rig = rig();
        let pci = &mut rig.pci;
        assert_eq!(cfg32(pci, 0), 0x1044_1af4);
        assert_eq!(cfg32(pci, 8), 0x00ff_0001);
        assert_eq!(cfg32(pci, 0x10), 0xc000_0004, "64-bit memory BAR");
        // Walk the capabilities: four virtio structures then MSI-X.
        let mut at = cfg32(pci, 0x34) as usize & 0xff;
        let mut found = vec![];
        while at != 0 {
            let hdr = cfg32(pci, at);
            let id = hdr as u8;
            if id == CAP_VENDOR {
                let cfg_type = (hdr >> 24) as u8;
                let offset = cfg32(pci, at + 8);
                let len = cfg32(pci, at + 12);
                found.push((cfg_type, offset, len));
                if cfg_type == CFG_TYPE_NOTIFY {
                    assert_eq!(cfg32(pci, at + 16), NOTIFY_MULTIPLIER);
                }
            } else {
                assert_eq!(id, MSIX_CAP_ID);
                assert_eq!((hdr >> 16) & 0x7ff, 2, "3 vectors");
                assert_eq!(cfg32(pci, at + 4), MSIX_TABLE_OFFSET as u32);
                assert_eq!(cfg32(pci, at + 8), MSIX_PBA_OFFSET as u32);
                found.push((0xff, 0, 0));
            }
            at = (hdr >> 8) as usize & 0xff;
        }
        assert_eq!(
            found,
            vec![
                (CFG_TYPE_COMMON, 0, 0x40),
                (CFG_TYPE_ISR, 0x1000, 1),
                (CFG_TYPE_DEVICE, 0x2000, 0x1000),
                (CFG_TYPE_NOTIFY, 0x3000, 8),
                (0xff, 0, 0)
            ]
        );
        assert_eq!(r(pci, 0x12, 2), 2, "num_queues");
        let notify: Vec<u64> = pci
            .ioeventfds(0, 0x1_0000)
            .iter()
            .map(|(a, _)| *a)
            .collect();
        assert_eq!(notify, vec![0x1_3000, 0x1_3004]);
        assert!(pci.ioeventfds(1, 0).is_empty());
    }

    #[test]
    fn feature_windows_and_refusals() {
        let mut rig = rig();
        let pci = &mut rig.pci;
        w(pci, 0x00, 4, 0);
        assert_eq!(r(pci, 0x04, 4), 1 << 3);
        w(pci, 0x00, 4, 1);
        assert_eq!(r(pci, 0x04, 4), 1);
        w(pci, 0x00, 4, 2);
        assert_eq!(r(pci, 0x04, 4), 0);
        // A feature that was not offered: FEATURES_OK does not stick.
        assert_eq!(negotiate(pci, VIRTIO_F_VERSION_1 | 1 << 5), 3);
        // Without VERSION_1 (a legacy driver on a modern-only device): refused too.
        w(pci, 0x14, 1, 0);
        assert_eq!(negotiate(pci, 1 << 3), 3);
        w(pci, 0x14, 1, 0);
        assert_eq!(negotiate(pci, VIRTIO_F_VERSION_1 | 1 << 3), 11);
        assert_eq!(rig.dev.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 1 << 3);
        // After FEATURES_OK the driver features are frozen.
        w(pci, 0x08, 4, 0);
        w(pci, 0x0c, 4, 0);
        assert_eq!(r(pci, 0x0c, 4), 1 << 3);
        // Clearing status bits without a reset is ignored.
        w(pci, 0x14, 1, 1);
        assert_eq!(r(pci, 0x14, 1), 11);
    }

    #[test]
    fn driver_ok_activates_and_reset_restores_defaults() {
        let mut rig = rig();
        let pci = &mut rig.pci;
        // DRIVER_OK before FEATURES_OK does nothing.
        w(
            pci,
            0x14,
            1,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK),
        );
        assert_eq!(rig.dev.lock().unwrap().activations, 0);
        w(pci, 0x14, 1, 0);
        negotiate(pci, VIRTIO_F_VERSION_1);
        setup_queue(pci, 0, 16, 0x1_0000);
        setup_queue(pci, 1, 8, 0x2_0000);
        assert_eq!(r(pci, 0x1a, 2), 2);
        // Vector 3 does not exist: reads back as NO_VECTOR.
        w(pci, 0x10, 2, 3);
        assert_eq!(r(pci, 0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        w(pci, 0x10, 2, 0);
        assert_eq!(r(pci, 0x10, 2), 0);
        w(pci, 0x14, 1, 15);
        assert_eq!(r(pci, 0x14, 1), 15);
        {
            let dev = rig.dev.lock().unwrap();
            assert_eq!(dev.activations, 1);
            assert_eq!(dev.queues.len(), 2);
            assert_eq!(dev.queues[1].queue.desc_table(), 0x2_0000);
            assert_eq!(dev.queues[1].queue.size(), 8);
            assert!(dev.queues[0].queue.ready());
        }
        // Queue configuration is frozen now.
        w(pci, 0x16, 2, 0);
        w(pci, 0x20, 4, 0x5000);
        assert_eq!(r(pci, 0x20, 4), 0x1_0000);
        // The device's interrupt goes to the queue's vector once MSI-X is on and unmasked.
        let msix_cap = pci.msix_cap;
        pci.write_config(msix_cap + 2, &0x8000u16.to_le_bytes());
        for v in 0..3u64 {
            w(pci, MSIX_TABLE_OFFSET + 16 * v, 4, 0xfee0_0000);
            w(pci, MSIX_TABLE_OFFSET + 16 * v + 8, 4, 0x30 + v);
            w(pci, MSIX_TABLE_OFFSET + 16 * v + 12, 4, 0);
        }
        let interrupt = rig.dev.lock().unwrap().interrupt.clone().unwrap();
        interrupt.trigger(InterruptKind::Queue(1)).unwrap();
        assert_eq!(r(pci, ISR_OFFSET, 1), 1);
        assert_eq!(r(pci, ISR_OFFSET, 1), 0, "reading the ISR clears it");
        interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(r(pci, 0x15, 1), 1, "config generation moves");
        assert!(rig
            .routing
            .routes
            .lock()
            .unwrap()
            .contains(&(26, 0xfee0_0000, 0x32)));
        // A kick that reaches us is forwarded to the queue's eventfd.
        let counters = pci.counters();
        assert_eq!(counters.counters(), [("kicks", 0), ("interrupts", 2)]);
        w(pci, NOTIFY_OFFSET + 4, 2, 1);
        assert_eq!(rig.dev.lock().unwrap().queues[1].notify.read().unwrap(), 1);
        // The metrics count the kick the device read, and the two interrupts above.
        assert_eq!(counters.counters(), [("kicks", 1), ("interrupts", 2)]);

        // Reset: device reset, queues and vectors back to defaults.
        w(pci, 0x14, 1, 0);
        assert_eq!(r(pci, 0x14, 1), 0);
        assert_eq!(rig.dev.lock().unwrap().resets, 1);
        w(pci, 0x16, 2, 1);
        assert_eq!(r(pci, 0x18, 2), 8);
        assert_eq!(r(pci, 0x1c, 2), 0);
        assert_eq!(r(pci, 0x20, 4), 0);
        assert_eq!(r(pci, 0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        assert_eq!(r(pci, 0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        // Device config passes through.
        w(pci, DEVICE_OFFSET + 1, 1, 0x5a);
        assert_eq!(r(pci, DEVICE_OFFSET, 2), 0x5a00);
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let mut rig = rig();
        let pci = &mut rig.pci;
        negotiate(pci, VIRTIO_F_VERSION_1);
        setup_queue(pci, 0, 16, 0x1_0000);
        // Queue 1's rings lie past the end of guest memory (1 MiB).
        setup_queue(pci, 1, 8, 0x10_0000);
        w(pci, 0x14, 1, 15);
        assert_eq!(r(pci, 0x14, 1) as u8, 11 | STATUS_NEEDS_RESET);
        assert_eq!(rig.dev.lock().unwrap().activations, 0);
        // A reset clears it and the driver may try again.
        w(pci, 0x14, 1, 0);
        assert_eq!(r(pci, 0x14, 1), 0);
        // Bad queue sizes are ignored: the size stays at the maximum.
        w(pci, 0x16, 2, 0);
        w(pci, 0x18, 2, 12);
        assert_eq!(r(pci, 0x18, 2), 16);
        w(pci, 0x18, 2, 32);
        assert_eq!(r(pci, 0x18, 2), 16);
        // Out-of-range queue select reads zeros and ignores writes.
        w(pci, 0x16, 2, 9);
        assert_eq!(r(pci, 0x18, 2), 0);
        w(pci, 0x1c, 2, 1);
        assert_eq!(r(pci, 0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    }

    #[test]
    fn a_device_that_cannot_reset_stays_failed() {
        let mut rig = rig();
        rig.dev.lock().unwrap().refuse_reset = true;
        let pci = &mut rig.pci;
        negotiate(pci, VIRTIO_F_VERSION_1);
        setup_queue(pci, 0, 16, 0x1_0000);
        setup_queue(pci, 1, 8, 0x2_0000);
        w(pci, 0x14, 1, 15);
        w(pci, 0x14, 1, 0);
        assert_eq!(r(pci, 0x14, 1) as u8, STATUS_NEEDS_RESET | STATUS_FAILED);
        negotiate(pci, VIRTIO_F_VERSION_1);
        assert_eq!(r(pci, 0x14, 1) as u8, STATUS_NEEDS_RESET | STATUS_FAILED);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let mut rig = rig();
        let pci = &mut rig.pci;
        let mut big = [0xaau8; 16];
        pci.read(0, &mut big);
        assert_eq!(big, [0; 16]);
        pci.write(0x14, &[1; 16]);
        pci.read(0x14, &mut []);
        pci.write(0x14, &[]);
        assert_eq!(r(pci, 0x14, 1), 0);
        // Past the BAR's structures.
        assert_eq!(r(pci, BAR_SIZE - 4, 4), 0);
        w(pci, BAR_SIZE + 4, 4, 1);
    }

    #[test]
    fn bar_moves_are_reported() {
        let mut rig = rig();
        let pci = &mut rig.pci;
        assert_eq!(pci.write_config(0x10, &0xffff_ffffu32.to_le_bytes()), None);
        assert_eq!(cfg32(pci, 0x10), !(BAR_SIZE as u32 - 1) | 4);
        assert_eq!(pci.write_config(0x10, &0xc000_0004u32.to_le_bytes()), None);
        let m = pci
            .write_config(0x10, &0xd000_0000u32.to_le_bytes())
            .unwrap();
        assert_eq!((m.old, m.new), (0xc000_0000, 0xd000_0000));
        pci.revert_bar(&m);
        assert_eq!(pci.config.bar_region(0).unwrap().addr, 0xc000_0000);
    }
}
