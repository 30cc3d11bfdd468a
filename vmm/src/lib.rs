//! chapeau's VMM: turns a `VmConfig` into a running KVM guest and runs it to its end.

pub mod arch;
pub mod cli;
pub mod device_manager;
pub mod event_loop;
pub mod host_files;
pub mod kvm;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod pmem;
pub mod pvm;
pub mod seccomp;
pub mod vcpu;

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use api::{PvmParams, SerialConfig, VmConfig};
use devices::legacy::{AcpiPowerDevice, Serial, I8042};
use devices::{Bus, ExitNotifier, ExitReason};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use arch::x86_64::{acpi, boot_params, layout, regs};
use event_loop::{ConsoleInput, EventLoop, TerminationSignals};
use seccomp::SeccompFilters;
use vcpu::{Vcpu, VcpuContext};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
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
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    EventLoop(#[from] event_loop::EventLoopError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot open serial output {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up {what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot register the {device} interrupt (GSI {gsi}): {source}")]
    Irqfd {
        device: &'static str,
        gsi: u32,
        source: kvm_ioctls::Error,
    },
    #[error("device layout: {0}")]
    Bus(#[from] devices::BusError),
    #[error(transparent)]
    Devices(#[from] device_manager::DeviceError),
    #[error(transparent)]
    Rng(#[from] devices::virtio::rng::RngError),
    #[error(transparent)]
    Console(#[from] devices::virtio::console::ConsoleError),
    #[error(transparent)]
    Pmem(#[from] pmem::PmemError),
    #[error("virtio-pmem: {0}")]
    PmemDevice(#[from] devices::virtio::pmem::PmemDeviceError),
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

fn serial_output(config: &SerialConfig) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match config {
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        SerialConfig::Off => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(|source| VmmError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

/// Restores the terminal's cooked mode when the VM ends, however it ends.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        stdin.lock().set_raw_mode().ok().map(|_| RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// Legacy devices on the PIO bus: COM1, the i8042 and the ACPI sleep/reset register.
fn legacy_devices(
    vm: &VmFd,
    config: &VmConfig,
    exit: &Arc<ExitNotifier>,
) -> Result<(Bus, Arc<Mutex<Serial>>), VmmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Setup {
        what: "the serial interrupt",
        source,
    })?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
        .map_err(|source| VmmError::Irqfd {
            device: "serial",
            gsi: layout::COM1_IRQ,
            source,
        })?;
    let serial = Arc::new(Mutex::new(Serial::new(
        serial_irq,
        serial_output(&config.serial)?,
    )));

    let pio = Bus::new();
    pio.insert(serial.clone(), u64::from(layout::COM1_PORT), 8)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    // Data port 0x60 through command port 0x64, one device.
    pio.insert(i8042, u64::from(layout::I8042_DATA_PORT), 5)?;
    let acpi_power = Arc::new(Mutex::new(AcpiPowerDevice::new(
        exit.clone(),
        layout::ACPI_S5_SLEEP_TYPE,
        layout::ACPI_RESET_VALUE,
    )));
    pio.insert(acpi_power, u64::from(layout::ACPI_SLEEP_CONTROL_PORT), 2)?;
    Ok((pio, serial))
}

fn load_guest(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    cmdline: &str,
    pmem: &[pmem::PmemRegion],
) -> Result<vm_memory::GuestAddress, VmmError> {
    let kernel = loader::load_kernel(mem, &config.boot.kernel)?;
    let initrd = match &config.boot.initrd {
        Some(path) => Some(loader::load_initrd(mem, path, &kernel)?),
        None => None,
    };
    let cmdline_size = loader::load_kernel_cmdline(mem, cmdline)?;
    let platform = acpi::Platform {
        pci: device_manager::wants_pci(config),
        nvdimms: pmem
            .iter()
            .filter(|region| region.config.model == api::PmemModel::Nvdimm)
            .map(|region| acpi::Nvdimm {
                gpa: region.gpa,
                size: region.size,
                readonly: region.config.readonly,
            })
            .collect(),
    };
    let rsdp = acpi::create_acpi_tables(mem, config.machine.vcpus, &platform)?;
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

/// Builds the VM described by `config`, runs it, and returns why it ended.
pub fn run_vm(config: &VmConfig) -> Result<ExitReason, VmmError> {
    // This thread becomes the event loop; named first so its log lines say so.
    name_current_thread(seccomp::VMM_THREAD);
    // Taken before anything opens a descriptor that could land on fd 0.
    let stdin = (config.serial == SerialConfig::Stdout && event_loop::fd_is_open(0))
        // SAFETY: fd 0 is open and from here on owned by the console input alone.
        .then(|| unsafe { OwnedFd::from_raw_fd(0) });
    let build_start = std::time::Instant::now();
    let phase =
        |name: &str| log::debug!("{name} done at +{} us", build_start.elapsed().as_micros());
    let filters = Arc::new(SeccompFilters::builtin()?);
    let vcpus = config.machine.vcpus;

    let kvm = kvm::open_kvm(vcpus)?;
    phase("open /dev/kvm");
    let mem = memory::create_guest_memory(config.machine.memory_mib, config.machine.thp)?;
    phase("guest memory");
    let pmem = pmem::open_images(&config.pmem, config.machine.memory_mib << 20)?;
    phase("map pmem images");
    let vm = Arc::new(kvm::create_vm(&kvm, &mem)?);
    pmem::register_slots(&vm, &pmem, mem.iter().count() as u32)?;
    phase("create VM");
    let cmdline = effective_cmdline(config, pvm::is_pvm_host());
    let entry = load_guest(&mem, config, &cmdline, &pmem)?;
    phase("load kernel, initrd, tables");

    let exit = Arc::new(ExitNotifier::new().map_err(|source| VmmError::Setup {
        what: "the exit event",
        source,
    })?);
    let (pio, serial) = legacy_devices(&vm, config, &exit)?;
    let devices = device_manager::build_devices(&vm, &mem, config, &pio, &pmem)?;
    let context = VcpuContext {
        pio: Arc::new(pio),
        mmio: devices.mmio_bus(),
        exit: exit.clone(),
        exit_count: Arc::new(AtomicU64::new(0)),
    };

    let kvm_error = |op| move |source| kvm::KvmError::Ioctl { op, source };
    let supported_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_error("GET_SUPPORTED_CPUID"))?;
    let supported_msrs = kvm
        .get_msr_index_list()
        .map_err(kvm_error("GET_MSR_INDEX_LIST"))?;
    let vcpu_list = (0..vcpus)
        .map(|index| {
            Vcpu::new(
                &vm,
                index,
                vcpus,
                &supported_cpuid,
                supported_msrs.as_slice(),
                entry,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut event_loop = EventLoop::new(exit.clone())?;
    // Blocked before the vCPU threads exist, so they inherit the mask and only the signalfd
    // sees SIGTERM/SIGINT.
    event_loop.add(Arc::new(Mutex::new(TerminationSignals::new(exit.clone())?)));
    let _terminal = stdin.as_ref().and_then(|_| RawTerminal::enter());
    if let Some(fd) = stdin {
        event_loop.add(Arc::new(Mutex::new(ConsoleInput::new(fd, serial))));
    }
    for subscriber in devices.subscribers() {
        event_loop.add(subscriber);
    }

    phase("vCPUs and devices");
    let started = std::time::Instant::now();
    for vcpu in vcpu_list {
        vcpu.start(context.clone(), filters.clone())?;
    }
    seccomp::apply(&filters, seccomp::VMM_THREAD)?;

    let reason = event_loop.run()?;
    let elapsed = started.elapsed();
    let exits = context.exit_count.load(Ordering::Relaxed);
    log::info!(
        "VM ended ({reason:?}) after {:.3} s; {exits} vCPU exits ({:.0}/s)",
        elapsed.as_secs_f64(),
        exits as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    log::info!(
        "PCI configuration space accesses (each a vCPU exit): {}",
        devices.pci_config_exits()
    );
    Ok(reason)
}

/// Names the calling thread (what `ps -T` and /proc/<pid>/task/<tid>/comm show).
fn name_current_thread(name: &str) {
    let mut buf = [0u8; 16];
    let len = name.len().min(15);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `buf`.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
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
