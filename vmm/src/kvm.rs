//! KVM itself: opening /dev/kvm, checking what we need, and creating the VM with the in-kernel
//! irqchip, PIT and our guest memory.

use std::path::Path;

use kvm_bindings::{
    kvm_pit_config, kvm_reinject_control, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
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
/// speaker and lost ticks discarded (QEMU's `kvm-pit.losttickpolicy=discard`: a guest that was
/// not scheduled does not get a burst of catch-up ticks), and the guest RAM slots.
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
    let reinject = kvm_reinject_control {
        pit_reinject: 0,
        ..Default::default()
    };
    // SAFETY: KVM_REINJECT_CONTROL reads one kvm_reinject_control that lives across the call;
    // the fd is a VM fd we own.
    let ret = unsafe { ioctl_with_ref(&vm, KVM_REINJECT_CONTROL(), &reinject) };
    if ret < 0 {
        return Err(KvmError::Ioctl {
            op: "REINJECT_CONTROL",
            source: kvm_ioctls::Error::last(),
        });
    }
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
