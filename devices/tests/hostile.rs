//! A malicious guest, without a guest: each device driven by a hostile fake driver (loops in
//! chains, zero-length and huge descriptors, indirect tables nobody negotiated, rings at the end
//! of RAM, avail indices far ahead, resets mid-transfer, reset/DRIVER_OK loops) while the
//! process's fds, threads, memory and log volume are watched. A malicious guest may break its
//! own device, never cost the host without bound.
//!
//! The scenarios measure the whole process (threads included), so one test runs them in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::pci::VirtioPciDevice;
use devices::virtio::console::{Console, ConsoleOutput, VIRTIO_CONSOLE_F_MULTIPORT};
use devices::virtio::fake_driver::{
    descriptor, pci_transport, ring_addrs, unlinked_tempfile, FakeDriver, DATA_BASE, MEM_SIZE,
};
use devices::virtio::pmem::Pmem;
use devices::virtio::rng::{Rng, DEFAULT_SOURCE};
use devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use devices::BusDevice;

/// Counts every log record (at every level) the code under test emits.
struct CountingLogger(AtomicUsize);

impl log::Log for CountingLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, _: &log::Record) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn flush(&self) {}
}

static LOG: CountingLogger = CountingLogger(AtomicUsize::new(0));

#[test]
fn a_hostile_guest_costs_the_host_a_bounded_amount() {
    let _ = log::set_logger(&LOG);
    // Warn and above: what chapeau logs by default.
    log::set_max_level(log::LevelFilter::Warn);
    rng_survives_hostile_queues();
    console_survives_hostile_queues();
    pmem_survives_hostile_queues();
    reset_driver_ok_loops_cost_no_fds();
}

fn log_lines() -> usize {
    LOG.0.load(Ordering::Relaxed)
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn status_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// What the process holds: fds, threads, resident KiB.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    threads: u64,
    rss_kib: u64,
}

fn usage() -> Usage {
    Usage {
        fds: fd_count(),
        threads: status_field("Threads:"),
        rss_kib: status_field("VmRSS:"),
    }
}

/// The host stayed bounded: no new fd or thread, RSS within `rss_slack_kib`, at most
/// `max_log` log lines.
fn assert_bounded(before: Usage, logs_before: usize, max_log: usize, rss_slack_kib: u64) {
    let after = usage();
    assert!(after.fds <= before.fds, "fds {before:?} -> {after:?}");
    assert!(
        after.threads <= before.threads,
        "threads {before:?} -> {after:?}"
    );
    assert!(
        after.rss_kib <= before.rss_kib + rss_slack_kib,
        "RSS {before:?} -> {after:?}"
    );
    let logged = log_lines() - logs_before;
    assert!(logged <= max_log, "{logged} log lines");
}

/// xorshift64: garbage that is the same on every run.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes a hostile queue `q` of `size`: every descriptor one of the nasty kinds, chained at
/// random (loops included), and avail entries posted with the index at `idx`.
fn poison_queue<D: VirtioDevice>(
    driver: &FakeDriver<D>,
    q: usize,
    size: u16,
    g: &mut Garbage,
    idx: u16,
) {
    for i in 0..size {
        let r = g.next();
        let (addr, len) = match r % 7 {
            0 => (DATA_BASE, 0),                          // zero-length
            1 => (DATA_BASE, u32::MAX),                   // huge
            2 => (MEM_SIZE - 8, 64),                      // straddles the end of RAM
            3 => (u64::MAX - 4, 16),                      // wraps the address space
            4 => (ring_addrs(q).0, 16 * u32::from(size)), // the descriptor table itself
            _ => (DATA_BASE + (r >> 20) % 0x1_0000, (r >> 40) as u32 % 0x4000),
        };
        // NEXT, WRITE and INDIRECT in every combination; next anywhere, loops included.
        let flags = ((r >> 8) & 7) as u16;
        let next = ((r >> 16) % (u64::from(size) + 2)) as u16;
        driver.set_descriptor(q, i, descriptor(addr, len, flags, next));
    }
    let heads: Vec<u16> = (0..size)
        .map(|_| (g.next() % (u64::from(size) + 4)) as u16)
        .collect();
    driver.post(q, size, 0, &heads, idx);
}

fn hostile_rounds<D: VirtioDevice + 'static>(device: D, features: u64, rounds: usize) {
    let mut driver = FakeDriver::new(device).unwrap();
    let mut g = Garbage(0x9e37_79b9_7f4a_7c15);
    // Warm up once so lazily allocated state does not count as growth.
    driver.activate(features, 16).unwrap();
    driver.run(8);
    let before = usage();
    let logs = log_lines();
    for round in 0..rounds {
        let size = [1u16, 2, 16, 64][round % 4];
        let queues = driver.queue_count();
        for q in 0..queues {
            // Avail index: a queue's worth, or far ahead, or wrapped.
            let idx = match round % 3 {
                0 => size,
                1 => 40_000,
                _ => u16::MAX,
            };
            poison_queue(&driver, q, size, &mut g, idx);
        }
        // Some activations fail (the device refuses the queues): that is the device's business.
        let _ = driver.activate(features, size);
        driver.kick_all();
        driver.run(4);
        // Reset mid-transfer: kicks pending, buffers half served.
        driver.kick_all();
        assert!(driver.reset());
        driver.run(4);
    }
    assert_bounded(before, logs, 64, 8 << 10);
}

fn rng_survives_hostile_queues() {
    let rng = Rng::new(std::path::Path::new(DEFAULT_SOURCE)).unwrap();
    hostile_rounds(rng, VIRTIO_F_VERSION_1, 2000);
}

fn console_survives_hostile_queues() {
    let console = Console::new(&ConsoleOutput::Off, &[]).unwrap();
    hostile_rounds(
        console,
        VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT,
        2000,
    );
}

fn pmem_survives_hostile_queues() {
    let file = unlinked_tempfile("hostile-pmem").unwrap();
    let pmem = Pmem::new(1 << 32, 2 << 20, Some(file)).unwrap();
    hostile_rounds(pmem, VIRTIO_F_VERSION_1, 2000);
}

// ----- through the PCI transport -----

fn w(pci: &mut VirtioPciDevice, offset: u64, len: usize, value: u64) {
    pci.write(offset, &value.to_le_bytes()[..len]);
}

/// One driver session: negotiate, place every queue (at `ring_base(q)`), DRIVER_OK, reset.
fn session(
    pci: &mut VirtioPciDevice,
    queues: usize,
    features: u64,
    ring_base: impl Fn(usize) -> u64,
) {
    w(pci, 0x14, 1, 3);
    w(pci, 0x08, 4, 0);
    w(pci, 0x0c, 4, features & 0xffff_ffff);
    w(pci, 0x08, 4, 1);
    w(pci, 0x0c, 4, features >> 32);
    w(pci, 0x14, 1, 11);
    for q in 0..queues {
        let base = ring_base(q);
        w(pci, 0x16, 2, q as u64);
        w(pci, 0x18, 2, 16);
        w(pci, 0x20, 4, base & 0xffff_ffff);
        w(pci, 0x24, 4, base >> 32);
        w(pci, 0x28, 4, (base + 0x1000) & 0xffff_ffff);
        w(pci, 0x30, 4, (base + 0x2000) & 0xffff_ffff);
        w(pci, 0x1c, 2, 1);
    }
    w(pci, 0x14, 1, 15);
    w(pci, 0x14, 1, 0);
}

/// A reset/DRIVER_OK loop while the event loop is busy elsewhere (it never runs here: the
/// worst case) must not pile up fds; nor may rings at the end of RAM pile up log lines.
fn reset_driver_ok_loops_cost_no_fds() {
    let console: Arc<Mutex<dyn VirtioDevice>> =
        Arc::new(Mutex::new(Console::new(&ConsoleOutput::Off, &[]).unwrap()));
    let rng: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(
        Rng::new(std::path::Path::new(DEFAULT_SOURCE)).unwrap(),
    ));
    let features = VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT;
    let mut console_pci = pci_transport(console.clone()).unwrap();
    let mut rng_pci = pci_transport(rng.clone()).unwrap();
    session(&mut console_pci, 4, features, |q| ring_addrs(q).0);
    session(&mut rng_pci, 1, VIRTIO_F_VERSION_1, |q| ring_addrs(q).0);
    let before = usage();
    let logs = log_lines();
    for _ in 0..10_000 {
        session(&mut console_pci, 4, features, |q| ring_addrs(q).0);
        session(&mut rng_pci, 1, VIRTIO_F_VERSION_1, |q| ring_addrs(q).0);
        // Rings straddling the end of RAM: activation refused, every time.
        session(&mut rng_pci, 1, VIRTIO_F_VERSION_1, |_| MEM_SIZE - 0x2000);
        // Features never offered: FEATURES_OK refused, every time.
        session(&mut rng_pci, 1, VIRTIO_F_VERSION_1 | 1 << 40, |q| {
            ring_addrs(q).0
        });
    }
    assert_bounded(before, logs, 64, 8 << 10);
}
