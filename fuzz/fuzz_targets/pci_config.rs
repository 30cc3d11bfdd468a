//! The virtio-pci transport: configuration space (capabilities, BARs, MSI-X control) and BAR
//! accesses (common configuration, device configuration, notify, MSI-X table and PBA) in any
//! order, with DRIVER_OK activating a real device.
#![no_main]

use std::sync::{Arc, Mutex};

use chapeau_fuzz::Input;
use devices::pci::PciDevice;
use devices::virtio::console::{Console, ConsoleOutput};
use devices::virtio::fake_driver::pci_transport;
use devices::virtio::VirtioDevice;
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(console) = Console::new(&ConsoleOutput::Off, &[]) else {
        return;
    };
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(console));
    let Ok(mut pci) = pci_transport(device) else {
        return;
    };
    let mut input = Input(data);
    while !input.is_empty() {
        let op = input.u8();
        let len = [1usize, 2, 4, 8][usize::from(op >> 6)];
        let value = u64::from(input.u32()) | u64::from(input.u32()) << 32;
        let bytes = value.to_le_bytes();
        match op % 4 {
            // BAR: mostly the common configuration and the MSI-X table.
            0 => {
                let offset = u64::from(input.u8() & 0x3f);
                pci.write(offset, &bytes[..len]);
            }
            1 => {
                let offset = u64::from(input.u16());
                if op & 0x10 != 0 {
                    let mut out = [0u8; 8];
                    pci.read(offset, &mut out[..len]);
                } else {
                    pci.write(offset, &bytes[..len]);
                }
            }
            // Configuration space (4 KiB, ECAM-sized).
            2 => {
                let offset = usize::from(input.u16() & 0xfff);
                let len = len.min(4);
                if let Some(moved) = pci.write_config(offset, &bytes[..len]) {
                    if op & 0x20 != 0 {
                        pci.revert_bar(&moved);
                    }
                }
            }
            _ => {
                let offset = usize::from(input.u16() & 0xfff);
                let mut out = [0u8; 4];
                pci.read_config(offset, &mut out[..len.min(4)]);
                let _ = pci.ioeventfds(usize::from(op & 7), value);
            }
        }
    }
});
