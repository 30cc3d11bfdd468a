//! `bench datapath`: the real virtio-console (one named port) and virtio-rng, driven in-process
//! by a fake driver on the host, with no guest and no KVM.
//!
//! The driver writes split virtqueues into a `GuestMemoryMmap` with vm-memory's checked
//! accessors, hands virtio-queue `Queue`s on those addresses to the device's `activate`, kicks
//! through each queue's notify `EventFd` (the fd KVM would signal as an ioeventfd) and waits for
//! completions on per-queue `EventFd`s our `VirtioInterrupt` writes (what an MSI-X irqfd is).
//! The devices run on an `EventManager` in their own thread, as on chapeau's `vmm` thread; that
//! thread's CPU time comes from its CPU-time clock (`pthread_getcpuclockid`, the clock
//! CLOCK_THREAD_CPUTIME_ID reads inside it), read from the driver before and after each test.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::console::{Console, ConsoleOutput, NamedPort, VIRTIO_CONSOLE_F_MULTIPORT};
use devices::virtio::rng::{Rng, DEFAULT_SOURCE};
use devices::virtio::{
    ActivatedQueue, InterruptKind, QueueNotify, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{median, opt_fmt, parse_flags, parse_positive, Failure};

const PORT_NAME: &str = "agent.channel.0";
pub(crate) const GUEST_MEM: usize = 64 << 20;
/// Every buffer the driver posts is one page, as Linux posts for port rx and virtio-rng.
pub(crate) const BUF_SIZE: u32 = 4096;
/// Queue k's descriptor table, avail ring and used ring, one page each.
const RING_BASE: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x4000;
/// Queue k's buffers: `queue size` pages each.
const BUF_BASE: u64 = 1 << 20;
const BUF_STRIDE: u64 = 1 << 20;
/// How long the driver waits for the device before it calls the run failed.
const STALL: Duration = Duration::from_secs(10);
/// Host client socket I/O size.
const CLIENT_CHUNK: usize = 64 << 10;

/// Split-ring flags (virtio 1.2, 2.7.5).
const VRING_DESC_F_WRITE: u16 = 2;

/// The multiport control messages the driver uses (virtio 1.2, 5.3.6.2).
const DEVICE_READY: u16 = 0;
const PORT_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME_EVENT: u16 = 7;
/// The console's queues: port 0 rx/tx, control rx/tx (c_ivq, c_ovq), port 1 rx/tx.
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;
const PORT1_RX: usize = 4;
const PORT1_TX: usize = 5;

pub(crate) fn run(args: &[String]) -> Result<(), Failure> {
    let (mib, runs) = mib_and_runs(args)?;
    let total = mib << 20;

    println!(
        "datapath benchmark: {mib} MiB per test, {runs} run(s), {BUF_SIZE}-byte buffers, queues \
         kept full; devices on their own event-manager thread, fake driver on this one"
    );
    println!(
        "{:<20} {:>4} {:>6} {:>9} {:>9} {:>11} {:>11} {:>8} {:>8}",
        "test", "run", "MiB", "seconds", "MB/s", "dev CPU ms", "CPU ms/MiB", "irqs", "kicks"
    );
    let mut bench = Bench::new()?;
    let tests: [(&str, Test); 3] = [
        ("console host->guest", Bench::console_rx),
        ("console guest->host", Bench::console_tx),
        ("rng", Bench::rng),
    ];
    let mut medians = Vec::new();
    for (name, test) in tests {
        let mut rates = Vec::new();
        let mut costs = Vec::new();
        for run in 1..=runs {
            let r = test(&mut bench, total)?;
            let mibs = r.bytes as f64 / f64::from(1u32 << 20);
            let cpu_ms = r.cpu_ns as f64 / 1e6;
            rates.push(r.bytes as f64 / r.seconds / 1e6);
            costs.push(cpu_ms / mibs);
            println!(
                "{name:<20} {run:>4} {mibs:>6.0} {:>9.3} {:>9.1} {cpu_ms:>11.1} {:>11.3} {:>8} {:>8}",
                r.seconds,
                r.bytes as f64 / r.seconds / 1e6,
                cpu_ms / mibs,
                r.irqs,
                r.kicks
            );
        }
        medians.push((name, median(&rates), median(&costs)));
    }
    bench.finish()?;

    println!();
    println!("median of {runs} run(s)");
    println!("{:<20} {:>9} {:>11}", "test", "MB/s", "CPU ms/MiB");
    for (name, rate, cost) in medians {
        println!(
            "{name:<20} {:>9} {:>11}",
            opt_fmt(rate, 1),
            opt_fmt(cost, 3)
        );
    }
    println!(
        "MB/s = 10^6 bytes/s of payload, verified byte for byte for the console; dev CPU = CPU \
         time of the device thread (its event loop, both devices) during the test; irqs = \
         interrupts the device raised on the data queue, kicks = notifications the driver sent."
    );
    Ok(())
}

/// `--mib N --runs N` (defaults 256 and 3), the flags of the in-process benchmarks.
pub(crate) fn mib_and_runs(args: &[String]) -> Result<(u64, usize), Failure> {
    let mut mib: u64 = 256;
    let mut runs: usize = 3;
    parse_flags(args, |flag, value| {
        match flag {
            "--mib" => mib = parse_positive(flag, &value()?)?,
            "--runs" => runs = parse_positive(flag, &value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })
    .map_err(Failure::Usage)?;
    Ok((mib, runs))
}

/// One test: moves the given number of bytes and measures it.
type Test = fn(&mut Bench, u64) -> Result<Outcome, String>;

struct Outcome {
    bytes: u64,
    seconds: f64,
    cpu_ns: u64,
    irqs: u64,
    kicks: u64,
}

/// Byte `i` of every stream is `i % 251`: a period that does not divide the buffer size, so a
/// lost, repeated or reordered buffer shows.
pub(crate) struct Pattern(Vec<u8>);

impl Pattern {
    const PERIOD: u64 = 251;

    pub(crate) fn new() -> Self {
        let len = Self::PERIOD as usize + CLIENT_CHUNK.max(BUF_SIZE as usize);
        Pattern((0..len).map(|i| (i as u64 % Self::PERIOD) as u8).collect())
    }

    /// The `len` bytes at stream offset `offset` (len at most CLIENT_CHUNK).
    pub(crate) fn at(&self, offset: u64, len: usize) -> &[u8] {
        let start = (offset % Self::PERIOD) as usize;
        &self.0[start..start + len]
    }

    /// Writes the first `total` bytes of the stream.
    pub(crate) fn send(&self, writer: &mut impl Write, total: u64) -> Result<(), String> {
        let mut sent = 0u64;
        while sent < total {
            let n = CLIENT_CHUNK.min((total - sent) as usize);
            writer
                .write_all(self.at(sent, n))
                .map_err(|e| format!("client write: {e}"))?;
            sent += n as u64;
        }
        Ok(())
    }

    /// Reads the first `total` bytes of the stream, checking each; `what` names it in errors.
    pub(crate) fn expect(
        &self,
        reader: &mut impl Read,
        total: u64,
        what: &str,
    ) -> Result<(), String> {
        let mut buf = vec![0u8; CLIENT_CHUNK];
        let mut got = 0u64;
        while got < total {
            let want = CLIENT_CHUNK.min((total - got) as usize);
            let n = match reader.read(&mut buf[..want]) {
                Ok(0) => return Err(format!("{what}: EOF after {got} of {total} bytes")),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("{what}: {e} after {got} of {total} bytes")),
            };
            if buf[..n] != *self.at(got, n) {
                return Err(format!("{what}: wrong bytes near offset {got}"));
            }
            got += n as u64;
        }
        Ok(())
    }
}

pub(crate) fn mem_err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("guest memory: {what}: {e}")
}

/// The driver's side of one split virtqueue. Every chain is one descriptor, and descriptor `i`
/// always points at buffer `i`, so a used id names its buffer.
pub(crate) struct DriverQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    buffers: GuestAddress,
    next_avail: Wrapping<u16>,
    last_used: Wrapping<u16>,
    /// Buffers the device does not hold.
    free: Vec<u16>,
    kick: Arc<QueueNotify>,
    irq: EventFd,
    kicks: u64,
    irqs: u64,
}

impl DriverQueue {
    /// Lays out queue `slot` of the memory map and returns the device's half of it too.
    fn new(
        mem: &GuestMemoryMmap,
        slot: u64,
        size: u16,
        irq: EventFd,
    ) -> Result<(DriverQueue, ActivatedQueue), String> {
        let ring = RING_BASE + slot * RING_STRIDE;
        let (desc, avail, used) = (ring, ring + 0x1000, ring + 0x2000);
        let mut queue = Queue::new(size).map_err(|e| format!("queue of {size}: {e:?}"))?;
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(format!("queue {slot} does not fit guest memory"));
        }
        // Rings start empty: avail/used flags and indices 0 (the mapping is fresh, but say so).
        mem.write_slice(&[0u8; 0x3000], GuestAddress(ring))
            .map_err(mem_err("clearing a ring"))?;
        let notify = Arc::new(QueueNotify::new().map_err(|e| format!("eventfd: {e}"))?);
        let kick = notify.clone();
        let driver = DriverQueue {
            size,
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            buffers: GuestAddress(BUF_BASE + slot * BUF_STRIDE),
            next_avail: Wrapping(0),
            last_used: Wrapping(0),
            free: (0..size).rev().collect(),
            kick,
            irq,
            kicks: 0,
            irqs: 0,
        };
        Ok((driver, ActivatedQueue { queue, notify }))
    }

    pub(crate) fn buffer(&self, id: u16) -> GuestAddress {
        GuestAddress(self.buffers.0 + u64::from(id) * u64::from(BUF_SIZE))
    }

    /// A buffer to fill and `post`.
    pub(crate) fn take_free(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Posts every free buffer, whole, for the device to write.
    pub(crate) fn fill(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        while let Some(id) = self.take_free() {
            self.post(mem, id, BUF_SIZE, true)?;
        }
        Ok(())
    }

    /// Makes buffer `id` (its first `len` bytes) available; the device sees it after `kick`.
    pub(crate) fn post(
        &mut self,
        mem: &GuestMemoryMmap,
        id: u16,
        len: u32,
        device_writes: bool,
    ) -> Result<(), String> {
        let flags = if device_writes { VRING_DESC_F_WRITE } else { 0 };
        // struct virtq_desc: le64 addr, le32 len, le16 flags, le16 next.
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&self.buffer(id).0.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        let at = GuestAddress(self.desc.0 + 16 * u64::from(id));
        mem.write_slice(&desc, at)
            .map_err(mem_err("writing a descriptor"))?;
        // struct virtq_avail: le16 flags, le16 idx, le16 ring[size].
        let slot = u64::from(self.next_avail.0 % self.size);
        mem.write_obj(id.to_le(), GuestAddress(self.avail.0 + 4 + 2 * slot))
            .map_err(mem_err("writing the avail ring"))?;
        self.next_avail += 1;
        Ok(())
    }

    /// Publishes what `post` added (release: descriptors before the index) and notifies.
    pub(crate) fn kick(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        mem.store(
            self.next_avail.0.to_le(),
            GuestAddress(self.avail.0 + 2),
            Ordering::Release,
        )
        .map_err(mem_err("publishing the avail index"))?;
        self.kicks += 1;
        self.kick.write(1).map_err(|e| format!("kick: {e}"))
    }

    /// Used buffers since the last call: (id, bytes the device wrote). Their buffers are free
    /// again (and keep their contents until posted).
    pub(crate) fn reap(&mut self, mem: &GuestMemoryMmap) -> Result<Vec<(u16, u32)>, String> {
        let idx: u16 = mem
            .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .map_err(mem_err("reading the used index"))?;
        let mut done = Vec::new();
        while self.last_used.0 != u16::from_le(idx) {
            // struct virtq_used: le16 flags, le16 idx, {le32 id, le32 len} ring[size].
            let at = self.used.0 + 4 + 8 * u64::from(self.last_used.0 % self.size);
            let id: u32 = mem
                .read_obj(GuestAddress(at))
                .map_err(mem_err("reading the used ring"))?;
            let len: u32 = mem
                .read_obj(GuestAddress(at + 4))
                .map_err(mem_err("reading the used ring"))?;
            let id = u16::try_from(u32::from_le(id))
                .ok()
                .filter(|id| *id < self.size)
                .ok_or_else(|| format!("the device returned descriptor {id}"))?;
            done.push((id, u32::from_le(len)));
            self.free.push(id);
            self.last_used += 1;
        }
        Ok(done)
    }

    /// Waits for this queue's interrupt (irqfd), STALL at most.
    pub(crate) fn wait(&mut self, what: &str) -> Result<(), String> {
        let mut pfd = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(STALL.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll reads and writes one pollfd, which lives on our stack.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        match rc {
            0 => Err(format!(
                "{what}: no interrupt from the device for {} s",
                STALL.as_secs()
            )),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    Ok(())
                } else {
                    Err(format!("poll: {e}"))
                }
            }
            // The counter is the number of interrupts since the last read.
            _ => {
                self.irqs += self.irq.read().unwrap_or(0);
                Ok(())
            }
        }
    }

    /// Interrupt and kick counts since the last call.
    pub(crate) fn take_counts(&mut self) -> (u64, u64) {
        // Interrupts not waited for are still in the eventfd's counter.
        self.irqs += self.irq.read().unwrap_or(0);
        (
            std::mem::take(&mut self.irqs),
            std::mem::take(&mut self.kicks),
        )
    }
}

/// The transport's interrupt side: one eventfd per queue, as MSI-X vectors routed to irqfds.
struct Irqfds {
    queues: Vec<EventFd>,
}

impl VirtioInterrupt for Irqfds {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        match kind {
            InterruptKind::Queue(n) => match self.queues.get(usize::from(n)) {
                Some(fd) => fd.write(1),
                None => Err(std::io::Error::other(format!("no queue {n}"))),
            },
            // Neither device changes its configuration here.
            InterruptKind::Config => Ok(()),
        }
    }
}

/// Queues for `device` at ring slots `first_slot..`, activated with every feature it offers,
/// which must include `required`.
pub(crate) fn activate(
    device: &Mutex<dyn VirtioDevice>,
    mem: &GuestMemoryMmap,
    first_slot: u64,
    required: u64,
) -> Result<Vec<DriverQueue>, String> {
    let mut device = device.lock().map_err(|_| "a device mutex is poisoned")?;
    let mut drivers = Vec::new();
    let mut queues = Vec::new();
    let mut irqfds = Vec::new();
    for (i, size) in device.queue_max_sizes().iter().enumerate() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        irqfds.push(irq.try_clone().map_err(|e| format!("eventfd: {e}"))?);
        let (driver, queue) = DriverQueue::new(mem, first_slot + i as u64, *size, irq)?;
        drivers.push(driver);
        queues.push(queue);
    }
    let features = device.avail_features();
    if features & required != required {
        return Err(format!(
            "device type {} offers features {features:#x}, the driver needs {required:#x}",
            device.device_type()
        ));
    }
    device.set_acked_features(features);
    device
        .activate(mem.clone(), Arc::new(Irqfds { queues: irqfds }), queues)
        .map_err(|e| format!("activate: {e}"))?;
    Ok(drivers)
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The device thread: an event manager running the devices, like chapeau's `vmm` thread.
struct DeviceThread {
    handle: JoinHandle<Result<(), String>>,
    stop: Arc<AtomicBool>,
    clock: libc::clockid_t,
}

impl DeviceThread {
    fn spawn(subscribers: Vec<Subscriber>) -> Result<Self, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                let mut manager = EventManager::<Subscriber>::new()
                    .map_err(|e| format!("event manager: {e:?}"))?;
                for subscriber in subscribers {
                    manager.add_subscriber(subscriber);
                }
                // The timeout only bounds how long a stop request waits.
                while !stopping.load(Ordering::Acquire) {
                    match manager.run_with_timeout(100) {
                        Ok(_) => {}
                        Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                        Err(e) => return Err(format!("event loop: {e:?}")),
                    }
                }
                Ok(())
            })
            .map_err(|e| format!("cannot start the device thread: {e}"))?;
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the pthread_t is a live thread's (joined only in `finish`); the call writes
        // one clockid_t on our stack.
        let rc = unsafe { libc::pthread_getcpuclockid(handle.as_pthread_t(), &mut clock) };
        if rc != 0 {
            return Err(format!(
                "pthread_getcpuclockid: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        Ok(DeviceThread {
            handle,
            stop,
            clock,
        })
    }

    fn cpu_ns(&self) -> Result<u64, String> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec on our stack.
        if unsafe { libc::clock_gettime(self.clock, &mut ts) } != 0 {
            return Err(format!(
                "device thread CPU clock: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    fn finish(self) -> Result<(), String> {
        self.stop.store(true, Ordering::Release);
        self.handle
            .join()
            .map_err(|_| "the device thread panicked".to_string())?
    }
}

/// `struct virtio_console_control` and its payload (a port's name).
struct ControlMessage {
    id: u32,
    event: u16,
    value: u16,
    payload: Vec<u8>,
}

impl ControlMessage {
    fn parse(bytes: &[u8]) -> Result<Self, String> {
        match bytes {
            [i0, i1, i2, i3, e0, e1, v0, v1, payload @ ..] => Ok(ControlMessage {
                id: u32::from_le_bytes([*i0, *i1, *i2, *i3]),
                event: u16::from_le_bytes([*e0, *e1]),
                value: u16::from_le_bytes([*v0, *v1]),
                payload: payload.to_vec(),
            }),
            _ => Err(format!("a {}-byte control message", bytes.len())),
        }
    }
}

/// A test's clock: wall time and device-thread CPU time from `start`.
struct Meter {
    wall: Instant,
    cpu_ns: u64,
}

struct Bench {
    mem: GuestMemoryMmap,
    pattern: Pattern,
    console: Vec<DriverQueue>,
    rng: Vec<DriverQueue>,
    /// The port's host side, connected before the port opens.
    client: UnixStream,
    _socket: SocketFile,
    control_in: VecDeque<ControlMessage>,
    devices: DeviceThread,
}

impl Bench {
    fn new() -> Result<Bench, String> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_MEM)])
            .map_err(|e| format!("cannot map guest memory: {e}"))?;
        let socket =
            std::env::temp_dir().join(format!("chapeau-bench-{}.sock", std::process::id()));
        let port = NamedPort {
            name: PORT_NAME.into(),
            socket: socket.clone(),
        };
        let console =
            Console::new(&ConsoleOutput::Off, &[port]).map_err(|e| format!("console: {e}"))?;
        let socket = SocketFile(socket);
        let rng = Rng::new(Path::new(DEFAULT_SOURCE)).map_err(|e| format!("rng: {e}"))?;
        let console = Arc::new(Mutex::new(console));
        let rng = Arc::new(Mutex::new(rng));
        // Registered before activation, as at boot: activation only wakes the event loop.
        let devices = DeviceThread::spawn(vec![console.clone(), rng.clone()])?;
        let console_queues = activate(
            &*console,
            &mem,
            0,
            VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT,
        )?;
        let first_rng_slot = console_queues.len() as u64;
        let rng_queues = activate(&*rng, &mem, first_rng_slot, VIRTIO_F_VERSION_1)?;
        if (first_rng_slot + 1) * BUF_STRIDE + BUF_BASE > GUEST_MEM as u64 {
            return Err("guest memory too small for the queues".into());
        }
        let mut bench = Bench {
            mem,
            pattern: Pattern::new(),
            console: console_queues,
            rng: rng_queues,
            client: UnixStream::connect(&socket.0)
                .map_err(|e| format!("connect {}: {e}", socket.0.display()))?,
            _socket: socket,
            control_in: VecDeque::new(),
            devices,
        };
        bench.open_port()?;
        Ok(bench)
    }

    /// The multiport handshake a Linux driver does, then the guest opens port 1. The client
    /// connected before, so the device announces PORT_OPEN(1) once the port is ready.
    fn open_port(&mut self) -> Result<(), String> {
        let rx = &mut self.console[CONTROL_RX];
        rx.fill(&self.mem)?;
        rx.kick(&self.mem)?;
        self.send_control(0, DEVICE_READY, 1)?;
        let name = self.control_until("PORT_NAME for port 1", |m| {
            m.id == 1 && m.event == PORT_NAME_EVENT
        })?;
        if name.payload.strip_suffix(b"\0") != Some(PORT_NAME.as_bytes()) {
            return Err(format!(
                "port 1 is named {:?}, expected {PORT_NAME:?}",
                String::from_utf8_lossy(&name.payload)
            ));
        }
        self.control_until("PORT_OPEN(1) for the connected client", |m| {
            m.id == 1 && m.event == PORT_OPEN && m.value == 1
        })?;
        self.send_control(1, PORT_OPEN, 1)
    }

    /// One driver→device control message on c_ovq.
    fn send_control(&mut self, id: u32, event: u16, value: u16) -> Result<(), String> {
        let tx = &mut self.console[CONTROL_TX];
        // Reclaim what the device consumed; few messages are ever in flight.
        tx.reap(&self.mem)?;
        let buf = tx.take_free().ok_or("no free control buffer")?;
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&id.to_le_bytes());
        msg[4..6].copy_from_slice(&event.to_le_bytes());
        msg[6..].copy_from_slice(&value.to_le_bytes());
        self.mem
            .write_slice(&msg, tx.buffer(buf))
            .map_err(mem_err("writing a control message"))?;
        tx.post(&self.mem, buf, 8, false)?;
        tx.kick(&self.mem)
    }

    /// Reads device→driver control messages, answering PORT_ADD with PORT_READY as Linux does,
    /// until `want(message)`; returns that message. Later messages of the same batch wait in
    /// `control_in` for the next call.
    fn control_until(
        &mut self,
        what: &str,
        want: impl Fn(&ControlMessage) -> bool,
    ) -> Result<ControlMessage, String> {
        let deadline = Instant::now() + STALL;
        loop {
            while let Some(message) = self.control_in.pop_front() {
                if want(&message) {
                    return Ok(message);
                }
            }
            let used = self.console[CONTROL_RX].reap(&self.mem)?;
            for (buf, len) in &used {
                let mut bytes = vec![0u8; (*len).min(BUF_SIZE) as usize];
                self.mem
                    .read_slice(&mut bytes, self.console[CONTROL_RX].buffer(*buf))
                    .map_err(mem_err("reading a control message"))?;
                let message = ControlMessage::parse(&bytes)?;
                if message.event == PORT_ADD {
                    self.send_control(message.id, PORT_READY, 1)?;
                }
                self.control_in.push_back(message);
            }
            let rx = &mut self.console[CONTROL_RX];
            rx.fill(&self.mem)?;
            if !used.is_empty() {
                rx.kick(&self.mem)?;
                continue;
            }
            if Instant::now() >= deadline {
                return Err(format!("no {what} from the console"));
            }
            rx.wait(what)?;
        }
    }

    /// Starts a console test on `queue`: the client's socket for the test's host side, and the
    /// clock.
    fn start(&mut self, queue: usize) -> Result<(UnixStream, Meter), String> {
        let client = self
            .client
            .try_clone()
            .map_err(|e| format!("client socket: {e}"))?;
        self.console[queue].take_counts();
        Ok((client, self.meter()?))
    }

    fn meter(&self) -> Result<Meter, String> {
        Ok(Meter {
            wall: Instant::now(),
            cpu_ns: self.devices.cpu_ns()?,
        })
    }

    /// The test's figures; `(irqs, kicks)` from the data queue's `take_counts`.
    fn stop(&self, meter: Meter, bytes: u64, (irqs, kicks): (u64, u64)) -> Result<Outcome, String> {
        let seconds = meter.wall.elapsed().as_secs_f64();
        let cpu_ns = self.devices.cpu_ns()?.saturating_sub(meter.cpu_ns);
        Ok(Outcome {
            bytes,
            seconds,
            cpu_ns,
            irqs,
            kicks,
        })
    }

    /// Host→guest: the client writes `total` bytes into the socket; the driver keeps port 1's
    /// receiveq full and checks every byte it gets.
    fn console_rx(&mut self, total: u64) -> Result<Outcome, String> {
        let (mut writer, meter) = self.start(PORT1_RX)?;
        let rx = &mut self.console[PORT1_RX];
        rx.fill(&self.mem)?;
        rx.kick(&self.mem)?;
        let client = std::thread::spawn(move || Pattern::new().send(&mut writer, total));
        let mut got = 0u64;
        let mut data = vec![0u8; BUF_SIZE as usize];
        while got < total {
            let rx = &mut self.console[PORT1_RX];
            let used = rx.reap(&self.mem)?;
            if used.is_empty() {
                rx.wait("console host->guest")?;
                continue;
            }
            for (id, len) in used {
                let len = len.min(BUF_SIZE) as usize;
                self.mem
                    .read_slice(&mut data[..len], rx.buffer(id))
                    .map_err(mem_err("reading a receive buffer"))?;
                if data[..len] != *self.pattern.at(got, len) {
                    return Err(format!(
                        "console host->guest: wrong bytes near offset {got}"
                    ));
                }
                got += len as u64;
            }
            rx.fill(&self.mem)?;
            rx.kick(&self.mem)?;
        }
        client
            .join()
            .map_err(|_| "the client thread panicked".to_string())??;
        if got != total {
            return Err(format!("console host->guest: got {got} of {total} bytes"));
        }
        let counts = self.console[PORT1_RX].take_counts();
        self.stop(meter, got, counts)
    }

    /// Guest→host: the driver keeps port 1's transmitq full of pattern buffers; the client
    /// reads and checks them.
    fn console_tx(&mut self, total: u64) -> Result<Outcome, String> {
        let (mut reader, meter) = self.start(PORT1_TX)?;
        let client = std::thread::spawn(move || {
            Pattern::new().expect(&mut reader, total, "console guest->host")
        });
        let mut posted = 0u64;
        loop {
            let tx = &mut self.console[PORT1_TX];
            let mut added = false;
            while posted < total {
                let Some(id) = tx.take_free() else { break };
                let len = u64::from(BUF_SIZE).min(total - posted) as usize;
                self.mem
                    .write_slice(self.pattern.at(posted, len), tx.buffer(id))
                    .map_err(mem_err("filling a transmit buffer"))?;
                tx.post(&self.mem, id, len as u32, false)?;
                posted += len as u64;
                added = true;
            }
            if added {
                tx.kick(&self.mem)?;
            }
            if posted >= total && tx.free.len() == usize::from(tx.size) {
                break;
            }
            if tx.reap(&self.mem)?.is_empty() {
                tx.wait("console guest->host")?;
            }
        }
        client
            .join()
            .map_err(|_| "the client thread panicked".to_string())??;
        let counts = self.console[PORT1_TX].take_counts();
        self.stop(meter, posted, counts)
    }

    /// The driver keeps the rng queue full of writable pages until `total` bytes came back.
    fn rng(&mut self, total: u64) -> Result<Outcome, String> {
        self.rng[0].take_counts();
        let meter = self.meter()?;
        let q = &mut self.rng[0];
        q.fill(&self.mem)?;
        q.kick(&self.mem)?;
        let mut got = 0u64;
        // Buffers still out when `total` is reached are not counted (they may complete later).
        while got < total {
            let used = q.reap(&self.mem)?;
            if used.is_empty() {
                q.wait("rng")?;
                continue;
            }
            for (_, len) in used {
                if len == 0 {
                    return Err("rng: the device returned an empty buffer".into());
                }
                got += u64::from(len);
            }
            q.fill(&self.mem)?;
            q.kick(&self.mem)?;
        }
        let counts = self.rng[0].take_counts();
        self.stop(meter, got, counts)
    }

    fn finish(self) -> Result<(), String> {
        drop(self.client);
        self.devices.finish()
    }
}

/// Removes the port's socket file however the benchmark ends: after an error the console
/// (which would remove it) stays with the device thread, which is never joined then.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
