//! Test helpers shared by the virtio device tests.

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

pub use super::fake_driver::CountingInterrupt;

/// A split-ring descriptor.
pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// The (head id, length) of used ring entry `i`.
pub fn used(mock: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let elem = mock.used().ring().ref_at(i.into()).unwrap().load();
    (elem.id(), elem.len())
}
