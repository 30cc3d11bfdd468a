//! PCI: the root bus, configuration space, MSI-X and the virtio-pci transport.
//!
//! One bus (bus 0), reached through configuration mechanism #1 (ports 0xcf8/0xcfc) and ECAM
//! (MMCONFIG, 4 KiB per function). Devices are single-function. BARs are assigned by the VMM
//! before boot and described to the guest by the DSDT's host bridge windows, so Linux keeps
//! them; a guest that moves a BAR anyway is followed through [`BarRelocator`].

pub mod config;
pub mod msix;
pub mod root;
pub mod virtio_pci;

pub use config::{PciConfig, PciHeader};
pub use msix::{MsiRouting, Msix, MsixVector};
pub use root::{PciConfigIo, PciConfigMmio, PciRoot};
pub use virtio_pci::VirtioPciDevice;

/// PCI vendor id of virtio devices (Red Hat / Qumranet).
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;
/// Slots on our one bus.
pub const NUM_SLOTS: usize = 32;

/// A BAR as the VMM maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBarRegion {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
}

/// The guest moved a BAR from `old` to `new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarReprogram {
    pub index: usize,
    pub old: u64,
    pub new: u64,
    pub size: u64,
}

/// A function on the bus, as configuration accesses see it.
pub trait PciDevice: Send {
    /// Reads `data.len()` bytes (1, 2 or 4) at `offset` in configuration space.
    fn read_config(&mut self, offset: usize, data: &mut [u8]);
    /// Writes configuration space; returns a BAR move the VMM must carry out.
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarReprogram>;
    /// The addresses whose writes KVM turns into eventfd signals (ioeventfds) when BAR
    /// `bar` sits at `base`: the VMM registers them, and moves them with the BAR.
    fn ioeventfds(&self, _bar: usize, _base: u64) -> Vec<(u64, &vmm_sys_util::eventfd::EventFd)> {
        Vec::new()
    }
    /// The guest could not get the move it asked for: the BAR stays mapped at `move_.old`.
    fn revert_bar(&mut self, _move_: &BarReprogram) {}
}

/// Carries out BAR moves: remaps the device on the MMIO bus and moves its ioeventfds. Called
/// on a vCPU thread with the device locked; implemented by the VMM.
pub trait BarRelocator: Send + Sync {
    fn move_bar(&self, device: &mut dyn PciDevice, move_: &BarReprogram) -> Result<(), String>;
}
