//! Devices of the chapeau VMM: the buses vCPU exits are dispatched on, and the devices on them.
//! Nothing here knows about KVM or the API: interrupts leave through `EventFd`s the VMM wires to
//! irqfds, and requests to end the VM leave through an [`ExitNotifier`].

pub mod bus;
pub mod exit;
pub mod host_files;
pub mod host_stdout;
pub mod legacy;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitNotifier, ExitReason};
pub mod pci;
pub mod rate_limit;
pub mod readonly_memory;
pub mod unix_socket;
pub mod virtio;
