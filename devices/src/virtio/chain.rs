//! Taking descriptor chains off a queue the guest controls, at a cost bounded by the queue
//! size, with nothing the guest can make us log on every kick.
//!
//! virtio-queue's own `pop_descriptor_chain` logs an error on every call while the driver's
//! avail index is more than a queue ahead, hands out chains whose head is outside the table
//! (which `add_used` then refuses, with another error), and follows indirect descriptor tables
//! (up to 65535 descriptors each) whether or not VIRTIO_RING_F_INDIRECT_DESC was negotiated.
//! [`pop_chain`] screens all three before a device walks a chain.

use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// VIRTIO_RING_F_INDIRECT_DESC (virtio 1.2, 6).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX (virtio 1.2, 6): the transport turns it on in the queues it hands
/// over; a device that offers it must [`rearm`] before it waits for a kick.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// The next chain the device may serve, or None when the driver posted nothing (or broke its
/// avail ring: an index more than a queue ahead, which only a reset repairs).
///
/// A chain that uses an indirect table without `indirect_allowed` is completed with 0 bytes
/// unread; one whose head is outside the descriptor table is consumed without completion (it
/// names no descriptor that could be returned).
pub fn pop_chain<M>(queue: &mut Queue, mem: M, indirect_allowed: bool) -> Option<DescriptorChain<M>>
where
    M: Clone + Deref<Target = GuestMemoryMmap>,
{
    let size = queue.size();
    let avail = queue.avail_idx(&*mem, Ordering::Acquire).ok()?;
    if (avail - Wrapping(queue.next_avail())).0 > size {
        return None;
    }
    // Each turn consumes one avail entry, and there are at most `size` of them.
    for _ in 0..size {
        let chain = queue.pop_descriptor_chain(mem.clone())?;
        let head = chain.head_index();
        if head >= size {
            continue;
        }
        if !indirect_allowed && uses_indirect(&mem, queue.desc_table(), size, head) {
            // Only fails on a used ring outside memory, which activation ruled out.
            let _ = queue.add_used(&*mem, head, 0);
            continue;
        }
        return Some(chain);
    }
    None
}

/// Turns the driver's notifications back on after a batch; whether chains came meanwhile that
/// [`pop_chain`] would serve (then the caller takes another turn). virtio-queue's
/// `enable_notification` alone says "more" for as long as the avail index is more than a queue
/// ahead, where [`pop_chain`] serves nothing: a loop on it would spin until a reset.
pub fn rearm(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if !queue.enable_notification(mem).unwrap_or(false) {
        return false;
    }
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|avail| (avail - Wrapping(queue.next_avail())).0 <= queue.size())
}

/// Whether the chain at `head` has a descriptor with VIRTQ_DESC_F_INDIRECT, walking at most
/// `size` descriptors of the table at `table` (as virtio-queue's iterator does). A chain we
/// cannot read is left to the device, whose own walk fails on it the same way.
fn uses_indirect(mem: &GuestMemoryMmap, table: u64, size: u16, head: u16) -> bool {
    let mut index = head;
    for _ in 0..size {
        let Some(addr) = GuestAddress(table).checked_add(u64::from(index) * 16) else {
            return false;
        };
        let Ok(desc) = mem.read_obj::<Descriptor>(addr) else {
            return false;
        };
        if desc.refers_to_indirect_table() {
            return true;
        }
        if !desc.has_next() || desc.next() >= size {
            return false;
        }
        index = desc.next();
    }
    false
}

/// Whether `queue`'s rings lie in guest memory: virtio-queue's `is_valid` without its error
/// line, which a guest could repeat with every reset and DRIVER_OK.
pub fn queue_in_memory(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    let size = u64::from(queue.size());
    let fits = |addr: u64, len: u64, access: Permissions| {
        usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len, access))
    };
    queue.ready()
        && fits(queue.desc_table(), 16 * size, Permissions::Read)
        && fits(queue.avail_ring(), 6 + 2 * size, Permissions::Read)
        && fits(queue.used_ring(), 6 + 8 * size, Permissions::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::desc;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::mock::MockSplitQueue;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn indirect_chains_are_refused_unless_negotiated() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.add_desc_chains(
            &[
                // 0: direct.
                desc(0x8000, 16, 0, 0),
                // 1: indirect in the middle of a chain (1 -> 2).
                desc(0x8000, 16, VRING_DESC_F_NEXT, 2),
                desc(0x9000, 32, VRING_DESC_F_INDIRECT, 0),
                // 3: direct again.
                desc(0x8000, 8, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let heads: Vec<u16> = std::iter::from_fn(|| pop_chain(&mut queue, &mem, false))
            .map(|c| c.head_index())
            .collect();
        assert_eq!(heads, vec![0, 3]);
        // The refused chain went back to the driver, empty.
        assert_eq!(mock.used().idx().load(), 1);
        let elem = mock.used().ring().ref_at(0).unwrap().load();
        assert_eq!((elem.id(), elem.len()), (1, 0));

        let mut queue: Queue = mock.create_queue().unwrap();
        let heads: Vec<u16> = std::iter::from_fn(|| pop_chain(&mut queue, &mem, true))
            .map(|c| c.head_index())
            .collect();
        assert_eq!(heads, vec![0, 1, 3]);
    }

    #[test]
    fn an_avail_index_far_ahead_yields_nothing() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.add_desc_chains(&[desc(0x8000, 16, 0, 0)], 0).unwrap();
        mock.avail().idx().store(u16::to_le(1000));
        let mut queue: Queue = mock.create_queue().unwrap();
        assert!(pop_chain(&mut queue, &mem, false).is_none());
        assert_eq!(queue.next_avail(), 0);
    }

    #[test]
    fn rearm_says_more_only_for_chains_pop_chain_serves() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.add_desc_chains(&[desc(0x8000, 16, 0, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        assert!(rearm(&mut queue, &mem), "one chain posted");
        assert!(pop_chain(&mut queue, &mem, false).is_some());
        assert!(!rearm(&mut queue, &mem), "all taken");
        // An index more than a queue ahead: "more" for virtio-queue, nothing for us (a
        // device that looped on it spun until a reset; found by fuzz target net_queue).
        mock.avail().idx().store(u16::to_le(1000));
        assert!(queue.enable_notification(&mem).unwrap());
        assert!(!rearm(&mut queue, &mem));
    }

    #[test]
    fn heads_outside_the_table_are_skipped() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.add_desc_chains(&[desc(0x8000, 16, 0, 0)], 0).unwrap();
        // Two avail entries: head 200 (outside a 16-entry table), then head 0.
        mock.avail()
            .ring()
            .ref_at(0)
            .unwrap()
            .store(u16::to_le(200));
        mock.avail().ring().ref_at(1).unwrap().store(0);
        mock.avail().idx().store(u16::to_le(2));
        let mut queue: Queue = mock.create_queue().unwrap();
        assert_eq!(pop_chain(&mut queue, &mem, false).unwrap().head_index(), 0);
        assert_eq!(mock.used().idx().load(), 0);
    }

    #[test]
    fn queue_bounds_are_checked_quietly() {
        let mem = memory();
        let mut queue = Queue::new(16).unwrap();
        assert!(!queue_in_memory(&queue, &mem), "not ready");
        queue.set_ready(true);
        assert!(queue_in_memory(&queue, &mem));
        queue.set_used_ring_address(Some(0xf_fff0), None);
        assert!(!queue_in_memory(&queue, &mem));
    }
}
