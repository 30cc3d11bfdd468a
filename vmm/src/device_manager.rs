//! The device manager: the PCI root bus and the resources its devices get (slots, BARs from
//! the layout's windows, GSIs, irqfds, ioeventfds, MSI routes), and the virtio devices it
//! puts on it.
//!
//! Everything is wired before the vCPUs start, on the `vmm` thread; afterwards only the
//! guest's MSI-X programming (routes, from vCPU threads) and BAR moves change KVM state.

use devices::virtio::console::{Console, ConsoleError, ConsoleOutput, NamedPort};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::msix::MsiRouting;
use devices::pci::virtio_pci::{self, VirtioPciDevice};
use devices::pci::{
    BarRelocator, BarReprogram, MsixVector, PciConfigIo, PciConfigMmio, PciDevice, PciRoot,
};
use devices::readonly_memory::ReadOnlyMemory;
use devices::virtio::pmem::Pmem;
use devices::virtio::VirtioDevice;
use devices::{Bus, BusError};
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout;
use crate::event_loop::Subscriber;
use crate::pmem::PmemRegion;

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

/// Follows a guest's BAR move: the device's MMIO range and its ioeventfds go to the new place.
struct BarMover {
    vm: Arc<VmFd>,
    mmio: Arc<Bus>,
}

impl BarRelocator for BarMover {
    fn move_bar(&self, device: &mut dyn PciDevice, m: &BarReprogram) -> Result<(), String> {
        self.mmio
            .relocate(m.old, m.new)
            .map_err(|e| e.to_string())?;
        for (addr, fd) in device.ioeventfds(m.index, m.old) {
            let _ = self
                .vm
                .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch);
        }
        for (addr, fd) in device.ioeventfds(m.index, m.new) {
            if let Err(e) = self
                .vm
                .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            {
                // The transport still forwards kicks that exit to us, only slower.
                log::warn!("cannot move the ioeventfd at {addr:#x}: {e}");
            }
        }
        Ok(())
    }
}

/// Lets the event loop run a virtio device it knows only as `Arc<Mutex<dyn VirtioDevice>>`.
struct DeviceSubscriber(Arc<Mutex<dyn VirtioDevice>>);

impl MutEventSubscriber for DeviceSubscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .process(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).init(ops);
    }
}

pub struct DeviceManager {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    mmio: Arc<Bus>,
    pci: Arc<PciRoot>,
    routing: Arc<KvmMsiRouting>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    gsis: IdAllocator,
    virtio: Vec<Arc<Mutex<dyn VirtioDevice>>>,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DeviceError {
    move |source| DeviceError::Kvm { op, source }
}

impl DeviceManager {
    /// The PCI root (host bridge, ECAM on a new MMIO bus) and the VM's GSI routing table.
    pub fn new(vm: Arc<VmFd>, mem: &GuestMemoryMmap, mem_size: u64) -> Result<Self, DeviceError> {
        // KVM starts with the default irqchip routes, which our table repeats: nothing to
        // install until the guest programs its first MSI-X vector.
        let routing = Arc::new(KvmMsiRouting::new(vm.clone()));
        let alloc = |what, base, size| {
            AddressAllocator::new(base, size)
                .map_err(|source| DeviceError::Allocate { what, source })
        };
        let (mmio64_start, mmio64_size) = layout::pci_mmio64_window(mem_size);
        let mmio = Arc::new(Bus::new());
        let pci = Arc::new(PciRoot::new());
        pci.set_relocator(Arc::new(BarMover {
            vm: vm.clone(),
            mmio: mmio.clone(),
        }));
        Ok(Self {
            vm,
            mem: mem.clone(),
            mmio,
            pci,
            routing,
            mmio32: alloc(
                "32-bit PCI memory",
                layout::PCI_MMIO32_START,
                layout::PCI_MMIO32_SIZE,
            )?,
            mmio64: alloc("64-bit PCI memory", mmio64_start, mmio64_size)?,
            gsis: IdAllocator::new(layout::MSI_GSI_START, layout::MSI_GSI_END).map_err(
                |source| DeviceError::Allocate {
                    what: "GSIs",
                    source,
                },
            )?,
            virtio: Vec::new(),
        })
    }

    /// Makes the PCI bus visible: configuration mechanism #1 (ports 0xcf8-0xcff) on the PIO
    /// bus and ECAM on the MMIO bus. Without it the guest finds no PCI (as with `pci=off`).
    pub fn attach_pci(&self, pio: &Bus) -> Result<(), DeviceError> {
        self.mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(self.pci.clone()))),
            layout::PCI_MMCONFIG_START,
            layout::PCI_MMCONFIG_SIZE,
        )?;
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(self.pci.clone()))),
            u64::from(layout::PCI_CONFIG_IO_PORT),
            u64::from(layout::PCI_CONFIG_IO_LEN),
        )?;
        Ok(())
    }

    /// The MMIO bus the vCPUs dispatch on (ECAM and the devices' BARs).
    pub fn mmio_bus(&self) -> Arc<Bus> {
        self.mmio.clone()
    }

    pub fn pci_config_exits(&self) -> u64 {
        self.pci.config_exits()
    }

    /// A BAR of `size`: below 4 GiB while the 32-bit window has room (every guest handles
    /// those), else above RAM.
    fn allocate_bar(&mut self, size: u64) -> Result<u64, DeviceError> {
        match self.mmio32.allocate(size, size, AllocPolicy::FirstMatch) {
            Ok(range) => Ok(range.start()),
            Err(_) => self
                .mmio64
                .allocate(size, size, AllocPolicy::FirstMatch)
                .map(|range| range.start())
                .map_err(|source| DeviceError::Allocate {
                    what: "PCI memory",
                    source,
                }),
        }
    }

    /// Puts a virtio device on the PCI bus behind the virtio-pci transport: a slot, a BAR, one
    /// MSI-X vector per queue plus one (GSI + irqfd each), an ioeventfd per queue. The device
    /// is also run by the event loop (see `subscribers`). Returns its slot.
    pub fn add_virtio_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<u8, DeviceError> {
        let needed = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            VirtioPciDevice::vectors_needed(&*d)
        };
        let slot = self.pci.free_slot()?;
        let mut vectors = Vec::with_capacity(needed);
        for _ in 0..needed {
            let gsi = self
                .gsis
                .allocate_id()
                .map_err(|source| DeviceError::Allocate {
                    what: "GSIs",
                    source,
                })?;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
            // KVM accepts an irqfd on a GSI without a route yet; the route comes when the
            // guest programs the vector.
            self.vm.register_irqfd(&irqfd, gsi).map_err(kvm("IRQFD"))?;
            vectors.push(MsixVector { gsi, irqfd });
        }
        let bar = self.allocate_bar(virtio_pci::BAR_SIZE)?;
        let transport = VirtioPciDevice::new(
            device.clone(),
            self.mem.clone(),
            bar,
            vectors,
            self.routing.clone(),
        )?;
        for (addr, fd) in transport.ioeventfds(virtio_pci::BAR_INDEX, bar) {
            self.vm
                .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(kvm("IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), bar, virtio_pci::BAR_SIZE)?;
        let added = self.pci.add_device(transport)?;
        debug_assert_eq!(added, slot);
        let device_type = device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device_type();
        log::info!(
            "virtio device type {device_type} at PCI 00:{slot:02x}.0, BAR {bar:#x}, {needed} MSI-X vectors"
        );
        self.virtio.push(device);
        Ok(slot)
    }

    /// The virtio devices as event-loop subscribers.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.virtio
            .iter()
            .map(|d| Arc::new(Mutex::new(DeviceSubscriber(d.clone()))) as Subscriber)
            .collect()
    }
}

/// Whether the VM has PCI devices. A VM without any gets no PCI bus at all (no config ports,
/// no MCFG, no `PCI0`): the guest skips PCI enumeration, which costs boot time on hosts where
/// guest kernel code is emulated.
pub fn wants_pci(config: &api::VmConfig) -> bool {
    config.rng.is_some()
        || !config.fs.is_empty()
        || config.has_virtio_console()
        || config
            .pmem
            .iter()
            .any(|p| p.model == api::PmemModel::Virtio)
}

/// The console device's view of the configuration (devices does not depend on api).
fn console_device(config: &api::VmConfig) -> Result<Console, ConsoleError> {
    let output = match &config.console {
        api::ConsoleConfig::Off => ConsoleOutput::Off,
        api::ConsoleConfig::Stdout => ConsoleOutput::Stdout,
        api::ConsoleConfig::File(path) => ConsoleOutput::File(path.clone()),
        api::ConsoleConfig::Socket(path) => ConsoleOutput::Socket(path.clone()),
    };
    let ports: Vec<NamedPort> = config
        .ports
        .iter()
        .map(|port| NamedPort {
            name: port.name.clone(),
            socket: port.socket.clone(),
        })
        .collect();
    Console::new(&output, &ports)
}

/// Confines device threads with the seccomp filter of their kind.
struct SeccompConfinement(crate::seccomp::SeccompFilters);

impl devices::virtio::ThreadConfinement for SeccompConfinement {
    fn confine(&self, kind: &str) -> Result<(), String> {
        crate::seccomp::apply(&self.0, kind).map_err(|e| e.to_string())
    }
}

/// A virtio-9p device sharing `fs.path` as `fs.tag`, its workers under the `"9p"` filter.
fn p9_device(fs: &api::FsConfig) -> Result<devices::virtio::p9::P9, crate::VmmError> {
    use devices::virtio::p9::{server::ServerOptions, Ownership, P9};
    let options = ServerOptions {
        ownership: match fs.security_model {
            api::SecurityModel::None => Ownership::Vmm,
            api::SecurityModel::Passthrough => Ownership::Guest,
        },
        readonly: fs.readonly,
    };
    let confinement = Arc::new(SeccompConfinement(
        crate::seccomp::SeccompFilters::builtin()?
    ));
    P9::new(&fs.tag, &fs.path, options, confinement).map_err(|e| crate::VmmError::Setup {
        what: "a virtio-9p device",
        source: std::io::Error::other(e.to_string()),
    })
}

/// The PCI bus and the devices `config` asks for; adds the config ports to `pio`. `pmem` are
/// the mapped images: the virtio ones get their device, and every read-only one a guard that
/// drops the guest's writes to it.
pub fn build_devices(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    config: &api::VmConfig,
    pio: &Bus,
    pmem: &[PmemRegion],
) -> Result<DeviceManager, crate::VmmError> {
    let mut manager = DeviceManager::new(vm.clone(), mem, config.machine.memory_mib << 20)?;
    if wants_pci(config) {
        manager.attach_pci(pio)?;
    }
    if let Some(rng) = &config.rng {
        let device = devices::virtio::rng::Rng::new(&rng.source)?;
        manager.add_virtio_device(Arc::new(Mutex::new(device)))?;
    }
    if config.has_virtio_console() {
        let console = console_device(config)?;
        manager.add_virtio_device(Arc::new(Mutex::new(console)))?;
    }
    for fs in &config.fs {
        let device = p9_device(fs)?;
        manager.add_virtio_device(Arc::new(Mutex::new(device)))?;
    }
    for region in pmem {
        if region.config.readonly {
            let guard = ReadOnlyMemory::new(
                format!("pmem image {}", region.config.file.display()),
                region.gpa,
            );
            manager
                .mmio
                .insert(Arc::new(Mutex::new(guard)), region.gpa, region.size)?;
        }
        if region.config.model == api::PmemModel::Virtio {
            let file = region
                .flush_file()
                .map_err(|source| crate::VmmError::Setup {
                    what: "the virtio-pmem flush file",
                    source,
                })?;
            let device = Pmem::new(region.gpa, region.size, file)?;
            manager.add_virtio_device(Arc::new(Mutex::new(device)))?;
        }
    }
    Ok(manager)
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

    /// The whole wiring against the real KVM, when this host has one.
    #[test]
    fn rng_on_pci_with_kvm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 16 << 20)]).unwrap();
        let vm = Arc::new(crate::kvm::create_vm(&kvm, &mem).unwrap());
        let mut dm = DeviceManager::new(vm, &mem, 16 << 20).unwrap();
        let pio = Bus::new();
        dm.attach_pci(&pio).unwrap();
        let rng = devices::virtio::rng::Rng::new(std::path::Path::new("/dev/urandom")).unwrap();
        assert_eq!(dm.add_virtio_device(Arc::new(Mutex::new(rng))).unwrap(), 1);
        assert_eq!(dm.subscribers().len(), 1);
        // Vendor/device of 00:01.0 through ECAM and through 0xcf8.
        let mut d = [0u8; 4];
        assert!(dm
            .mmio_bus()
            .read(layout::PCI_MMCONFIG_START + (1 << 15), &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x1044_1af4);
        pio.write(0xcf8, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
        pio.read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1044_1af4);
        // Its BAR is in the 32-bit window and answers on the MMIO bus (num_queues = 1).
        let ecam = layout::PCI_MMCONFIG_START + (1 << 15);
        dm.mmio_bus().read(ecam + 0x10, &mut d);
        let bar = u64::from(u32::from_le_bytes(d) & !0xf);
        assert_eq!(bar, layout::PCI_MMIO32_START);
        let mut q = [0u8; 2];
        dm.mmio_bus().read(bar + 0x12, &mut q);
        assert_eq!(u16::from_le_bytes(q), 1);
        // Move the BAR: the old range goes quiet, the new one answers.
        let new_bar = layout::PCI_MMIO32_START + 0x10_0000;
        dm.mmio_bus()
            .write(ecam + 0x10, &((new_bar as u32) | 4).to_le_bytes());
        assert!(!dm.mmio_bus().read(bar + 0x12, &mut q));
        assert!(dm.mmio_bus().read(new_bar + 0x12, &mut q));
        assert_eq!(u16::from_le_bytes(q), 1);
        // A move onto ECAM is refused; the device stays put.
        dm.mmio_bus().write(
            ecam + 0x10,
            &((layout::PCI_MMCONFIG_START as u32) | 4).to_le_bytes(),
        );
        assert!(dm.mmio_bus().read(new_bar + 0x12, &mut q));
        assert!(dm.pci_config_exits() >= 5);
    }
}
