//! virtio-console's queues (port 0 and the multiport control queues), driven by a hostile
//! driver.
#![no_main]

use devices::virtio::console::{Console, ConsoleOutput, VIRTIO_CONSOLE_F_MULTIPORT};
use devices::virtio::VIRTIO_F_VERSION_1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(console) = Console::new(&ConsoleOutput::Off, &[]) else {
        return;
    };
    // The first byte says whether the driver takes MULTIPORT.
    let multiport = data.first().is_some_and(|b| b & 0x80 != 0);
    let features = VIRTIO_F_VERSION_1
        | if multiport {
            VIRTIO_CONSOLE_F_MULTIPORT
        } else {
            0
        };
    chapeau_fuzz::drive_device(console, features, data);
});
