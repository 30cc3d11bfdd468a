//! virtio-net (device type 1) on a tap.
//!
//! Queues: rx/tx per queue pair (rx 2p, tx 2p+1), then the control queue. The datapath runs on
//! its own threads, one per queue pair (`net{N}-q{M}`), woken by the queues' ioeventfds and
//! the tap's readiness, raising interrupts through the transport's irqfds: the `vmm` thread
//! and the device mutex are never on the packet path. Thread 0 also serves the control queue
//! (rx mode, MAC table and address, queue pairs, guest offloads).
//!
//! With vhost-net (`vhost` module) the kernel moves the packets; thread 0 then only sets the
//! backend up and down, serves the control queue and forwards vhost's used-buffer signals as
//! interrupts.
//!
//! A vCPU thread only hands commands to the threads through a mailbox (`worker`): activation
//! does not wait; reset and pause wait until every thread has let go of guest memory.

pub mod backend;
mod ctrl;
mod tap;
#[cfg(test)]
mod tests;
pub mod vhost;
mod worker;

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_net as vn;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::{
    ActivateError, ActivatedQueue, Counters, DeviceCounters, InterruptKind, ThreadConfinement,
    VirtioDevice, VirtioInterrupt, TYPE_NET, VIRTIO_F_VERSION_1,
};
pub use ctrl::RxFilter;
pub use tap::{Tap, TapError, VNET_HDR_LEN};
use vhost::VhostNetBackend;
use worker::{Activation, Command, PairQueues, WorkerThread};

pub const QUEUE_SIZE: u16 = 256;
pub const CTRL_QUEUE_SIZE: u16 = 64;

pub use super::chain::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Guest-side receive offloads and what the tap must be told for each.
const GUEST_OFFLOADS: [(u64, u32); 7] = [
    (bit(vn::VIRTIO_NET_F_GUEST_CSUM), tap::TUN_F_CSUM),
    (bit(vn::VIRTIO_NET_F_GUEST_TSO4), tap::TUN_F_TSO4),
    (bit(vn::VIRTIO_NET_F_GUEST_TSO6), tap::TUN_F_TSO6),
    (bit(vn::VIRTIO_NET_F_GUEST_ECN), tap::TUN_F_TSO_ECN),
    (bit(vn::VIRTIO_NET_F_GUEST_UFO), tap::TUN_F_UFO),
    (bit(vn::VIRTIO_NET_F_GUEST_USO4), tap::TUN_F_USO4),
    (bit(vn::VIRTIO_NET_F_GUEST_USO6), tap::TUN_F_USO6),
];

/// The TUNSETOFFLOAD flags for the guest offload features in `features`. The tap refuses
/// segmentation offloads without checksum offload, so none are set without it.
pub fn tap_offloads(features: u64) -> u32 {
    if features & bit(vn::VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    GUEST_OFFLOADS
        .iter()
        .filter(|(f, _)| features & f != 0)
        .fold(0, |acc, (_, t)| acc | t)
}

/// The features offered on a host whose tap supports `tap_supported` (TUN_F_*).
fn offered_features(tap_supported: u32, pairs: u16) -> u64 {
    let mut f = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC
        | bit(vn::VIRTIO_NET_F_MAC)
        | bit(vn::VIRTIO_NET_F_STATUS)
        | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
        | bit(vn::VIRTIO_NET_F_CTRL_VQ)
        | bit(vn::VIRTIO_NET_F_CTRL_RX)
        | bit(vn::VIRTIO_NET_F_CTRL_MAC_ADDR)
        | bit(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
        // The tap takes GSO frames from the guest (checksum, TSO, ECN, UFO) on any kernel
        // that has IFF_VNET_HDR.
        | bit(vn::VIRTIO_NET_F_CSUM)
        | bit(vn::VIRTIO_NET_F_HOST_TSO4)
        | bit(vn::VIRTIO_NET_F_HOST_TSO6)
        | bit(vn::VIRTIO_NET_F_HOST_ECN)
        | bit(vn::VIRTIO_NET_F_HOST_UFO);
    if tap_supported & tap::TUN_F_USO4 != 0 {
        // A kernel that delivers USO to us also accepts it from us.
        f |= bit(vn::VIRTIO_NET_F_HOST_USO);
    }
    for (feature, flag) in GUEST_OFFLOADS {
        if tap_supported & flag == flag {
            f |= feature;
        }
    }
    if pairs > 1 {
        f |= bit(vn::VIRTIO_NET_F_MQ);
    }
    f
}

/// `struct virtio_net_config`: mac, status, max_virtqueue_pairs.
const CONFIG_LEN: usize = 10;

/// What the device and its threads share: the guest-visible state the control queue changes.
pub(crate) struct Shared {
    pub mac: Mutex<[u8; 6]>,
    /// VIRTIO_NET_S_* bits.
    pub status: AtomicU16,
    pub filter: Mutex<RxFilter>,
    /// Bumped on every filter change; the rx path re-reads the filter when it moves.
    pub filter_gen: AtomicU64,
    /// The interrupt of the current activation, for config changes (link state).
    pub interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    pub stats: Arc<NetStats>,
}

/// The datapath's counters, summed over the queue threads; relaxed atomics, so counting costs
/// a thread an uncontended add and reading them (the metrics) never waits on a datapath.
/// Frame bytes do not include the virtio-net header. With vhost-net the kernel moves the
/// frames and these stay 0.
#[derive(Debug, Default)]
pub(crate) struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap and not delivered: truncated, too short, or refused by the
    /// guest's receive filter.
    pub rx_dropped: AtomicU64,
    /// Times rx ran out of the guest's buffers (frames then wait in the tap).
    pub rx_no_buffer: AtomicU64,
    /// Malformed rx chains returned empty.
    pub rx_bad_chains: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames the tap refused (dropped).
    pub tx_errors: AtomicU64,
    /// Malformed tx chains dropped.
    pub tx_bad_chains: AtomicU64,
}

impl NetStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn counters(&self) -> Counters {
        super::load_counters(&[
            ("rx_frames", &self.rx_frames),
            ("rx_bytes", &self.rx_bytes),
            ("rx_dropped", &self.rx_dropped),
            ("rx_no_buffer", &self.rx_no_buffer),
            ("rx_bad_chains", &self.rx_bad_chains),
            ("tx_frames", &self.tx_frames),
            ("tx_bytes", &self.tx_bytes),
            ("tx_errors", &self.tx_errors),
            ("tx_bad_chains", &self.tx_bad_chains),
        ])
    }
}

/// What the VMM gives a net device.
pub struct NetParams {
    /// N in the thread names `net{N}-q{M}`.
    pub index: usize,
    pub mac: [u8; 6],
    /// One tap queue per queue pair.
    pub taps: Vec<Tap>,
    /// One vhost-net backend per queue pair; empty for the userspace datapath.
    pub vhost: Vec<Box<dyn VhostNetBackend>>,
    pub confinement: Arc<dyn ThreadConfinement>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("a net device needs 1 to 16 queue pairs, got {0}")]
    QueuePairs(usize),
    #[error("{vhost} vhost backends for {taps} tap queues: give one per queue pair")]
    VhostCount { vhost: usize, taps: usize },
    #[error("cannot create the eventfds of the net device: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start thread {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Net {
    pairs: u16,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    shared: Arc<Shared>,
    workers: Vec<WorkerThread>,
    vhost: bool,
    activated: bool,
}

impl Net {
    /// Builds the device and starts its threads (idle until the driver activates it).
    pub fn new(params: NetParams) -> Result<Net, NetError> {
        let pairs = params.taps.len();
        if pairs == 0 || pairs > 16 {
            return Err(NetError::QueuePairs(pairs));
        }
        let vhost = !params.vhost.is_empty();
        if vhost && params.vhost.len() != pairs {
            return Err(NetError::VhostCount {
                vhost: params.vhost.len(),
                taps: pairs,
            });
        }
        let pairs16 = pairs as u16;
        let tap_supported = params.taps[0].probe_offloads();
        let avail_features = offered_features(tap_supported, pairs16);
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * pairs];
        queue_sizes.push(CTRL_QUEUE_SIZE);
        let shared = Arc::new(Shared {
            mac: Mutex::new(params.mac),
            status: AtomicU16::new(vn::VIRTIO_NET_S_LINK_UP as u16),
            filter: Mutex::new(RxFilter::new(params.mac)),
            filter_gen: AtomicU64::new(0),
            interrupt: Mutex::new(None),
            stats: Arc::default(),
        });
        let taps: Arc<[Tap]> = params.taps.into();
        // vhost-net moves the packets itself: one thread for the control queue and signals.
        let threads = if vhost { 1 } else { pairs };
        let mut vhost_backends = Some(params.vhost);
        let mut workers = Vec::with_capacity(threads);
        for q in 0..threads {
            let name = format!("net{}-q{q}", params.index);
            let worker = WorkerThread::spawn(
                name,
                q,
                taps.clone(),
                shared.clone(),
                params.confinement.clone(),
                if q == 0 {
                    vhost_backends.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
            )?;
            workers.push(worker);
        }
        Ok(Net {
            pairs: pairs16,
            queue_sizes,
            avail_features,
            acked_features: 0,
            shared,
            workers,
            vhost,
            activated: false,
        })
    }

    /// Whether the kernel (vhost-net) moves the packets.
    pub fn uses_vhost(&self) -> bool {
        self.vhost
    }

    /// Sets the link state the guest sees and tells it.
    pub fn set_link_up(&self, up: bool) {
        let bit = vn::VIRTIO_NET_S_LINK_UP as u16;
        if up {
            self.shared.status.fetch_or(bit, Ordering::AcqRel);
        } else {
            self.shared.status.fetch_and(!bit, Ordering::AcqRel);
        }
        let interrupt = self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(interrupt) = interrupt.as_ref() {
            let _ = interrupt.trigger(InterruptKind::Config);
        }
    }

    /// The MAC address the guest has now (it may set its own through the control queue).
    pub fn mac(&self) -> [u8; 6] {
        *self.shared.mac.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has every queue thread serve its queues now and waits until they are done, so a fake
    /// driver's step is over before its next one (what keeps the fuzz target reproducible).
    #[cfg(any(test, feature = "fake-driver"))]
    pub fn quiesce(&self) {
        self.broadcast(|| Command::Quiesce);
    }

    fn broadcast(&self, command: impl Fn() -> Command) {
        for w in &self.workers {
            w.mailbox.post(command());
        }
        for w in &self.workers {
            w.mailbox.wait_idle();
        }
    }
}

impl MutEventSubscriber for Net {
    /// The device's own threads serve it; the event loop has nothing to do.
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
    fn init(&mut self, _ops: &mut EventOps) {}
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn counters(&self) -> DeviceCounters {
        self.shared.stats.counters().into()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Read-only: the MAC is set through the control queue (CTRL_MAC_ADDR), so the default
    /// `write_config` (writes ignored) serves.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac());
        config[6..8].copy_from_slice(&self.shared.status.load(Ordering::Acquire).to_le_bytes());
        config[8..10].copy_from_slice(&self.pairs.to_le_bytes());
        crate::virtio::read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let expected = self.queue_sizes.len();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        let acked = self.acked_features;
        // Without MQ the control queue is queue 2 whatever the number of pairs (5.1.2).
        let mq = acked & bit(vn::VIRTIO_NET_F_MQ) != 0;
        let pairs = if mq { usize::from(self.pairs) } else { 1 };
        let ctrl_index = 2 * pairs;
        let mut slots: Vec<Option<ActivatedQueue>> = queues.into_iter().map(Some).collect();
        let ctrl = if acked & bit(vn::VIRTIO_NET_F_CTRL_VQ) != 0 {
            slots[ctrl_index].take().filter(|q| q.queue.ready())
        } else {
            None
        };
        let mut per_pair: Vec<Option<PairQueues>> = (0..pairs)
            .map(|p| {
                let rx = slots[2 * p].take()?;
                let tx = slots[2 * p + 1].take()?;
                (rx.queue.ready() && tx.queue.ready()).then_some(PairQueues { rx, tx, pair: p })
            })
            .collect();
        *self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(interrupt.clone());
        let mut ctrl = ctrl;
        for (q, worker) in self.workers.iter().enumerate() {
            // With vhost, thread 0 sets up every pair; otherwise each thread takes its own.
            let pairs_for_worker: Vec<PairQueues> = if self.vhost {
                per_pair.iter_mut().filter_map(Option::take).collect()
            } else {
                per_pair
                    .get_mut(q)
                    .and_then(Option::take)
                    .into_iter()
                    .collect()
            };
            worker.mailbox.post(Command::Activate(Box::new(Activation {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                acked_features: acked,
                pairs: pairs_for_worker,
                ctrl: if q == 0 { ctrl.take() } else { None },
                active_pairs: pairs,
            })));
        }
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.broadcast(|| Command::Reset);
        *self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        let mac = self.mac();
        *self.shared.filter.lock().unwrap_or_else(|p| p.into_inner()) = RxFilter::new(mac);
        self.shared.filter_gen.fetch_add(1, Ordering::AcqRel);
        self.activated = false;
        true
    }

    fn pause(&mut self) {
        self.broadcast(|| Command::Pause);
    }

    fn resume(&mut self) {
        for w in &self.workers {
            w.mailbox.post(Command::Resume);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for w in &self.workers {
            w.mailbox.post(Command::Exit);
        }
        for w in &mut self.workers {
            w.join();
        }
    }
}
