//! The `qmp` thread: serves QMP on the socket the QEMU command line names (a path it binds, or
//! a listening socket it inherited), forwarding each command to the runtime, and tells every
//! client how the VM ended.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::thread::JoinHandle;

use api::qemu::qmp::{QmpBackend, QmpEvent};
use api::qemu::{notice_channel, QmpEndpoint, QmpNotice, QmpNotifier, QmpServerError};
use api::{RequestError, VmState, VmmRequest, VmmResponse};
use devices::unix_socket::{bind_unix_listener, SocketError, SocketFile};
use devices::ExitReason;

use devices::virtio::ThreadConfinement;

use crate::seccomp;
use crate::vmm::{ApiClient, RuntimeError, Vmm};

#[derive(Debug, thiserror::Error)]
pub enum QmpThreadError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("-qmp: {0}")]
    Socket(#[from] SocketError),
    #[error("-qmp unix:fd={fd}: {why}")]
    InheritedFd { fd: RawFd, why: String },
    #[error(transparent)]
    Server(#[from] QmpServerError),
    #[error("cannot start the qmp thread: {0}")]
    Spawn(std::io::Error),
}

/// The running QMP server; [`QmpServer::finish`] tells the clients how the VM ended, stops the
/// thread and removes the socket file it bound.
pub struct QmpServer {
    notifier: QmpNotifier,
    thread: Option<JoinHandle<()>>,
    _socket: Option<SocketFile>,
}

/// Starts serving QMP at `endpoint` for `vmm`.
pub fn start(endpoint: &QmpEndpoint, vmm: &mut Vmm) -> Result<QmpServer, QmpThreadError> {
    let (listener, socket) = match endpoint {
        QmpEndpoint::Path(path) => {
            let (listener, socket) = bind_unix_listener(path)?;
            (listener, Some(socket))
        }
        QmpEndpoint::Fd(fd) => (inherited_listener(*fd)?, None),
    };
    let mut backend = RuntimeBackend {
        client: vmm.api_client()?,
    };
    let confinement = seccomp::SeccompConfinement(vmm.seccomp_filters());
    let (notifier, inbox) = notice_channel()?;
    let thread = std::thread::Builder::new()
        .name(seccomp::QMP_THREAD.into())
        .spawn(move || {
            // The allocator's lazy set-up reads /proc: before Landlock.
            seccomp::warm_up_allocator();
            // Landlock to no path at all, then the qmp filter: the thread only parses and
            // forwards.
            if let Err(e) = confinement.confine(seccomp::QMP_THREAD) {
                log::error!("{e}; QMP is not served");
                return;
            }
            if let Err(e) = api::qemu::server::serve(listener, inbox, &mut backend) {
                log::error!("{e}");
            }
        })
        .map_err(QmpThreadError::Spawn)?;
    Ok(QmpServer {
        notifier,
        thread: Some(thread),
        _socket: socket,
    })
}

/// Takes the listening unix socket `fd` the caller passed (`-qmp unix:fd=N`), after checking
/// it is one: anything else would be served as if it were, or stall.
fn inherited_listener(fd: RawFd) -> Result<UnixListener, QmpThreadError> {
    let refuse = |why: &str| QmpThreadError::InheritedFd {
        fd,
        why: why.into(),
    };
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, an int we own; a
        // descriptor that is not open or not a socket makes it fail, nothing else.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    match (option(libc::SO_DOMAIN), option(libc::SO_ACCEPTCONN)) {
        (None, _) => Err(refuse("not an open socket")),
        (Some(libc::AF_UNIX), Some(1)) => {
            // SAFETY: `fd` is an open socket nothing else in this process owns: it was
            // inherited for this use alone, and is taken once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok(UnixListener::from(owned))
        }
        (Some(libc::AF_UNIX), _) => Err(refuse("the unix socket is not listening")),
        _ => Err(refuse("not a unix socket")),
    }
}

impl QmpServer {
    /// Reports the end to every client (one `SHUTDOWN`, unless a `quit` already announced it),
    /// sends what is queued and stops the thread.
    pub fn finish(mut self, reason: ExitReason) {
        let (guest, reason) = match reason {
            ExitReason::Poweroff => (true, "guest-shutdown"),
            ExitReason::Reset | ExitReason::TripleFault => (true, "guest-reset"),
            ExitReason::Crashed => (true, "guest-panic"),
            ExitReason::Stopped => (false, "host-signal"),
        };
        self.notifier
            .notify(QmpNotice::Event(QmpEvent::Shutdown { guest, reason }));
        self.stop();
    }

    fn stop(&mut self) {
        self.notifier.notify(QmpNotice::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Answers the QMP session's questions through the runtime's request channel.
struct RuntimeBackend {
    client: ApiClient,
}

impl QmpBackend for RuntimeBackend {
    fn request(&mut self, request: VmmRequest) -> Result<VmmResponse, RequestError> {
        self.client.call(request)
    }

    fn vcpu_thread_ids(&self) -> Vec<i32> {
        match self.client.call(VmmRequest::GetVcpuThreadIds) {
            Ok(VmmResponse::VcpuThreadIds(ids)) => ids,
            _ => Vec::new(),
        }
    }

    fn status(&self) -> VmState {
        match self.client.call(VmmRequest::GetInfo) {
            Ok(VmmResponse::Info(info)) => info.state,
            _ => VmState::Stopped,
        }
    }
}
