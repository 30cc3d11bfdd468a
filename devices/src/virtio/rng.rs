//! virtio-rng (device type 4): one queue of device-writable buffers, filled from a host
//! source (default /dev/urandom) on the `vmm` thread's event loop.
//!
//! A guest controls the descriptor chains, so each one is checked: a chain with a descriptor
//! the device may not write, or one that points outside guest memory, completes with 0 bytes;
//! chains that loop end when virtio-queue's iterator has seen a queue's worth of descriptors;
//! at most `MAX_BYTES_PER_CHAIN` are produced per chain and `MAX_BYTES_PER_WAKE` per event
//! (the rest waits for the next turn of the loop, so one guest cannot hog it).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::chain::pop_chain;
use super::single_queue::{single_queue_subscriber, SingleQueue};
use super::{
    ActivateError, ActivatedQueue, DeviceCounters, VirtioDevice, VirtioInterrupt, TYPE_RNG,
    VIRTIO_F_VERSION_1,
};
use crate::rate_limit::RateLimit;

pub const DEFAULT_SOURCE: &str = "/dev/urandom";
pub const QUEUE_SIZE: u16 = 256;
/// Bytes one chain can get (Linux asks for at most a page or two at a time).
pub const MAX_BYTES_PER_CHAIN: u32 = 64 << 10;
/// Bytes produced per event before yielding to the rest of the event loop.
pub const MAX_BYTES_PER_WAKE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error(transparent)]
    Open(#[from] crate::host_files::HostFileError),
    #[error("cannot create the activation eventfd: {0}")]
    EventFd(std::io::Error),
}

pub struct Rng {
    source: File,
    queue: SingleQueue,
    buf: Vec<u8>,
    /// Bytes handed to the guest, for tests and metrics.
    bytes_served: u64,
    read_errors: RateLimit,
}

impl Rng {
    /// Opens `source` now (before the VMM's seccomp filter forbids open), non-blocking so a
    /// source that runs dry never stalls the event loop: a character device or regular file
    /// (a directory or FIFO is refused here rather than failing per request).
    pub fn new(source: &Path) -> Result<Self, RngError> {
        let file = crate::host_files::open_byte_source("entropy source", source)?;
        Ok(Self {
            source: file,
            queue: SingleQueue::new().map_err(RngError::EventFd)?,
            buf: Vec::new(),
            bytes_served: 0,
            read_errors: RateLimit::default(),
        })
    }

    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }

    /// Fills one chain with one read of the source, however many descriptors it has; returns
    /// the bytes written (0 for a chain we refuse).
    fn fill_chain(
        source: &mut File,
        buf: &mut Vec<u8>,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        read_errors: &RateLimit,
    ) -> u32 {
        // A buffer the driver meant for us to read: not an rng request.
        if chain.clone().any(|desc| !desc.is_write_only()) {
            return 0;
        }
        let Ok(mut writer) = chain.writer(mem) else {
            return 0;
        };
        let want = writer.available_bytes().min(MAX_BYTES_PER_CHAIN as usize);
        if want == 0 {
            return 0;
        }
        buf.resize(want, 0);
        let n = match source.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                if let Some(count) = read_errors.hit() {
                    log::warn!("virtio-rng: reading the source: {e} ({count} errors so far)");
                }
                0
            }
        };
        if writer.write_all(&buf[..n]).is_err() {
            return 0;
        }
        // n <= want <= MAX_BYTES_PER_CHAIN.
        n as u32
    }

    /// Serves the queue; returns true when it stopped because of the per-wake budget.
    pub fn process_queue(&mut self) -> bool {
        let Some(active) = self.queue.active_mut() else {
            return false;
        };
        let mut used_any = false;
        let mut budget = MAX_BYTES_PER_WAKE;
        // VIRTIO_RING_F_INDIRECT_DESC is not offered, so never negotiated.
        while let Some(chain) = pop_chain(&mut active.queue, &active.mem, false) {
            let head = chain.head_index();
            let written = Self::fill_chain(
                &mut self.source,
                &mut self.buf,
                &active.mem,
                chain,
                &self.read_errors,
            );
            if let Err(e) = active.queue.add_used(&active.mem, head, written) {
                log::warn!("virtio-rng: cannot complete a chain: {e:?}");
                break;
            }
            used_any = true;
            self.bytes_served += u64::from(written);
            budget = budget.saturating_sub(u64::from(written).max(1));
            if budget == 0 {
                break;
            }
        }
        active.end_pass("virtio-rng", used_any, budget == 0)
    }
}

single_queue_subscriber!(Rng, "virtio-rng");
impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// No feature changes what the device does.
    fn set_acked_features(&mut self, _features: u64) {}

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.queue.activate(mem, interrupt, queues)
    }

    fn reset(&mut self) -> bool {
        self.queue.reset();
        true
    }

    fn counters(&self) -> DeviceCounters {
        vec![
            ("bytes_served", self.bytes_served),
            ("read_errors", self.read_errors.count()),
        ]
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::{activate_on_mock, desc, used, CountingInterrupt};
    use crate::virtio::QueueNotify;
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MEM_SIZE: u64 = 4 << 20;
    const DATA: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// An activated rng over a mock queue holding `descs` (chained by their NEXT flags);
    /// returns it with its interrupt counter.
    fn rng_with(
        mem: &GuestMemoryMmap,
        mock: &MockSplitQueue<GuestMemoryMmap>,
        descs: &[RawDescriptor],
    ) -> (Rng, Arc<CountingInterrupt>) {
        mock.add_desc_chains(descs, 0).unwrap();
        let mut rng = Rng::new(Path::new(DEFAULT_SOURCE)).unwrap();
        let notify = Arc::new(QueueNotify::new().unwrap());
        let interrupt = activate_on_mock(&mut rng, mem, mock, notify);
        (rng, interrupt)
    }

    #[test]
    fn a_directory_is_not_an_entropy_source() {
        let dir = std::env::temp_dir();
        let err = Rng::new(&dir)
            .err()
            .expect("accepted a directory")
            .to_string();
        assert_eq!(
            err,
            format!(
                "entropy source {} is a directory, not a regular file or a character device",
                dir.display()
            )
        );
        Rng::new(Path::new("/dev/urandom")).unwrap();
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        // One chain of two writable descriptors, then a single-descriptor chain.
        let (mut rng, irq) = rng_with(
            &mem,
            &mock,
            &[
                desc(DATA, 100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(DATA + 0x1000, 28, VRING_DESC_F_WRITE, 0),
                desc(DATA + 0x2000, 4096, VRING_DESC_F_WRITE, 0),
            ],
        );
        assert!(!rng.process_queue());
        assert_eq!(mock.used().idx().load(), 2);
        assert_eq!(used(&mock, 0), (0, 128));
        assert_eq!(used(&mock, 1), (2, 4096));
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        let mut out = [0u8; 4096];
        mem.read_slice(&mut out, GuestAddress(DATA + 0x2000))
            .unwrap();
        assert!(out.iter().any(|b| *b != 0), "random bytes arrived");
        assert_eq!(rng.bytes_served(), 128 + 4096);
    }

    #[test]
    fn malicious_chains_complete_empty_or_bounded() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let (mut rng, _) = rng_with(
            &mem,
            &mock,
            &[
                // 0: read-only descriptor.
                desc(DATA, 64, 0, 0),
                // 1: beyond guest memory.
                desc(MEM_SIZE + 0x1000, 64, VRING_DESC_F_WRITE, 0),
                // 2: straddles the end of guest memory.
                desc(MEM_SIZE - 16, 64, VRING_DESC_F_WRITE, 0),
                // 3: a large buffer: capped at MAX_BYTES_PER_CHAIN.
                desc(DATA, 1 << 20, VRING_DESC_F_WRITE, 0),
                // 4: writable then read-only in one chain.
                desc(DATA, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 5),
                desc(DATA + 8, 8, 0, 0),
                // 6: a chain that loops onto itself (6 -> 7 -> 6).
                desc(DATA, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 7),
                desc(DATA + 8, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 6),
            ],
        );
        rng.process_queue();
        let results: Vec<_> = (0..mock.used().idx().load())
            .map(|i| used(&mock, i))
            .collect();
        assert_eq!(results[0], (0, 0));
        assert_eq!(results[1], (1, 0));
        assert_eq!(results[2], (2, 0));
        assert_eq!(results[3], (3, MAX_BYTES_PER_CHAIN));
        assert_eq!(results[4], (4, 0));
        // The loop ends after a queue's worth of descriptors, bounded in bytes.
        assert_eq!(results[5].0, 6);
        assert!(results[5].1 <= 16 * 8);
        assert_eq!(results.len(), 6);
    }

    #[test]
    fn indirect_table_outside_memory_is_harmless() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
        let (mut rng, _) = rng_with(
            &mem,
            &mock,
            &[
                desc(MEM_SIZE + 0x1000, 16 * 4, indirect, 0),
                desc(DATA, 16, VRING_DESC_F_WRITE, 0),
            ],
        );
        rng.process_queue();
        assert_eq!(used(&mock, 0), (0, 0));
        assert_eq!(used(&mock, 1).1, 16);
    }

    #[test]
    fn indirect_tables_are_not_followed_unless_negotiated() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let table = DATA + 0x8000;
        // A valid indirect table of 4 writable descriptors: the device never offered
        // INDIRECT_DESC, so the chain completes empty, unread.
        for i in 0..4u16 {
            let d = desc(DATA + u64::from(i) * 64, 64, VRING_DESC_F_WRITE, 0);
            mem.write_obj(d, GuestAddress(table + u64::from(i) * 16))
                .unwrap();
        }
        let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
        let (mut rng, _) = rng_with(&mem, &mock, &[desc(table, 4 * 16, indirect, 0)]);
        rng.process_queue();
        assert_eq!(used(&mock, 0), (0, 0));
        assert_eq!(rng.bytes_served(), 0);
    }

    /// read(2) calls this thread made so far.
    fn read_syscalls() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("syscr: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn one_source_read_per_chain() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 256);
        // One chain of 256 one-byte descriptors.
        let descs: Vec<_> = (0..256u16)
            .map(|i| {
                let flags = VRING_DESC_F_WRITE | if i < 255 { VRING_DESC_F_NEXT } else { 0 };
                desc(DATA + u64::from(i) * 2, 1, flags, i + 1)
            })
            .collect();
        let (mut rng, _) = rng_with(&mem, &mock, &descs);
        let probe_cost = read_syscalls().abs_diff(read_syscalls());
        let before = read_syscalls();
        rng.process_queue();
        let reads = read_syscalls() - before - probe_cost;
        assert_eq!(used(&mock, 0), (0, 256));
        assert_eq!(reads, 1, "read calls for one chain of 256 descriptors");
    }

    #[test]
    fn budget_per_wake_is_bounded() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 64);
        let descs: Vec<_> = (0..32)
            .map(|i| {
                desc(
                    DATA + i * 0x1_0000,
                    MAX_BYTES_PER_CHAIN,
                    VRING_DESC_F_WRITE,
                    0,
                )
            })
            .collect();
        let (mut rng, _) = rng_with(&mem, &mock, &descs);
        assert!(rng.process_queue(), "2 MiB asked, 1 MiB per wake");
        assert_eq!(mock.used().idx().load(), 16);
        let notify = rng.queue.active_mut().unwrap().notify.clone();
        assert_eq!(notify.read().unwrap(), 1);
        assert_eq!(
            notify.kicks(),
            0,
            "the device's own wake-up is not a guest kick"
        );
        assert!(!rng.process_queue());
        assert_eq!(mock.used().idx().load(), 32);
        assert_eq!(
            rng.counters().counters,
            [
                ("bytes_served", 32 * u64::from(MAX_BYTES_PER_CHAIN)),
                ("read_errors", 0)
            ]
        );
    }

    #[test]
    fn event_loop_activation_kick_and_reset() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let rng = Arc::new(Mutex::new(Rng::new(Path::new(DEFAULT_SOURCE)).unwrap()));
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        manager.add_subscriber(rng.clone());
        mock.add_desc_chains(&[desc(DATA, 32, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let notify = Arc::new(QueueNotify::new().unwrap());
        let interrupt = activate_on_mock(&mut *rng.lock().unwrap(), &mem, &mock, notify.clone());
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(mock.used().idx().load(), 1, "served on activation");
        // A kick through the notify eventfd.
        mock.add_desc_chains(&[desc(DATA, 32, VRING_DESC_F_WRITE, 0)], 1)
            .unwrap();
        notify.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(mock.used().idx().load(), 2);
        assert_eq!(interrupt.0.load(Ordering::SeqCst), 2);
        assert_eq!(notify.kicks(), 1, "the kick is counted");
        assert_eq!(
            rng.lock().unwrap().counters().counters[0],
            ("bytes_served", 64)
        );
        // Reset: the queue's eventfd stays watched; a later kick is read and does nothing.
        assert!(rng.lock().unwrap().reset());
        mock.add_desc_chains(&[desc(DATA, 32, VRING_DESC_F_WRITE, 0)], 2)
            .unwrap();
        notify.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(mock.used().idx().load(), 2);
        assert_eq!(rng.lock().unwrap().queue.watched_count(), 1);
        assert_eq!(
            notify.kicks(),
            2,
            "a kick after reset is still one the guest sent"
        );
        assert_eq!(
            manager.run_with_timeout(100).unwrap(),
            0,
            "the kick was consumed"
        );
        // Wrong queue counts are refused.
        let err = rng
            .lock()
            .unwrap()
            .activate(mem.clone(), interrupt, vec![])
            .unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { .. }));
    }

    #[test]
    fn missing_source_is_a_clear_error() {
        let err = Rng::new(Path::new("/nonexistent/rng")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/rng"), "{err}");
    }
}
