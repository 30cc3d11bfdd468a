//! The device against a real tap in a network namespace each test creates (unshare on its
//! own thread: the namespace, the tap and everything in it vanish when the thread's last
//! descriptor closes, pass or fail). A fake driver posts buffers with virtio-queue's mock
//! rings; the host side is an AF_PACKET socket on the tap, or the namespace's IP stack.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::vhost::tests::Recorder;
use super::vhost::VhostNetBackend;
use super::*;
use crate::virtio::test_util::{desc, used, CountingInterrupt};
use crate::virtio::{ActivatedQueue, QueueNotify, Unconfined, VirtioDevice};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const MEM_SIZE: usize = 32 << 20;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
const CTRL_RING: u64 = 0x3_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x80_0000;
const ETHERTYPE_TEST: [u8; 2] = [0x88, 0xb5];
const TAP: &str = "ctap0";

/// Runs `body` on a thread in a new network namespace.
fn in_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare changes only this thread's network namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        body()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn ip(args: &str) {
    let status = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("run ip");
    assert!(status.success(), "ip {args}");
}

/// The tap, up, with no IPv6 link-local address (no stray router solicitations), address
/// 10.0.0.1/24 and the "guest" 10.0.0.2 at MAC.
fn tap_in_netns(queues: u16, mtu: u32) -> Vec<Tap> {
    let taps = Tap::open_named(TAP, queues).unwrap();
    ip("link set lo up");
    ip(&format!(
        "link set dev {TAP} addrgenmode none mtu {mtu} address 02:00:00:00:00:01"
    ));
    ip(&format!("addr add 10.0.0.1/24 dev {TAP}"));
    ip(&format!("link set {TAP} up"));
    ip(&format!(
        "neigh add 10.0.0.2 lladdr 52:54:00:12:34:56 dev {TAP}"
    ));
    taps
}

/// An AF_PACKET socket on the tap: what it sends, the device reads; what the device writes,
/// it receives.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn open() -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket creation; the fd is owned below.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(TAP).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto as u16;
        addr.sll_ifindex = ifindex;
        // SAFETY: bind with a sockaddr_ll of the right size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0);
        PacketSocket(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: send reads `frame`.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next incoming frame of our test ethertype.
    fn recv_test_frame(&self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 70000];
        loop {
            assert!(Instant::now() < deadline, "no frame reached the host");
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom writes at most buf.len() bytes and one sockaddr_ll.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let frame = &buf[..n as usize];
            if from.sll_pkttype != libc::PACKET_OUTGOING
                && frame.get(12..14) == Some(&ETHERTYPE_TEST)
            {
                return frame.to_vec();
            }
        }
    }
}

/// A device on `taps` (vhost-net through `vhost` when given), unconfined.
fn net_on(taps: Vec<Tap>, index: usize, vhost: Vec<Box<dyn VhostNetBackend>>) -> Net {
    Net::new(NetParams {
        index,
        mac: MAC,
        taps,
        vhost,
        confinement: Arc::new(Unconfined),
    })
    .unwrap()
}

fn test_frame(len: usize, dest: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dest);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    f.extend_from_slice(&ETHERTYPE_TEST);
    f.extend((0..len - 14).map(|i| (i % 251) as u8));
    f
}

type Mock = MockSplitQueue<'static, GuestMemoryMmap>;

/// Guest memory for one test, kept for the rest of the process: the mock rings borrow it
/// and the device threads may still hold it while the test ends.
fn leaked_memory() -> &'static GuestMemoryMmap {
    Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    ))
}

struct Driver {
    mem: &'static GuestMemoryMmap,
    rx: Mock,
    tx: Mock,
    ctrl: Mock,
    net: Net,
    irq: Arc<CountingInterrupt>,
    rx_kick: Arc<QueueNotify>,
    tx_kick: Arc<QueueNotify>,
    ctrl_kick: Arc<QueueNotify>,
}

impl Driver {
    /// A device on `taps`, activated with `features`; `rx_bufs` rx buffers of `buf_len`.
    fn new(taps: Vec<Tap>, features: u64, rx_bufs: u16, buf_len: u32) -> Self {
        let mem = leaked_memory();
        let mut net = net_on(taps, 0, Vec::new());
        assert_eq!(features & !net.avail_features(), 0, "features offered");
        net.set_acked_features(features);
        let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), 256);
        let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), 256);
        let ctrl = MockSplitQueue::create(mem, GuestAddress(CTRL_RING), 64);
        let descs: Vec<_> = (0..u64::from(rx_bufs))
            .map(|i| desc(RX_BUFS + i * 0x4000, buf_len, VRING_DESC_F_WRITE, 0))
            .collect();
        rx.add_desc_chains(&descs, 0).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let kick = || Arc::new(QueueNotify::new().unwrap());
        let (rx_kick, tx_kick, ctrl_kick) = (kick(), kick(), kick());
        let activated =
            |q: &MockSplitQueue<GuestMemoryMmap>, fd: &Arc<QueueNotify>| ActivatedQueue {
                queue: q.create_queue().unwrap(),
                notify: fd.clone(),
            };
        net.activate(
            mem.clone(),
            irq.clone(),
            vec![
                activated(&rx, &rx_kick),
                activated(&tx, &tx_kick),
                activated(&ctrl, &ctrl_kick),
            ],
        )
        .unwrap();
        // Pausing waits until the thread has taken the activation (and set the offloads).
        net.pause();
        net.resume();
        Driver {
            mem,
            rx,
            tx,
            ctrl,
            net,
            irq,
            rx_kick,
            tx_kick,
            ctrl_kick,
        }
    }

    /// Waits until the used ring of `q` has `count` entries.
    fn wait_used(&self, q: &Mock, count: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.used().idx().load() < count {
            assert!(
                Instant::now() < deadline,
                "device completed {} of {count}",
                q.used().idx().load()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Queues `chains` (each a list of descriptors, NEXT flags added) on tx from `first`.
    fn send(&self, first: u16, descs: &[virtio_queue::desc::RawDescriptor]) {
        self.tx.add_desc_chains(descs, first).unwrap();
        self.tx_kick.write(1).unwrap();
    }

    /// The rx used entries from `from` on, with each chain's bytes.
    fn received(&self, from: u16, to: u16, buf_len: u32) -> Vec<(u32, Vec<u8>)> {
        (from..to)
            .map(|i| {
                let (head, len) = used(&self.rx, i);
                let mut data = vec![0u8; len.min(buf_len) as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(RX_BUFS + u64::from(head) * 0x4000))
                    .unwrap();
                (head, data)
            })
            .collect()
    }
}

/// A tx chain: header and frame in one readable descriptor at `slot`.
fn put_tx(mem: &GuestMemoryMmap, slot: u64, header: &[u8; 12], frame: &[u8]) -> (u64, u32) {
    let addr = TX_BUFS + slot * 0x1_0000;
    mem.write_slice(header, GuestAddress(addr)).unwrap();
    mem.write_slice(frame, GuestAddress(addr + 12)).unwrap();
    (addr, (12 + frame.len()) as u32)
}

fn features(extra: &[u32]) -> u64 {
    extra.iter().fold(VIRTIO_F_VERSION_1, |f, b| f | (1 << b))
}

#[test]
fn frames_both_ways() {
    in_netns(|| {
        let taps = tap_in_netns(1, 1500);
        let host = PacketSocket::open();
        let d = Driver::new(taps, features(&[vn::VIRTIO_NET_F_MRG_RXBUF]), 16, 2048);
        // Guest -> host.
        let frame = test_frame(200, [0xff; 6]);
        let (addr, len) = put_tx(d.mem, 0, &[0; 12], &frame);
        d.send(0, &[desc(addr, len, 0, 0)]);
        assert_eq!(host.recv_test_frame(), frame);
        d.wait_used(&d.tx, 1);
        // Host -> guest, for our MAC.
        let frame = test_frame(300, MAC);
        host.send(&frame);
        d.wait_used(&d.rx, 1);
        let (_, data) = d.received(0, 1, 2048).pop().unwrap();
        assert_eq!(data.len(), 12 + 300);
        assert_eq!(&data[10..12], &1u16.to_le_bytes(), "num_buffers");
        assert_eq!(&data[12..], &frame[..]);
        assert!(d.irq.0.load(Ordering::SeqCst) >= 2);
        // The metrics saw both frames (the host may send the tap more: ours is at least one)
        // and the guest's tx kick.
        let counters = d.net.counters().counters;
        let get = |name| counters.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!((get("tx_frames"), get("tx_bytes")), (1, 200));
        assert!(
            get("rx_frames") >= 1 && get("rx_bytes") >= 300,
            "{counters:?}"
        );
        assert_eq!((get("tx_errors"), get("tx_bad_chains")), (0, 0));
        assert_eq!(d.tx_kick.kicks(), 1);
    });
}

#[test]
fn mergeable_buffers_hold_a_jumbo_frame() {
    in_netns(|| {
        let taps = tap_in_netns(1, 9000);
        let host = PacketSocket::open();
        let d = Driver::new(taps, features(&[vn::VIRTIO_NET_F_MRG_RXBUF]), 32, 1536);
        let frame = test_frame(8014, MAC);
        host.send(&frame);
        // 12 + 8014 bytes in 1536-byte buffers: 6 of them.
        d.wait_used(&d.rx, 6);
        let chains = d.received(0, 6, 1536);
        let lens: Vec<usize> = chains.iter().map(|(_, b)| b.len()).collect();
        assert_eq!(
            lens,
            vec![1536, 1536, 1536, 1536, 1536, 12 + 8014 - 5 * 1536]
        );
        let bytes: Vec<u8> = chains.into_iter().flat_map(|(_, b)| b).collect();
        assert_eq!(&bytes[10..12], &6u16.to_le_bytes(), "num_buffers");
        assert_eq!(&bytes[12..], &frame[..]);
    });
}

#[test]
fn checksum_offload_headers_pass_both_ways() {
    in_netns(|| {
        let taps = tap_in_netns(1, 1500);
        let f = features(&[
            vn::VIRTIO_NET_F_MRG_RXBUF,
            vn::VIRTIO_NET_F_CSUM,
            vn::VIRTIO_NET_F_GUEST_CSUM,
        ]);
        let d = Driver::new(taps, f, 16, 2048);
        // Host -> guest: a UDP datagram from the namespace's stack arrives unchecksummed,
        // with NEEDS_CSUM and where the checksum goes.
        let sock = std::net::UdpSocket::bind("10.0.0.1:4000").unwrap();
        sock.send_to(&[7u8; 100], "10.0.0.2:5000").unwrap();
        d.wait_used(&d.rx, 1);
        let (_, data) = d.received(0, 1, 2048).pop().unwrap();
        assert_eq!(
            data[0] & vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            1,
            "flags {:#x}",
            data[0]
        );
        assert_eq!(
            u16::from_le_bytes([data[6], data[7]]),
            14 + 20,
            "csum_start"
        );
        assert_eq!(u16::from_le_bytes([data[8], data[9]]), 6, "csum_offset");
        // Guest -> host: a datagram whose UDP checksum the guest left to the host.
        let payload = b"offloaded checksum";
        let mut frame = Vec::new();
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // the tap's address
        frame.extend_from_slice(&MAC);
        frame.extend_from_slice(&[0x08, 0x00]);
        let total = 20 + 8 + payload.len();
        let mut iph = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            1,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ];
        iph.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        let sum = iph
            .chunks(2)
            .fold(0u32, |s, c| s + u32::from(u16::from_be_bytes([c[0], c[1]])));
        let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
        iph[10..12].copy_from_slice(&sum.to_be_bytes());
        frame.extend_from_slice(&iph);
        let port = sock.local_addr().unwrap().port();
        frame.extend_from_slice(&5000u16.to_be_bytes());
        frame.extend_from_slice(&port.to_be_bytes());
        frame.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        frame.extend_from_slice(&[0xde, 0xad]); // not a checksum: the host fills it
        frame.extend_from_slice(payload);
        let mut header = [0u8; 12];
        header[0] = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        header[6..8].copy_from_slice(&34u16.to_le_bytes());
        header[8..10].copy_from_slice(&6u16.to_le_bytes());
        let (addr, len) = put_tx(d.mem, 0, &header, &frame);
        d.send(0, &[desc(addr, len, 0, 0)]);
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], payload);
        assert_eq!(from.to_string(), "10.0.0.2:5000");
    });
}

#[test]
fn malformed_chains_complete_empty_and_the_device_goes_on() {
    in_netns(|| {
        let taps = tap_in_netns(1, 1500);
        let host = PacketSocket::open();
        let d = Driver::new(taps, features(&[vn::VIRTIO_NET_F_MRG_RXBUF]), 0, 0);
        let good = test_frame(100, [0xff; 6]);
        let (addr, len) = put_tx(d.mem, 0, &[0; 12], &good);
        d.send(
            0,
            &[
                // 0: writable descriptor in a tx chain.
                desc(addr, len, VRING_DESC_F_WRITE, 0),
                // 1: outside guest memory.
                desc(MEM_SIZE as u64 + 0x1000, 100, 0, 0),
                // 2: shorter than the header.
                desc(addr, 4, 0, 0),
                // 3 -> 4 -> 3: a loop.
                desc(addr, 12, VRING_DESC_F_NEXT, 4),
                desc(addr + 12, 8, VRING_DESC_F_NEXT, 3),
            ],
        );
        d.wait_used(&d.tx, 4);
        // A good frame after all that.
        d.send(5, &[desc(addr, len, 0, 0)]);
        assert_eq!(host.recv_test_frame(), good);
        d.wait_used(&d.tx, 5);
        for i in 0..4 {
            assert_eq!(used(&d.tx, i).1, 0);
        }
        // rx: a read-only chain and one outside memory come back empty.
        let rx = &d.rx;
        rx.add_desc_chains(
            &[
                desc(RX_BUFS, 2048, 0, 0),
                desc(MEM_SIZE as u64 - 16, 2048, VRING_DESC_F_WRITE, 0),
                desc(RX_BUFS + 0x4000 * 2, 2048, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        d.rx_kick.write(1).unwrap();
        host.send(&test_frame(64, MAC));
        d.wait_used(&d.rx, 3);
        assert_eq!(used(rx, 0), (0, 0));
        assert_eq!(used(rx, 1), (1, 0));
        assert_eq!(used(rx, 2), (2, 12 + 64));
        let counters = d.net.counters().counters;
        let get = |name| counters.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!((get("tx_bad_chains"), get("tx_frames")), (4, 1));
        assert_eq!(get("rx_bad_chains"), 2);
    });
}

/// On-CPU time so far (ns) of this process's thread named `name`, from its schedstat.
fn thread_run_ns(name: &str) -> u64 {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no thread {name}"))
}

/// Found by the fuzz target net_queue: an avail index more than a queue ahead made the
/// control and tx loops spin forever (virtio-queue keeps saying "more" where it serves
/// nothing), so the queue thread burnt a CPU and never answered pause or reset again.
#[test]
fn an_avail_index_far_ahead_does_not_spin_the_queue_thread() {
    in_netns(|| {
        let taps = tap_in_netns(1, 1500);
        let f = features(&[
            vn::VIRTIO_NET_F_MRG_RXBUF,
            vn::VIRTIO_NET_F_CTRL_VQ,
            vn::VIRTIO_NET_F_CTRL_RX,
        ]);
        let mut d = Driver::new(taps, f, 0, 0);
        for (q, kick) in [
            (&d.ctrl, &d.ctrl_kick),
            (&d.tx, &d.tx_kick),
            (&d.rx, &d.rx_kick),
        ] {
            q.avail().idx().store(u16::to_le(1000));
            kick.write(1).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        d.net.pause();
        let answered = start.elapsed();
        if answered >= Duration::from_secs(2) {
            // Dropping the device would wait for the spinning thread forever.
            std::mem::forget(d);
            panic!("the queue thread took {answered:?} to answer pause");
        }
        d.net.resume();
        let cpu = thread_run_ns("net0-q0");
        std::thread::sleep(Duration::from_millis(300));
        let spent = thread_run_ns("net0-q0") - cpu;
        assert!(
            spent < 50_000_000,
            "the idle queue thread ran {spent} ns in 300 ms"
        );
        // A reset repairs the rings.
        assert!(d.net.reset());
    });
}

#[test]
fn control_queue_sets_rx_mode_mac_and_filters() {
    in_netns(|| {
        let taps = tap_in_netns(1, 1500);
        let host = PacketSocket::open();
        let f = features(&[
            vn::VIRTIO_NET_F_MRG_RXBUF,
            vn::VIRTIO_NET_F_CTRL_VQ,
            vn::VIRTIO_NET_F_CTRL_RX,
            vn::VIRTIO_NET_F_CTRL_MAC_ADDR,
        ]);
        let d = Driver::new(taps, f, 16, 2048);
        let ctrl = &d.ctrl;
        let base = 0x40_0000u64;
        let mut next = 0u16;
        let mut request = |class: u32, cmd: u32, data: &[u8]| {
            let at = base + u64::from(next) * 0x100;
            d.mem
                .write_slice(&[class as u8, cmd as u8], GuestAddress(at))
                .unwrap();
            d.mem.write_slice(data, GuestAddress(at + 2)).unwrap();
            let done = ctrl.used().idx().load() + 1;
            ctrl.add_desc_chains(
                &[
                    desc(at, 2, VRING_DESC_F_NEXT, next + 1),
                    desc(at + 2, data.len() as u32, VRING_DESC_F_NEXT, next + 2),
                    desc(at + 0x80, 1, VRING_DESC_F_WRITE, 0),
                ],
                next,
            )
            .unwrap();
            d.ctrl_kick.write(1).unwrap();
            d.wait_used(ctrl, done);
            next += 3;
            d.mem.read_obj::<u8>(GuestAddress(at + 0x80)).unwrap()
        };
        let ok = vn::VIRTIO_NET_OK as u8;
        assert_eq!(
            request(vn::VIRTIO_NET_CTRL_RX, vn::VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
            ok
        );
        let new_mac = [0x52, 0x54, 0, 0, 0, 0x99];
        assert_eq!(
            request(
                vn::VIRTIO_NET_CTRL_MAC,
                vn::VIRTIO_NET_CTRL_MAC_ADDR_SET,
                &new_mac
            ),
            ok
        );
        assert_eq!(d.net.mac(), new_mac);
        let mut config = [0u8; 6];
        d.net.read_config(0, &mut config);
        assert_eq!(config, new_mac);
        // Malformed or unknown requests are refused, not fatal.
        let err = vn::VIRTIO_NET_ERR as u8;
        assert_eq!(
            request(
                vn::VIRTIO_NET_CTRL_RX,
                vn::VIRTIO_NET_CTRL_RX_PROMISC,
                &[0, 0]
            ),
            err
        );
        assert_eq!(
            request(vn::VIRTIO_NET_CTRL_MQ, 0, &[1, 0]),
            err,
            "MQ not negotiated"
        );
        assert_eq!(request(0x77, 0, &[]), err);
        // Not promiscuous: a frame for another unicast MAC is dropped, ours arrives.
        host.send(&test_frame(80, [0x52, 0x54, 0, 0, 0, 0x42]));
        host.send(&test_frame(90, new_mac));
        d.wait_used(&d.rx, 1);
        let (_, data) = d.received(0, 1, 2048).pop().unwrap();
        assert_eq!(data.len(), 12 + 90);
    });
}

#[test]
fn multiqueue_runs_a_thread_per_pair_and_reset_stops_them_touching_memory() {
    in_netns(|| {
        let taps = tap_in_netns(2, 1500);
        let mut net = net_on(taps, 3, Vec::new());
        assert_ne!(net.avail_features() & (1 << vn::VIRTIO_NET_F_MQ), 0);
        assert_eq!(net.queue_max_sizes().len(), 5);
        let mut pairs = [0u8; 2];
        net.read_config(8, &mut pairs);
        assert_eq!(u16::from_le_bytes(pairs), 2);
        let names = || -> Vec<String> {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .collect()
        };
        // A thread names itself once it runs: wait for both.
        let both = |names: &[String]| {
            ["net3-q0", "net3-q1"]
                .iter()
                .all(|n| names.iter().any(|m| m == n))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !both(&names()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let names = names();
        assert!(names.contains(&"net3-q0".to_string()), "{names:?}");
        assert!(names.contains(&"net3-q1".to_string()), "{names:?}");
        net.pause();
        net.resume();
        assert!(net.reset());
        drop(net);
    });
}

#[test]
fn tap_errors_say_why() {
    let err = Tap::open_named("a-very-long-tap-name", 1).unwrap_err();
    assert!(err.to_string().contains("too long"), "{err}");
    let err = Tap::adopt(9999).unwrap_err();
    assert_eq!(err.to_string(), "descriptor 9999 is not open");
    let file = std::fs::File::open("/dev/null").unwrap();
    let err = Tap::adopt(file.as_raw_fd()).unwrap_err();
    assert!(
        err.to_string()
            .contains("is not a tap: not a tun/tap device"),
        "{err}"
    );
    // Still ours to close: adopt handed it back.
    drop(file);
    in_netns(|| {
        let _held = Tap::open_named("busy0", 1).unwrap();
        let err = Tap::open_named("busy0", 2).unwrap_err();
        assert!(err.to_string().contains("is busy"), "{err}");
    });
}

#[test]
fn vhost_setup_and_teardown_sequence() {
    in_netns(|| {
        let taps = tap_in_netns(1, 1500);
        let recorder = Recorder::default();
        let mut net = net_on(
            taps,
            0,
            vec![Box::new(recorder.clone()) as Box<dyn VhostNetBackend>],
        );
        assert!(net.uses_vhost());
        let mem = leaked_memory();
        net.set_acked_features(features(&[
            vn::VIRTIO_NET_F_MRG_RXBUF,
            vn::VIRTIO_NET_F_CSUM,
        ]));
        let queue = |ring| MockSplitQueue::create(mem, GuestAddress(ring), 256);
        let (rx, tx, ctrl) = (queue(RX_RING), queue(TX_RING), queue(CTRL_RING));
        let activated = |q: &MockSplitQueue<GuestMemoryMmap>| ActivatedQueue {
            queue: q.create_queue().unwrap(),
            notify: Arc::new(QueueNotify::new().unwrap()),
        };
        net.activate(
            mem.clone(),
            Arc::new(CountingInterrupt::default()),
            vec![activated(&rx), activated(&tx), activated(&ctrl)],
        )
        .unwrap();
        // Paused, vhost has no tap and so touches no guest memory; resumed, it has it again.
        net.pause();
        net.resume();
        assert!(net.reset());
        let calls = recorder.calls();
        let mrg = 1u64 << vn::VIRTIO_NET_F_MRG_RXBUF;
        let ring = |q: &MockSplitQueue<GuestMemoryMmap>| {
            format!(
                "{:#x} {:#x} {:#x}",
                q.desc_table_addr().0,
                q.avail_addr().0,
                q.used_addr().0
            )
        };
        let mut expected = vec![
            "set_owner".to_string(),
            "get_features".into(),
            format!("set_features {:#x}", VIRTIO_F_VERSION_1 | mrg),
            "set_mem_table 1 regions".into(),
        ];
        for (i, q) in [&rx, &tx].into_iter().enumerate() {
            expected.extend([
                format!("set_vring_num {i} 256"),
                format!("set_vring_addr {i} {}", ring(q)),
                format!("set_vring_base {i} 0"),
                format!("set_vring_call {i}"),
                format!("set_vring_err {i}"),
                format!("set_vring_kick {i}"),
            ]);
        }
        expected.extend([
            "set_backend 0 tap".to_string(),
            "set_backend 1 tap".into(),
            // pause, resume
            "set_backend 0 none".into(),
            "set_backend 1 none".into(),
            "set_backend 0 tap".into(),
            "set_backend 1 tap".into(),
            // reset
            "set_backend 0 none".into(),
            "set_backend 1 none".into(),
            "get_vring_base 0".into(),
            "get_vring_base 1".into(),
            "reset_owner".into(),
        ]);
        assert_eq!(calls, expected);
    });
}

#[test]
fn vhost_setup_failure_tears_down() {
    in_netns(|| {
        let taps = tap_in_netns(1, 1500);
        let recorder = Recorder {
            fail_at: Some("set_vring_addr"),
            ..Default::default()
        };
        let mut net = net_on(
            taps,
            0,
            vec![Box::new(recorder.clone()) as Box<dyn VhostNetBackend>],
        );
        let mem = leaked_memory();
        net.set_acked_features(VIRTIO_F_VERSION_1);
        let queue = |ring| MockSplitQueue::create(mem, GuestAddress(ring), 256);
        let qs: Vec<_> = [RX_RING, TX_RING, CTRL_RING]
            .into_iter()
            .map(|r| ActivatedQueue {
                queue: queue(r).create_queue().unwrap(),
                notify: Arc::new(QueueNotify::new().unwrap()),
            })
            .collect();
        net.activate(mem.clone(), Arc::new(CountingInterrupt::default()), qs)
            .unwrap();
        net.pause(); // waits until the worker has handled the activation
        let calls = recorder.calls();
        assert!(
            calls.iter().any(|c| c.starts_with("set_vring_addr 0")),
            "{calls:?}"
        );
        assert!(!calls.iter().any(|c| c == "set_backend 0 tap"), "{calls:?}");
        assert_eq!(
            calls.last().map(String::as_str),
            Some("reset_owner"),
            "{calls:?}"
        );
    });
}
