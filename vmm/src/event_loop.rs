//! The `vmm` thread's event sources. Two sets: the *control* sources (termination signals, the
//! VM-exit event, API requests, the metrics timer), which the runtime serves itself, and the
//! *device* sources (virtio queues and backends, console input), which an event-manager runs.
//! While the VM runs, the device loop also watches the control fds (without consuming them) so
//! one wait covers both; while it is paused, only the control fds are waited on, so no device
//! touches guest memory.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::Serial;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("event loop: {0}")]
    Manager(event_manager::Error),
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
}

/// Feeds host input (stdin) to the serial console.
pub struct ConsoleInput {
    input: std::fs::File,
    serial: Arc<Mutex<Serial>>,
}

impl ConsoleInput {
    /// Takes ownership of `fd` (stdin) for reading.
    pub fn new(fd: OwnedFd, serial: Arc<Mutex<Serial>>) -> Self {
        Self {
            input: std::fs::File::from(fd),
            serial,
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match self.input.read(&mut buf) {
            Ok(n) if n > 0 => {
                let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                serial.enqueue_input(&buf[..n]);
            }
            // EOF or a broken input: stop watching it, the guest keeps running.
            result => {
                if let Err(e) = result {
                    log::warn!("console input: {e}; no more input");
                }
                let _ = ops.remove(events);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be polled (EPERM): then there is simply no input.
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            log::info!("stdin cannot be polled ({e:?}); the guest console gets no input");
        }
    }
}

/// SIGTERM and SIGINT, received through a signalfd so they are ordinary events here.
pub struct TerminationSignals {
    fd: OwnedFd,
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t on our stack.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

impl TerminationSignals {
    /// Blocks SIGTERM/SIGINT for the calling thread and every thread it starts afterwards, and
    /// opens a signalfd for them. Call before starting any other thread.
    pub fn new() -> Result<Self, EventLoopError> {
        let set = termination_set();
        // SAFETY: pthread_sigmask reads a valid sigset_t; signalfd returns a new fd or -1.
        let fd = unsafe {
            let ret = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if ret != 0 {
                return Err(EventLoopError::Signals(std::io::Error::from_raw_os_error(
                    ret,
                )));
            }
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(EventLoopError::Signals(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// The signal received, if any (non-blocking).
    pub fn take(&self) -> Option<u32> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        let mut file = std::mem::ManuallyDrop::new(
            // SAFETY: a non-owning File view of our signalfd; ManuallyDrop keeps it from closing.
            unsafe { std::fs::File::from_raw_fd(self.fd.as_raw_fd()) },
        );
        match file.read(&mut info) {
            Ok(n) if n == info.len() => {
                Some(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]))
            }
            _ => None,
        }
    }
}

impl AsRawFd for TerminationSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// In the device loop: notes that a control fd is ready, without consuming it, so the runtime
/// serves the control sources after the device loop returns.
pub struct ControlWake {
    fds: Vec<RawFd>,
    pending: Arc<AtomicBool>,
}

impl ControlWake {
    /// `fds` must stay open as long as the device loop runs (the runtime owns both).
    pub fn new(fds: Vec<RawFd>, pending: Arc<AtomicBool>) -> Self {
        Self { fds, pending }
    }
}

impl MutEventSubscriber for ControlWake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.pending.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in &self.fds {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::IN)) {
                log::error!("cannot watch control fd {fd}: {e:?}");
            }
        }
    }
}

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Whether `fd` is an open descriptor (CI may start us with stdin closed).
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only inspects the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}
