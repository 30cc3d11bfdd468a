//! One queue pair's thread (`net{N}-q{M}`): moves frames between the pair's virtqueues and its
//! tap queue, with readv/writev straight between guest memory and the tap (the kernel's copy
//! is the only one). Thread 0 also serves the control queue, and with vhost-net sets up the
//! kernel backend and forwards its used-buffer signals.
//!
//! Receive uses mergeable buffers: chains are taken from the rx queue until they can hold the
//! largest frame the tap may deliver, one readv fills as many as the frame needs, and the rest
//! stay with us for the next frame. Notifications are batched per wake (EVENT_IDX: the guest
//! kicks only when it must, and is interrupted once per batch).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::{self, CtrlContext, RxFilter};
use super::tap::{Tap, VNET_HDR_LEN};
use super::vhost::{VhostNetBackend, VhostSession};
use super::{tap_offloads, NetError, NetStats, Shared, VIRTIO_RING_F_INDIRECT_DESC};
use crate::virtio::chain::{pop_chain, rearm};
use crate::virtio::{
    ActivatedQueue, InterruptKind, QueueNotify, ThreadConfinement, VirtioInterrupt,
};

/// The largest frame a tap hands over with segmentation offloads on: a 64 KiB GSO packet
/// plus Ethernet and VLAN headers, after the virtio-net header.
const MAX_GSO_FRAME: u64 = (VNET_HDR_LEN + 65535 + 14 + 4) as u64;
/// Without them: a jumbo frame.
const MAX_PLAIN_FRAME: u64 = (VNET_HDR_LEN + 9216 + 14 + 4) as u64;
/// Frames moved per direction per wake before the other direction and the mailbox get a turn.
const FRAMES_PER_WAKE: usize = 256;
/// Descriptors one chain may have (Linux uses at most MAX_SKB_FRAGS + 2 for tx).
const MAX_SEGMENTS: usize = 64;
/// How long a reset or pause waits for a thread before giving up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

const TOKEN_MAILBOX: u64 = 0;
const TOKEN_TAP: u64 = 1;
const TOKEN_RX_KICK: u64 = 2;
const TOKEN_TX_KICK: u64 = 3;
const TOKEN_CTRL_KICK: u64 = 4;
/// vhost call eventfd of queue i: TOKEN_VHOST_CALL + i.
const TOKEN_VHOST_CALL: u64 = 16;

/// A pair's two queues at activation.
pub(crate) struct PairQueues {
    pub rx: ActivatedQueue,
    pub tx: ActivatedQueue,
    pub pair: usize,
}

pub(crate) struct Activation {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub acked_features: u64,
    pub pairs: Vec<PairQueues>,
    pub ctrl: Option<ActivatedQueue>,
    /// Queue pairs the driver may use.
    pub active_pairs: usize,
}

pub(crate) enum Command {
    Activate(Box<Activation>),
    Reset,
    Pause,
    Resume,
    Exit,
    /// Serve every queue now, before the command counts as done (a fake driver's step).
    #[cfg(any(test, feature = "fake-driver"))]
    Quiesce,
}

#[derive(Default)]
struct MailboxState {
    pending: VecDeque<Command>,
    posted: u64,
    done: u64,
    exited: bool,
}

/// Commands from the device (vCPU or vmm thread) to a worker, and their completion.
pub(crate) struct Mailbox {
    state: Mutex<MailboxState>,
    cond: Condvar,
    wake: EventFd,
}

impl Mailbox {
    fn new() -> std::io::Result<Self> {
        Ok(Mailbox {
            state: Mutex::new(MailboxState::default()),
            cond: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MailboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn post(&self, command: Command) {
        let mut state = self.lock();
        state.pending.push_back(command);
        state.posted += 1;
        let _ = self.wake.write(1);
    }

    /// Waits until the worker has carried out everything posted (or has ended).
    pub fn wait_idle(&self) {
        let mut state = self.lock();
        let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
        while !state.exited && state.done < state.posted {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                log::error!("virtio-net: a queue thread did not answer in {COMMAND_TIMEOUT:?}");
                return;
            }
            state = self
                .cond
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn take(&self) -> Option<Command> {
        self.lock().pending.pop_front()
    }

    fn complete(&self) {
        let mut state = self.lock();
        state.done += 1;
        self.cond.notify_all();
    }

    fn mark_exited(&self) {
        self.lock().exited = true;
        self.cond.notify_all();
    }
}

pub(crate) struct WorkerThread {
    pub mailbox: Arc<Mailbox>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerThread {
    pub fn spawn(
        name: String,
        index: usize,
        taps: Arc<[Tap]>,
        shared: Arc<Shared>,
        confinement: Arc<dyn ThreadConfinement>,
        vhost: Vec<Box<dyn VhostNetBackend>>,
    ) -> Result<Self, NetError> {
        let mailbox = Arc::new(Mailbox::new().map_err(NetError::EventFd)?);
        let theirs = mailbox.clone();
        let label = name.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                block_signals();
                if let Err(e) = confinement.confine("net") {
                    log::error!("{label}: cannot confine the thread, it stops: {e}");
                } else {
                    let mut worker = Worker {
                        name: label,
                        index,
                        taps,
                        shared,
                        mailbox: theirs.clone(),
                        vhost_backends: vhost,
                        active: None,
                        paused: false,
                        deferred_calls: 0,
                    };
                    if let Err(e) = worker.run() {
                        log::error!("{}: stopped: {e}", worker.name);
                    }
                }
                theirs.mark_exited();
            })
            .map_err(|source| NetError::Spawn { name, source })?;
        Ok(WorkerThread {
            mailbox,
            thread: Some(thread),
        })
    }

    pub fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Process signals (SIGTERM, SIGINT) belong to the `vmm` thread's signalfd; a queue thread
/// may be started before the VMM blocks them, so it blocks them itself.
fn block_signals() {
    // SAFETY: sigfillset initialises the set on our stack; pthread_sigmask reads it and
    // changes only this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Counts events a guest can cause at will and logs the first, then every 1024th.
#[derive(Default)]
struct RateLimit(u64);

impl RateLimit {
    fn hit(&mut self) -> Option<u64> {
        self.0 += 1;
        (self.0 == 1 || self.0.is_multiple_of(1024)).then_some(self.0)
    }
}

/// One popped rx chain: its writable segments as iovecs into guest memory.
struct RxChain {
    head: u16,
    iov: Vec<libc::iovec>,
    /// (guest address, length) of each segment, for the header fix-ups.
    segs: Vec<(GuestAddress, usize)>,
    capacity: u64,
}

/// Builds iovecs for `len` bytes at `addr`; false if any part is outside guest memory.
fn push_iovecs(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    iov: &mut Vec<libc::iovec>,
) -> bool {
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let Ok(slice) = slice else {
            return false;
        };
        iov.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    true
}

struct RxState {
    queue: Queue,
    kick: Arc<QueueNotify>,
    index: u16,
    spare: VecDeque<RxChain>,
    spare_capacity: u64,
    /// Out of buffers: wait for the driver's kick.
    starved: bool,
    /// A frame read while the guest's buffers were short, waiting for more.
    pending: Option<Vec<u8>>,
    filter: RxFilter,
    filter_gen: u64,
    iov: Vec<libc::iovec>,
    bad: RateLimit,
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    indirect: bool,
    stats: Arc<NetStats>,
}

struct TxState {
    queue: Queue,
    kick: Arc<QueueNotify>,
    index: u16,
    iov: Vec<libc::iovec>,
    bad: RateLimit,
    io_errors: RateLimit,
    stats: Arc<NetStats>,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    acked_features: u64,
    rx: Option<RxState>,
    tx: Option<TxState>,
    ctrl: Option<(Queue, Arc<QueueNotify>, u16)>,
    vhost: Option<VhostSession>,
    /// Work left after a budget ran out: poll again without sleeping.
    more: bool,
}

struct Worker {
    name: String,
    index: usize,
    taps: Arc<[Tap]>,
    shared: Arc<Shared>,
    mailbox: Arc<Mailbox>,
    vhost_backends: Vec<Box<dyn VhostNetBackend>>,
    active: Option<Active>,
    paused: bool,
    /// vhost queues that signalled used buffers while paused (bit = queue index): their
    /// interrupts are raised on resume.
    deferred_calls: u64,
}

fn add(epoll: &Epoll, fd: i32, token: u64, events: EventSet) -> std::io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
}

fn remove(epoll: &Epoll, fd: i32) {
    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
}

impl Worker {
    fn tap(&self) -> &Tap {
        &self.taps[self.index]
    }

    fn run(&mut self) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        add(
            &epoll,
            self.mailbox.wake.as_raw_fd(),
            TOKEN_MAILBOX,
            EventSet::IN,
        )?;
        if self.vhost_backends.is_empty() {
            // Edge-triggered: a frame arriving wakes us once; we read until the tap is empty
            // or the guest runs out of buffers (then its rx kick brings us back).
            add(
                &epoll,
                self.tap().as_raw_fd(),
                TOKEN_TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            )?;
        }
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let more = self.active.as_ref().is_some_and(|a| a.more) && !self.paused;
            let n = match epoll.wait(if more { 0 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut kick_rx = more;
            let mut kick_tx = more;
            let mut kick_ctrl = false;
            let mut commands = false;
            for event in &events[..n] {
                match event.data() {
                    // After the kicks of this batch: a kick the guest sent before a pause is
                    // read (and counted) before the pause completes, never after.
                    TOKEN_MAILBOX => commands = true,
                    TOKEN_TAP => kick_rx = true,
                    TOKEN_RX_KICK => {
                        if let Some(rx) = self.active.as_mut().and_then(|a| a.rx.as_mut()) {
                            let _ = rx.kick.read();
                            rx.starved = false;
                        }
                        kick_rx = true;
                    }
                    TOKEN_TX_KICK => {
                        if let Some(tx) = self.active.as_ref().and_then(|a| a.tx.as_ref()) {
                            let _ = tx.kick.read();
                        }
                        kick_tx = true;
                    }
                    TOKEN_CTRL_KICK => kick_ctrl = true,
                    token if token >= TOKEN_VHOST_CALL => {
                        if let Some(active) = self.active.as_ref() {
                            if let Some(vhost) = active.vhost.as_ref() {
                                let queue = (token - TOKEN_VHOST_CALL) as usize;
                                if vhost.take_call(queue) {
                                    if self.paused {
                                        self.deferred_calls |= 1 << (queue % 64);
                                    } else {
                                        let _ = active
                                            .interrupt
                                            .trigger(InterruptKind::Queue(queue as u16));
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            if commands {
                let _ = self.mailbox.wake.read();
                while let Some(command) = self.mailbox.take() {
                    let exit = matches!(command, Command::Exit);
                    self.apply(command, &epoll);
                    self.mailbox.complete();
                    if exit {
                        return Ok(());
                    }
                }
                kick_rx = true;
                kick_tx = true;
                kick_ctrl = true;
            }
            self.serve(kick_tx, kick_rx, kick_ctrl);
        }
    }

    /// Serves the queues that were kicked (or have work left).
    fn serve(&mut self, tx: bool, rx: bool, ctrl: bool) {
        if self.paused {
            return;
        }
        let tap = &self.taps[self.index];
        let Some(active) = self.active.as_mut() else {
            return;
        };
        active.more = false;
        if tx {
            active.process_tx(tap);
        }
        if rx {
            active.refresh_filter(&self.shared);
            active.process_rx(tap);
        }
        if ctrl {
            active.process_ctrl(&self.shared, &self.taps);
        }
    }

    fn apply(&mut self, command: Command, epoll: &Epoll) {
        match command {
            Command::Activate(activation) => {
                self.deactivate(epoll);
                self.activate(*activation, epoll);
            }
            Command::Reset | Command::Exit => self.deactivate(epoll),
            Command::Pause => {
                self.paused = true;
                self.attach_vhost_taps(false);
            }
            Command::Resume => {
                self.attach_vhost_taps(true);
                self.paused = false;
                self.raise_deferred_calls();
            }
            #[cfg(any(test, feature = "fake-driver"))]
            Command::Quiesce => self.serve(true, true, true),
        }
    }

    /// Pause and resume for a vhost-run pair: vhost works on guest memory by itself, so its
    /// taps are detached while paused.
    fn attach_vhost_taps(&mut self, attached: bool) {
        if let Some(vhost) = self.active.as_ref().and_then(|a| a.vhost.as_ref()) {
            vhost.attach_taps(&mut self.vhost_backends, &self.taps, attached);
        }
    }

    fn raise_deferred_calls(&mut self) {
        let deferred = std::mem::take(&mut self.deferred_calls);
        let Some(active) = self.active.as_ref() else {
            return;
        };
        for queue in (0..64u16).filter(|q| deferred & (1 << q) != 0) {
            let _ = active.interrupt.trigger(InterruptKind::Queue(queue));
        }
    }

    fn activate(&mut self, a: Activation, epoll: &Epoll) {
        let Activation {
            mem,
            interrupt,
            acked_features,
            pairs,
            ctrl,
            active_pairs,
        } = a;
        let mut active = Active {
            mem,
            interrupt,
            acked_features,
            rx: None,
            tx: None,
            ctrl: None,
            vhost: None,
            more: true,
        };
        if let Some(c) = ctrl {
            let index = (2 * active_pairs) as u16;
            if add(epoll, c.notify.as_raw_fd(), TOKEN_CTRL_KICK, EventSet::IN).is_ok() {
                active.ctrl = Some((c.queue, c.notify, index));
            }
        }
        let offloads = tap_offloads(acked_features);
        for tap in self.taps.iter() {
            if let Err(e) = tap.set_offload(offloads) {
                log::warn!("{}: {e}", self.name);
            }
        }
        if !self.vhost_backends.is_empty() {
            match VhostSession::start(
                &mut self.vhost_backends,
                &active.mem,
                acked_features,
                pairs,
                &self.taps,
            ) {
                Ok(session) => {
                    for (i, call) in session.calls() {
                        let _ = add(epoll, call, TOKEN_VHOST_CALL + i as u64, EventSet::IN);
                    }
                    active.vhost = Some(session);
                }
                Err(e) => log::error!("{}: vhost-net setup failed: {e}", self.name),
            }
            self.active = Some(active);
            return;
        }
        if let Some(pair) = pairs.into_iter().next() {
            let PairQueues { rx, tx, pair } = pair;
            let rx_index = (2 * pair) as u16;
            let ok = add(epoll, rx.notify.as_raw_fd(), TOKEN_RX_KICK, EventSet::IN).is_ok()
                && add(epoll, tx.notify.as_raw_fd(), TOKEN_TX_KICK, EventSet::IN).is_ok();
            if ok {
                let filter = self
                    .shared
                    .filter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                active.rx = Some(RxState {
                    queue: rx.queue,
                    kick: rx.notify,
                    index: rx_index,
                    spare: VecDeque::new(),
                    spare_capacity: 0,
                    starved: false,
                    pending: None,
                    filter,
                    filter_gen: self.shared.filter_gen.load(Ordering::Acquire),
                    iov: Vec::new(),
                    bad: RateLimit::default(),
                    indirect: acked_features & VIRTIO_RING_F_INDIRECT_DESC != 0,
                    stats: self.shared.stats.clone(),
                });
                active.tx = Some(TxState {
                    queue: tx.queue,
                    kick: tx.notify,
                    index: rx_index + 1,
                    iov: Vec::new(),
                    bad: RateLimit::default(),
                    io_errors: RateLimit::default(),
                    stats: self.shared.stats.clone(),
                });
            }
        }
        self.active = Some(active);
    }

    /// Lets go of the queues and guest memory (reset, exit, or a new activation).
    fn deactivate(&mut self, epoll: &Epoll) {
        self.deferred_calls = 0;
        let Some(mut active) = self.active.take() else {
            return;
        };
        if let Some(rx) = &active.rx {
            remove(epoll, rx.kick.as_raw_fd());
        }
        if let Some(tx) = &active.tx {
            remove(epoll, tx.kick.as_raw_fd());
        }
        if let Some((_, kick, _)) = &active.ctrl {
            remove(epoll, kick.as_raw_fd());
        }
        if let Some(session) = active.vhost.take() {
            for (_, call) in session.calls() {
                remove(epoll, call);
            }
            session.stop(&mut self.vhost_backends);
        }
        // Every queue of a multiqueue tap serves again after a reset.
        if self.index == 0 && self.taps.len() > 1 {
            for tap in self.taps.iter() {
                let _ = tap.set_queue_enabled(true);
            }
        }
    }
}

impl Active {
    fn has(&self, feature: u32) -> bool {
        self.acked_features & (1 << feature) != 0
    }

    fn refresh_filter(&mut self, shared: &Shared) {
        let Some(rx) = self.rx.as_mut() else { return };
        let generation = shared.filter_gen.load(Ordering::Acquire);
        if generation != rx.filter_gen {
            rx.filter = shared
                .filter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            rx.filter_gen = generation;
        }
    }

    fn process_ctrl(&mut self, shared: &Shared, taps: &[Tap]) {
        let max_pairs = if self.has(vn::VIRTIO_NET_F_MQ) {
            taps.len()
        } else {
            1
        };
        let Some((queue, kick, index)) = self.ctrl.as_mut() else {
            return;
        };
        let _ = kick.read();
        let ctx = CtrlContext {
            mem: &self.mem,
            shared,
            taps,
            acked_features: self.acked_features,
            max_pairs,
        };
        if ctrl::process(queue, &ctx) {
            signal_used(&self.mem, self.interrupt.as_ref(), queue, *index);
        }
    }

    /// Guest → tap: one writev per frame, header and all, straight from guest memory.
    fn process_tx(&mut self, tap: &Tap) {
        let mem = &self.mem;
        let indirect = self.acked_features & VIRTIO_RING_F_INDIRECT_DESC != 0;
        let Some(tx) = self.tx.as_mut() else { return };
        let mut used = false;
        let mut budget = FRAMES_PER_WAKE;
        'outer: loop {
            let _ = tx.queue.disable_notification(mem);
            while let Some(chain) = pop_chain(&mut tx.queue, mem, indirect) {
                let head = chain.head_index();
                tx.iov.clear();
                let mut valid = true;
                let mut total = 0usize;
                for (n, desc) in chain.enumerate() {
                    if desc.is_write_only() || n >= MAX_SEGMENTS {
                        valid = false;
                        break;
                    }
                    total = total.saturating_add(desc.len() as usize);
                    if !push_iovecs(mem, desc.addr(), desc.len() as usize, &mut tx.iov) {
                        valid = false;
                        break;
                    }
                }
                if !valid || total < VNET_HDR_LEN || total as u64 > MAX_GSO_FRAME {
                    NetStats::add(&tx.stats.tx_bad_chains, 1);
                    if let Some(n) = tx.bad.hit() {
                        log::warn!("virtio-net: malformed tx chain dropped ({n} so far)");
                    }
                } else {
                    // SAFETY: every iovec points into guest memory that `mem` keeps mapped
                    // (get_slices checked each range); writev only reads it.
                    let ret = unsafe {
                        libc::writev(tap.as_raw_fd(), tx.iov.as_ptr(), tx.iov.len() as i32)
                    };
                    if ret < 0 {
                        NetStats::add(&tx.stats.tx_errors, 1);
                        if let Some(n) = tx.io_errors.hit() {
                            log::warn!(
                                "virtio-net: tap {}: write: {} ({n} frames dropped)",
                                tap.name(),
                                std::io::Error::last_os_error()
                            );
                        }
                    } else {
                        NetStats::add(&tx.stats.tx_frames, 1);
                        NetStats::add(&tx.stats.tx_bytes, (total - VNET_HDR_LEN) as u64);
                    }
                }
                if tx.queue.add_used(mem, head, 0).is_err() {
                    break 'outer;
                }
                used = true;
                budget -= 1;
                if budget == 0 {
                    self.more = true;
                    break 'outer;
                }
            }
            if !rearm(&mut tx.queue, mem) {
                break;
            }
        }
        if used {
            signal_used(mem, self.interrupt.as_ref(), &mut tx.queue, tx.index);
        }
    }

    /// The largest frame the tap may hand the guest with the negotiated offloads.
    fn max_frame(&self) -> u64 {
        let gso = [
            vn::VIRTIO_NET_F_GUEST_TSO4,
            vn::VIRTIO_NET_F_GUEST_TSO6,
            vn::VIRTIO_NET_F_GUEST_UFO,
            vn::VIRTIO_NET_F_GUEST_USO4,
            vn::VIRTIO_NET_F_GUEST_USO6,
        ];
        if gso.iter().any(|f| self.has(*f)) {
            MAX_GSO_FRAME
        } else {
            MAX_PLAIN_FRAME
        }
    }

    /// Tap → guest.
    fn process_rx(&mut self, tap: &Tap) {
        let mergeable = self.has(vn::VIRTIO_NET_F_MRG_RXBUF);
        let max_frame = self.max_frame();
        let mem = &self.mem;
        let Some(rx) = self.rx.as_mut() else { return };
        let mut used = false;
        let mut budget_spent = true;
        for _ in 0..FRAMES_PER_WAKE {
            if rx.starved {
                budget_spent = false;
                break;
            }
            // A frame that came when the guest's buffers were short waits for more.
            if let Some(len) = rx.pending.as_ref().map(|p| p.len() as u64) {
                used |= rx.fill(mem, len);
                if rx.spare_capacity < len {
                    if rx.wait_for_buffers(mem) {
                        continue;
                    }
                    budget_spent = false;
                    break;
                }
                match rx.deliver_pending(mem) {
                    Receive::Frame => used = true,
                    _ => NetStats::add(&rx.stats.rx_dropped, 1),
                }
                continue;
            }
            // Mergeable: enough chains for the largest frame; otherwise one (big) chain.
            let need = if mergeable { max_frame } else { 1 };
            used |= rx.fill(mem, need);
            if rx.spare.is_empty() {
                if rx.wait_for_buffers(mem) {
                    continue;
                }
                budget_spent = false;
                break;
            }
            let received = if !mergeable || rx.spare_capacity >= max_frame {
                rx.receive(mem, tap, mergeable)
            } else {
                // The ring has no more for now: read into our own buffer rather than risk
                // truncating a large frame (its one extra copy is the price of a short ring).
                rx.receive_bounced(mem, tap)
            };
            match received {
                Receive::Frame => used = true,
                Receive::Dropped => NetStats::add(&rx.stats.rx_dropped, 1),
                Receive::Empty => {
                    budget_spent = false;
                    break;
                }
            }
        }
        if used {
            signal_used(mem, self.interrupt.as_ref(), &mut rx.queue, rx.index);
        }
        // Budget spent with frames possibly left in the tap (edge-triggered: no new event).
        if budget_spent {
            self.more = true;
        }
    }
}

enum Receive {
    Frame,
    Dropped,
    Empty,
}

impl RxState {
    /// Pops chains until `need` bytes are available; completes malformed chains with 0
    /// bytes. Returns whether any chain was completed.
    fn fill(&mut self, mem: &GuestMemoryMmap, need: u64) -> bool {
        let mut used = false;
        while self.spare_capacity < need {
            let Some(chain) = pop_chain(&mut self.queue, mem, self.indirect) else {
                break;
            };
            let head = chain.head_index();
            let mut entry = RxChain {
                head,
                iov: Vec::new(),
                segs: Vec::new(),
                capacity: 0,
            };
            let mut valid = true;
            for (n, desc) in chain.enumerate() {
                let len = desc.len() as usize;
                if !desc.is_write_only()
                    || n >= MAX_SEGMENTS
                    || !push_iovecs(mem, desc.addr(), len, &mut entry.iov)
                {
                    valid = false;
                    break;
                }
                entry.segs.push((desc.addr(), len));
                entry.capacity += len as u64;
            }
            if !valid || entry.capacity < VNET_HDR_LEN as u64 {
                NetStats::add(&self.stats.rx_bad_chains, 1);
                if let Some(n) = self.bad.hit() {
                    log::warn!("virtio-net: malformed rx chain returned empty ({n} so far)");
                }
                if self.queue.add_used(mem, head, 0).is_ok() {
                    used = true;
                }
                continue;
            }
            self.spare_capacity += entry.capacity;
            self.spare.push_back(entry);
        }
        used
    }

    /// Reads one frame into the spare chains.
    fn receive(&mut self, mem: &GuestMemoryMmap, tap: &Tap, mergeable: bool) -> Receive {
        self.iov.clear();
        let mut capacity = 0u64;
        let chains = if mergeable { self.spare.len() } else { 1 };
        for chain in self.spare.iter().take(chains) {
            if self.iov.len() + chain.iov.len() > 1024 {
                break;
            }
            self.iov.extend_from_slice(&chain.iov);
            capacity += chain.capacity;
        }
        // SAFETY: every iovec points into guest memory that `mem` keeps mapped (get_slices
        // checked each range when the chain was taken); the device owns these buffers until
        // it puts them on the used ring.
        let n = unsafe { libc::readv(tap.as_raw_fd(), self.iov.as_ptr(), self.iov.len() as i32) };
        if n < 0 {
            return Receive::Empty;
        }
        let n = n as u64;
        if n > capacity {
            // Truncated: the guest's buffers were too small.
            return Receive::Dropped;
        }
        self.complete(mem, n)
    }

    /// Reads one frame into the bounce buffer and hands it over if the buffers we hold fit it.
    fn receive_bounced(&mut self, mem: &GuestMemoryMmap, tap: &Tap) -> Receive {
        let mut bounce = vec![0u8; MAX_GSO_FRAME as usize];
        // SAFETY: read into a buffer we own, at most its length.
        let n = unsafe { libc::read(tap.as_raw_fd(), bounce.as_mut_ptr().cast(), bounce.len()) };
        if n < 0 {
            return Receive::Empty;
        }
        bounce.truncate(n as usize);
        self.pending = Some(bounce);
        if self.spare_capacity >= n as u64 {
            return self.deliver_pending(mem);
        }
        Receive::Dropped
    }

    /// Copies the pending frame into the spare chains (which hold enough room) and hands it
    /// over.
    fn deliver_pending(&mut self, mem: &GuestMemoryMmap) -> Receive {
        let Some(frame) = self.pending.take() else {
            return Receive::Dropped;
        };
        let mut done = 0;
        for &(addr, len) in self.spare.iter().flat_map(|c| c.segs.iter()) {
            if done == frame.len() {
                break;
            }
            let take = len.min(frame.len() - done);
            if mem.write_slice(&frame[done..done + take], addr).is_err() {
                return Receive::Dropped;
            }
            done += take;
        }
        self.complete(mem, frame.len() as u64)
    }

    /// Out of buffers: asks the driver to kick when it adds some; true if it already has.
    fn wait_for_buffers(&mut self, mem: &GuestMemoryMmap) -> bool {
        if rearm(&mut self.queue, mem) {
            return true;
        }
        self.starved = true;
        NetStats::add(&self.stats.rx_no_buffer, 1);
        false
    }

    /// Hands over the frame of `n` bytes at the start of the spare chains: checks the
    /// destination against the guest's filter, sets num_buffers, puts the chains it filled
    /// on the used ring.
    fn complete(&mut self, mem: &GuestMemoryMmap, n: u64) -> Receive {
        if n < (VNET_HDR_LEN + 14) as u64 {
            return Receive::Dropped;
        }
        let mut dest = [0u8; 6];
        if !self.read_packet(mem, VNET_HDR_LEN, &mut dest) || !self.filter.accepts(&dest) {
            return Receive::Dropped;
        }
        // Hand over as many chains as the frame filled.
        let mut left = n;
        let mut count: u16 = 0;
        let mut taken = Vec::new();
        while left > 0 {
            let Some(chain) = self.spare.pop_front() else {
                break;
            };
            let len = left.min(chain.capacity);
            left -= len;
            self.spare_capacity -= chain.capacity;
            count += 1;
            taken.push((chain, len as u32));
        }
        if let Some((first, _)) = taken.first() {
            // num_buffers, the last field of virtio_net_hdr_v1.
            write_at(mem, first, 10, &count.to_le_bytes());
        }
        for (chain, len) in taken {
            let _ = self.queue.add_used(mem, chain.head, len);
        }
        NetStats::add(&self.stats.rx_frames, 1);
        NetStats::add(&self.stats.rx_bytes, n - VNET_HDR_LEN as u64);
        Receive::Frame
    }

    /// Reads `out.len()` bytes at `offset` of the frame in the spare chains.
    fn read_packet(&self, mem: &GuestMemoryMmap, offset: usize, out: &mut [u8]) -> bool {
        let mut segs = self.spare.iter().flat_map(|c| c.segs.iter());
        let mut skip = offset;
        let mut filled = 0;
        for &(addr, len) in segs.by_ref() {
            if skip >= len {
                skip -= len;
                continue;
            }
            let take = (len - skip).min(out.len() - filled);
            if mem
                .read_slice(
                    &mut out[filled..filled + take],
                    addr.unchecked_add(skip as u64),
                )
                .is_err()
            {
                return false;
            }
            filled += take;
            skip = 0;
            if filled == out.len() {
                return true;
            }
        }
        false
    }
}

/// Interrupts the driver for used buffers on queue `index`, unless it asked not to be
/// (EVENT_IDX: once the used index passes its used_event).
fn signal_used(
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    queue: &mut Queue,
    index: u16,
) {
    if queue.needs_notification(mem).unwrap_or(true) {
        let _ = interrupt.trigger(InterruptKind::Queue(index));
    }
}

/// Writes `bytes` at `offset` of one chain's buffers.
fn write_at(mem: &GuestMemoryMmap, chain: &RxChain, offset: usize, bytes: &[u8]) {
    let mut skip = offset;
    let mut done = 0;
    for &(addr, len) in &chain.segs {
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(bytes.len() - done);
        let _ = mem.write_slice(&bytes[done..done + take], addr.unchecked_add(skip as u64));
        done += take;
        skip = 0;
        if done == bytes.len() {
            return;
        }
    }
}
