//! vhost-net: the kernel moves a queue pair's packets between the guest's rings and the tap.
//!
//! The device speaks to it through [`VhostNetBackend`], a small trait with the steps of the
//! vhost protocol, so the whole setup and teardown sequence is testable without
//! /dev/vhost-net; [`KernelVhostNet`] implements it with the rust-vmm `vhost` crate on an
//! opened or inherited /dev/vhost-net descriptor (one per queue pair).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use std::sync::Arc;
use vhost::vhost_kern::VhostKernBackend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::tap::Tap;
use super::worker::PairQueues;
use crate::virtio::QueueNotify;

pub const VHOST_NET_PATH: &str = "/dev/vhost-net";

#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("vhost-net {op}: {message}")]
    Op { op: &'static str, message: String },
    #[error("cannot open {VHOST_NET_PATH}: {0}")]
    Open(#[source] std::io::Error),
    #[error("vhost descriptor {fd} is not open")]
    FdNotOpen { fd: RawFd },
    #[error("cannot create a vhost eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A ring's addresses, in guest physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The vhost protocol steps for one queue pair (queue 0 rx, queue 1 tx).
pub trait VhostNetBackend: Send {
    fn set_owner(&mut self) -> Result<(), VhostError>;
    fn get_features(&mut self) -> Result<u64, VhostError>;
    fn set_features(&mut self, features: u64) -> Result<(), VhostError>;
    fn set_mem_table(&mut self, mem: &GuestMemoryMmap) -> Result<(), VhostError>;
    fn set_vring_num(&mut self, queue: usize, num: u16) -> Result<(), VhostError>;
    fn set_vring_addr(&mut self, queue: usize, ring: &RingAddrs) -> Result<(), VhostError>;
    fn set_vring_base(&mut self, queue: usize, base: u16) -> Result<(), VhostError>;
    fn get_vring_base(&mut self, queue: usize) -> Result<u16, VhostError>;
    fn set_vring_kick(&mut self, queue: usize, fd: &EventFd) -> Result<(), VhostError>;
    fn set_vring_call(&mut self, queue: usize, fd: &EventFd) -> Result<(), VhostError>;
    fn set_vring_err(&mut self, queue: usize, fd: &EventFd) -> Result<(), VhostError>;
    /// The tap queue the rings move packets to and from; None detaches it.
    fn set_backend(&mut self, queue: usize, tap: Option<&File>) -> Result<(), VhostError>;
    fn reset_owner(&mut self) -> Result<(), VhostError>;
}

/// Whether this host has vhost-net.
pub fn available() -> bool {
    Path::new(VHOST_NET_PATH).exists()
}

/// /dev/vhost-net through the `vhost` crate.
pub struct KernelVhostNet {
    fd: File,
    mem: Arc<GuestMemoryMmap>,
}

impl KernelVhostNet {
    pub fn open() -> Result<Self, VhostError> {
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(VHOST_NET_PATH)
            .map_err(VhostError::Open)?;
        Ok(Self::with_file(fd))
    }

    /// Adopts an inherited /dev/vhost-net descriptor.
    pub fn adopt(fd: RawFd) -> Result<Self, VhostError> {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(VhostError::FdNotOpen { fd });
        }
        // SAFETY: the descriptor is open and handed to us to own by the configuration.
        Ok(Self::with_file(unsafe { File::from_raw_fd(fd) }))
    }

    fn with_file(fd: File) -> Self {
        KernelVhostNet {
            fd,
            mem: Arc::new(GuestMemoryMmap::default()),
        }
    }
}

impl AsRawFd for KernelVhostNet {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl VhostKernBackend for KernelVhostNet {
    type AS = Arc<GuestMemoryMmap>;

    fn mem(&self) -> &Self::AS {
        &self.mem
    }
}

fn op<T>(op: &'static str, r: vhost::Result<T>) -> Result<T, VhostError> {
    r.map_err(|e| VhostError::Op {
        op,
        message: e.to_string(),
    })
}

vmm_sys_util::ioctl_iow_nr!(
    VHOST_NET_SET_BACKEND,
    0xaf,
    0x30,
    vhost::vhost_kern::vhost_binding::vhost_vring_file
);

impl VhostNetBackend for KernelVhostNet {
    fn set_owner(&mut self) -> Result<(), VhostError> {
        op("SET_OWNER", VhostBackend::set_owner(self))
    }
    fn get_features(&mut self) -> Result<u64, VhostError> {
        op("GET_FEATURES", VhostBackend::get_features(self))
    }
    fn set_features(&mut self, features: u64) -> Result<(), VhostError> {
        op("SET_FEATURES", VhostBackend::set_features(self, features))
    }
    fn set_mem_table(&mut self, mem: &GuestMemoryMmap) -> Result<(), VhostError> {
        self.mem = Arc::new(mem.clone());
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        op(
            "SET_MEM_TABLE",
            VhostBackend::set_mem_table(self, &regions).map(|_| ()),
        )
    }
    fn set_vring_num(&mut self, queue: usize, num: u16) -> Result<(), VhostError> {
        op(
            "SET_VRING_NUM",
            VhostBackend::set_vring_num(self, queue, num),
        )
    }
    fn set_vring_addr(&mut self, queue: usize, ring: &RingAddrs) -> Result<(), VhostError> {
        let config = VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: ring.desc,
            used_ring_addr: ring.used,
            avail_ring_addr: ring.avail,
            log_addr: None,
        };
        op(
            "SET_VRING_ADDR",
            VhostBackend::set_vring_addr(self, queue, &config),
        )
    }
    fn set_vring_base(&mut self, queue: usize, base: u16) -> Result<(), VhostError> {
        op(
            "SET_VRING_BASE",
            VhostBackend::set_vring_base(self, queue, base),
        )
    }
    fn get_vring_base(&mut self, queue: usize) -> Result<u16, VhostError> {
        op("GET_VRING_BASE", VhostBackend::get_vring_base(self, queue)).map(|b| b as u16)
    }
    fn set_vring_kick(&mut self, queue: usize, fd: &EventFd) -> Result<(), VhostError> {
        op(
            "SET_VRING_KICK",
            VhostBackend::set_vring_kick(self, queue, fd),
        )
    }
    fn set_vring_call(&mut self, queue: usize, fd: &EventFd) -> Result<(), VhostError> {
        op(
            "SET_VRING_CALL",
            VhostBackend::set_vring_call(self, queue, fd),
        )
    }
    fn set_vring_err(&mut self, queue: usize, fd: &EventFd) -> Result<(), VhostError> {
        op(
            "SET_VRING_ERR",
            VhostBackend::set_vring_err(self, queue, fd),
        )
    }
    fn set_backend(&mut self, queue: usize, tap: Option<&File>) -> Result<(), VhostError> {
        let file = vhost::vhost_kern::vhost_binding::vhost_vring_file {
            index: queue as u32,
            fd: tap.map_or(-1, AsRawFd::as_raw_fd),
        };
        // SAFETY: VHOST_NET_SET_BACKEND reads one vhost_vring_file from our stack.
        let ret = unsafe { ioctl_with_ref(&self.fd, VHOST_NET_SET_BACKEND(), &file) };
        if ret < 0 {
            return Err(VhostError::Op {
                op: "NET_SET_BACKEND",
                message: std::io::Error::last_os_error().to_string(),
            });
        }
        Ok(())
    }
    fn reset_owner(&mut self) -> Result<(), VhostError> {
        op("RESET_OWNER", VhostBackend::reset_owner(self))
    }
}

/// Features vhost-net implements in the rings (the offloads are the tap's business).
const VHOST_RING_FEATURES: u64 = super::VIRTIO_F_VERSION_1
    | super::VIRTIO_RING_F_EVENT_IDX
    | super::VIRTIO_RING_F_INDIRECT_DESC
    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF);

/// One queue's eventfds while vhost runs it.
struct VhostQueue {
    /// The queue's index in the device (2p rx, 2p+1 tx).
    index: usize,
    /// vhost signals used buffers here; we raise the interrupt.
    call: EventFd,
    _err: EventFd,
    /// The guest's kicks (the transport's ioeventfd), read by vhost.
    _kick: Arc<QueueNotify>,
}

/// The pairs vhost runs, from activation to reset.
pub(crate) struct VhostSession {
    pairs: Vec<usize>,
    queues: Vec<VhostQueue>,
}

impl VhostSession {
    /// Sets up every pair: owner, features, memory table, then per ring num, addresses, base,
    /// call, err, kick, and last the tap as backend. On error what was set up is torn down.
    pub fn start(
        backends: &mut [Box<dyn VhostNetBackend>],
        mem: &GuestMemoryMmap,
        acked_features: u64,
        pairs: Vec<PairQueues>,
        taps: &[Tap],
    ) -> Result<VhostSession, VhostError> {
        let mut session = VhostSession {
            pairs: Vec::new(),
            queues: Vec::new(),
        };
        for pair in pairs {
            let p = pair.pair;
            let (Some(backend), Some(tap)) = (backends.get_mut(p), taps.get(p)) else {
                continue;
            };
            session.pairs.push(p);
            if let Err(e) = session.start_pair(backend.as_mut(), mem, acked_features, pair, tap) {
                session.stop(backends);
                return Err(e);
            }
        }
        Ok(session)
    }

    fn start_pair(
        &mut self,
        backend: &mut dyn VhostNetBackend,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        pair: PairQueues,
        tap: &Tap,
    ) -> Result<(), VhostError> {
        backend.set_owner()?;
        let supported = backend.get_features()?;
        backend.set_features(acked_features & supported & VHOST_RING_FEATURES)?;
        backend.set_mem_table(mem)?;
        for (local, q) in [(0, pair.rx), (1, pair.tx)] {
            let queue = &q.queue;
            let ring = RingAddrs {
                size: queue.size(),
                desc: queue.desc_table(),
                avail: queue.avail_ring(),
                used: queue.used_ring(),
            };
            backend.set_vring_num(local, ring.size)?;
            backend.set_vring_addr(local, &ring)?;
            backend.set_vring_base(local, queue.next_avail())?;
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(VhostError::EventFd)?;
            let err = EventFd::new(libc::EFD_NONBLOCK).map_err(VhostError::EventFd)?;
            backend.set_vring_call(local, &call)?;
            backend.set_vring_err(local, &err)?;
            backend.set_vring_kick(local, q.notify.eventfd())?;
            self.queues.push(VhostQueue {
                index: 2 * pair.pair + local,
                call,
                _err: err,
                _kick: q.notify,
            });
        }
        for local in 0..2 {
            backend.set_backend(local, Some(tap.file()))?;
        }
        Ok(())
    }

    /// The call eventfds to watch, with their queue index.
    pub fn calls(&self) -> impl Iterator<Item = (usize, RawFd)> + '_ {
        self.queues.iter().map(|q| (q.index, q.call.as_raw_fd()))
    }

    /// Consumes a call signal of queue `index`; true when there was one.
    pub fn take_call(&self, index: usize) -> bool {
        self.queues
            .iter()
            .find(|q| q.index == index)
            .is_some_and(|q| q.call.read().is_ok())
    }

    /// Detaches the taps (pause) or attaches them again (resume). Without a backend vhost
    /// moves no frame, and changing it waits for the kernel's work in flight: once paused,
    /// nothing touches guest memory.
    pub fn attach_taps(
        &self,
        backends: &mut [Box<dyn VhostNetBackend>],
        taps: &[Tap],
        attached: bool,
    ) {
        for p in &self.pairs {
            let (Some(backend), Some(tap)) = (backends.get_mut(*p), taps.get(*p)) else {
                continue;
            };
            for local in 0..2 {
                if let Err(e) = backend.set_backend(local, attached.then(|| tap.file())) {
                    log::warn!("virtio-net: {e}");
                }
            }
        }
    }

    /// Detaches the taps, stops the rings and gives up ownership, pair by pair.
    pub fn stop(self, backends: &mut [Box<dyn VhostNetBackend>]) {
        for p in &self.pairs {
            let Some(backend) = backends.get_mut(*p) else {
                continue;
            };
            for local in 0..2 {
                let _ = backend.set_backend(local, None);
            }
            for local in 0..2 {
                let _ = backend.get_vring_base(local);
            }
            if let Err(e) = backend.reset_owner() {
                log::warn!("virtio-net: {e}");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records every call; fails the one named in `fail_at`.
    #[derive(Clone, Default)]
    pub struct Recorder {
        pub log: Arc<Mutex<Vec<String>>>,
        pub fail_at: Option<&'static str>,
    }

    impl Recorder {
        fn note(&self, what: &'static str, detail: String) -> Result<(), VhostError> {
            self.log.lock().unwrap().push(format!("{what}{detail}"));
            if self.fail_at == Some(what) {
                return Err(VhostError::Op {
                    op: what,
                    message: "refused by the test".into(),
                });
            }
            Ok(())
        }
        pub fn calls(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    impl VhostNetBackend for Recorder {
        fn set_owner(&mut self) -> Result<(), VhostError> {
            self.note("set_owner", String::new())
        }
        fn get_features(&mut self) -> Result<u64, VhostError> {
            self.note("get_features", String::new())?;
            Ok(u64::MAX)
        }
        fn set_features(&mut self, f: u64) -> Result<(), VhostError> {
            self.note("set_features", format!(" {f:#x}"))
        }
        fn set_mem_table(&mut self, mem: &GuestMemoryMmap) -> Result<(), VhostError> {
            self.note("set_mem_table", format!(" {} regions", mem.num_regions()))
        }
        fn set_vring_num(&mut self, q: usize, num: u16) -> Result<(), VhostError> {
            self.note("set_vring_num", format!(" {q} {num}"))
        }
        fn set_vring_addr(&mut self, q: usize, r: &RingAddrs) -> Result<(), VhostError> {
            self.note(
                "set_vring_addr",
                format!(" {q} {:#x} {:#x} {:#x}", r.desc, r.avail, r.used),
            )
        }
        fn set_vring_base(&mut self, q: usize, base: u16) -> Result<(), VhostError> {
            self.note("set_vring_base", format!(" {q} {base}"))
        }
        fn get_vring_base(&mut self, q: usize) -> Result<u16, VhostError> {
            self.note("get_vring_base", format!(" {q}"))?;
            Ok(0)
        }
        fn set_vring_kick(&mut self, q: usize, _: &EventFd) -> Result<(), VhostError> {
            self.note("set_vring_kick", format!(" {q}"))
        }
        fn set_vring_call(&mut self, q: usize, _: &EventFd) -> Result<(), VhostError> {
            self.note("set_vring_call", format!(" {q}"))
        }
        fn set_vring_err(&mut self, q: usize, _: &EventFd) -> Result<(), VhostError> {
            self.note("set_vring_err", format!(" {q}"))
        }
        fn set_backend(&mut self, q: usize, tap: Option<&File>) -> Result<(), VhostError> {
            let what = if tap.is_some() { " tap" } else { " none" };
            self.note("set_backend", format!(" {q}{what}"))
        }
        fn reset_owner(&mut self) -> Result<(), VhostError> {
            self.note("reset_owner", String::new())
        }
    }
}
