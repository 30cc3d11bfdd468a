//! The connection loop of the `api` thread: one epoll over the listening socket, the stop
//! eventfd and every client. Sockets are non-blocking and each client has its own parser state
//! and output buffer, so a slow or half-open client stalls neither the loop nor other clients.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use dbs_uhttp::{ConnectionError, HttpConnection, Request, ScmSocket, SysError, Version};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{encode_final_response, encode_response, parse_request, HttpError, MAX_BODY_BYTES};
use crate::nonblocking::{flush_output, send};
use crate::request::{RequestError, VmmRequest, VmmResponse};

/// Clients connected at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 32;
/// A client that completes no request and takes none of our output for this long is closed
/// (silently, as HTTP servers close idle keep-alive connections): clients that connect and
/// send nothing, or stall half-way through a request, cannot hold the connection slots for
/// ever. Bytes that do not complete a request do not count as activity, so a client
/// trickling a request in byte by byte is closed too. 30 s, as common HTTP servers.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Request line and headers of one request, all together (a client cannot grow our memory by
/// sending headers forever).
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// After an unparsable request, what is still read and dropped before the socket closes: a
/// client still sending its body would otherwise get a reset instead of our answer.
const LINGER_BYTES: usize = MAX_BODY_BYTES + MAX_HEAD_BYTES;
const MAX_EVENTS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API server: cannot create its epoll: {0}")]
    EpollCreate(#[source] io::Error),
    #[error("API server: cannot watch the {what}: {source}")]
    EpollAdd {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("API server: epoll_wait failed: {0}")]
    EpollWait(#[source] io::Error),
    #[error("API server: cannot make the listening socket non-blocking: {0}")]
    NonBlocking(#[source] io::Error),
}

/// Serves the REST API on `listener` until `stop` is written: every request is parsed and
/// passed to `handler`, whose answer goes back to the client. Returns when `stop` becomes
/// readable (clients are then disconnected), or on an epoll failure. Idle clients are closed
/// after [`IDLE_TIMEOUT`].
pub fn serve<H>(listener: UnixListener, stop: EventFd, handler: H) -> Result<(), ServerError>
where
    H: FnMut(VmmRequest) -> Result<VmmResponse, RequestError>,
{
    serve_with_idle_timeout(listener, stop, IDLE_TIMEOUT, handler)
}

/// [`serve`] with another idle timeout (tests shorten it).
pub fn serve_with_idle_timeout<H>(
    listener: UnixListener,
    stop: EventFd,
    idle_timeout: Duration,
    mut handler: H,
) -> Result<(), ServerError>
where
    H: FnMut(VmmRequest) -> Result<VmmResponse, RequestError>,
{
    listener
        .set_nonblocking(true)
        .map_err(ServerError::NonBlocking)?;
    let epoll = Epoll::new().map_err(ServerError::EpollCreate)?;
    for (what, fd) in [
        ("listening socket", listener.as_raw_fd()),
        ("stop eventfd", stop.as_raw_fd()),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .map_err(|source| ServerError::EpollAdd { what, source })?;
    }
    let mut clients: BTreeMap<RawFd, Client> = BTreeMap::new();
    let mut events = [EpollEvent::default(); MAX_EVENTS];
    loop {
        let count = match epoll.wait(wait_ms(&clients, idle_timeout), &mut events) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ServerError::EpollWait(e)),
        };
        for event in &events[..count] {
            let fd = event.data() as RawFd;
            if fd == stop.as_raw_fd() {
                return Ok(());
            }
            if fd == listener.as_raw_fd() {
                accept(&listener, &epoll, &mut clients);
                continue;
            }
            let Some(client) = clients.get_mut(&fd) else {
                continue;
            };
            let before = client.interest();
            client.on_event(event.event_set(), &mut handler);
            let after = client.interest();
            let rearmed = match after {
                Interest::Close => false,
                _ if after == before => true,
                _ => epoll
                    .ctl(ControlOperation::Modify, fd, after.event(fd))
                    .is_ok(),
            };
            if !rearmed {
                // Dropping the client closes its socket, which also leaves the epoll.
                clients.remove(&fd);
            }
        }
        let now = Instant::now();
        clients.retain(|_, client| now.duration_since(client.active) < idle_timeout);
    }
}

/// How long epoll may wait: until the first client's idle deadline, or for ever with none.
fn wait_ms(clients: &BTreeMap<RawFd, Client>, idle_timeout: Duration) -> i32 {
    let Some(first) = clients.values().map(|client| client.active).min() else {
        return -1;
    };
    let left = (first + idle_timeout).saturating_duration_since(Instant::now());
    // Rounded up: waking a little early would only wait again.
    i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
}

fn accept(listener: &UnixListener, epoll: &Epoll, clients: &mut BTreeMap<RawFd, Client>) {
    // An accept failure (the client gave up, EMFILE) costs that client only.
    let Ok((stream, _)) = listener.accept() else {
        return;
    };
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let fd = stream.as_raw_fd();
    if clients.len() >= MAX_CONNECTIONS {
        let answer = encode_final_response(
            Version::Http11,
            HttpError::TooManyConnections(MAX_CONNECTIONS),
        );
        // Best effort: the client is dropped either way.
        let _ = send(fd, &answer);
        return;
    }
    let client = Client::new(stream);
    if epoll
        .ctl(ControlOperation::Add, fd, Interest::Read.event(fd))
        .is_ok()
    {
        clients.insert(fd, client);
    }
}

/// What a client waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interest {
    Read,
    Write,
    /// The answer is sent and our side shut: what the client still sends is dropped.
    Drain,
    Close,
}

impl Interest {
    fn event(self, fd: RawFd) -> EpollEvent {
        let set = match self {
            Interest::Read | Interest::Drain => EventSet::IN,
            Interest::Write | Interest::Close => EventSet::OUT,
        };
        EpollEvent::new(set, fd as u64)
    }
}

struct Client {
    /// dbs-uhttp's parser state for this client; only its read side is used.
    connection: HttpConnection<ApiStream>,
    /// Bytes received since the last complete request (shared with the stream).
    received: Rc<Cell<usize>>,
    /// Encoded responses not yet sent, from `sent` on.
    output: Vec<u8>,
    sent: usize,
    /// Close once `output` is sent: the stream can no longer be parsed, or the peer is gone.
    closing: bool,
    /// Bytes still to drop before closing after an unparsable request (0: close at once).
    linger: usize,
    /// Our side is shut down (the client has seen the end of our answer).
    write_shut: bool,
    /// Close now: the socket failed.
    broken: bool,
    /// When it connected, last completed a request, or last took some of our output.
    active: Instant,
}

impl Client {
    fn new(stream: UnixStream) -> Self {
        let received = Rc::new(Cell::new(0));
        let mut connection = HttpConnection::new(ApiStream {
            stream,
            received: received.clone(),
        });
        connection.set_payload_max_size(MAX_BODY_BYTES);
        Client {
            connection,
            received,
            output: Vec::new(),
            sent: 0,
            closing: false,
            linger: 0,
            write_shut: false,
            broken: false,
            active: Instant::now(),
        }
    }

    fn interest(&self) -> Interest {
        if self.broken {
            Interest::Close
        } else if self.sent < self.output.len() {
            Interest::Write
        } else if self.closing && self.linger > 0 {
            Interest::Drain
        } else if self.closing {
            Interest::Close
        } else {
            Interest::Read
        }
    }

    fn on_event<H>(&mut self, events: EventSet, handler: &mut H)
    where
        H: FnMut(VmmRequest) -> Result<VmmResponse, RequestError>,
    {
        if events.contains(EventSet::ERROR) {
            self.broken = true;
            return;
        }
        match self.interest() {
            Interest::Write => self.flush(),
            Interest::Drain => self.drain(),
            _ => {
                // A hang-up is seen here too: the read returns 0 and the client closes.
                self.receive(handler);
                self.flush();
            }
        }
        if self.interest() == Interest::Drain && !self.write_shut {
            self.write_shut = true;
            // SAFETY: shutdown(2) on the client's socket, which this client owns; no memory
            // is involved.
            if unsafe { libc::shutdown(self.connection.as_raw_fd(), libc::SHUT_WR) } != 0 {
                self.broken = true;
            }
        }
    }

    /// Drops what the client still sends after an unparsable request, up to `linger` bytes or
    /// its end, whichever comes first; then the socket closes.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while self.linger > 0 {
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len().min(self.linger),
            };
            // SAFETY: one iovec over `buf`, which lives on this stack frame; readv writes at
            // most its length.
            let n = unsafe { libc::readv(self.connection.as_raw_fd(), &iov, 1) };
            match n {
                0 => self.linger = 0,
                n if n > 0 => self.linger = self.linger.saturating_sub(n as usize),
                _ => {
                    if io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
                        self.linger = 0;
                    }
                    return;
                }
            }
        }
    }

    /// Reads what the socket has, answers every request completed by it, in order.
    fn receive<H>(&mut self, handler: &mut H)
    where
        H: FnMut(VmmRequest) -> Result<VmmResponse, RequestError>,
    {
        let result = self.connection.try_read();
        while let Some(request) = self.connection.pop_parsed_request() {
            self.received.set(0);
            self.active = Instant::now();
            if request.headers.chunked() {
                self.fail(HttpError::BadRequest(
                    "chunked request bodies are not supported: send Content-Length".into(),
                ));
                return;
            }
            let answer = answer(&request, handler);
            self.output
                .extend(encode_response(request.http_version(), answer));
        }
        // A 100-continue that dbs-uhttp queued: send it now, the body follows.
        while self.connection.pending_write() && self.connection.try_write().is_ok() {}
        match result {
            Ok(()) => {}
            Err(ConnectionError::ParseError(error)) => self.fail(error.into()),
            // The peer shut down its side: answer what it sent, then close.
            Err(ConnectionError::ConnectionClosed) => self.closing = true,
            Err(ConnectionError::StreamReadError(e))
                if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => {}
            Err(_) => self.broken = true,
        }
        if !self.closing && self.received.get() > MAX_BODY_BYTES + MAX_HEAD_BYTES {
            self.fail(HttpError::BadRequest(format!(
                "request line and headers are over {MAX_HEAD_BYTES} bytes"
            )));
        }
    }

    /// Answers an unparsable request and closes: what follows it cannot be parsed either.
    fn fail(&mut self, error: HttpError) {
        self.output
            .extend(encode_final_response(Version::Http11, error));
        self.closing = true;
        self.linger = LINGER_BYTES;
    }

    /// Sends as much output as the socket takes now.
    fn flush(&mut self) {
        let pending = self.output.len() - self.sent;
        if flush_output(
            self.connection.as_raw_fd(),
            &mut self.output,
            &mut self.sent,
        )
        .is_err()
        {
            self.broken = true;
        }
        if self.output.len() - self.sent < pending {
            self.active = Instant::now();
        }
    }
}

fn answer<H>(request: &Request, handler: &mut H) -> Result<VmmResponse, HttpError>
where
    H: FnMut(VmmRequest) -> Result<VmmResponse, RequestError>,
{
    let body = request.body.as_ref().map(|body| body.raw());
    let vmm_request = parse_request(request.method(), request.uri().get_abs_path(), body)?;
    handler(vmm_request).map_err(HttpError::from)
}

/// A client socket as dbs-uhttp reads it: plain reads (file descriptors a client sends along
/// are never accepted, so it cannot fill our descriptor table), counted.
struct ApiStream {
    stream: UnixStream,
    received: Rc<Cell<usize>>,
}

impl ScmSocket for ApiStream {
    fn socket_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    unsafe fn recv_with_fds(
        &self,
        iovecs: &mut [libc::iovec],
        _fds: &mut [RawFd],
    ) -> Result<(usize, usize), SysError> {
        let count = libc::c_int::try_from(iovecs.len()).map_err(|_| SysError::new(libc::EINVAL))?;
        // SAFETY: the caller guarantees the iovecs point to writable buffers of their length;
        // readv writes at most that much into them. SCM_RIGHTS data is discarded by the kernel.
        let n = unsafe { libc::readv(self.stream.as_raw_fd(), iovecs.as_ptr(), count) };
        if n < 0 {
            return Err(SysError::last());
        }
        let n = n as usize;
        self.received.set(self.received.get().saturating_add(n));
        Ok((n, 0))
    }
}

impl Read for ApiStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

/// Only used by dbs-uhttp for a `100 Continue`.
impl Write for ApiStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send(self.stream.as_raw_fd(), buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for ApiStream {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}
