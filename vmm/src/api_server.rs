//! The `api` thread: binds the API socket (replacing only a stale one), serves REST requests
//! by forwarding each to the runtime, and removes the socket file when it ends.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::unix_socket::{bind_unix_listener, SocketError, SocketFile};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, SeccompFilters};
use crate::vmm::{RuntimeError, Vmm};

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("API socket: {0}")]
    Socket(#[from] SocketError),
    #[error("cannot start the api thread: {0}")]
    Spawn(std::io::Error),
}

/// The running API server; dropping it stops the thread and removes the socket file.
pub struct ApiServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Removes the socket file when dropped, after the thread has stopped.
    _socket: SocketFile,
}

/// Binds the API socket and starts the `api` thread serving it for `vmm`.
pub fn start(path: &Path, vmm: &mut Vmm) -> Result<ApiServer, ApiServerError> {
    let (listener, socket) = bind_unix_listener(path)?;
    let client = vmm.api_client()?;
    let filters: Arc<SeccompFilters> = vmm.seccomp_filters();
    let spawn_error = |e| ApiServerError::Spawn(e);
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(spawn_error)?;
    let thread_stop = stop.try_clone().map_err(spawn_error)?;
    let thread = std::thread::Builder::new()
        .name(seccomp::API_THREAD.into())
        .spawn(move || {
            // The allocator's lazy set-up reads /proc: before Landlock.
            seccomp::warm_up_allocator();
            // Landlock first (its syscalls then need no room in the filter): the thread
            // only parses and forwards, so it may reach no path at all.
            let confined = crate::landlock::restrict_thread(&[])
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    seccomp::apply(&filters, seccomp::API_THREAD).map_err(|e| e.to_string())
                });
            if let Err(e) = confined {
                log::error!("{e}; the API is not served");
                return;
            }
            if let Err(e) = api::rest::serve(listener, thread_stop, |request| client.call(request))
            {
                log::error!("{e}");
            }
        })
        .map_err(spawn_error)?;
    Ok(ApiServer {
        stop,
        thread: Some(thread),
        _socket: socket,
    })
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
