//! virtio-console (type 3) with VIRTIO_CONSOLE_F_MULTIPORT, as Kata's guest agent uses it.
//!
//! Port 0 is the console: announced with CONSOLE_PORT so `console=hvc0` works, its output goes to
//! stdout, a file or a socket client and is always drained (dropped when nobody listens: the
//! guest's hvc driver spins until the host consumes). Ports 1..=N are named ports
//! (`/dev/virtio-ports/<name>`), each backed by a unix socket we listen on, one client at a time,
//! like QEMU's `chardev socket,server,nowait`: a client connecting is PORT_OPEN(1) to the guest,
//! its leaving PORT_OPEN(0). Named ports never lose or reorder a byte: host→guest we stop reading
//! the socket while the guest has not opened the port or our bounded buffer is full; guest→host
//! a descriptor chain the socket cannot take yet stays un-consumed until EPOLLOUT.
//!
//! Everything runs on the `vmm` event loop; vCPU threads only call `activate`/`reset`/config
//! accessors, which never block. Guest memory is accessed only through vm-memory's checked
//! slices (virtio-queue's `Reader`/`Writer`), chains are bounded by virtio-queue's iterators,
//! and every loop over guest-supplied buffers has a budget.

mod backend;
mod control;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{pop_chain, queue_in_memory};
use super::{
    ActivateError, ActivatedQueue, Counters, DeviceCounters, InterruptKind, QueueNotify,
    VirtioDevice, VirtioInterrupt, TYPE_CONSOLE, VIRTIO_F_VERSION_1,
};
use backend::{ClientState, Sink, SocketBackend};
use control::{Control, RateLimit};

/// The device has a control queue pair and ports beyond port 0.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
/// Size of each port's rx/tx queue (Linux posts one page per rx slot).
pub const DATA_QUEUE_SIZE: u16 = 256;
pub const CONTROL_QUEUE_SIZE: u16 = 64;
/// Host→guest bytes read from a socket but not yet placed in guest buffers, per port.
pub const RX_BUFFER_LIMIT: usize = 64 * 1024;
/// Console output waiting for a slow stdout/socket; beyond it output is dropped.
pub const CONSOLE_OUT_LIMIT: usize = 64 * 1024;
/// Named ports besides the console (QEMU's virtio-serial default is 31 ports in all).
pub const MAX_NAMED_PORTS: usize = 30;
/// Longest port name we announce.
pub const MAX_PORT_NAME_LEN: usize = 127;
/// Device→driver control messages waiting for control rx buffers. Only a guest that never
/// posts buffers reaches it.
const MAX_PENDING_CONTROL: usize = 1024;
/// Bytes copied per step between guest memory and a socket.
const CHUNK: usize = 16 * 1024;
/// Guest→host bytes sent per event before yielding to the rest of the event loop.
const TX_BYTES_PER_EVENT: usize = 1 << 20;
/// Socket reads per event (each up to CHUNK bytes) before yielding.
const READS_PER_EVENT: usize = 8;

/// `struct virtio_console_config`: cols, rows (le16), max_nr_ports, emerg_wr (le32).
const CONFIG_SIZE: usize = 12;

/// Queue layout (virtio 1.2, 5.3.2): port 0 rx/tx, control rx/tx, then rx/tx per port 1..N.
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;

fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * port + 2
    }
}

fn tx_queue(port: usize) -> usize {
    rx_queue(port) + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueRole {
    Rx(usize),
    Tx(usize),
    ControlRx,
    ControlTx,
}

fn queue_role(index: usize) -> QueueRole {
    match index {
        0 => QueueRole::Rx(0),
        1 => QueueRole::Tx(0),
        CONTROL_RX => QueueRole::ControlRx,
        CONTROL_TX => QueueRole::ControlTx,
        i if i % 2 == 0 => QueueRole::Rx(i / 2 - 1),
        i => QueueRole::Tx(i / 2 - 1),
    }
}

/// What an epoll event is about: the kind in the high 16 bits of its data, an index in the low.
const TAG_ACTIVATE: u32 = 0;
const TAG_QUEUE: u32 = 1;
const TAG_LISTENER: u32 = 2;
const TAG_CLIENT: u32 = 3;
const TAG_SINK: u32 = 4;

fn tag(kind: u32, index: usize) -> u32 {
    // Indices are queue (< 64) or port (< 32) numbers.
    (kind << 16) | (u32::try_from(index).unwrap_or(0xffff) & 0xffff)
}

/// Where port 0 goes (the device-side mirror of the API's console setting).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleOutput {
    /// Output dropped, no input.
    #[default]
    Off,
    Stdout,
    /// Created, or truncated if it is ours (see [`crate::host_files::open_output`]).
    File(PathBuf),
    /// A unix socket we listen on: output to the client (dropped while none), input from it.
    Socket(PathBuf),
}

/// A named port backed by a unix socket we listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Socket(#[from] crate::unix_socket::SocketError),
    #[error(transparent)]
    Output(#[from] crate::host_files::HostFileError),
    #[error("cannot duplicate stdout for the console: {0}")]
    Stdout(#[source] io::Error),
    #[error("cannot create the console's activation eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("invalid port name {name:?}: {reason}")]
    PortName { name: String, reason: &'static str },
    #[error("{count} named ports, at most {MAX_NAMED_PORTS} are supported")]
    TooManyPorts { count: usize },
}

enum Backend {
    Off,
    Sink(Sink),
    Socket(SocketBackend),
}

/// A guest→host chain the socket has not taken completely yet; kept un-consumed (not on the
/// used ring) so the guest cannot reuse the buffer and no byte is lost.
struct PendingTx {
    chain: DescriptorChain<Arc<GuestMemoryMmap>>,
    offset: usize,
}

struct Port {
    /// None for the console (port 0).
    name: Option<String>,
    backend: Backend,
    /// The driver sent PORT_READY for it (since the last reset).
    guest_ready: bool,
    /// The guest has the port open (its PORT_OPEN).
    guest_open: bool,
    /// Host→guest bytes read from the socket, in order, at most RX_BUFFER_LIMIT.
    rx_buf: VecDeque<u8>,
    /// Named ports: the chain being sent to the socket.
    tx_pending: Option<PendingTx>,
    /// Console: output waiting for the sink or socket client.
    out_buf: VecDeque<u8>,
    dropped: RateLimit,
    stats: PortStats,
}

impl PortStats {
    /// A guest→host chain is done with, `unsent` of its bytes not delivered.
    fn done(&mut self, unsent: u64, error: Option<io::Error>) -> TxProgress {
        self.from_guest = self.from_guest.saturating_add(unsent);
        self.dropped = self.dropped.saturating_add(unsent);
        TxProgress::Done(error)
    }
}

/// A port's counters for the metrics (the `vmm` thread alone serves the device).
#[derive(Debug, Default)]
struct PortStats {
    /// Host→guest bytes put in the guest's buffers.
    to_guest: u64,
    /// Guest→host bytes taken from the guest's buffers, delivered or not.
    from_guest: u64,
    /// Of those, bytes dropped: no listener, no room for a slow one, or its file's cap/rate.
    dropped: u64,
}

impl Port {
    fn new(name: Option<String>, backend: Backend) -> Self {
        Port {
            name,
            backend,
            guest_ready: false,
            guest_open: false,
            rx_buf: VecDeque::new(),
            tx_pending: None,
            out_buf: VecDeque::new(),
            dropped: RateLimit::default(),
            stats: PortStats::default(),
        }
    }

    fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("console")
    }

    /// A host client is connected and its session is live.
    fn host_connected(&self) -> bool {
        matches!(&self.backend, Backend::Socket(s)
            if s.client.as_ref().is_some_and(|c| c.state == ClientState::Open))
    }

    /// Whether to read the socket now: the guest listens and our buffer has room.
    fn want_read(&self) -> bool {
        let Backend::Socket(s) = &self.backend else {
            return false;
        };
        let live = s
            .client
            .as_ref()
            .is_some_and(|c| c.state != ClientState::Closing);
        live && self.guest_open && self.rx_buf.len() < RX_BUFFER_LIMIT
    }
}

/// State from DRIVER_OK to reset.
struct Active {
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
    notify: Vec<Arc<QueueNotify>>,
    /// Queues with new used buffers since the last interrupt check.
    needs_irq: Vec<bool>,
}

impl Active {
    fn add_used(&mut self, index: usize, head: u16, len: u32, log: &mut RateLimit) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if let Err(e) = queue.add_used(&*self.mem, head, len) {
            if let Some(n) = log.hit() {
                log::warn!(
                    "virtio-console: cannot return a buffer on queue {index}: {e} ({n} so far)"
                );
            }
        }
        if let Some(flag) = self.needs_irq.get_mut(index) {
            *flag = true;
        }
    }

    fn pop(&mut self, index: usize) -> Option<DescriptorChain<Arc<GuestMemoryMmap>>> {
        let mem = self.mem.clone();
        // A queue the driver left disabled has nothing (and virtio-queue would log an error).
        // VIRTIO_RING_F_INDIRECT_DESC is not offered, so never negotiated.
        let queue = self.queues.get_mut(index).filter(|q| q.ready())?;
        pop_chain(queue, mem, false)
    }

    /// Out of budget with work left: come back through the event loop, after other events.
    fn reschedule(&self, index: usize) {
        if let Some(fd) = self.notify.get(index) {
            let _ = fd.rewake();
        }
    }

    fn budget(&self, index: usize) -> usize {
        self.queues
            .get(index)
            .map_or(0, |q| usize::from(q.size()).max(1))
    }
}

/// The multiport virtio-console device.
pub struct Console {
    ports: Vec<Port>,
    queue_sizes: Vec<u16>,
    acked_features: u64,
    activate_evt: EventFd,
    active: Option<Active>,
    /// The notify eventfds in the event loop's epoll set, by queue index. The transport hands
    /// the same ones to every activation, so they stay watched across resets (a kick then is
    /// read and ignored) and a reset/DRIVER_OK loop costs no fd and no epoll churn.
    watched: Vec<Arc<QueueNotify>>,
    device_ready: bool,
    control_out: VecDeque<Vec<u8>>,
    scratch: Vec<u8>,
    bad_control: RateLimit,
    bad_chain: RateLimit,
    io_errors: RateLimit,
}

impl Console {
    /// Builds the device and binds every unix socket now (before seccomp): a socket someone
    /// listens on is refused, a stale one replaced. Port 0 is the console; `ports` become ports 1..=N in order.
    pub fn new(console: &ConsoleOutput, ports: &[NamedPort]) -> Result<Console, ConsoleError> {
        if ports.len() > MAX_NAMED_PORTS {
            return Err(ConsoleError::TooManyPorts { count: ports.len() });
        }
        for port in ports {
            check_port_name(&port.name)?;
        }
        let console_backend = match console {
            ConsoleOutput::Off => Backend::Off,
            ConsoleOutput::Stdout => Backend::Sink(Sink::stdout()?),
            ConsoleOutput::File(path) => Backend::Sink(Sink::file(path)?),
            ConsoleOutput::Socket(path) => Backend::Socket(SocketBackend::listen(path)?),
        };
        let mut list = vec![Port::new(None, console_backend)];
        for port in ports {
            list.push(Port::new(
                Some(port.name.clone()),
                Backend::Socket(SocketBackend::listen(&port.socket)?),
            ));
        }
        let queue_sizes = (0..2 * list.len() + 2)
            .map(|i| match queue_role(i) {
                QueueRole::ControlRx | QueueRole::ControlTx => CONTROL_QUEUE_SIZE,
                _ => DATA_QUEUE_SIZE,
            })
            .collect();
        Ok(Console {
            ports: list,
            queue_sizes,
            acked_features: 0,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::EventFd)?,
            active: None,
            watched: Vec::new(),
            device_ready: false,
            control_out: VecDeque::new(),
            scratch: vec![0; CHUNK],
            bad_control: RateLimit::default(),
            bad_chain: RateLimit::default(),
            io_errors: RateLimit::default(),
        })
    }

    /// Ports in all, the console included (`max_nr_ports`).
    pub fn max_nr_ports(&self) -> u32 {
        u32::try_from(self.ports.len()).unwrap_or(u32::MAX)
    }

    fn multiport(&self) -> bool {
        self.acked_features & VIRTIO_CONSOLE_F_MULTIPORT != 0
    }

    fn push_control(&mut self, control: Control, payload: &[u8]) {
        if self.control_out.len() >= MAX_PENDING_CONTROL {
            if let Some(n) = self.bad_control.hit() {
                log::warn!(
                    "virtio-console: the guest takes no control messages, dropping one ({n} so far)"
                );
            }
            return;
        }
        self.control_out.push_back(control.message(payload));
    }

    // ----- guest side -----

    fn on_activate_event(&mut self, ops: &mut EventOps) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        let same = self.watched.len() == active.notify.len()
            && self
                .watched
                .iter()
                .zip(&active.notify)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            for fd in self.watched.drain(..) {
                let _ = ops.remove(Events::new(&*fd, EventSet::IN));
            }
            for (i, fd) in active.notify.iter().enumerate() {
                if let Err(e) = ops.add(Events::with_data(&**fd, tag(TAG_QUEUE, i), EventSet::IN)) {
                    log::error!("virtio-console: cannot watch queue {i}: {e:?}");
                }
            }
            self.watched = active.notify.clone();
        }
        // Kicks that came before we watched the queues, and host data that waited.
        self.process_control_tx();
        for p in 0..self.ports.len() {
            self.process_tx(p);
            self.fill_rx(p);
        }
    }

    fn on_queue_event(&mut self, index: usize) {
        if let Some(fd) = self.watched.get(index) {
            let _ = fd.read();
        }
        if self.active.is_none() {
            return;
        }
        match queue_role(index) {
            QueueRole::Rx(p) => self.fill_rx(p),
            QueueRole::Tx(p) => self.process_tx(p),
            // New control buffers: `settle` flushes pending messages into them.
            QueueRole::ControlRx => {}
            QueueRole::ControlTx => self.process_control_tx(),
        }
    }

    /// Driver→device control messages.
    fn process_control_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut messages = Vec::new();
        let mut budget = active.budget(CONTROL_TX);
        while let Some(chain) = active.pop(CONTROL_TX) {
            let head = chain.head_index();
            match read_control(chain, &active.mem) {
                Some(message) => messages.push(message),
                None => {
                    if let Some(n) = self.bad_control.hit() {
                        log::warn!(
                            "virtio-console: ignoring a malformed control message ({n} so far)"
                        );
                    }
                }
            }
            active.add_used(CONTROL_TX, head, 0, &mut self.bad_chain);
            budget -= 1;
            if budget == 0 {
                active.reschedule(CONTROL_TX);
                break;
            }
        }
        for message in messages {
            self.handle_control(message);
        }
    }

    fn handle_control(&mut self, message: Control) {
        let id = usize::try_from(message.id)
            .ok()
            .filter(|&id| id < self.ports.len());
        match (message.event, id) {
            (control::DEVICE_READY, _) => {
                if message.value != 1 {
                    log::warn!("virtio-console: the guest driver failed to initialise");
                    return;
                }
                // Once per driver session; a repeat would only duplicate ports.
                if self.device_ready {
                    return;
                }
                self.device_ready = true;
                for id in 0..self.max_nr_ports() {
                    self.push_control(Control::new(id, control::PORT_ADD, 0), &[]);
                }
            }
            (control::PORT_READY, Some(id)) => {
                if message.value != 1 {
                    log::warn!(
                        "virtio-console: the guest failed to set up port {id} ({})",
                        self.ports[id].label()
                    );
                    return;
                }
                if self.ports[id].guest_ready {
                    return;
                }
                self.ports[id].guest_ready = true;
                let id32 = message.id;
                match self.ports[id].name.clone() {
                    None => {
                        self.push_control(Control::new(id32, control::CONSOLE_PORT, 1), &[]);
                        self.push_control(Control::new(id32, control::PORT_OPEN, 1), &[]);
                    }
                    Some(name) => {
                        // NUL-terminated, as QEMU sends it.
                        let mut payload = name.into_bytes();
                        payload.push(0);
                        self.push_control(Control::new(id32, control::PORT_NAME, 1), &payload);
                        if self.ports[id].host_connected() {
                            self.push_control(Control::new(id32, control::PORT_OPEN, 1), &[]);
                        }
                    }
                }
            }
            (control::PORT_OPEN, Some(id)) => {
                let open = message.value != 0;
                let port = &mut self.ports[id];
                if port.guest_open != open {
                    log::debug!(
                        "virtio-console: guest {} port {}",
                        if open { "opened" } else { "closed" },
                        port.label()
                    );
                }
                port.guest_open = open;
                if open {
                    self.fill_rx(id);
                }
            }
            _ => {
                if let Some(n) = self.bad_control.hit() {
                    log::warn!(
                        "virtio-console: ignoring control event {} for port {} ({n} so far)",
                        message.event,
                        message.id
                    );
                }
            }
        }
    }

    /// Device→driver control messages into the control rx queue.
    fn flush_control(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut budget = active.budget(CONTROL_RX);
        while let Some(message) = self.control_out.front() {
            let Some(chain) = active.pop(CONTROL_RX) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(&active.mem) {
                Ok(mut writer) => write_all_possible(&mut writer, message),
                Err(_) => 0,
            };
            if written < message.len() {
                if let Some(n) = self.bad_chain.hit() {
                    log::warn!(
                        "virtio-console: control buffer too small or invalid ({written} of {} bytes, {n} so far)",
                        message.len()
                    );
                }
            }
            // A buffer that took nothing does not count as delivery: try the next one.
            if written > 0 {
                self.control_out.pop_front();
            }
            active.add_used(CONTROL_RX, head, len32(written), &mut self.bad_chain);
            budget -= 1;
            if budget == 0 {
                active.reschedule(CONTROL_RX);
                break;
            }
        }
    }

    /// Host→guest: places buffered bytes into the port's rx buffers, in order.
    fn fill_rx(&mut self, p: usize) {
        let (Some(active), Some(port)) = (self.active.as_mut(), self.ports.get_mut(p)) else {
            return;
        };
        // A closed guest port discards what arrives (Linux does), so keep it here.
        if !port.guest_open {
            return;
        }
        let index = rx_queue(p);
        let mut budget = active.budget(index);
        while !port.rx_buf.is_empty() {
            let Some(chain) = active.pop(index) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(&active.mem) {
                Ok(mut writer) => write_from_deque(&mut writer, &mut port.rx_buf),
                Err(e) => {
                    if let Some(n) = self.bad_chain.hit() {
                        log::warn!(
                            "virtio-console: invalid rx chain on queue {index}: {e} ({n} so far)"
                        );
                    }
                    0
                }
            };
            port.stats.to_guest = port.stats.to_guest.saturating_add(written as u64);
            active.add_used(index, head, len32(written), &mut self.bad_chain);
            budget -= 1;
            if budget == 0 {
                active.reschedule(index);
                break;
            }
        }
    }

    fn process_tx(&mut self, p: usize) {
        if p == 0 {
            self.console_tx();
        } else {
            self.named_tx(p);
        }
    }

    /// Port 0 output: always consumed; kept (bounded) for a slow listener, else dropped.
    fn console_tx(&mut self) {
        let (Some(active), Some(port)) = (self.active.as_mut(), self.ports.get_mut(0)) else {
            return;
        };
        let index = tx_queue(0);
        let listening = match &mut port.backend {
            Backend::Off => false,
            Backend::Sink(sink) => !sink.failed,
            Backend::Socket(s) => s.writable_client().is_some(),
        };
        let mut budget = active.budget(index);
        let mut dropped = 0usize;
        while let Some(chain) = active.pop(index) {
            let head = chain.head_index();
            match chain.reader(&active.mem) {
                Ok(mut reader) => {
                    let available = reader.available_bytes();
                    let room = if listening {
                        CONSOLE_OUT_LIMIT.saturating_sub(port.out_buf.len())
                    } else {
                        0
                    };
                    let take = available.min(room);
                    let copied = io::copy(
                        &mut (&mut reader).take(u64::try_from(take).unwrap_or(0)),
                        &mut port.out_buf,
                    )
                    .unwrap_or(0);
                    let copied = usize::try_from(copied).unwrap_or(0);
                    dropped = dropped.saturating_add(available - copied.min(available));
                    port.stats.from_guest = port.stats.from_guest.saturating_add(available as u64);
                }
                Err(e) => {
                    if let Some(n) = self.bad_chain.hit() {
                        log::warn!("virtio-console: invalid console tx chain: {e} ({n} so far)");
                    }
                }
            }
            active.add_used(index, head, 0, &mut self.bad_chain);
            budget -= 1;
            if budget == 0 {
                active.reschedule(index);
                break;
            }
        }
        port.stats.dropped = port.stats.dropped.saturating_add(dropped as u64);
        if dropped > 0 && listening {
            if let Some(n) = port.dropped.hit() {
                log::info!("virtio-console: console output too fast for its listener, dropped {dropped} bytes ({n} times)");
            }
        }
        self.flush_console();
    }

    /// Writes pending console output without blocking.
    fn flush_console(&mut self) {
        let Some(port) = self.ports.get_mut(0) else {
            return;
        };
        let out = &mut port.out_buf;
        let stats = &mut port.stats;
        let mut discard = |out: &mut VecDeque<u8>| {
            stats.dropped = stats.dropped.saturating_add(out.len() as u64);
            out.clear();
        };
        match &mut port.backend {
            Backend::Off => discard(out),
            Backend::Sink(sink) => {
                if sink.failed {
                    discard(out);
                    return;
                }
                if let Err(e) = backend::flush_with(out, |d| sink.write(d)) {
                    log::warn!(
                        "virtio-console: console output failed, dropping it from now on: {e}"
                    );
                    sink.failed = true;
                }
            }
            Backend::Socket(s) => match s.writable_client() {
                None => discard(out),
                Some(client) => {
                    if let Err(e) = backend::flush_with(out, |d| backend::send(&client.stream, d)) {
                        log::debug!("virtio-console: console client write failed: {e}");
                        client.write_broken = true;
                    }
                }
            },
        }
    }

    /// Named port output: in order, never dropped while a client is connected.
    fn named_tx(&mut self, p: usize) {
        let (Some(active), Some(port)) = (self.active.as_mut(), self.ports.get_mut(p)) else {
            return;
        };
        let index = tx_queue(p);
        let mut budget = active.budget(index);
        let mut bytes_budget = TX_BYTES_PER_EVENT;
        loop {
            let pending = match port.tx_pending.take() {
                Some(pending) => pending,
                None => match active.pop(index) {
                    Some(chain) => PendingTx { chain, offset: 0 },
                    None => break,
                },
            };
            let client = match &mut port.backend {
                Backend::Socket(s) => s.writable_client(),
                _ => None,
            };
            match send_chain(
                &pending,
                client,
                &active.mem,
                &mut self.scratch,
                &mut bytes_budget,
                &mut port.stats,
            ) {
                TxProgress::Done(Some(e)) => {
                    if let Some(n) = self.io_errors.hit() {
                        log::info!("virtio-console: port {}: client gone ({e}); dropping guest output until the next client ({n} so far)", port.label());
                    }
                    active.add_used(index, pending.chain.head_index(), 0, &mut self.bad_chain);
                }
                TxProgress::Done(None) => {
                    active.add_used(index, pending.chain.head_index(), 0, &mut self.bad_chain);
                }
                TxProgress::Blocked(offset) => {
                    port.tx_pending = Some(PendingTx { offset, ..pending });
                    break;
                }
                TxProgress::Yield(offset) => {
                    port.tx_pending = Some(PendingTx { offset, ..pending });
                    active.reschedule(index);
                    break;
                }
            }
            budget -= 1;
            if budget == 0 || bytes_budget == 0 {
                active.reschedule(index);
                break;
            }
        }
    }

    // ----- host side -----

    fn on_listener_event(&mut self, p: usize) {
        let Some(port) = self.ports.get_mut(p) else {
            return;
        };
        let Backend::Socket(s) = &mut port.backend else {
            return;
        };
        // One client at a time; others wait in the listen backlog, as with QEMU.
        if s.client.is_some() {
            return;
        }
        match s.accept() {
            Ok(true) => {
                log::info!("virtio-console: {}: client connected", s.path.display());
                if port.name.is_some() && port.guest_ready {
                    let id = u32::try_from(p).unwrap_or(u32::MAX);
                    self.push_control(Control::new(id, control::PORT_OPEN, 1), &[]);
                }
            }
            Ok(false) => {}
            Err(e) => {
                if let Some(n) = self.io_errors.hit() {
                    log::warn!(
                        "virtio-console: cannot accept on {}: {e} ({n} so far)",
                        s.path.display()
                    );
                }
            }
        }
    }

    fn on_client_event(&mut self, p: usize, set: EventSet) {
        if set.contains(EventSet::OUT) {
            if p == 0 {
                self.flush_console();
            } else {
                self.named_tx(p);
            }
        }
        if !set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            return;
        }
        if self.ports.get(p).is_some_and(Port::want_read) {
            self.read_client(p);
            return;
        }
        // The peer hung up while we do not read: if the guest has the port open (our buffer is
        // full), what the peer sent is delivered first; otherwise the session just ends.
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            let Some(port) = self.ports.get_mut(p) else {
                return;
            };
            let guest_open = port.guest_open;
            if let Backend::Socket(s) = &mut port.backend {
                if let Some(client) = s.client.as_mut() {
                    if client.state == ClientState::Open {
                        client.state = if guest_open {
                            ClientState::HungUp
                        } else {
                            ClientState::Closing
                        };
                    }
                }
            }
        }
    }

    /// Reads host bytes into the port's buffer while the guest can take them.
    fn read_client(&mut self, p: usize) {
        for _ in 0..READS_PER_EVENT {
            let Some(port) = self.ports.get_mut(p) else {
                return;
            };
            if !port.want_read() {
                break;
            }
            let room = RX_BUFFER_LIMIT - port.rx_buf.len();
            let Backend::Socket(s) = &mut port.backend else {
                return;
            };
            let Some(client) = s.client.as_mut() else {
                return;
            };
            let want = room.min(self.scratch.len());
            match (&client.stream).read(&mut self.scratch[..want]) {
                Ok(0) => client.state = ClientState::Closing,
                Ok(n) => port.rx_buf.extend(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("virtio-console: port {p}: read failed: {e}");
                    client.state = ClientState::Closing;
                }
            }
            self.fill_rx(p);
        }
    }

    /// Ends sessions whose client is gone and whose bytes reached the guest (or never can).
    fn reap_clients(&mut self, ops: &mut EventOps) {
        for p in 0..self.ports.len() {
            let port = &mut self.ports[p];
            let guest_open = port.guest_open;
            let rx_empty = port.rx_buf.is_empty();
            let Backend::Socket(s) = &mut port.backend else {
                continue;
            };
            let ended = match s.client.as_ref().map(|c| c.state) {
                Some(ClientState::HungUp) => !guest_open,
                Some(ClientState::Closing) => rx_empty || !guest_open,
                _ => false,
            };
            if !ended {
                continue;
            }
            if let Some(client) = s.client.take() {
                if let Some(set) = client.registered {
                    let _ = ops.remove(Events::new(&client.stream, set));
                }
                log::info!("virtio-console: {}: client disconnected", s.path.display());
            }
            // Whatever is left belonged to that session.
            port.rx_buf.clear();
            port.out_buf.clear();
            let pending = port.tx_pending.take();
            let announce = port.name.is_some() && port.guest_ready;
            if let (Some(pending), Some(active)) = (pending, self.active.as_mut()) {
                let head = pending.chain.head_index();
                active.add_used(tx_queue(p), head, 0, &mut self.bad_chain);
            }
            if announce {
                let id = u32::try_from(p).unwrap_or(u32::MAX);
                self.push_control(Control::new(id, control::PORT_OPEN, 0), &[]);
            }
            // Guest output queued behind the pending chain has nobody to go to.
            self.process_tx(p);
        }
    }

    /// Makes the epoll set match what each fd is waited for.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        for (p, port) in self.ports.iter_mut().enumerate() {
            let want_read = port.want_read();
            let want_out = if p == 0 {
                !port.out_buf.is_empty()
            } else {
                port.tx_pending.is_some()
            };
            match &mut port.backend {
                Backend::Off => {}
                Backend::Sink(sink) => {
                    let want = want_out && !sink.failed;
                    if want && !sink.registered {
                        match ops.add(Events::with_data(
                            &sink.file,
                            tag(TAG_SINK, p),
                            EventSet::OUT,
                        )) {
                            Ok(()) => sink.registered = true,
                            Err(e) => {
                                log::info!("virtio-console: console output cannot be polled ({e:?}); output that would block is dropped");
                                port.out_buf.clear();
                            }
                        }
                    } else if !want && sink.registered {
                        let _ = ops.remove(Events::new(&sink.file, EventSet::OUT));
                        sink.registered = false;
                    }
                }
                Backend::Socket(s) => {
                    let want_listen = s.client.is_none();
                    if want_listen && !s.listener_registered {
                        match ops.add(Events::with_data(
                            &s.listener,
                            tag(TAG_LISTENER, p),
                            EventSet::IN,
                        )) {
                            Ok(()) => s.listener_registered = true,
                            Err(e) => log::error!(
                                "virtio-console: cannot watch {}: {e:?}",
                                s.path.display()
                            ),
                        }
                    } else if !want_listen && s.listener_registered {
                        let _ = ops.remove(Events::new(&s.listener, EventSet::IN));
                        s.listener_registered = false;
                    }
                    let Some(client) = s.client.as_mut() else {
                        continue;
                    };
                    let mut set = EventSet::empty();
                    if want_read {
                        set |= EventSet::IN;
                    }
                    if want_out && !client.write_broken {
                        set |= EventSet::OUT;
                    }
                    // A live session stays registered (even for no event) so a hang-up is
                    // noticed; an ending one only while we still wait for something, else a
                    // level-triggered EPOLLHUP would spin the loop.
                    let keep = !set.is_empty() || client.state == ClientState::Open;
                    let events = Events::with_data(&client.stream, tag(TAG_CLIENT, p), set);
                    let result = match (client.registered, keep) {
                        (None, true) => ops.add(events).map(|()| Some(set)),
                        (Some(old), true) if old != set => ops.modify(events).map(|()| Some(set)),
                        (Some(old), false) => {
                            ops.remove(Events::new(&client.stream, old)).map(|()| None)
                        }
                        (current, _) => Ok(current),
                    };
                    match result {
                        Ok(registered) => client.registered = registered,
                        Err(e) => log::error!(
                            "virtio-console: cannot watch the client of {}: {e:?}",
                            s.path.display()
                        ),
                    }
                }
            }
        }
    }

    /// Interrupts for queues with new used buffers (unless the driver suppressed them).
    fn signal_used(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        for (index, flag) in active.needs_irq.iter_mut().enumerate() {
            if !std::mem::take(flag) {
                continue;
            }
            let notify = active
                .queues
                .get_mut(index)
                .map(|q| q.needs_notification(&*active.mem).unwrap_or(true))
                .unwrap_or(false);
            if !notify {
                continue;
            }
            let kind = InterruptKind::Queue(u16::try_from(index).unwrap_or(u16::MAX));
            if let Err(e) = active.interrupt.trigger(kind) {
                if let Some(n) = self.io_errors.hit() {
                    log::warn!("virtio-console: cannot signal queue {index}: {e} ({n} so far)");
                }
            }
        }
    }

    /// After any event: end sessions, deliver control messages, update epoll, interrupt.
    fn settle(&mut self, ops: &mut EventOps) {
        self.reap_clients(ops);
        self.flush_control();
        self.sync_interest(ops);
        self.signal_used();
    }
}

/// How far a named port's chain got.
enum TxProgress {
    /// Completely sent, or dropped (no client, invalid chain, or the error given).
    Done(Option<io::Error>),
    /// The socket is full; resume at this offset on EPOLLOUT.
    Blocked(usize),
    /// Out of this event's byte budget; resume at this offset soon.
    Yield(usize),
}

fn send_chain(
    pending: &PendingTx,
    client: Option<&mut backend::Client>,
    mem: &GuestMemoryMmap,
    scratch: &mut [u8],
    budget: &mut usize,
    stats: &mut PortStats,
) -> TxProgress {
    let mut offset = pending.offset;
    // One reader for the whole call: building one walks the chain, so not once per chunk.
    let Ok(mut reader) = pending.chain.clone().reader(mem) else {
        return TxProgress::Done(None);
    };
    if offset > 0 {
        reader = match reader.split_at(offset) {
            Ok(rest) => rest,
            Err(_) => return TxProgress::Done(None),
        };
    }
    // What is not sent when the chain is done with is dropped.
    let mut unsent = reader.available_bytes() as u64;
    let Some(client) = client else {
        return stats.done(unsent, None);
    };
    loop {
        let n = match reader.read(scratch) {
            Ok(0) | Err(_) => return stats.done(unsent, None),
            Ok(n) => n,
        };
        let mut sent = 0;
        while sent < n {
            match backend::send(&client.stream, &scratch[sent..n]) {
                Ok(0) => {
                    client.write_broken = true;
                    return stats.done(unsent, Some(io::ErrorKind::WriteZero.into()));
                }
                Ok(k) => {
                    sent += k;
                    unsent = unsent.saturating_sub(k as u64);
                    stats.from_guest = stats.from_guest.saturating_add(k as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return TxProgress::Blocked(offset + sent)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    client.write_broken = true;
                    return stats.done(unsent, Some(e));
                }
            }
        }
        offset += n;
        *budget = budget.saturating_sub(n);
        if *budget == 0 {
            return TxProgress::Yield(offset);
        }
    }
}

/// Reads one driver control message: exactly the 8-byte header, or None.
fn read_control(
    chain: DescriptorChain<Arc<GuestMemoryMmap>>,
    mem: &GuestMemoryMmap,
) -> Option<Control> {
    let mut reader = chain.reader(mem).ok()?;
    if reader.available_bytes() != control::HEADER_LEN {
        return None;
    }
    let mut bytes = [0u8; control::HEADER_LEN];
    reader.read_exact(&mut bytes).ok()?;
    Some(Control::from_bytes(&bytes))
}

fn write_all_possible(writer: &mut impl Write, mut data: &[u8]) -> usize {
    let mut total = 0;
    while !data.is_empty() {
        match writer.write(data) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n;
                data = &data[n.min(data.len())..];
            }
        }
    }
    total
}

fn write_from_deque(writer: &mut impl Write, buf: &mut VecDeque<u8>) -> usize {
    let mut total = 0;
    while !buf.is_empty() {
        let (front, _) = buf.as_slices();
        match writer.write(front) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let n = n.min(buf.len());
                buf.drain(..n);
                total += n;
            }
        }
    }
    total
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn check_port_name(name: &str) -> Result<(), ConsoleError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_PORT_NAME_LEN {
        "longer than 127 bytes"
    } else if name == "." || name == ".." {
        "\".\" and \"..\" are not file names"
    } else if name
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        "contains '/', whitespace or a control character"
    } else {
        return Ok(());
    };
    Err(ConsoleError::PortName {
        name: name.to_string(),
        reason,
    })
}

impl Console {
    /// Each port's counters, port 0 as "console".
    fn port_counters(&self) -> Vec<(String, Counters)> {
        self.ports
            .iter()
            .map(|port| {
                let refused = match &port.backend {
                    Backend::Sink(sink) => sink.refused(),
                    _ => 0,
                };
                let counters = vec![
                    ("bytes_to_guest", port.stats.to_guest),
                    ("bytes_from_guest", port.stats.from_guest),
                    ("bytes_dropped", port.stats.dropped.saturating_add(refused)),
                ];
                (port.label().to_string(), counters)
            })
            .collect()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        // cols and rows stay 0 (no size); emerg_wr reads as 0.
        config[4..8].copy_from_slice(&self.max_nr_ports().to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only emerg_wr is writable, and only with VIRTIO_CONSOLE_F_EMERG_WRITE, not offered.
        log::debug!(
            "virtio-console: ignoring a {}-byte config write at {offset}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        // The transport hands over every queue, ready or not; without MULTIPORT a driver sets
        // up only port 0's pair, so accept exactly that too.
        let expected = self.queue_sizes.len();
        let only_port0 = queues.len() == 2 && !self.multiport();
        if queues.len() != expected && !only_port0 {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        if let Some(index) = queues
            .iter()
            .position(|q| q.queue.ready() && !queue_in_memory(&q.queue, &mem))
        {
            return Err(ActivateError::InvalidQueue { index });
        }
        let (queues, notify): (Vec<_>, Vec<_>) =
            queues.into_iter().map(|q| (q.queue, q.notify)).unzip();
        if !self.multiport() {
            // Without the control queue, port 0 is simply there and open.
            if let Some(port) = self.ports.get_mut(0) {
                port.guest_ready = true;
                port.guest_open = true;
            }
        }
        self.active = Some(Active {
            mem: Arc::new(mem),
            interrupt,
            needs_irq: vec![false; queues.len()],
            queues,
            notify,
        });
        self.activate_evt.write(1).map_err(ActivateError::Wake)
    }

    fn counters(&self) -> DeviceCounters {
        DeviceCounters {
            counters: vec![
                ("bad_chains", self.bad_chain.count()),
                ("bad_control", self.bad_control.count()),
            ],
            ports: self.port_counters(),
        }
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.device_ready = false;
        self.control_out.clear();
        for port in &mut self.ports {
            port.guest_ready = false;
            port.guest_open = false;
            // Its buffer belongs to the old driver; host bytes still buffered stay for the next.
            port.tx_pending = None;
        }
        // The event loop stops reading for closed ports.
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("virtio-console: cannot wake the event loop after reset: {e}");
        }
        true
    }
}

impl MutEventSubscriber for Console {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        let index = usize::try_from(data & 0xffff).unwrap_or(usize::MAX);
        match data >> 16 {
            TAG_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.on_activate_event(ops);
            }
            TAG_QUEUE => self.on_queue_event(index),
            TAG_LISTENER => self.on_listener_event(index),
            TAG_CLIENT => self.on_client_event(index, events.event_set()),
            TAG_SINK => self.flush_console(),
            _ => {}
        }
        self.settle(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            tag(TAG_ACTIVATE, 0),
            EventSet::IN,
        )) {
            log::error!("virtio-console: cannot watch the activation event: {e:?}");
        }
        // Listen from the start: a client may connect before the guest drives the device.
        self.settle(ops);
    }
}
