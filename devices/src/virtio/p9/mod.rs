//! virtio-9p (device type 9): a host directory served to the guest over 9P2000.L, what Kata
//! mounts as `kataShared`.
//!
//! One request queue. The `vmm` event loop only turns the guest's kicks into a wake-up of the
//! device's worker threads (`9p-1` … `9p-N`): each worker takes a request off the queue,
//! serves it on the host filesystem (which may block), writes the reply and completes it, so
//! several requests are in flight at once. A worker confines itself before it touches guest
//! memory: Landlock limiting its filesystem access to the export ([`landlock_export`], done
//! by the worker itself: the VMM's hook does not know the export), then the VMM's seccomp
//! policy `"9p"` through [`ThreadConfinement`].
//!
//! Malformed requests (too short, larger than msize, without a reply buffer, with bad fids)
//! complete with an Rlerror, or with nothing when there is no room for one.
//!
//! The ring features Linux's driver uses: indirect descriptor tables (a 512 KiB zero-copy
//! request is ~130 descriptors; [`pop_chain`] takes them only when negotiated, and a chain of
//! more than [`MAX_DESCRIPTORS`] is refused) and EVENT_IDX. Kicks are wanted only while a
//! worker is free to take the request: the worker that takes the last free place leaves them
//! off, and every worker about to wait turns them back on and looks again ([`rearm`]) under
//! the lock [`P9::kick`] takes, so a request posted meanwhile is either seen or kicked.
//! Completions interrupt only when the driver's used_event asks for it.

#[cfg(any(test, feature = "fake-driver"))]
pub mod fake_driver;
pub mod server;
#[cfg(test)]
mod tests;
pub mod wire;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use event_manager::{EventOps, Events, MutEventSubscriber};
use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::server::{Server, ServerOptions, MAX_MSIZE};
use self::wire::{encode_error, HEADER_SIZE, RLERROR, TFLUSH, TREAD, TWRITE};
use super::chain::{pop_chain, rearm, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use super::{
    ActivateError, ActivatedQueue, Counters, DeviceCounters, InterruptKind, QueueNotify,
    ThreadConfinement, VirtioDevice, VirtioInterrupt, TYPE_9P, VIRTIO_F_VERSION_1,
};

pub use self::server::Ownership;

pub const QUEUE_SIZE: u16 = 128;
/// VIRTIO_9P_MOUNT_TAG: the configuration space holds the mount tag.
pub const VIRTIO_9P_F_MOUNT_TAG: u64 = 1;
/// Worker threads per device: enough to keep a few host requests in flight on 2-4 vCPUs.
pub const WORKERS: usize = 4;
/// Descriptors one request may have: a 512 KiB msize in 4 KiB pages each way (Linux's zero-copy
/// requests) and their headers, with room to spare.
pub const MAX_DESCRIPTORS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum P9Error {
    #[error("cannot share {}: {source}", path.display())]
    Export {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the mount tag is empty or longer than 65535 bytes")]
    Tag,
    #[error("cannot create the activation eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start a 9p worker thread: {0}")]
    Spawn(std::io::Error),
}

/// What the workers share with the device.
struct Active {
    mem: Arc<GuestMemoryMmap>,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    indirect: bool,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    /// Bumped on reset so a request taken before it is not completed on the new queue.
    generation: u64,
    paused: bool,
    in_flight: usize,
    stop: bool,
    /// Sequence number of the next request taken off the queue.
    next_seq: u64,
    /// Requests taken but whose tag is not known yet, by sequence number.
    reading: BTreeSet<u64>,
    /// Tags of requests taken and not completed yet (a guest may reuse one; hence counts).
    tags: HashMap<u16, usize>,
    /// Workers waiting for work, for tests that need them all asleep.
    #[cfg(test)]
    idle: usize,
}

impl State {
    /// Whether a Tflush taken as request `seq` must wait: its `old_tag` is still in flight,
    /// or a request taken before it might carry that tag.
    fn flush_waits(&self, seq: u64, old_tag: u16) -> bool {
        self.tags.contains_key(&old_tag) || self.reading.range(..seq).next().is_some()
    }
}

/// The workers' counters: relaxed atomics, so the metrics never wait on a worker (nor on the
/// state lock).
#[derive(Default)]
struct P9Stats {
    requests: AtomicU64,
    /// Requests answered with an Rlerror, or with nothing (no room for a reply).
    errors: AtomicU64,
    /// Data bytes of Rread replies, and those Twrite wrote.
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl P9Stats {
    /// Counts one request by its reply (the first `written` bytes of `reply`).
    fn count(&self, reply: &[u8], written: u32) {
        let add = |counter: &AtomicU64, n: u64| {
            counter.fetch_add(n, Ordering::Relaxed);
        };
        add(&self.requests, 1);
        let reply = reply.get(..written as usize).unwrap_or_default();
        let count = || {
            reply.get(HEADER_SIZE..HEADER_SIZE + 4).map_or(0, |c| {
                u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            })
        };
        match reply.get(4).copied() {
            None | Some(RLERROR) => add(&self.errors, 1),
            Some(kind) if kind == TREAD + 1 => add(&self.bytes_read, count()),
            Some(kind) if kind == TWRITE + 1 => add(&self.bytes_written, count()),
            Some(_) => {}
        }
    }

    fn counters(&self) -> Counters {
        super::load_counters(&[
            ("requests", &self.requests),
            ("errors", &self.errors),
            ("bytes_read", &self.bytes_read),
            ("bytes_written", &self.bytes_written),
        ])
    }
}

struct Shared {
    server: Server,
    stats: P9Stats,
    state: Mutex<State>,
    /// Signalled on kicks, activation, resume and stop (for workers), and when a request
    /// completes (for pause and reset, which wait for `in_flight` to drain).
    changed: Condvar,
    /// Run by the next worker that finds the queue empty, before it turns kicks back on: a
    /// test's way to post a request in that window.
    #[cfg(test)]
    window: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct P9 {
    config: Vec<u8>,
    acked_features: u64,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Written by activate/reset (vCPU thread) for the event loop side.
    wake: EventFd,
    notify: Option<Arc<QueueNotify>>,
    notify_watched: bool,
    /// Notify eventfds of a reset device, still in epoll until the event loop removes them.
    retired: Vec<Arc<QueueNotify>>,
}

/// Limits the calling thread's filesystem access to `export` (Landlock, best effort up to the
/// kernel's ABI): nothing outside it can be opened, created, renamed into or executed, even if
/// a bug in the server let a path escape. Called by each worker after the VMM's confinement.
pub fn landlock_export(export: &Path, readonly: bool) -> Result<(), String> {
    let abi = ABI::V6;
    let access = if readonly {
        AccessFs::from_read(abi)
    } else {
        AccessFs::from_all(abi)
    };
    let fd = PathFd::new(export).map_err(|e| e.to_string())?;
    Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rule(PathBeneath::new(fd, access)))
        .and_then(|r| r.restrict_self())
        .map(|status| {
            if status.ruleset == RulesetStatus::NotEnforced {
                log::warn!("virtio-9p: this kernel has no Landlock; the workers rely on seccomp");
            }
        })
        .map_err(|e| e.to_string())
}

impl P9 {
    /// A device exporting `export` under `tag`, with its workers started (idle until the
    /// driver activates the device).
    pub fn new(
        tag: &str,
        export: &Path,
        options: ServerOptions,
        confinement: Arc<dyn ThreadConfinement>,
    ) -> Result<Self, P9Error> {
        let tag_len = u16::try_from(tag.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or(P9Error::Tag)?;
        let mut config = tag_len.to_le_bytes().to_vec();
        config.extend_from_slice(tag.as_bytes());
        let server = Server::new(export, options).map_err(|source| P9Error::Export {
            path: export.to_path_buf(),
            source,
        })?;
        let shared = Arc::new(Shared {
            server,
            stats: P9Stats::default(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            #[cfg(test)]
            window: Mutex::new(None),
        });
        let mut device = P9 {
            config,
            acked_features: 0,
            shared,
            workers: Vec::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(P9Error::EventFd)?,
            notify: None,
            notify_watched: false,
            retired: Vec::new(),
        };
        for i in 1..=WORKERS {
            let shared = device.shared.clone();
            let confinement = confinement.clone();
            let export = export.to_path_buf();
            let readonly = options.readonly;
            let handle = std::thread::Builder::new()
                .name(format!("9p-{i}"))
                .spawn(move || {
                    // Landlock first: its own syscalls then need no room in the seccomp
                    // policy. Both come before the worker touches guest memory.
                    let confined =
                        landlock_export(&export, readonly).and_then(|()| confinement.confine("9p"));
                    match confined {
                        Ok(()) => serve(&shared),
                        Err(e) => log::error!("virtio-9p: worker {i} cannot confine itself: {e}"),
                    }
                })
                .map_err(P9Error::Spawn)?;
            device.workers.push(handle);
        }
        Ok(device)
    }

    /// Wakes the workers: the guest posted requests.
    pub fn kick(&self) {
        let _state = self.shared.state();
        self.shared.changed.notify_all();
    }

    /// Waits until no worker is inside a request.
    fn drain<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while state.in_flight > 0 {
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        state
    }
}

/// A worker: takes requests while the device is active and running, until told to stop.
fn serve(shared: &Shared) {
    let mut request = Vec::new();
    let mut reply = Vec::new();
    let mut state = shared.state();
    loop {
        if state.stop {
            return;
        }
        let generation = state.generation;
        let paused = state.paused;
        // This worker is free: with it, `in_flight` would reach WORKERS.
        let last_free = state.in_flight + 1 >= WORKERS;
        let taken = match state.active.as_mut() {
            Some(active) if !paused => {
                let mem = active.mem.clone();
                match pop_chain(&mut active.queue, mem.clone(), active.indirect) {
                    Some(chain) => {
                        if last_free {
                            // Nobody is left to take a kick's request until one of us is done
                            // (each looks at the queue then). With EVENT_IDX this is a no-op:
                            // the avail_event published last already stopped kicks.
                            let _ = active.queue.disable_notification(mem.as_ref());
                        } else if rearm(&mut active.queue, mem.as_ref()) {
                            // More posted: a free worker takes it now (EVENT_IDX: the
                            // driver kicked only for the first of them).
                            shared.changed.notify_one();
                        }
                        Some((chain, mem, active.interrupt.clone()))
                    }
                    None => {
                        #[cfg(test)]
                        if let Some(post) = shared.window.lock().ok().and_then(|mut w| w.take()) {
                            post();
                        }
                        // Anything posted since the look, before the driver could see kicks
                        // were wanted, is seen here.
                        if rearm(&mut active.queue, mem.as_ref()) {
                            continue;
                        }
                        None
                    }
                }
            }
            _ => None,
        };
        let Some((chain, mem, interrupt)) = taken else {
            // Kicks are on (rearm above) and `kick` takes this lock: a request posted after
            // the look is kicked, and the kick wakes us.
            #[cfg(test)]
            {
                state.idle += 1;
            }
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
            #[cfg(test)]
            {
                state.idle -= 1;
            }
            continue;
        };
        state.in_flight += 1;
        let seq = state.next_seq;
        state.next_seq += 1;
        state.reading.insert(seq);
        drop(state);

        let head = chain.head_index();
        let request_tag = read_request(&shared.server, &chain, &mem, &mut request);

        state = shared.state();
        state.reading.remove(&seq);
        if let Ok(tag) = request_tag {
            *state.tags.entry(tag).or_default() += 1;
        }
        shared.changed.notify_all();
        // Rflush may only follow the flushed request's own reply, or the guest could take a
        // late reply for the next request that reuses the tag.
        if let Some(old_tag) = flushed_tag(&request, request_tag) {
            while state.flush_waits(seq, old_tag) {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        drop(state);

        let written = answer(
            &shared.server,
            chain,
            &mem,
            &request,
            request_tag,
            &mut reply,
        );
        shared.stats.count(&reply, written);

        state = shared.state();
        state.in_flight -= 1;
        if let Ok(tag) = request_tag {
            if let Some(count) = state.tags.get_mut(&tag) {
                *count -= 1;
                if *count == 0 {
                    state.tags.remove(&tag);
                }
            }
        }
        if state.generation == generation {
            if let Some(active) = state.active.as_mut() {
                match active.queue.add_used(mem.as_ref(), head, written) {
                    Ok(()) => {
                        if active
                            .queue
                            .needs_notification(mem.as_ref())
                            .unwrap_or(true)
                        {
                            if let Err(e) = interrupt.trigger(InterruptKind::Queue(0)) {
                                log::warn!("virtio-9p: cannot interrupt the guest: {e}");
                            }
                        }
                    }
                    Err(e) => log::warn!("virtio-9p: cannot complete a request: {e:?}"),
                }
            }
        }
        shared.changed.notify_all();
    }
}

/// Reads the request on `chain` into `request`; its tag, or the error to answer with (and the
/// tag to answer it under) when it is malformed.
fn read_request(
    server: &Server,
    chain: &virtio_queue::DescriptorChain<Arc<GuestMemoryMmap>>,
    mem: &GuestMemoryMmap,
    request: &mut Vec<u8>,
) -> Result<u16, (u16, i32)> {
    if too_long(chain) {
        return Err((u16::MAX, libc::EINVAL));
    }
    let mut reader = chain
        .clone()
        .reader(mem)
        .map_err(|_| (u16::MAX, libc::EINVAL))?;
    let available = reader.available_bytes();
    let mut header = [0u8; HEADER_SIZE];
    if reader.read_exact(&mut header).is_err() {
        return Err((u16::MAX, libc::EINVAL));
    }
    let tag = u16::from_le_bytes([header[5], header[6]]);
    let size = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(HEADER_SIZE..=available.min(server.msize() as usize)).contains(&size) {
        return Err((tag, libc::EINVAL));
    }
    request.clear();
    request.extend_from_slice(&header);
    request.resize(size, 0);
    reader
        .read_exact(&mut request[HEADER_SIZE..])
        .map_err(|_| (tag, libc::EIO))?;
    Ok(tag)
}

/// Whether `chain` has more than [`MAX_DESCRIPTORS`] descriptors (an indirect table may have
/// 65535); counted before a reader or writer collects them.
fn too_long(chain: &virtio_queue::DescriptorChain<Arc<GuestMemoryMmap>>) -> bool {
    chain.clone().nth(MAX_DESCRIPTORS).is_some()
}

/// The tag a well-formed Tflush asks to flush.
fn flushed_tag(request: &[u8], tag: Result<u16, (u16, i32)>) -> Option<u16> {
    match (tag, request) {
        (Ok(own), [_, _, _, _, TFLUSH, _, _, lo, hi, ..]) => {
            Some(u16::from_le_bytes([*lo, *hi])).filter(|&old| old != own)
        }
        _ => None,
    }
}

/// Serves `request` (or answers the error `read_request` found) into the chain's writable
/// part; returns the bytes written. A chain with no room for the reply completes empty.
fn answer(
    server: &Server,
    chain: virtio_queue::DescriptorChain<Arc<GuestMemoryMmap>>,
    mem: &GuestMemoryMmap,
    request: &[u8],
    request_tag: Result<u16, (u16, i32)>,
    reply: &mut Vec<u8>,
) -> u32 {
    if too_long(&chain) {
        return 0;
    }
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    let max_reply = writer.available_bytes().min(MAX_MSIZE as usize);
    match request_tag {
        Ok(_) => server.handle(request, reply, max_reply),
        Err((tag, errno)) => encode_error(reply, tag, errno),
    }
    if reply.len() > max_reply || writer.write_all(reply).is_err() {
        return 0;
    }
    reply.len() as u32
}

impl MutEventSubscriber for P9 {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.wake.as_raw_fd() {
            let _ = self.wake.read();
            for fd in self.retired.drain(..) {
                let _ = ops.remove(Events::new(fd.as_ref(), EventSet::IN));
            }
            if let (Some(notify), false) = (&self.notify, self.notify_watched) {
                match ops.add(Events::new(notify.as_ref(), EventSet::IN)) {
                    Ok(()) => self.notify_watched = true,
                    Err(e) => log::error!("virtio-9p: cannot watch the queue: {e:?}"),
                }
            }
        } else if let Some(notify) = self.notify.as_ref() {
            if events.fd() != notify.as_raw_fd() {
                return;
            }
            let _ = notify.read();
        }
        // Requests may have been posted before activation reached us.
        self.kick();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::error!("virtio-9p: cannot watch the activation event: {e:?}");
        }
    }
}

impl VirtioDevice for P9 {
    fn device_type(&self) -> u32 {
        TYPE_9P
    }

    fn counters(&self) -> DeviceCounters {
        self.shared.stats.counters().into()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_9P_F_MOUNT_TAG
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
    }

    /// Kept for activation: whether indirect tables are allowed (the transport turns EVENT_IDX
    /// on in the queues themselves).
    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// Read-only (the default `write_config`).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let q = super::single_queue::the_one_queue(queues)?;
        self.shared.state().active = Some(Active {
            mem: Arc::new(mem),
            queue: q.queue,
            interrupt,
            indirect: self.acked_features & VIRTIO_RING_F_INDIRECT_DESC != 0,
        });
        if let Some(old) = self.notify.replace(q.notify) {
            if self.notify_watched {
                self.retired.push(old);
            }
        }
        self.notify_watched = false;
        self.wake.write(1).map_err(ActivateError::Wake)
    }

    fn reset(&mut self) -> bool {
        let mut state = self.shared.state();
        state.active = None;
        state.generation += 1;
        // Requests already taken finish on the host but are not completed; wait for them so
        // no worker touches the old guest memory after the reset.
        drop(self.drain(state));
        self.shared.server.reset();
        if let Some(notify) = self.notify.take() {
            if self.notify_watched {
                self.retired.push(notify);
            }
            self.notify_watched = false;
        }
        let _ = self.wake.write(1);
        true
    }

    fn pause(&mut self) {
        let mut state = self.shared.state();
        state.paused = true;
        drop(self.drain(state));
    }

    fn resume(&mut self) {
        self.shared.state().paused = false;
        self.shared.changed.notify_all();
    }
}

impl Drop for P9 {
    fn drop(&mut self) {
        self.shared.state().stop = true;
        self.shared.changed.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
