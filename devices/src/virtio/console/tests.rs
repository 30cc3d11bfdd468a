//! The device driven by a fake driver: split queues in real guest memory, notifications through
//! the notify eventfds, and the real event-manager loop.
//!
//! The rings are laid out here rather than with `virtio_queue::mock::MockSplitQueue`: in
//! virtio-queue 0.18 its `SplitQueueRing::end()` counts elements, not bytes, so the mock's used
//! ring overlaps the avail ring once more than a few buffers are posted.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const QUEUE_LEN: u16 = 16;
const MEM_SIZE: usize = 256 << 20;
/// Each queue's buffers live in their own 16 MiB window, 16 slots of 1 MiB.
const SLOT: u64 = 1 << 20;

#[derive(Default)]
struct FakeInterrupt(Mutex<Vec<InterruptKind>>);

impl VirtioInterrupt for FakeInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        self.0.lock().unwrap().push(kind);
        Ok(())
    }
}

impl FakeInterrupt {
    fn take(&self) -> Vec<InterruptKind> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Descriptor table, avail ring and used ring of queue `q`.
fn ring_addrs(q: usize) -> (u64, u64, u64) {
    let base = q as u64 * 0x1_0000;
    (base, base + 0x1000, base + 0x2000)
}

fn slot_addr(q: usize, slot: u16) -> u64 {
    0x100_0000 + q as u64 * 16 * SLOT + u64::from(slot) * SLOT
}

/// The driver side of every queue.
struct Driver {
    mem: GuestMemoryMmap,
    count: usize,
    kicks: Vec<Arc<QueueNotify>>,
    /// Free descriptor indices per queue.
    free: Vec<Vec<u16>>,
    /// Descriptors of each posted chain, by (queue, head), freed when the chain is used.
    chains: HashMap<(usize, u16), Vec<u16>>,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
    /// (queue, head) → address of the first buffer, for reading rx data back.
    heads: HashMap<(usize, u16), u64>,
}

impl Driver {
    fn new(mem: &GuestMemoryMmap, count: usize) -> Self {
        for q in 0..count {
            let (_, avail, used) = ring_addrs(q);
            mem.write_obj(0u32, GuestAddress(avail)).unwrap();
            mem.write_obj(0u32, GuestAddress(used)).unwrap();
        }
        Driver {
            mem: mem.clone(),
            count,
            kicks: Vec::new(),
            free: vec![(0..QUEUE_LEN).rev().collect(); count],
            chains: HashMap::new(),
            avail_idx: vec![0; count],
            used_seen: vec![0; count],
            heads: HashMap::new(),
        }
    }

    fn activated_queues(&mut self) -> Vec<ActivatedQueue> {
        self.kicks.clear();
        (0..self.count)
            .map(|q| {
                let notify = Arc::new(QueueNotify::new().unwrap());
                self.kicks.push(notify.clone());
                let (desc, avail, used) = ring_addrs(q);
                let mut queue = Queue::new(QUEUE_LEN).unwrap();
                queue.set_size(QUEUE_LEN);
                queue
                    .try_set_desc_table_address(GuestAddress(desc))
                    .unwrap();
                queue
                    .try_set_avail_ring_address(GuestAddress(avail))
                    .unwrap();
                queue.try_set_used_ring_address(GuestAddress(used)).unwrap();
                queue.set_ready(true);
                ActivatedQueue { queue, notify }
            })
            .collect()
    }

    /// Descriptors free in queue `q`.
    fn room(&self, q: usize) -> usize {
        self.free[q].len()
    }

    /// Posts one chain of (addr, len, flags) descriptors; NEXT links are filled in.
    fn post_raw(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let indices: Vec<u16> = (0..descs.len())
            .map(|_| self.free[q].pop().expect("descriptor table full"))
            .collect();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match indices.get(i + 1) {
                Some(&next) => (flags | VRING_DESC_F_NEXT as u16, next),
                None => (flags & !(VRING_DESC_F_NEXT as u16), 0),
            };
            self.store_desc(q, indices[i], addr, len, flags, next);
        }
        let head = indices[0];
        self.publish(q, head);
        self.chains.insert((q, head), indices);
        self.heads.insert((q, head), descs[0].0);
        head
    }

    fn store_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        let table = ring_addrs(q).0;
        self.mem
            .write_obj(desc, GuestAddress(table + u64::from(index) * 16))
            .unwrap();
    }

    /// Puts `head` on the avail ring.
    fn publish(&mut self, q: usize, head: u16) {
        let avail = GuestAddress(ring_addrs(q).1);
        let idx = self.avail_idx[q];
        let slot = 4 + u64::from(idx % QUEUE_LEN) * 2;
        self.mem
            .write_obj(head, GuestAddress(avail.0 + slot))
            .unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail.0 + 2))
            .unwrap();
    }

    /// A device-writable buffer of `len` bytes.
    fn post_rx(&mut self, q: usize, len: u32) -> u16 {
        let slot = *self.free[q].last().expect("descriptor table full");
        self.post_raw(q, &[(slot_addr(q, slot), len, VRING_DESC_F_WRITE as u16)])
    }

    /// A device-readable buffer holding `data`.
    fn post_tx(&mut self, q: usize, data: &[u8]) -> u16 {
        let slot = *self.free[q].last().expect("descriptor table full");
        let addr = slot_addr(q, slot);
        assert!(data.len() as u64 <= SLOT);
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        self.post_raw(q, &[(addr, data.len() as u32, 0)])
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Used elements (head, len) returned since the last call.
    fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = ring_addrs(q).2;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let elem = used + 4 + u64::from(self.used_seen[q] % QUEUE_LEN) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            let head = id as u16;
            out.push((head, len));
            if let Some(indices) = self.chains.remove(&(q, head)) {
                self.free[q].extend(indices);
            }
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// Bytes the device wrote into the rx buffers it returned since the last call.
    fn received(&mut self, q: usize) -> Vec<Vec<u8>> {
        self.used(q)
            .into_iter()
            .map(|(head, len)| {
                let addr = self.heads[&(q, head)];
                let mut buf = vec![0u8; len as usize];
                self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                buf
            })
            .collect()
    }

    fn send_control(&mut self, id: u32, event: u16, value: u16) {
        self.post_tx(CONTROL_TX, &Control::new(id, event, value).to_bytes());
        self.kick(CONTROL_TX);
    }

    /// Control messages from the device since the last call; re-posts the buffers.
    fn control_messages(&mut self) -> Vec<(Control, Vec<u8>)> {
        let messages: Vec<_> = self
            .received(CONTROL_RX)
            .into_iter()
            .map(|buf| {
                let header: [u8; 8] = buf[..8].try_into().unwrap();
                (Control::from_bytes(&header), buf[8..].to_vec())
            })
            .collect();
        for _ in &messages {
            self.post_rx(CONTROL_RX, 4096);
        }
        if !messages.is_empty() {
            self.kick(CONTROL_RX);
        }
        messages
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

struct Harness {
    dev: Arc<Mutex<Console>>,
    em: EventManager<Arc<Mutex<Console>>>,
    irq: Arc<FakeInterrupt>,
    dir: PathBuf,
}

impl Harness {
    fn new(console: ConsoleOutput, names: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "chapeau-console-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<NamedPort> = names
            .iter()
            .map(|name| NamedPort {
                name: name.to_string(),
                socket: dir.join(format!("{name}.sock")),
            })
            .collect();
        let console = match console {
            ConsoleOutput::Socket(p) | ConsoleOutput::File(p) if p.is_relative() => {
                if p.extension().is_some_and(|e| e == "sock") {
                    ConsoleOutput::Socket(dir.join(p))
                } else {
                    ConsoleOutput::File(dir.join(p))
                }
            }
            other => other,
        };
        let dev = Arc::new(Mutex::new(Console::new(&console, &ports).unwrap()));
        let mut em = EventManager::<Arc<Mutex<Console>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        Harness {
            dev,
            em,
            irq: Arc::new(FakeInterrupt::default()),
            dir,
        }
    }

    fn dev(&self) -> MutexGuard<'_, Console> {
        self.dev.lock().unwrap()
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    fn connect(&mut self, name: &str) -> UnixStream {
        let client = UnixStream::connect(self.socket(name)).unwrap();
        self.pump();
        client
    }

    /// Runs the event loop until nothing is ready.
    fn pump(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never settles");
    }

    fn activate(&mut self, driver: &mut Driver) {
        let mut dev = self.dev.lock().unwrap();
        dev.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT);
        dev.activate(
            driver.mem.clone(),
            self.irq.clone(),
            driver.activated_queues(),
        )
        .unwrap();
        drop(dev);
        self.pump();
    }

    /// Activation plus the control handshake up to every port being ready; returns the
    /// control messages the device sent.
    fn handshake(&mut self, driver: &mut Driver) -> Vec<(Control, Vec<u8>)> {
        self.activate(driver);
        for _ in 0..8 {
            driver.post_rx(CONTROL_RX, 4096);
        }
        driver.kick(CONTROL_RX);
        driver.send_control(0, control::DEVICE_READY, 1);
        self.pump();
        let mut messages = driver.control_messages();
        let ports = self.dev().max_nr_ports();
        for id in 0..ports {
            driver.send_control(id, control::PORT_READY, 1);
            self.pump();
            messages.extend(driver.control_messages());
        }
        messages
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A device with the ports `names`, activated by a driver that finished the handshake.
fn started(console: ConsoleOutput, names: &[&str]) -> (Harness, Driver) {
    let mut h = Harness::new(console, names);
    let mut driver = Driver::new(&memory(), queue_count(names.len()));
    h.handshake(&mut driver);
    (h, driver)
}

fn events(messages: &[(Control, Vec<u8>)]) -> Vec<(u32, u16, u16)> {
    messages
        .iter()
        .map(|(c, _)| (c.id, c.event, c.value))
        .collect()
}

fn queue_count(ports: usize) -> usize {
    2 * (ports + 1) + 2
}

#[test]
fn queue_layout() {
    assert_eq!(queue_role(0), QueueRole::Rx(0));
    assert_eq!(queue_role(1), QueueRole::Tx(0));
    assert_eq!(queue_role(2), QueueRole::ControlRx);
    assert_eq!(queue_role(3), QueueRole::ControlTx);
    assert_eq!(queue_role(4), QueueRole::Rx(1));
    assert_eq!(queue_role(5), QueueRole::Tx(1));
    assert_eq!(queue_role(6), QueueRole::Rx(2));
    for p in 0..31 {
        assert_eq!(queue_role(rx_queue(p)), QueueRole::Rx(p));
        assert_eq!(queue_role(tx_queue(p)), QueueRole::Tx(p));
    }
}

#[test]
fn device_description() {
    let h = Harness::new(ConsoleOutput::Off, &["a", "b"]);
    let dev = h.dev();
    assert_eq!(dev.device_type(), 3);
    assert_eq!(dev.queue_max_sizes().len(), 8);
    assert_eq!(dev.queue_max_sizes()[CONTROL_RX], CONTROL_QUEUE_SIZE);
    assert_eq!(dev.queue_max_sizes()[4], DATA_QUEUE_SIZE);
    assert_eq!(
        dev.avail_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT
    );
    let mut config = [0xffu8; 12];
    dev.read_config(0, &mut config);
    assert_eq!(config, [0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
    let mut word = [0xffu8; 4];
    dev.read_config(4, &mut word);
    assert_eq!(u32::from_le_bytes(word), 3);
    dev.read_config(10, &mut word);
    assert_eq!(word, [0; 4]);
    dev.read_config(u64::MAX, &mut word);
    assert_eq!(word, [0; 4]);
}

#[test]
fn activation_checks_queue_count() {
    let h = Harness::new(ConsoleOutput::Off, &["a"]);
    let mem = memory();
    let mut driver = Driver::new(&mem, 4);
    let mut dev = h.dev();
    dev.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT);
    let err = dev
        .activate(mem.clone(), h.irq.clone(), driver.activated_queues())
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 6,
            got: 4
        }
    ));
}

#[test]
fn without_multiport_port0_just_works() {
    let mut h = Harness::new(ConsoleOutput::File("hvc0.log".into()), &["agent"]);
    let mem = memory();
    let mut driver = Driver::new(&mem, queue_count(1));
    // The transport hands over every queue; this driver enabled only port 0's pair.
    let mut queues = driver.activated_queues();
    for q in &mut queues[2..] {
        q.queue.set_ready(false);
    }
    {
        let mut dev = h.dev();
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        dev.activate(mem.clone(), h.irq.clone(), queues).unwrap();
    }
    h.pump();
    driver.post_tx(tx_queue(0), b"early boot\n");
    driver.kick(tx_queue(0));
    h.pump();
    assert_eq!(driver.used(tx_queue(0)).len(), 1);
    assert_eq!(
        std::fs::read(h.dir.join("hvc0.log")).unwrap(),
        b"early boot\n"
    );
    assert_eq!(h.irq.take(), vec![InterruptKind::Queue(tx_queue(0) as u16)]);
}

#[test]
fn control_handshake() {
    let mut h = Harness::new(ConsoleOutput::Off, &["agent.channel.0", "other"]);
    let mem = memory();
    let mut driver = Driver::new(&mem, queue_count(2));
    let messages = h.handshake(&mut driver);
    assert_eq!(
        events(&messages),
        vec![
            (0, control::PORT_ADD, 0),
            (1, control::PORT_ADD, 0),
            (2, control::PORT_ADD, 0),
            (0, control::CONSOLE_PORT, 1),
            (0, control::PORT_OPEN, 1),
            (1, control::PORT_NAME, 1),
            (2, control::PORT_NAME, 1),
        ]
    );
    assert_eq!(messages[5].1, b"agent.channel.0\0");
    assert_eq!(messages[6].1, b"other\0");
    // The driver heard about every used control buffer.
    assert!(h
        .irq
        .take()
        .contains(&InterruptKind::Queue(CONTROL_RX as u16)));
    // A second DEVICE_READY does not announce the ports again.
    driver.send_control(0, control::DEVICE_READY, 1);
    h.pump();
    assert!(driver.control_messages().is_empty());
}

#[test]
fn client_connect_and_disconnect_open_and_close_the_port() {
    let mut h = Harness::new(ConsoleOutput::Off, &["agent"]);
    // A client that connects before the guest is ready is announced at PORT_READY.
    let early = h.connect("agent");
    let mem = memory();
    let mut driver = Driver::new(&mem, queue_count(1));
    let messages = h.handshake(&mut driver);
    assert!(events(&messages).ends_with(&[(1, control::PORT_NAME, 1), (1, control::PORT_OPEN, 1)]));

    // A second client waits in the backlog while the first is connected.
    let second = UnixStream::connect(h.socket("agent")).unwrap();
    h.pump();
    assert!(driver.control_messages().is_empty());

    drop(early);
    h.pump();
    // The first leaves (close), the waiting one is taken (fresh session: open).
    assert_eq!(
        events(&driver.control_messages()),
        vec![(1, control::PORT_OPEN, 0), (1, control::PORT_OPEN, 1)]
    );
    drop(second);
    h.pump();
    assert_eq!(
        events(&driver.control_messages()),
        vec![(1, control::PORT_OPEN, 0)]
    );
    let third = h.connect("agent");
    assert_eq!(
        events(&driver.control_messages()),
        vec![(1, control::PORT_OPEN, 1)]
    );
    drop(third);
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn host_to_guest_waits_for_the_guest_and_keeps_order() {
    let (mut h, mut driver) = started(ConsoleOutput::Off, &["agent"]);
    let mut client = h.connect("agent");
    driver.control_messages();

    // The client speaks before the guest opened the port: nothing is read yet.
    let data = pattern(200_000);
    let writer = {
        let mut client = client.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || client.write_all(&data).unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    h.pump();
    assert_eq!(h.dev().ports[1].rx_buf.len(), 0);

    // The guest opens it with no rx buffers: we read ahead, bounded.
    driver.send_control(1, control::PORT_OPEN, 1);
    h.pump();
    assert!(h.dev().ports[1].rx_buf.len() <= RX_BUFFER_LIMIT);

    // Few, small buffers at a time: every byte arrives, in order.
    let rx = rx_queue(1);
    let mut got = Vec::new();
    for _ in 0..100_000 {
        if got.len() == data.len() {
            break;
        }
        if driver.room(rx) >= 2 {
            driver.post_rx(rx, 1000);
            driver.post_rx(rx, 3);
            driver.kick(rx);
        }
        h.pump();
        for buf in driver.received(rx) {
            assert!(buf.len() <= 1000);
            got.extend(buf);
        }
        if got.len() < data.len() {
            std::thread::yield_now();
        }
    }
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes reordered or corrupted");
    assert!(h.irq.take().contains(&InterruptKind::Queue(rx as u16)));

    // Nothing more: an rx buffer posted now stays with the guest.
    driver.post_rx(rx, 100);
    driver.kick(rx);
    h.pump();
    assert!(driver.used(rx).is_empty());
    client.write_all(b"late").unwrap();
    h.pump();
    assert_eq!(driver.received(rx).concat(), b"late");
}

#[test]
fn host_bytes_sent_before_hangup_reach_the_guest_first() {
    let (mut h, mut driver) = started(ConsoleOutput::Off, &["agent"]);
    driver.send_control(1, control::PORT_OPEN, 1);
    let mut client = h.connect("agent");
    driver.control_messages();
    // 100 KiB: more than our buffer, so part of it is still in the socket at hang-up.
    let data = pattern(100 * 1024);
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            client.write_all(&data).unwrap();
            // Dropping the client hangs up with part of the data still in the socket.
        })
    };
    let rx = rx_queue(1);
    let mut got = Vec::new();
    for _ in 0..100_000 {
        if driver.room(rx) > 0 {
            driver.post_rx(rx, 4096);
            driver.kick(rx);
        }
        h.pump();
        for buf in driver.received(rx) {
            got.extend(buf);
        }
        let closed = events(&driver.control_messages()).contains(&(1, control::PORT_OPEN, 0));
        if closed {
            break;
        }
        std::thread::yield_now();
    }
    writer.join().unwrap();
    assert!(got == data, "got {} of {} bytes", got.len(), data.len());
}

#[test]
fn guest_close_pauses_reading_without_loss() {
    let (mut h, mut driver) = started(ConsoleOutput::Off, &["agent"]);
    driver.send_control(1, control::PORT_OPEN, 1);
    let mut client = h.connect("agent");
    let rx = rx_queue(1);
    driver.post_rx(rx, 64);
    driver.kick(rx);
    client.write_all(b"one").unwrap();
    h.pump();
    assert_eq!(driver.received(rx), vec![b"one".to_vec()]);

    // The guest closes the port: its buffers stay unused and the socket is not read.
    driver.send_control(1, control::PORT_OPEN, 0);
    h.pump();
    client.write_all(b"two").unwrap();
    driver.post_rx(rx, 64);
    driver.kick(rx);
    h.pump();
    assert!(driver.used(rx).is_empty());
    assert!(h.dev().ports[1].rx_buf.is_empty());

    // Reopened: the bytes arrive.
    driver.send_control(1, control::PORT_OPEN, 1);
    h.pump();
    assert_eq!(driver.received(rx), vec![b"two".to_vec()]);
}

#[test]
fn guest_to_host_with_back_pressure() {
    let (mut h, mut driver) = started(ConsoleOutput::Off, &["agent"]);
    let mut client = h.connect("agent");
    driver.control_messages();

    // 12 chains of 512 KiB: far more than the socket buffer while the client does not read.
    let tx = tx_queue(1);
    let chunk = 512 * 1024;
    let data = pattern(12 * chunk);
    for part in data.chunks(chunk) {
        driver.post_tx(tx, part);
    }
    driver.kick(tx);
    h.pump();
    let completed_early = driver.used(tx).len();
    assert!(completed_early < 12, "the socket cannot hold 6 MiB");
    assert!(h.dev().ports[1].tx_pending.is_some());

    client.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut completed = completed_early;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..100_000 {
        match client.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.pump();
        completed += driver.used(tx).len();
        if got.len() == data.len() {
            break;
        }
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes reordered or corrupted");
    assert_eq!(completed, 12);
    assert!(h.dev().ports[1].tx_pending.is_none());
}

#[test]
fn guest_output_without_client_is_consumed() {
    let (mut h, mut driver) = started(ConsoleOutput::Off, &["agent"]);
    let tx = tx_queue(1);
    driver.post_tx(tx, b"nobody hears this");
    driver.kick(tx);
    h.pump();
    assert_eq!(driver.used(tx).len(), 1);
    assert_eq!(port_counters(&h, "agent"), [17, 0, 17]);
    // A client that connects later starts a clean session.
    let mut client = h.connect("agent");
    driver.post_tx(tx, b"hello");
    driver.kick(tx);
    h.pump();
    let mut buf = [0u8; 64];
    let n = client.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(port_counters(&h, "agent"), [22, 0, 17]);
}

/// A port's (bytes_from_guest, bytes_to_guest, bytes_dropped), from the device's metrics.
fn port_counters(h: &Harness, port: &str) -> [u64; 3] {
    let counters = h.dev().counters();
    let (_, counters) = counters
        .ports
        .iter()
        .find(|(name, _)| name == port)
        .expect("the port has counters");
    let get = |name| counters.iter().find(|(n, _)| *n == name).unwrap().1;
    [
        get("bytes_from_guest"),
        get("bytes_to_guest"),
        get("bytes_dropped"),
    ]
}

#[test]
fn console_output_is_dropped_without_listener() {
    let (mut h, mut driver) = started(ConsoleOutput::Socket("console.sock".into()), &[]);
    let tx = tx_queue(0);
    // Much more than any buffer: the guest never waits.
    for _ in 0..QUEUE_LEN {
        driver.post_tx(tx, &[b'x'; 256 * 1024]);
    }
    driver.kick(tx);
    h.pump();
    assert_eq!(driver.used(tx).len(), usize::from(QUEUE_LEN));
    assert!(h.dev().ports[0].out_buf.is_empty());
    let offered = u64::from(QUEUE_LEN) * 256 * 1024;
    assert_eq!(port_counters(&h, "console"), [offered, 0, offered]);

    // With a listener, output reaches it; input goes to port 0's rx queue once the guest
    // opened it (Linux does right after CONSOLE_PORT).
    driver.send_control(0, control::PORT_OPEN, 1);
    let mut client = UnixStream::connect(h.dir.join("console.sock")).unwrap();
    h.pump();
    driver.post_tx(tx, b"login: ");
    driver.kick(tx);
    h.pump();
    let mut buf = [0u8; 64];
    let n = client.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"login: ");
    client.write_all(b"root\n").unwrap();
    driver.post_rx(rx_queue(0), 64);
    driver.kick(rx_queue(0));
    h.pump();
    assert_eq!(driver.received(rx_queue(0)), vec![b"root\n".to_vec()]);
    assert_eq!(port_counters(&h, "console"), [offered + 7, 5, offered]);

    // A console client leaving sends no control message (port 0 stays open).
    drop(client);
    h.pump();
    assert!(driver.control_messages().is_empty());
}

#[test]
fn console_output_to_file() {
    let (mut h, mut driver) = started(ConsoleOutput::File("hvc0.log".into()), &[]);
    driver.post_tx(tx_queue(0), b"Linux version 6.x\n");
    driver.kick(tx_queue(0));
    h.pump();
    assert_eq!(driver.used(tx_queue(0)).len(), 1);
    let text = std::fs::read(h.dir.join("hvc0.log")).unwrap();
    assert_eq!(text, b"Linux version 6.x\n");
}

#[test]
fn malformed_control_messages_are_ignored() {
    let mut h = Harness::new(ConsoleOutput::Off, &["agent"]);
    let mem = memory();
    let mut driver = Driver::new(&mem, queue_count(1));
    h.activate(&mut driver);
    for _ in 0..8 {
        driver.post_rx(CONTROL_RX, 4096);
    }
    // Short, long, out-of-range port, unknown event, and a device-only event.
    driver.post_tx(CONTROL_TX, &[0, 0, 0, 0]);
    driver.post_tx(CONTROL_TX, &[0u8; 12]);
    driver.post_tx(
        CONTROL_TX,
        &Control::new(7, control::PORT_READY, 1).to_bytes(),
    );
    driver.post_tx(
        CONTROL_TX,
        &Control::new(u32::MAX, control::PORT_OPEN, 1).to_bytes(),
    );
    driver.post_tx(CONTROL_TX, &Control::new(0, 99, 1).to_bytes());
    driver.post_tx(
        CONTROL_TX,
        &Control::new(1, control::PORT_NAME, 1).to_bytes(),
    );
    // A header split over two descriptors is fine (it is 8 bytes in all).
    let bytes = Control::new(0, control::DEVICE_READY, 1).to_bytes();
    mem.write_slice(&bytes, GuestAddress(0x800_0000)).unwrap();
    driver.post_raw(CONTROL_TX, &[(0x800_0000, 3, 0), (0x800_0003, 5, 0)]);
    driver.kick(CONTROL_TX);
    h.pump();
    assert_eq!(driver.used(CONTROL_TX).len(), 7);
    assert_eq!(
        events(&driver.control_messages()),
        vec![(0, control::PORT_ADD, 0), (1, control::PORT_ADD, 0)]
    );
    assert!(!h.dev().ports[0].guest_ready);
}

#[test]
fn malicious_chains_break_nothing() {
    let (mut h, mut driver) = started(ConsoleOutput::Off, &["agent"]);
    driver.send_control(1, control::PORT_OPEN, 1);
    let mut client = h.connect("agent");
    driver.control_messages();
    let (rx, tx) = (rx_queue(1), tx_queue(1));
    let beyond = MEM_SIZE as u64 + 0x1000;

    // tx: out of memory, absurd length, wrong direction, a loop; then a good one.
    driver.post_raw(tx, &[(beyond, 64, 0)]);
    driver.post_raw(tx, &[(0x100_0000, u32::MAX, 0)]);
    driver.post_raw(tx, &[(0x100_0000, 64, VRING_DESC_F_WRITE as u16)]);
    let looped = driver.post_raw(tx, &[(0x100_0000, 4, 0)]);
    driver.store_desc(tx, looped, 0x100_0000, 4, VRING_DESC_F_NEXT as u16, looped);
    driver.post_tx(tx, b"good");
    driver.kick(tx);
    h.pump();
    assert_eq!(driver.used(tx).len(), 5);
    let mut buf = [0u8; 256];
    client.set_nonblocking(true).unwrap();
    let n = client.read(&mut buf).unwrap();
    // The loop is cut by virtio-queue's bound, its bytes sent at most queue-size times;
    // what matters is that "good" arrives last and the device is still alive.
    assert!(buf[..n].ends_with(b"good"), "{:?}", &buf[..n]);

    // rx: out of memory, wrong direction, zero length; the data goes to the next good one.
    client.write_all(b"payload").unwrap();
    driver.post_raw(rx, &[(beyond, 64, VRING_DESC_F_WRITE as u16)]);
    driver.post_raw(rx, &[(0x100_0000, 64, 0)]);
    driver.post_raw(rx, &[(0x100_0000, 0, VRING_DESC_F_WRITE as u16)]);
    let good = driver.post_rx(rx, 64);
    driver.kick(rx);
    h.pump();
    let used = driver.used(rx);
    assert_eq!(used.len(), 4);
    assert_eq!(used[3], (good, 7));
    assert!(used[..3].iter().all(|&(_, len)| len == 0));

    // Control rx buffers that are too small or invalid do not lose the message.
    driver.post_raw(CONTROL_RX, &[(beyond, 64, VRING_DESC_F_WRITE as u16)]);
    driver.post_rx(CONTROL_RX, 4096);
    drop(client);
    h.pump();
    assert!(events(&driver.control_messages()).contains(&(1, control::PORT_OPEN, 0)));
}

#[test]
fn random_garbage_on_every_queue() {
    let (mut h, mut driver) = started(ConsoleOutput::Socket("console.sock".into()), &["agent"]);
    driver.send_control(1, control::PORT_OPEN, 1);
    let mut client = h.connect("agent");
    let _console = UnixStream::connect(h.dir.join("console.sock")).unwrap();
    client.write_all(&[0x55; 4096]).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _round in 0..200 {
        for q in 0..queue_count(1) {
            // Random descriptors (address anywhere, any length, any flags, any next) written
            // over the whole table, then random heads made available.
            for index in 0..QUEUE_LEN {
                let r = next();
                let addr = match r % 4 {
                    0 => next() % (MEM_SIZE as u64 + 0x10_0000),
                    1 => u64::MAX - (next() % 0x1000),
                    _ => 0x100_0000 + next() % 0x100_0000,
                };
                let len = match (r >> 8) % 4 {
                    0 => u32::MAX - (next() as u32 % 16),
                    1 => 0,
                    _ => next() as u32 % 0x2_0000,
                };
                driver.store_desc(
                    q,
                    index,
                    addr,
                    len,
                    (r >> 16) as u16 & 0x7,
                    (r >> 32) as u16,
                );
            }
            for _ in 0..next() % 4 {
                driver.publish(q, (next() % 20) as u16);
            }
            driver.kick(q);
        }
        h.pump();
    }
    // An avail index far ahead of the ring is refused by virtio-queue, every time.
    for q in 0..queue_count(1) {
        let avail = ring_addrs(q).1;
        let idx: u16 = driver.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        driver
            .mem
            .write_obj(idx.wrapping_add(1000), GuestAddress(avail + 2))
            .unwrap();
        driver.kick(q);
    }
    h.pump();
    // Still alive and sane: a fresh driver session works.
    drop(client);
    assert!(h.dev().reset());
    h.pump();
    let mut driver = Driver::new(&driver.mem, queue_count(1));
    let messages = h.handshake(&mut driver);
    assert_eq!(
        events(&messages)[..2],
        [(0, control::PORT_ADD, 0), (1, control::PORT_ADD, 0)]
    );
}

#[test]
fn reset_then_reactivate() {
    let (mut h, mut driver) = started(ConsoleOutput::Off, &["agent"]);
    let _client = h.connect("agent");
    driver.control_messages();
    assert!(h.dev().reset());
    h.pump();
    assert!(h.dev().active.is_none());
    assert!(!h.dev().ports[1].guest_ready);

    // A fresh driver session gets the whole handshake again, with the client announced.
    let mut driver = Driver::new(&driver.mem, queue_count(1));
    let messages = h.handshake(&mut driver);
    assert_eq!(
        events(&messages),
        vec![
            (0, control::PORT_ADD, 0),
            (1, control::PORT_ADD, 0),
            (0, control::CONSOLE_PORT, 1),
            (0, control::PORT_OPEN, 1),
            (1, control::PORT_NAME, 1),
            (1, control::PORT_OPEN, 1),
        ]
    );
}

#[test]
fn construction_errors_name_the_path() {
    let dir = std::env::temp_dir().join(format!("chapeau-console-new-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let port = |socket: &Path| NamedPort {
        name: "agent".into(),
        socket: socket.to_path_buf(),
    };
    let new_err = |console: ConsoleOutput, ports: &[NamedPort]| {
        Console::new(&console, ports).err().unwrap().to_string()
    };
    let err = new_err(ConsoleOutput::Off, &[port(&file)]);
    assert_eq!(
        err,
        format!(
            "{} exists and is not a socket; not replacing it",
            file.display()
        )
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let missing = dir.join("no/such/dir.sock");
    let err = new_err(ConsoleOutput::Off, &[port(&missing)]);
    assert!(
        err.starts_with(&format!(
            "cannot listen on unix socket {}: ",
            missing.display()
        )),
        "{err}"
    );

    // A socket someone listens on is refused, and keeps its listener.
    let live = dir.join("live.sock");
    let theirs = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let err = new_err(ConsoleOutput::Socket(live.clone()), &[]);
    assert_eq!(
        err,
        format!(
            "{} is a socket another process is listening on; not taking it over",
            live.display()
        )
    );
    UnixStream::connect(&live).unwrap();
    theirs.accept().unwrap();

    // A stale socket is replaced, and removed when the device goes away.
    let sock = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let console = Console::new(&ConsoleOutput::Off, &[port(&sock)]).unwrap();
    UnixStream::connect(&sock).unwrap();
    drop(console);
    assert!(!sock.exists());

    let bad = NamedPort {
        name: "a/b".into(),
        socket: dir.join("x.sock"),
    };
    assert!(matches!(
        Console::new(&ConsoleOutput::Off, &[bad]),
        Err(ConsoleError::PortName { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Named-port throughput through the device with the fake driver in this thread (so the CPU
/// time includes the driver's share) and the host client in another:
/// `cargo test -p devices --release console_throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn console_throughput() {
    const TOTAL: usize = 64 << 20;
    let (mut h, mut driver) = started(ConsoleOutput::Off, &["agent"]);
    driver.send_control(1, control::PORT_OPEN, 1);
    let client = h.connect("agent");
    driver.control_messages();

    // host → guest, 4 KiB rx buffers as Linux posts them.
    let mut writer = client.try_clone().unwrap();
    let feeder = std::thread::spawn(move || {
        let block = pattern(64 * 1024);
        for _ in 0..TOTAL / block.len() {
            writer.write_all(&block).unwrap();
        }
    });
    let rx = rx_queue(1);
    let (start, cpu) = (std::time::Instant::now(), thread_cpu_time());
    let mut got = 0;
    while got < TOTAL {
        while driver.room(rx) > 0 {
            driver.post_rx(rx, 4096);
        }
        driver.kick(rx);
        h.em.run_with_timeout(100).unwrap();
        got += driver
            .used(rx)
            .iter()
            .map(|&(_, len)| len as usize)
            .sum::<usize>();
    }
    let (wall, cpu) = (start.elapsed(), thread_cpu_time() - cpu);
    feeder.join().unwrap();
    println!(
        "host->guest: {:.0} MB/s, {:.2} ms CPU/MiB (device + fake driver)",
        TOTAL as f64 / wall.as_secs_f64() / 1e6,
        cpu.as_secs_f64() * 1e3 / (TOTAL >> 20) as f64
    );

    // guest → host, 32 KiB tx buffers.
    let mut reader = client.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        while n < TOTAL {
            n += reader.read(&mut buf).unwrap();
        }
    });
    let tx = tx_queue(1);
    let block = pattern(32 * 1024);
    let (start, cpu) = (std::time::Instant::now(), thread_cpu_time());
    let (mut posted, mut done) = (0, 0);
    while done < TOTAL {
        while driver.room(tx) > 0 && posted < TOTAL {
            driver.post_tx(tx, &block);
            posted += block.len();
        }
        driver.kick(tx);
        h.em.run_with_timeout(100).unwrap();
        done += driver.used(tx).len() * block.len();
    }
    drain.join().unwrap();
    let (wall, cpu) = (start.elapsed(), thread_cpu_time() - cpu);
    println!(
        "guest->host: {:.0} MB/s, {:.2} ms CPU/MiB (device + fake driver)",
        TOTAL as f64 / wall.as_secs_f64() / 1e6,
        cpu.as_secs_f64() * 1e3 / (TOTAL >> 20) as f64
    );
}
