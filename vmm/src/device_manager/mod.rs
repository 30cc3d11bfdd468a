//! The device manager: all device wiring in one place. It builds the legacy devices on the PIO
//! bus, the PCI root bus and the virtio devices on it, the pmem images and their guards, and
//! describes the resulting platform for the ACPI tables. It owns every device for the VM's
//! life; dropping it removes them, and with them every file they created.

pub mod legacy;
pub mod net;
pub mod p9;
pub mod pci;
pub mod pmem;

use std::sync::{Arc, Mutex};

use api::{ConsoleConfig, PmemModel, VmConfig};
use devices::legacy::{AcpiGed, Serial, I8042};
use devices::pci::virtio_pci;
use devices::readonly_memory::ReadOnlyMemory;
use devices::virtio::console::{Console, ConsoleOutput, NamedPort};
use devices::virtio::pmem::Pmem;
use devices::virtio::rng::Rng;
use devices::virtio::ThreadConfinement;
use devices::{Bus, BusError, ExitNotifier};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::acpi;
use crate::event_loop::Subscriber;
use pci::PciDevices;
use pmem::PmemRegion;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("KVM_{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("out of {what}: {source}")]
    Allocate {
        what: &'static str,
        source: vm_allocator::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("virtio-pci: {0}")]
    VirtioPci(#[from] virtio_pci::VirtioPciError),
    #[error("PCI: {0}")]
    Pci(#[from] devices::pci::root::PciRootError),
    #[error(transparent)]
    HostFile(#[from] devices::host_files::HostFileError),
    #[error("serial output to stdout: {0}")]
    SerialStdout(std::io::Error),
    #[error(transparent)]
    Rng(#[from] devices::virtio::rng::RngError),
    #[error(transparent)]
    Console(#[from] devices::virtio::console::ConsoleError),
    #[error(transparent)]
    Pmem(#[from] pmem::PmemError),
    #[error("virtio-pmem: {0}")]
    PmemDevice(#[from] devices::virtio::pmem::PmemDeviceError),
    #[error("cannot open the virtio-pmem flush file: {0}")]
    PmemFlushFile(std::io::Error),
    #[error("virtio-net {0}")]
    Net(String),
    #[error("virtio-9p share {0}")]
    P9(String),
}

/// Whether the VM has PCI devices. A VM without any gets no PCI bus at all (no config ports,
/// no MCFG, no `PCI0`): the guest skips PCI enumeration, which costs boot time on hosts where
/// guest kernel code is emulated.
pub fn wants_pci(config: &VmConfig) -> bool {
    config.rng.is_some()
        || !config.net.is_empty()
        || !config.fs.is_empty()
        || config.has_virtio_console()
        || config.pmem.iter().any(|p| p.model == PmemModel::Virtio)
}

/// The platform the ACPI tables describe: the PCI bus if there is one, and the NVDIMMs.
pub fn platform(config: &VmConfig, pmem: &[PmemRegion]) -> acpi::Platform {
    acpi::Platform {
        pci: wants_pci(config),
        nvdimms: pmem
            .iter()
            .filter(|region| region.config.model == PmemModel::Nvdimm)
            .map(|region| acpi::Nvdimm {
                gpa: region.gpa,
                size: region.size,
                readonly: region.config.readonly,
            })
            .collect(),
    }
}

/// The console device's view of the configuration (devices does not depend on api).
fn console_device(config: &VmConfig) -> Result<Console, DeviceError> {
    let output = match &config.console {
        ConsoleConfig::Off => ConsoleOutput::Off,
        ConsoleConfig::Stdout => ConsoleOutput::Stdout,
        ConsoleConfig::File(path) => ConsoleOutput::File(path.clone()),
        ConsoleConfig::Socket(path) => ConsoleOutput::Socket(path.clone()),
    };
    let ports: Vec<NamedPort> = config
        .ports
        .iter()
        .map(|port| NamedPort {
            name: port.name.clone(),
            socket: port.socket.clone(),
        })
        .collect();
    Ok(Console::new(&output, &ports)?)
}

/// Every device of one VM.
pub struct DeviceManager {
    pio: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    ged: Arc<Mutex<AcpiGed>>,
    i8042: Arc<Mutex<I8042>>,
    pci: PciDevices,
    /// Mapped images; the mappings must outlive the VM's memory slots.
    _pmem: Vec<PmemRegion>,
}

impl DeviceManager {
    /// Builds the devices `config` asks for. `pmem` are the mapped images (already given KVM
    /// slots): the virtio ones get their device, and every read-only one a guard that drops
    /// the guest's writes to it. Devices with threads of their own confine them with
    /// `confinement`.
    pub fn build(
        vm: &Arc<VmFd>,
        mem: &GuestMemoryMmap,
        config: &VmConfig,
        exit: &Arc<ExitNotifier>,
        pmem: Vec<PmemRegion>,
        confinement: &Arc<dyn ThreadConfinement>,
    ) -> Result<Self, DeviceError> {
        let legacy = legacy::legacy_devices(vm, &config.serial, exit)?;
        let pio = legacy.pio;
        let mut pci = PciDevices::new(vm.clone(), mem, config.machine.memory_mib << 20)?;
        if wants_pci(config) {
            pci.attach_pci(&pio)?;
        }
        if let Some(rng) = &config.rng {
            let device = Arc::new(Mutex::new(Rng::new(&rng.source)?));
            pci.add_virtio_device("rng".into(), device)?;
        }
        for (index, interface) in config.net.iter().enumerate() {
            let device = net::net_device(index, interface, confinement)?;
            pci.add_virtio_device(format!("net{index}"), Arc::new(Mutex::new(device)))?;
        }
        for share in &config.fs {
            let device = p9::p9_device(share, confinement)?;
            pci.add_virtio_device(format!("fs/{}", share.tag), Arc::new(Mutex::new(device)))?;
        }
        if config.has_virtio_console() {
            let device = Arc::new(Mutex::new(console_device(config)?));
            pci.add_virtio_device("console".into(), device)?;
        }
        for (index, region) in pmem.iter().enumerate() {
            if region.config.readonly {
                let guard = ReadOnlyMemory::new(
                    format!("pmem image {}", region.config.file.display()),
                    region.gpa,
                );
                pci.mmio_bus()
                    .insert(Arc::new(Mutex::new(guard)), region.gpa, region.size)?;
            }
            if region.config.model == PmemModel::Virtio {
                let file = region.flush_file().map_err(DeviceError::PmemFlushFile)?;
                let device = Pmem::new(region.gpa, region.size, file)?;
                pci.add_virtio_device(format!("pmem{index}"), Arc::new(Mutex::new(device)))?;
            }
        }
        Ok(Self {
            pio: Arc::new(pio),
            serial: legacy.serial,
            ged: legacy.ged,
            i8042: legacy.i8042,
            pci,
            _pmem: pmem,
        })
    }

    pub fn pio_bus(&self) -> Arc<Bus> {
        self.pio.clone()
    }

    pub fn mmio_bus(&self) -> Arc<Bus> {
        self.pci.mmio_bus()
    }

    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// What the `vmm` event loop runs for the devices.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.pci.subscribers()
    }

    /// Stops the devices' own threads from touching guest memory (see `VirtioDevice::pause`).
    pub fn pause(&self) {
        for device in self.pci.virtio_devices() {
            device.lock().unwrap_or_else(|p| p.into_inner()).pause();
        }
    }

    pub fn resume(&self) {
        for device in self.pci.virtio_devices() {
            device.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
    }

    /// Per-device counters for the metrics, keyed by device id: `serial`, then the virtio
    /// devices (`rng`, `net0`, `fs/TAG`, `console` with its `ports`, `pmem0`), each with its
    /// transport's `kicks` and `interrupts` first.
    pub fn metrics(&self) -> serde_json::Value {
        fn object(counters: &[(&str, u64)]) -> serde_json::Map<String, serde_json::Value> {
            counters
                .iter()
                .map(|(name, value)| (name.to_string(), (*value).into()))
                .collect()
        }
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters();
        let mut devices = serde_json::Map::new();
        devices.insert(
            "pci_config_exits".into(),
            self.pci.pci_config_exits().into(),
        );
        devices.insert("serial".into(), object(&serial).into());
        for (id, counters) in self.pci.virtio_counters() {
            let mut value = object(&counters.counters);
            if !counters.ports.is_empty() {
                let ports = counters
                    .ports
                    .iter()
                    .map(|(name, port)| (name.clone(), object(port).into()))
                    .collect::<serde_json::Map<_, _>>();
                value.insert("ports".into(), ports.into());
            }
            devices.insert(id.to_string(), value.into());
        }
        devices.into()
    }

    /// Asks the guest to shut down (`SendCtrlAltDel`): presses the ACPI power button, which an
    /// ACPI guest's button driver reports, and types Ctrl-Alt-Del on the i8042 keyboard, which
    /// a guest with a keyboard driver acts on. Fails only if neither could be signalled.
    pub fn request_shutdown(&self) -> Result<(), String> {
        let button = self
            .ged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .press_power_button();
        let keyboard = self
            .i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send_ctrl_alt_del();
        match (button, keyboard) {
            (Err(b), Err(k)) => Err(format!("power button: {b}; keyboard: {k}")),
            _ => Ok(()),
        }
    }

    pub fn pci_config_exits(&self) -> u64 {
        self.pci.pci_config_exits()
    }
}
