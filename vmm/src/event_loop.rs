//! The `vmm` thread's event loop: console input, termination signals and the VM-exit event.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::legacy::Serial;
use devices::{ExitNotifier, ExitReason};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
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
    exit: Arc<ExitNotifier>,
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
    /// opens a signalfd for them. Call before starting the vCPU threads.
    pub fn new(exit: Arc<ExitNotifier>) -> Result<Self, EventLoopError> {
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
        Ok(Self { fd, exit })
    }
}

impl MutEventSubscriber for TerminationSignals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        let mut file = std::mem::ManuallyDrop::new(
            // SAFETY: a non-owning File view of our signalfd; ManuallyDrop keeps it from closing.
            unsafe { std::fs::File::from_raw_fd(self.fd.as_raw_fd()) },
        );
        if let Ok(n) = file.read(&mut info) {
            if n == info.len() {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                log::info!("received signal {signo}, stopping the VM");
                self.exit.notify(ExitReason::Stopped);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch termination signals: {e:?}");
        }
    }
}

/// Wakes the loop when a vCPU or device asks the VM to end.
struct ExitWatch {
    exit: Arc<ExitNotifier>,
}

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event(), EventSet::IN)) {
            log::error!("cannot watch the VM exit event: {e:?}");
        }
    }
}

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

pub struct EventLoop {
    manager: EventManager<Subscriber>,
    exit: Arc<ExitNotifier>,
}

impl EventLoop {
    pub fn new(exit: Arc<ExitNotifier>) -> Result<Self, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(EventLoopError::Manager)?;
        manager.add_subscriber(Arc::new(Mutex::new(ExitWatch { exit: exit.clone() })));
        Ok(Self { manager, exit })
    }

    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Runs until something asks the VM to end; returns why.
    pub fn run(&mut self) -> Result<ExitReason, EventLoopError> {
        loop {
            if let Some(reason) = self.exit.reason() {
                return Ok(reason);
            }
            match self.manager.run() {
                Ok(_) => {}
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(EventLoopError::Manager(e)),
            }
        }
    }
}

/// Whether `fd` is an open descriptor (CI may start us with stdin closed).
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only inspects the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}
