//! Host side of the console ports: unix sockets chapeau listens on (one client at a time, like
//! QEMU's `chardev socket,server,nowait`) and the stdout/file output of port 0. Every fd here is
//! non-blocking, so neither the event loop nor a vCPU ever waits on a host peer.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::ConsoleError;
use crate::host_files::open_output;
use crate::legacy::{OutputBudget, OutputLimits};
use crate::unix_socket::{bind_unix_listener, SocketError, SocketFile};

/// A unix socket we listen on, and its client while one is connected.
pub(super) struct SocketBackend {
    pub path: PathBuf,
    pub listener: UnixListener,
    /// Removes the socket file when the port goes away (only while it is still ours).
    _file: SocketFile,
    pub listener_registered: bool,
    pub client: Option<Client>,
}

/// Where a connected client's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientState {
    /// Connected; bytes flow both ways.
    Open,
    /// The peer hung up while we were not reading (the guest applied back-pressure); what it
    /// sent is still in the socket and gets read once the guest takes more.
    HungUp,
    /// Read end reached EOF or failed: nothing more to read; the session ends once what we
    /// already read has reached the guest (or the guest closed the port).
    Closing,
}

pub(super) struct Client {
    pub stream: UnixStream,
    /// The interest currently registered with epoll, if the fd is registered.
    pub registered: Option<EventSet>,
    pub state: ClientState,
    /// A send failed (peer gone): guest output for this session is dropped from now on.
    pub write_broken: bool,
}

impl SocketBackend {
    /// Listens on `path` (see [`bind_unix_listener`]: a live socket is refused, a stale one
    /// replaced), non-blocking.
    pub fn listen(path: &Path) -> Result<Self, ConsoleError> {
        let (listener, file) = bind_unix_listener(path)?;
        listener.set_nonblocking(true).map_err(|source| {
            ConsoleError::Socket(SocketError::Listen {
                path: path.to_path_buf(),
                source,
            })
        })?;
        Ok(SocketBackend {
            path: path.to_path_buf(),
            listener,
            _file: file,
            listener_registered: false,
            client: None,
        })
    }

    /// Accepts one pending connection, non-blocking. `Ok(false)`: nobody is waiting.
    /// accept4 with SOCK_NONBLOCK (rather than std's accept + set_nonblocking) keeps the
    /// FIONBIO ioctl out of the vmm thread's seccomp policy.
    pub fn accept(&mut self) -> io::Result<bool> {
        // SAFETY: null address pointers ask accept4 for no peer address, so it writes no
        // memory; it only returns a new fd or -1.
        let fd = unsafe {
            libc::accept4(
                self.listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                // The peer gave up before we took it: nothing to do.
                _ if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(false),
                _ => Err(e),
            };
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
        self.client = Some(Client {
            stream,
            registered: None,
            state: ClientState::Open,
            write_broken: false,
        });
        Ok(true)
    }

    /// A client that can take guest output.
    pub fn writable_client(&mut self) -> Option<&mut Client> {
        self.client.as_mut().filter(|c| !c.write_broken)
    }
}

/// `send(2)` with MSG_NOSIGNAL (a vanished peer is an EPIPE error, never a SIGPIPE) and
/// MSG_DONTWAIT.
pub(super) fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice, valid for reads of `buf.len()` bytes for the whole call;
    // the fd belongs to `stream`, which outlives the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Port 0's stdout or file output.
pub(super) struct Sink {
    pub file: File,
    /// Registered with epoll for EPOLLOUT (only while output waits).
    pub registered: bool,
    /// Output failed or cannot be polled: further output is dropped.
    pub failed: bool,
    /// A file's cap and rate (a guest must not fill the host's disk nor hog its I/O); none
    /// for stdout, whose reader sets the pace.
    budget: Option<OutputBudget>,
}

impl Sink {
    /// Our stdout, non-blocking (see `host_stdout`).
    pub fn stdout() -> Result<Self, ConsoleError> {
        let file =
            crate::host_stdout::nonblocking_stdout("console").map_err(ConsoleError::Stdout)?;
        Ok(Sink {
            file,
            registered: false,
            failed: false,
            budget: None,
        })
    }

    /// Creates `path`, or truncates it if it is ours; see [`open_output`]. Capped and
    /// rate-limited as the serial port's `file=` ([`OutputLimits::FILE`]).
    pub fn file(path: &Path) -> Result<Self, ConsoleError> {
        Self::file_with(path, OutputLimits::FILE)
    }

    fn file_with(path: &Path, limits: OutputLimits) -> Result<Self, ConsoleError> {
        let file = open_output("console output", path)?;
        Ok(Sink {
            file,
            registered: false,
            failed: false,
            budget: Some(OutputBudget::new("console output", limits)),
        })
    }

    /// Bytes the file's cap or rate dropped.
    pub fn refused(&self) -> u64 {
        self.budget.as_ref().map_or(0, OutputBudget::refused)
    }

    /// Writes what the budget admits of `data`; the rest counts as written (dropped), so
    /// the guest's output never waits on a limit.
    pub fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let allowed = self
            .budget
            .as_mut()
            .map_or(data.len(), |budget| budget.admit(data.len()));
        if allowed == 0 {
            return Ok(data.len());
        }
        let written = self.file.write(&data[..allowed])?;
        Ok(if written == allowed {
            data.len()
        } else {
            written
        })
    }
}

/// What a flush attempt left behind.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flush {
    /// Everything went out (or was dropped).
    Done,
    /// The peer would block: wait for EPOLLOUT.
    Blocked,
}

/// Writes as much of `buf` as `write` takes without blocking. On an error other than
/// WouldBlock the rest is dropped and the error returned.
pub(super) fn flush_with(
    buf: &mut VecDeque<u8>,
    mut write: impl FnMut(&[u8]) -> io::Result<usize>,
) -> Result<Flush, io::Error> {
    while !buf.is_empty() {
        let (front, _) = buf.as_slices();
        match write(front) {
            Ok(0) => {
                buf.clear();
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            Ok(n) => {
                buf.drain(..n.min(buf.len()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                buf.clear();
                return Err(e);
            }
        }
    }
    Ok(Flush::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The console's `file=` output stops at its cap like the serial port's, and what is
    /// dropped still counts as written (the guest's output never waits on the limit).
    #[test]
    fn a_console_file_stops_at_its_cap() {
        let path = std::env::temp_dir().join(format!("console-cap-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let limits = OutputLimits {
            cap: Some(1000),
            rate: None,
        };
        let mut sink = Sink::file_with(&path, limits).unwrap();
        let mut out: VecDeque<u8> = std::iter::repeat_n(b'c', 5000).collect();
        assert_eq!(
            flush_with(&mut out, |d| sink.write(d)).unwrap(),
            Flush::Done
        );
        assert!(out.is_empty());
        let size = std::fs::metadata(&path).unwrap().len();
        let _ = std::fs::remove_file(&path);
        assert_eq!(size, 1000);
    }
}
