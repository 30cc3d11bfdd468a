//! virtio-rng's queue handling, driven by a hostile driver.
#![no_main]

use devices::virtio::rng::{Rng, DEFAULT_SOURCE};
use devices::virtio::VIRTIO_F_VERSION_1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(rng) = Rng::new(std::path::Path::new(DEFAULT_SOURCE)) else {
        return;
    };
    chapeau_fuzz::drive_device(rng, VIRTIO_F_VERSION_1, data);
});
