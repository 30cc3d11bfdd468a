//! The `api` thread: binds the API socket (replacing only a stale one), serves REST requests
//! by forwarding each to the runtime, and removes the socket file when it ends.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, SeccompFilters};
use crate::vmm::{RuntimeError, Vmm};

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("API socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket {}: something is listening on it already (another chapeau?)", path.display())]
    InUse { path: PathBuf },
    #[error("API socket {}: a file that is not a socket is in the way", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot start the api thread: {0}")]
    Spawn(std::io::Error),
}

/// Binds `path`. A socket file nobody listens on (a crashed VMM's) is replaced; a live one, or
/// any other kind of file, is left alone and refused.
fn bind(path: &Path) -> Result<UnixListener, ApiServerError> {
    let socket_error = |source| ApiServerError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiServerError::InUse { path: path.into() }),
            Err(_) => {
                log::warn!("replacing stale API socket {}", path.display());
                std::fs::remove_file(path).map_err(socket_error)?;
            }
        },
        Ok(_) => return Err(ApiServerError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    UnixListener::bind(path).map_err(socket_error)
}

/// The running API server; dropping it stops the thread and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    /// The socket file we created, by device and inode: removed only if still ours.
    identity: Option<(u64, u64)>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Binds the API socket and starts the `api` thread serving it for `vmm`.
pub fn start(path: &Path, vmm: &mut Vmm) -> Result<ApiServer, ApiServerError> {
    let listener = bind(path)?;
    let identity = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let client = vmm.api_client()?;
    let filters: Arc<SeccompFilters> = vmm.seccomp_filters();
    let spawn_error = |e| ApiServerError::Spawn(e);
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(spawn_error)?;
    let thread_stop = stop.try_clone().map_err(spawn_error)?;
    let thread = std::thread::Builder::new()
        .name(seccomp::API_THREAD.into())
        .spawn(move || {
            if let Err(e) = seccomp::apply(&filters, seccomp::API_THREAD) {
                log::error!("{e}; the API is not served");
                return;
            }
            if let Err(e) = api::rest::serve(listener, thread_stop, |request| client.call(request)) {
                log::error!("{e}");
            }
        })
        .map_err(spawn_error)?;
    Ok(ApiServer {
        path: path.to_path_buf(),
        identity,
        stop,
        thread: Some(thread),
    })
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let still_ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if still_ours.is_some() && still_ours == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
