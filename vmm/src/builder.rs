//! `VmConfig` → a built VM, top to bottom: KVM, guest memory, pmem images, the VM, the kernel
//! and its boot tables, the devices, the vCPUs. Nothing runs yet: the runtime (`vmm.rs`) starts
//! the vCPUs and owns what this returns.

use std::sync::Arc;
use std::time::Instant;

use api::{PvmParams, VmConfig};
use devices::virtio::ThreadConfinement;
use devices::ExitNotifier;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::x86_64::{acpi, boot_params, regs};
use crate::device_manager::{self, pmem, DeviceManager};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{self, KvmError};
use crate::{loader, memory, pvm};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("zero page: {0}")]
    BootParams(#[from] boot_params::BootParamsError),
    #[error("boot tables: {0}")]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Pmem(#[from] pmem::PmemError),
    #[error(transparent)]
    Devices(#[from] device_manager::DeviceError),
    #[error("cannot start the vm-setup thread: {0}")]
    Helper(std::io::Error),
}

/// A VM ready to run: everything but the vCPU threads.
pub struct BuiltVm {
    pub vm: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub devices: DeviceManager,
    pub vcpus: Vec<Vcpu>,
}

/// The kernel command line the guest gets: the user's, plus what a PVM host needs.
pub fn effective_cmdline(config: &VmConfig, pvm_host: bool) -> String {
    let wanted = match config.boot.pvm_params {
        PvmParams::Auto => pvm_host,
        PvmParams::On => true,
        PvmParams::Off => false,
    };
    if wanted {
        let line = pvm::with_pvm_params(&config.boot.cmdline);
        log::info!(
            "PVM host: appended guest kernel parameters (turn off with --pvm-params off): {line}"
        );
        line
    } else {
        config.boot.cmdline.clone()
    }
}

/// Loads the kernel, initrd and command line and writes the tables the kernel reads at entry
/// (ACPI, zero page, page tables and GDT); returns the entry point.
fn load_guest(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    platform: &acpi::Platform,
) -> Result<GuestAddress, BuildError> {
    let kernel = loader::load_kernel(mem, &config.boot.kernel)?;
    let initrd = match &config.boot.initrd {
        Some(path) => Some(loader::load_initrd(mem, path, &kernel)?),
        None => None,
    };
    let cmdline = effective_cmdline(config, pvm::is_pvm_host());
    let cmdline_size = loader::load_kernel_cmdline(mem, &cmdline)?;
    let rsdp = acpi::create_acpi_tables(mem, config.machine.vcpus, platform)?;
    let params = boot_params::build_boot_params(&boot_params::BootInfo {
        setup_header: kernel.setup_header,
        cmdline_size,
        initrd,
        rsdp,
        mem_size: config.machine.memory_mib << 20,
    })?;
    boot_params::write_boot_params(mem, &params)?;
    regs::write_boot_tables(mem)?;
    Ok(kernel.entry)
}

/// Builds the VM `config` describes. `exit` is where its vCPUs and devices report the end;
/// device threads are confined with `confinement`.
pub fn build_vm(
    config: &VmConfig,
    exit: &Arc<ExitNotifier>,
    confinement: &Arc<dyn ThreadConfinement>,
) -> Result<BuiltVm, BuildError> {
    let start = Instant::now();
    let phase = |name: &str| log::debug!("{name} done at +{} us", start.elapsed().as_micros());
    let vcpu_count = config.machine.vcpus;

    let kvm = vm::open_kvm(vcpu_count)?;
    phase("open /dev/kvm");
    let mem = memory::create_guest_memory(config.machine.memory_mib, config.machine.thp)?;
    phase("guest memory");
    let images = pmem::open_images(&config.pmem, config.machine.memory_mib << 20)?;
    phase("map pmem images");
    let platform = device_manager::platform(config, &images);
    // The VM is created on a helper thread while this one loads the kernel: its ioctls spend
    // most of their time asleep in the kernel (the first SRCU grace period of a new VM, in
    // KVM_SET_USER_MEMORY_REGION: up to 10 ms on a loaded PVM host), and
    // the load needs only the memory, not the VM. The helper ends before this block does, and
    // no seccomp filter is in force before the VM is built, so it needs none of its own.
    let (vm, entry, (supported_cpuid, supported_msrs)) = std::thread::scope(|scope| {
        let creating = std::thread::Builder::new()
            .name("vm-setup".into())
            .spawn_scoped(scope, || -> Result<VmFd, BuildError> {
                // The allocator's once-per-process set-up needs a thread other than the
                // main one: this one, alongside the kernel load, spares starting another.
                crate::seccomp::warm_up_allocator();
                let vm = vm::create_vm(&kvm, &mem)?;
                pmem::register_slots(&vm, &images, mem.iter().count() as u32)?;
                phase("create VM (vm-setup thread)");
                Ok(vm)
            })
            .map_err(BuildError::Helper)?;
        let loaded = load_guest(&mem, config, &platform);
        phase("load kernel, initrd, tables");
        // What the vCPUs may be given, asked of /dev/kvm while the VM is still being created.
        let kvm_error = |op| move |source| KvmError::Ioctl { op, source };
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("GET_SUPPORTED_CPUID"))
            .and_then(|cpuid| {
                let msrs = kvm
                    .get_msr_index_list()
                    .map_err(kvm_error("GET_MSR_INDEX_LIST"))?;
                Ok((cpuid, msrs))
            });
        let created = creating
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok::<_, BuildError>((created?, loaded?, supported?))
    })?;
    let vm = Arc::new(vm);
    phase("VM created and guest loaded");

    let devices = DeviceManager::build(&vm, &mem, config, exit, images, confinement)?;

    let vcpus = (0..vcpu_count)
        .map(|index| {
            Vcpu::new(
                &vm,
                index,
                vcpu_count,
                &supported_cpuid,
                supported_msrs.as_slice(),
                entry,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    phase("vCPUs and devices");
    Ok(BuiltVm {
        vm,
        mem,
        devices,
        vcpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pvm_params: PvmParams) -> VmConfig {
        let mut config: VmConfig =
            serde_json::from_str(r#"{"boot": {"kernel": "/k", "cmdline": "console=ttyS0"}}"#)
                .unwrap();
        config.boot.pvm_params = pvm_params;
        config
    }

    #[test]
    fn pvm_parameters_follow_the_host_unless_forced() {
        let auto = config(PvmParams::Auto);
        assert_eq!(effective_cmdline(&auto, false), "console=ttyS0");
        assert!(effective_cmdline(&auto, true).contains("noxsave"));
        assert!(effective_cmdline(&config(PvmParams::On), false).contains("pvm_syscall"));
        assert_eq!(
            effective_cmdline(&config(PvmParams::Off), true),
            "console=ttyS0"
        );
    }
}
