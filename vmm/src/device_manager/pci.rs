//! The PCI root bus and the resources its devices get (slots, BARs from the layout's windows,
//! GSIs, irqfds, ioeventfds, MSI routes), and the virtio devices on it.
//!
//! Everything is wired before the vCPUs start, on the `vmm` thread; afterwards only the
//! guest's MSI-X programming (routes, from vCPU threads) and BAR moves change KVM state.

use std::sync::{Arc, Mutex, Weak};

use devices::pci::virtio_pci::{self, TransportCounters, VirtioPciDevice};
use devices::pci::{
    BarRelocator, BarReprogram, MsixVector, PciConfigIo, PciConfigMmio, PciDevice, PciRoot,
};
use devices::virtio::{DeviceCounters, VirtioDevice};
use devices::Bus;
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::DeviceError;
use crate::arch::x86_64::layout;
use crate::event_loop::Subscriber;
use crate::vstate::vm::KvmMsiRouting;

/// Follows a guest's BAR move: the device's MMIO range and its ioeventfds go to the new place.
/// Holds the MMIO bus weakly: the bus holds the PCI root (ECAM), which holds this.
struct BarMover {
    vm: Arc<VmFd>,
    mmio: Weak<Bus>,
}

impl BarRelocator for BarMover {
    fn move_bar(&self, device: &mut dyn PciDevice, m: &BarReprogram) -> Result<(), String> {
        let mmio = self.mmio.upgrade().ok_or("the VM is shutting down")?;
        mmio.relocate(m.old, m.new).map_err(|e| e.to_string())?;
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

pub struct PciDevices {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    mmio: Arc<Bus>,
    pci: Arc<PciRoot>,
    routing: Arc<KvmMsiRouting>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    gsis: IdAllocator,
    virtio: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    /// Each virtio device's metrics id (`net0`, `fs/TAG`, ...) and its transport's counters,
    /// in the order of `virtio`.
    counters: Vec<(String, TransportCounters)>,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DeviceError {
    move |source| DeviceError::Kvm { op, source }
}

impl PciDevices {
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
            mmio: Arc::downgrade(&mmio),
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
            counters: Vec::new(),
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
    /// is also run by the event loop (see `subscribers`). `id` names it in the metrics.
    /// Returns its slot.
    pub fn add_virtio_device(
        &mut self,
        id: String,
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
        let counters = transport.counters();
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
        self.counters.push((id, counters));
        Ok(slot)
    }

    /// The virtio devices, in the order they were added.
    pub fn virtio_devices(&self) -> &[Arc<Mutex<dyn VirtioDevice>>] {
        &self.virtio
    }

    /// Each virtio device's metrics id with its counters: the transport's (kicks, interrupts)
    /// then the device's own.
    pub fn virtio_counters(&self) -> Vec<(&str, DeviceCounters)> {
        self.virtio
            .iter()
            .zip(&self.counters)
            .map(|(device, (id, transport))| {
                let mut counters = device.lock().unwrap_or_else(|p| p.into_inner()).counters();
                counters.counters.splice(0..0, transport.counters());
                (id.as_str(), counters)
            })
            .collect()
    }

    /// The virtio devices as event-loop subscribers.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.virtio
            .iter()
            .map(|d| Arc::new(Mutex::new(DeviceSubscriber(d.clone()))) as Subscriber)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole wiring against the real KVM, when this host has one.
    #[test]
    fn rng_on_pci_with_kvm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 16 << 20)]).unwrap();
        let vm = Arc::new(crate::vstate::vm::create_vm(&kvm, &mem).unwrap());
        let mut dm = PciDevices::new(vm, &mem, 16 << 20).unwrap();
        let pio = Bus::new();
        dm.attach_pci(&pio).unwrap();
        let rng = devices::virtio::rng::Rng::new(std::path::Path::new("/dev/urandom")).unwrap();
        let rng = Arc::new(Mutex::new(rng));
        assert_eq!(dm.add_virtio_device("rng".into(), rng).unwrap(), 1);
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
