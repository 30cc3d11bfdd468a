//! The VM handle: opening /dev/kvm, checking what we need, creating the VM with the in-kernel
//! irqchip, PIT and our guest memory; the VM's interrupt routing (MSI routes for the guest's
//! MSI-X vectors); and its clock across a pause.

use std::path::Path;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::msix::MsiRouting;
use kvm_bindings::{
    kvm_clock_data, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_irqchip, kvm_irq_routing_msi, kvm_pit_config, kvm_reinject_control,
    kvm_userspace_memory_region, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_io_nr;

use crate::arch::x86_64::layout;

pub const KVM_DEVICE: &str = "/dev/kvm";

/// What a VM of ours cannot run without.
const REQUIRED_CAPS: [(Cap, &str); 11] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::ReinjectControl, "PIT tick reinjection control"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::SetIdentityMapAddr, "identity map address"),
    (Cap::ExtCpuid, "extended CPUID"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::ImmediateExit, "immediate exit"),
    (Cap::ReadonlyMem, "read-only memory slots"),
];

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "{KVM_DEVICE} does not exist: this host has no KVM (load kvm-intel, kvm-amd or kvm-pvm)"
    )]
    Missing,
    #[error("cannot open {KVM_DEVICE}: {0}")]
    Open(kvm_ioctls::Error),
    #[error("{KVM_DEVICE} speaks KVM API version {0}, chapeau needs 12")]
    ApiVersion(i32),
    #[error("{KVM_DEVICE} lacks a capability chapeau needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM_{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM supports at most {max} vCPUs on this host, {requested} requested")]
    TooManyVcpus { requested: u8, max: usize },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// Opens /dev/kvm and checks the API version and capabilities up front, so a host that cannot
/// run us says so in one line instead of failing half-way through building the VM.
pub fn open_kvm(vcpus: u8) -> Result<Kvm, KvmError> {
    if !Path::new(KVM_DEVICE).exists() {
        return Err(KvmError::Missing);
    }
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(KvmError::ApiVersion(version));
    }
    if let Some((_, name)) = REQUIRED_CAPS
        .iter()
        .find(|(cap, _)| !kvm.check_extension(*cap))
    {
        return Err(KvmError::MissingCap(name));
    }
    let max = kvm.get_max_vcpus();
    if usize::from(vcpus) > max {
        return Err(KvmError::TooManyVcpus {
            requested: vcpus,
            max,
        });
    }
    Ok(kvm)
}

ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// Creates the VM: TSS and identity-map pages, in-kernel PIC/IOAPIC/LAPIC, PIT2 with a dummy
/// speaker (its lost ticks are discarded by [`discard_lost_pit_ticks`], once the vCPUs run), and
/// the guest RAM slots.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, KvmError> {
    let vm = kvm.create_vm().map_err(ioctl("CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(ioctl("SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(ioctl("SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(ioctl("CREATE_IRQCHIP"))?;
    let pit_config = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit_config).map_err(ioctl("CREATE_PIT2"))?;
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|_| KvmError::Ioctl {
                op: "SET_USER_MEMORY_REGION",
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which outlives the VM (the
        // VM is torn down before the memory, both at process exit).
        unsafe { vm.set_user_memory_region(region) }.map_err(ioctl("SET_USER_MEMORY_REGION"))?;
    }
    Ok(vm)
}

/// Makes the PIT discard the ticks a guest missed (QEMU's `kvm-pit.losttickpolicy=discard`): a
/// guest that was not scheduled does not get a burst of catch-up ticks. KVM creates the PIT
/// reinjecting, and turning that off waits for two SRCU grace periods (13-23 ms on a PVM host),
/// so this is done once the vCPUs run, long before any guest programs the PIT.
pub fn discard_lost_pit_ticks(vm: &VmFd) -> Result<(), KvmError> {
    let reinject = kvm_reinject_control {
        pit_reinject: 0,
        ..Default::default()
    };
    // SAFETY: KVM_REINJECT_CONTROL reads one kvm_reinject_control that lives across the call;
    // the fd is a VM fd we own.
    let ret = unsafe { ioctl_with_ref(vm, KVM_REINJECT_CONTROL(), &reinject) };
    if ret < 0 {
        return Err(KvmError::Ioctl {
            op: "REINJECT_CONTROL",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

/// Pins 0-15 reach both the PIC and the IOAPIC, 16-23 only the IOAPIC: KVM's default routing
/// (kvm_setup_default_irq_routing), which a KVM_SET_GSI_ROUTING replaces and so must repeat,
/// or the serial port's and the PIT's interrupts would stop.
const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

fn msi_route(gsi: u32, addr: u64, data: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: addr as u32,
                address_hi: (addr >> 32) as u32,
                data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// The routes KVM installs by default.
pub fn default_irq_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_PINS {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip_route(gsi, pic, gsi % 8));
        }
    }
    routes
}

/// The VM's GSI routing table: the default irqchip routes plus one MSI route per programmed
/// vector. KVM_SET_GSI_ROUTING replaces the whole table, so each change sends all of it.
pub struct KvmMsiRouting {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
}

impl KvmMsiRouting {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// The full table for the current MSI routes.
    fn table(msi: &BTreeMap<u32, (u64, u32)>) -> Vec<kvm_irq_routing_entry> {
        let mut routes = default_irq_routes();
        routes.extend(
            msi.iter()
                .map(|(gsi, (addr, data))| msi_route(*gsi, *addr, *data)),
        );
        routes
    }

    fn commit(&self, msi: &BTreeMap<u32, (u64, u32)>) -> std::io::Result<()> {
        let routes = Self::table(msi);
        let mut routing = KvmIrqRouting::new(routes.len())
            .map_err(|e| std::io::Error::other(format!("routing table: {e:?}")))?;
        routing.as_mut_slice().copy_from_slice(&routes);
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    /// Installs the table as it stands (at boot: the defaults).
    pub fn install(&self) -> std::io::Result<()> {
        let msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        self.commit(&msi)
    }
}

impl MsiRouting for KvmMsiRouting {
    fn set_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        let old = msi.insert(gsi, (addr, data));
        let result = self.commit(&msi);
        if result.is_err() {
            // Keep our table what KVM has.
            match old {
                Some(route) => msi.insert(gsi, route),
                None => msi.remove(&gsi),
            };
        }
        result
    }

    fn clear_route(&self, gsi: u32) -> std::io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        if msi.remove(&gsi).is_some() {
            self.commit(&msi)?;
        }
        Ok(())
    }
}

/// The guest's kvmclock, held still while the VM is paused (as QEMU does): without it the
/// guest's clock would jump by the length of the pause when it resumes.
pub struct PausedClock(kvm_clock_data);

impl PausedClock {
    /// Reads the clock as the vCPUs stop. `None` where KVM cannot (the guest then sees the
    /// pause as time passing, which is all a real machine would show).
    pub fn save(vm: &VmFd) -> Option<Self> {
        vm.get_clock().ok().map(PausedClock)
    }

    /// Sets the clock back to where it stood at the pause.
    pub fn restore(self, vm: &VmFd) {
        let clock = kvm_clock_data {
            clock: self.0.clock,
            ..Default::default()
        };
        if let Err(e) = vm.set_clock(&clock) {
            log::warn!("cannot restore the guest clock after the pause: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_mirror_kvm() {
        let routes = default_irq_routes();
        assert_eq!(routes.len(), 24 + 16);
        let find = |gsi: u32, chip: u32| {
            routes
                .iter()
                .find(|r| {
                    r.gsi == gsi
                        // SAFETY: every default route is an irqchip route.
                        && unsafe { r.u.irqchip.irqchip } == chip
                })
                // SAFETY: as above.
                .map(|r| unsafe { r.u.irqchip.pin })
        };
        assert_eq!(find(0, KVM_IRQCHIP_PIC_MASTER), Some(0));
        assert_eq!(find(0, KVM_IRQCHIP_IOAPIC), Some(0));
        assert_eq!(find(2, KVM_IRQCHIP_IOAPIC), Some(2));
        assert_eq!(find(4, KVM_IRQCHIP_PIC_MASTER), Some(4));
        assert_eq!(find(12, KVM_IRQCHIP_PIC_SLAVE), Some(4));
        assert_eq!(find(23, KVM_IRQCHIP_IOAPIC), Some(23));
        assert_eq!(find(16, KVM_IRQCHIP_PIC_SLAVE), None);
        assert!(routes.iter().all(|r| r.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    }

    #[test]
    fn msi_routes_follow_the_defaults() {
        let mut msi = BTreeMap::new();
        msi.insert(25, (0xfee0_1000u64, 0x41));
        let table = KvmMsiRouting::table(&msi);
        let last = table.last().unwrap();
        assert_eq!((last.gsi, last.type_), (25, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI route.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 0, 0x41));
    }
}
