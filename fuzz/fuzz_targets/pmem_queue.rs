//! virtio-pmem's request queue (flushes go to an unlinked temp file), driven by a hostile
//! driver.
#![no_main]

use std::fs::File;
use std::sync::OnceLock;

use devices::virtio::fake_driver::unlinked_tempfile;
use devices::virtio::pmem::Pmem;
use devices::virtio::VIRTIO_F_VERSION_1;
use libfuzzer_sys::fuzz_target;

fn backing() -> Option<File> {
    static FILE: OnceLock<Option<File>> = OnceLock::new();
    FILE.get_or_init(|| unlinked_tempfile("fuzz-pmem").ok())
        .as_ref()
        .and_then(|f| f.try_clone().ok())
}

fuzz_target!(|data: &[u8]| {
    let file = if data.first().is_some_and(|b| b & 1 == 1) {
        backing()
    } else {
        None
    };
    let Ok(pmem) = Pmem::new(1 << 32, 2 << 20, file) else {
        return;
    };
    chapeau_fuzz::drive_device(pmem, VIRTIO_F_VERSION_1, data);
});
