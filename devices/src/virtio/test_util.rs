//! Test helpers shared by the virtio device tests.

use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

pub use super::fake_driver::CountingInterrupt;
use super::{ActivatedQueue, QueueNotify, VirtioDevice};

/// Activates a one-queue `device` on `mock`'s queue, kicked through `notify`; returns the
/// interrupt it was given, which counts what it raises.
pub fn activate_on_mock(
    device: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<GuestMemoryMmap>,
    notify: Arc<QueueNotify>,
) -> Arc<CountingInterrupt> {
    let interrupt = Arc::new(CountingInterrupt::default());
    let queue = mock.create_queue().unwrap();
    let queues = vec![ActivatedQueue { queue, notify }];
    device
        .activate(mem.clone(), interrupt.clone(), queues)
        .unwrap();
    interrupt
}

/// A split-ring descriptor.
pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// The (head id, length) of used ring entry `i`.
pub fn used(mock: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let elem = mock.used().ring().ref_at(i.into()).unwrap().load();
    (elem.id(), elem.len())
}
