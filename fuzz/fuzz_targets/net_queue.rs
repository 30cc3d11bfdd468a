//! virtio-net's queues driven by a hostile driver: tx chains (the virtio-net header and the
//! frame, in any layout), rx buffers, and control-queue commands (rx mode, MAC table and
//! address, queue pairs, guest offloads), with any features, on a two-queue tap in a private
//! network namespace (needs root: without it the target does nothing, and says so once).
#![no_main]

use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use devices::virtio::net::{Net, NetParams, Tap};
use devices::virtio::{Unconfined, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;

/// The tap, created once: creating and destroying one per input would cost milliseconds.
fn taps() -> Option<&'static [Tap]> {
    static TAPS: OnceLock<Option<Vec<Tap>>> = OnceLock::new();
    TAPS.get_or_init(|| {
        // SAFETY: unshare changes only this (the fuzzing) thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "net_queue: unshare(CLONE_NEWNET): {} (run as root): fuzzing nothing",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Tap::open_named("fuzz0", 2)
            .inspect_err(|e| eprintln!("net_queue: {e}: fuzzing nothing"))
            .ok()
    })
    .as_deref()
}

/// Each device gets its own descriptors for the same tap queues.
fn adopt_copies(taps: &[Tap]) -> Option<Vec<Tap>> {
    taps.iter()
        .map(|tap| {
            // SAFETY: dup of a descriptor we hold; the copy is handed to `adopt`, which owns it.
            let fd = unsafe { libc::dup(tap.file().as_raw_fd()) };
            (fd >= 0).then(|| Tap::adopt(fd).ok()).flatten()
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some(taps) = taps().and_then(adopt_copies) else {
        return;
    };
    let Ok(net) = Net::new(NetParams {
        index: 0,
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        taps,
        vhost: Vec::new(),
        confinement: Arc::new(Unconfined),
    }) else {
        return;
    };
    // The first four bytes are the driver's feature bits 0-31 (the device keeps those it
    // offers): the net features and the ring's (indirect descriptors, EVENT_IDX).
    let (features, rest) = match data.split_first_chunk::<4>() {
        Some((bits, rest)) => (u64::from(u32::from_le_bytes(*bits)), rest),
        None => (0, data),
    };
    chapeau_fuzz::drive_device_with(net, VIRTIO_F_VERSION_1 | features, rest, Net::quiesce);
});
