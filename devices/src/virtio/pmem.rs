//! virtio-pmem (device type 27): a host file the VMM has mapped into guest physical memory at
//! `start`, which the guest uses directly (DAX); the device itself only answers flush requests
//! on its one queue, by syncing the file.
//!
//! The mapping is the VMM's business (KVM memory slot, read-only or not); this device only
//! describes it in its configuration space and keeps the file for flushing. A request is a
//! readable 4-byte type followed by a writable 4-byte status; anything else completes with 0
//! bytes written and is counted, never trusted.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::chain::pop_chain;
use super::single_queue::{single_queue_subscriber, SingleQueue};
use super::{
    ActivateError, ActivatedQueue, DeviceCounters, VirtioDevice, VirtioInterrupt, TYPE_PMEM,
    VIRTIO_F_VERSION_1,
};
use crate::rate_limit::RateLimit;

pub const QUEUE_SIZE: u16 = 64;
/// VIRTIO_PMEM_REQ_TYPE_FLUSH, the only request type.
const REQ_TYPE_FLUSH: u32 = 0;
const RESP_OK: u32 = 0;
/// VIRTIO_PMEM_RESP_TYPE_EIO.
const RESP_EIO: u32 = 1;
/// Requests served per wake before yielding to the rest of the event loop.
const MAX_REQUESTS_PER_WAKE: usize = 64;
/// Configuration space: le64 start, le64 size.
const CONFIG_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PmemDeviceError {
    #[error("cannot create the activation eventfd: {0}")]
    EventFd(std::io::Error),
}

pub struct Pmem {
    /// The backing file, for flushes; `None` when read-only (nothing can be dirty).
    file: Option<File>,
    config: [u8; CONFIG_SIZE],
    queue: SingleQueue,
    flushes: u64,
    /// fdatasync calls made (flush requests are coalesced, see `process_queue`).
    syncs: u64,
    bad_requests: u64,
    used_errors: RateLimit,
    flush_errors: RateLimit,
}

impl Pmem {
    /// A device describing `size` bytes at guest physical `start`. `file` is the writable
    /// backing file a flush syncs, or `None` for a read-only image.
    pub fn new(start: u64, size: u64, file: Option<File>) -> Result<Self, PmemDeviceError> {
        let mut config = [0u8; CONFIG_SIZE];
        config[..8].copy_from_slice(&start.to_le_bytes());
        config[8..].copy_from_slice(&size.to_le_bytes());
        Ok(Self {
            file,
            config,
            queue: SingleQueue::new().map_err(PmemDeviceError::EventFd)?,
            flushes: 0,
            syncs: 0,
            bad_requests: 0,
            used_errors: RateLimit::default(),
            flush_errors: RateLimit::default(),
        })
    }

    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    pub fn bad_requests(&self) -> u64 {
        self.bad_requests
    }

    /// Syncs the file's data (a read-only image has nothing to sync).
    fn flush(file: Option<&File>, errors: &RateLimit) -> u32 {
        match file.map(File::sync_data) {
            None | Some(Ok(())) => RESP_OK,
            Some(Err(e)) => {
                if let Some(n) = errors.hit() {
                    log::warn!("virtio-pmem: flush failed: {e} ({n} so far)");
                }
                RESP_EIO
            }
        }
    }

    /// Serves the queue; returns true when it stopped at the per-wake limit.
    ///
    /// Flush requests are coalesced: one fdatasync, after every request of this wake was
    /// taken, answers them all (each asked that what it wrote before be durable, and the sync
    /// starts after all of them). So a guest that flushes in a loop costs the event loop at
    /// most one sync per wake.
    pub fn process_queue(&mut self) -> bool {
        let Some(active) = self.queue.active_mut() else {
            return false;
        };
        let mut taken = Vec::with_capacity(MAX_REQUESTS_PER_WAKE);
        while taken.len() < MAX_REQUESTS_PER_WAKE {
            // VIRTIO_RING_F_INDIRECT_DESC is not offered, so never negotiated.
            let Some(chain) = pop_chain(&mut active.queue, &active.mem, false) else {
                break;
            };
            let request = chain
                .clone()
                .reader(&active.mem)
                .ok()
                .and_then(|mut reader| {
                    let mut kind = [0u8; 4];
                    reader
                        .read_exact(&mut kind)
                        .ok()
                        .map(|()| u32::from_le_bytes(kind))
                });
            taken.push((chain, request));
        }
        let flushes = taken
            .iter()
            .filter(|(_, request)| *request == Some(REQ_TYPE_FLUSH))
            .count();
        let flush_status = if flushes > 0 {
            self.flushes += flushes as u64;
            self.syncs += 1;
            log::debug!("virtio-pmem: {flushes} flush requests, one sync");
            Self::flush(self.file.as_ref(), &self.flush_errors)
        } else {
            RESP_OK
        };
        let served = taken.len();
        for (chain, request) in taken {
            let head = chain.head_index();
            let status = match request {
                Some(REQ_TYPE_FLUSH) => Some(flush_status),
                // Not logged: a guest could repeat it forever.
                Some(_) => Some(RESP_EIO),
                None => None,
            };
            let written = status
                .and_then(|status| {
                    let mut writer = chain.writer(&active.mem).ok()?;
                    writer.write_all(&status.to_le_bytes()).ok()?;
                    Some(4)
                })
                .unwrap_or_else(|| {
                    self.bad_requests += 1;
                    0
                });
            if let Err(e) = active.queue.add_used(&active.mem, head, written) {
                if let Some(n) = self.used_errors.hit() {
                    log::warn!("virtio-pmem: cannot complete a request: {e:?} ({n} so far)");
                }
            }
        }
        active.end_pass("virtio-pmem", served > 0, served == MAX_REQUESTS_PER_WAKE)
    }
}

single_queue_subscriber!(Pmem, "virtio-pmem");

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        TYPE_PMEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    /// Not VIRTIO_PMEM_F_SHMEM_REGION: the region is described by `start`/`size` in the
    /// configuration space, which every driver reads.
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// No feature changes what the device does.
    fn set_acked_features(&mut self, _features: u64) {}

    /// Read-only (the default `write_config`).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
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
            ("flushes", self.flushes),
            ("syncs", self.syncs),
            ("flush_errors", self.flush_errors.count()),
            ("bad_requests", self.bad_requests),
        ]
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::{activate_on_mock, desc, used, CountingInterrupt};
    use crate::virtio::QueueNotify;
    use std::sync::atomic::Ordering;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MEM_SIZE: u64 = 4 << 20;
    const REQ: u64 = 0x10_0000;
    const RESP: u64 = 0x10_1000;

    fn pmem_with(
        file: Option<File>,
        descs: &[virtio_queue::desc::RawDescriptor],
        queue_size: u16,
    ) -> (
        Pmem,
        GuestMemoryMmap,
        MockSplitQueue<'static, GuestMemoryMmap>,
        Arc<CountingInterrupt>,
    ) {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
        ));
        let mock = MockSplitQueue::new(mem, queue_size);
        mock.add_desc_chains(descs, 0).unwrap();
        let mut pmem = Pmem::new(1 << 32, 64 << 20, file).unwrap();
        let notify = Arc::new(QueueNotify::new().unwrap());
        let interrupt = activate_on_mock(&mut pmem, mem, &mock, notify);
        (pmem, mem.clone(), mock, interrupt)
    }

    fn flush_request() -> [virtio_queue::desc::RawDescriptor; 2] {
        [
            desc(REQ, 4, VRING_DESC_F_NEXT, 1),
            desc(RESP, 4, VRING_DESC_F_WRITE, 0),
        ]
    }

    #[test]
    fn config_space_describes_the_region() {
        let pmem = Pmem::new(0x5_4000_0000, 64 << 20, None).unwrap();
        let mut start = [0u8; 8];
        pmem.read_config(0, &mut start);
        assert_eq!(u64::from_le_bytes(start), 0x5_4000_0000);
        let mut size = [0u8; 8];
        pmem.read_config(8, &mut size);
        assert_eq!(u64::from_le_bytes(size), 64 << 20);
        let mut past = [0xffu8; 4];
        pmem.read_config(14, &mut past);
        assert_eq!(past, [0, 0, 0, 0]);
        pmem.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn flush_syncs_a_writable_file_and_answers_ok() {
        let file = tempfile_with(b"data");
        let (mut pmem, mem, mock, irq) = pmem_with(Some(file), &flush_request(), 16);
        mem.write_obj(REQ_TYPE_FLUSH.to_le_bytes(), GuestAddress(REQ))
            .unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(RESP)).unwrap();
        assert!(!pmem.process_queue());
        assert_eq!(used(&mock, 0), (0, 4));
        assert_eq!(mem.read_obj::<u32>(GuestAddress(RESP)).unwrap(), RESP_OK);
        assert_eq!(pmem.flushes(), 1);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn unknown_type_gets_eio() {
        let (mut pmem, mem, mock, _) = pmem_with(None, &flush_request(), 16);
        mem.write_obj(7u32, GuestAddress(REQ)).unwrap();
        pmem.process_queue();
        assert_eq!(used(&mock, 0), (0, 4));
        assert_eq!(mem.read_obj::<u32>(GuestAddress(RESP)).unwrap(), RESP_EIO);
        assert_eq!(pmem.flushes(), 0);
    }

    #[test]
    fn malformed_requests_complete_empty() {
        let (mut pmem, _, mock, _) = pmem_with(
            None,
            &[
                // 0: no response buffer.
                desc(REQ, 4, 0, 0),
                // 1: request too short.
                desc(REQ, 2, VRING_DESC_F_NEXT, 2),
                desc(RESP, 4, VRING_DESC_F_WRITE, 0),
                // 3: request outside guest memory.
                desc(MEM_SIZE + 0x1000, 4, VRING_DESC_F_NEXT, 4),
                desc(RESP, 4, VRING_DESC_F_WRITE, 0),
                // 5: response buffer straddles the end of memory.
                desc(REQ, 4, VRING_DESC_F_NEXT, 6),
                desc(MEM_SIZE - 2, 4, VRING_DESC_F_WRITE, 0),
                // 7: a loop (7 -> 8 -> 7).
                desc(REQ, 4, VRING_DESC_F_NEXT, 8),
                desc(REQ, 4, VRING_DESC_F_NEXT, 7),
            ],
            16,
        );
        pmem.process_queue();
        let results: Vec<_> = (0..mock.used().idx().load())
            .map(|i| used(&mock, i))
            .collect();
        assert_eq!(results, vec![(0, 0), (1, 0), (3, 0), (5, 0), (7, 0)]);
        assert_eq!(pmem.bad_requests(), 5);
        assert_eq!(pmem.counters().counters[3], ("bad_requests", 5));
    }

    #[test]
    fn requests_per_wake_are_bounded() {
        let descs: Vec<_> = (0..80u16)
            .flat_map(|i| {
                [
                    desc(REQ, 4, VRING_DESC_F_NEXT, 2 * i + 1),
                    desc(RESP, 4, VRING_DESC_F_WRITE, 0),
                ]
            })
            .collect();
        let (mut pmem, _, mock, _) = pmem_with(None, &descs, 256);
        assert!(pmem.process_queue());
        assert_eq!(usize::from(mock.used().idx().load()), MAX_REQUESTS_PER_WAKE);
        assert!(!pmem.process_queue());
        assert_eq!(mock.used().idx().load(), 80);
    }

    #[test]
    fn flushes_in_one_wake_share_one_sync() {
        let descs: Vec<_> = (0..64u16)
            .flat_map(|i| {
                [
                    desc(REQ, 4, VRING_DESC_F_NEXT, 2 * i + 1),
                    desc(RESP + 4 * u64::from(i), 4, VRING_DESC_F_WRITE, 0),
                ]
            })
            .collect();
        let file = tempfile_with(b"data");
        let (mut pmem, mem, mock, irq) = pmem_with(Some(file), &descs, 128);
        mem.write_obj(REQ_TYPE_FLUSH.to_le_bytes(), GuestAddress(REQ))
            .unwrap();
        pmem.process_queue();
        assert_eq!(mock.used().idx().load(), 64);
        assert_eq!(pmem.flushes(), 64);
        assert_eq!(pmem.syncs(), 1, "one fdatasync answers the 64 requests");
        assert_eq!(
            pmem.counters().counters,
            [
                ("flushes", 64),
                ("syncs", 1),
                ("flush_errors", 0),
                ("bad_requests", 0)
            ]
        );
        for i in 0..64 {
            assert_eq!(used(&mock, i), (2 * i as u32, 4));
            let status = mem.read_obj::<u32>(GuestAddress(RESP + 4 * u64::from(i)));
            assert_eq!(status.unwrap(), RESP_OK);
        }
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let mut file = crate::virtio::fake_driver::unlinked_tempfile("pmem-dev-test").unwrap();
        file.write_all(bytes).unwrap();
        file
    }
}
