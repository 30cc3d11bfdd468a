//! The QMP socket loop of the `qmp` thread: one epoll over the listening socket, the runtime's
//! notice eventfd and every client. Each client has its own [`QmpSession`] and output buffer;
//! sockets are non-blocking, so a client that stops reading stalls neither the loop nor the
//! others (past [`MAX_CLIENT_OUTPUT`] unread bytes it is disconnected).
//!
//! Clients come and go: Kata's shim connects, asks, and disconnects, many times per VM. Events
//! reach every client that negotiated capabilities, whether a client's command caused them or
//! the runtime reported them through a [`QmpNotifier`] (the guest powered off, a signal).

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::SystemTime;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::qmp::{QmpBackend, QmpEvent, QmpSession};
use crate::nonblocking::flush_output;

/// Clients connected at once; one more is closed at once (QEMU serves one at a time).
pub const MAX_CLIENTS: usize = 8;
/// Unsent bytes kept for one client; one that lets more pile up is disconnected.
pub const MAX_CLIENT_OUTPUT: usize = 1 << 20;
/// Bytes read from a client per readiness event: a client sending without end is served
/// in turn with the others.
const READ_CHUNK: usize = 4096;
const MAX_EVENTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum QmpServerError {
    #[error("QMP server: cannot create its epoll: {0}")]
    EpollCreate(#[source] io::Error),
    #[error("QMP server: cannot watch the {what}: {source}")]
    EpollAdd {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("QMP server: epoll_wait failed: {0}")]
    EpollWait(#[source] io::Error),
    #[error("QMP server: cannot make the listening socket non-blocking: {0}")]
    NonBlocking(#[source] io::Error),
    #[error("QMP server: cannot create its notice event: {0}")]
    Notice(#[source] io::Error),
}

/// What the runtime tells the QMP thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpNotice {
    /// An event for every client (a `SHUTDOWN` is sent once, whoever reports it first).
    Event(QmpEvent),
    /// Send what is queued and return.
    Stop,
}

/// The runtime's end of the notice channel.
pub struct QmpNotifier {
    notices: Sender<QmpNotice>,
    wake: EventFd,
}

impl QmpNotifier {
    /// Queues `notice`; false once the QMP thread is gone.
    pub fn notify(&self, notice: QmpNotice) -> bool {
        self.notices.send(notice).is_ok() && self.wake.write(1).is_ok()
    }
}

/// The QMP thread's end.
pub struct QmpInbox {
    notices: Receiver<QmpNotice>,
    wake: EventFd,
}

/// A connected pair of notifier and inbox.
pub fn notice_channel() -> Result<(QmpNotifier, QmpInbox), QmpServerError> {
    let (sender, receiver) = mpsc::channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(QmpServerError::Notice)?;
    let notifier = QmpNotifier {
        notices: sender,
        wake: wake.try_clone().map_err(QmpServerError::Notice)?,
    };
    Ok((
        notifier,
        QmpInbox {
            notices: receiver,
            wake,
        },
    ))
}

/// Serves QMP on `listener` until the inbox says stop (or its notifier is dropped).
pub fn serve<B: QmpBackend>(
    listener: UnixListener,
    inbox: QmpInbox,
    backend: &mut B,
) -> Result<(), QmpServerError> {
    listener
        .set_nonblocking(true)
        .map_err(QmpServerError::NonBlocking)?;
    let epoll = Epoll::new().map_err(QmpServerError::EpollCreate)?;
    for (what, fd) in [
        ("listening socket", listener.as_raw_fd()),
        ("notice eventfd", inbox.wake.as_raw_fd()),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .map_err(|source| QmpServerError::EpollAdd { what, source })?;
    }
    let mut server = Server {
        epoll,
        clients: BTreeMap::new(),
        shutdown_sent: false,
    };
    let mut ready = [EpollEvent::default(); MAX_EVENTS];
    loop {
        let count = match server.epoll.wait(-1, &mut ready) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(QmpServerError::EpollWait(e)),
        };
        for event in &ready[..count] {
            let fd = event.data() as RawFd;
            if fd == inbox.wake.as_raw_fd() {
                let _ = inbox.wake.read();
                loop {
                    match inbox.notices.try_recv() {
                        Ok(QmpNotice::Event(event)) => server.broadcast(&[event]),
                        Ok(QmpNotice::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                            server.flush_all();
                            return Ok(());
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                    }
                }
            } else if fd == listener.as_raw_fd() {
                server.accept(&listener);
            } else {
                server.serve_client(fd, event.event_set(), backend);
            }
        }
        server.flush_all();
    }
}

struct Server {
    epoll: Epoll,
    clients: BTreeMap<RawFd, Client>,
    /// QEMU reports the end once; a `quit` and the runtime's own report must not make two.
    shutdown_sent: bool,
}

struct Client {
    stream: UnixStream,
    session: QmpSession,
    /// Lines not yet sent, from `sent` on.
    output: Vec<u8>,
    sent: usize,
    /// Whether epoll also waits for the socket to take more output.
    watching_output: bool,
    /// Drop at the next chance: the peer left, the socket failed, or it stopped reading.
    gone: bool,
}

impl Client {
    fn queue(&mut self, text: &str) {
        if self.output.len() - self.sent + text.len() > MAX_CLIENT_OUTPUT {
            self.gone = true;
            return;
        }
        self.output.extend_from_slice(text.as_bytes());
    }

    /// Sends as much output as the socket takes now.
    fn flush(&mut self) {
        if flush_output(self.stream.as_raw_fd(), &mut self.output, &mut self.sent).is_err() {
            self.gone = true;
        }
    }
}

impl Server {
    fn accept(&mut self, listener: &UnixListener) {
        // An accept failure (the client gave up, EMFILE) costs that client only.
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        if self.clients.len() >= MAX_CLIENTS || stream.set_nonblocking(true).is_err() {
            return;
        }
        let fd = stream.as_raw_fd();
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .is_err()
        {
            return;
        }
        let mut client = Client {
            stream,
            session: QmpSession::new(),
            output: Vec::new(),
            sent: 0,
            watching_output: false,
            gone: false,
        };
        client.queue(&QmpSession::greeting());
        self.clients.insert(fd, client);
    }

    /// Reads what one client sent and answers it; the events its commands caused go to every
    /// client, before the reply, as QEMU orders them.
    fn serve_client<B: QmpBackend>(&mut self, fd: RawFd, events: EventSet, backend: &mut B) {
        let Some(mut client) = self.clients.remove(&fd) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            return;
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
            let mut buf = [0u8; READ_CHUNK];
            match client.stream.read(&mut buf) {
                // The peer closed: it wants no answer.
                Ok(0) => return,
                Ok(n) => {
                    for step in client.session.feed(&buf[..n], backend) {
                        // The client itself is out of the map: it gets its events here.
                        if client.session.receives_events() {
                            for event in self.events_to_send(&step.events) {
                                client.queue(&event);
                            }
                        }
                        self.broadcast(&step.events);
                        client.queue(&step.reply);
                    }
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
        self.clients.insert(fd, client);
    }

    /// The event lines for `events`, each once; a second `SHUTDOWN` is dropped.
    fn events_to_send(&self, events: &[QmpEvent]) -> Vec<String> {
        let now = SystemTime::now();
        let mut shutdown_sent = self.shutdown_sent;
        events
            .iter()
            .filter(|event| {
                let is_shutdown = matches!(event, QmpEvent::Shutdown { .. });
                let send = !(is_shutdown && shutdown_sent);
                shutdown_sent |= is_shutdown;
                send
            })
            .map(|event| event.to_line(now))
            .collect()
    }

    /// Queues `events` for every client in the map that negotiated capabilities.
    fn broadcast(&mut self, events: &[QmpEvent]) {
        let lines = self.events_to_send(events);
        self.shutdown_sent |= events
            .iter()
            .any(|event| matches!(event, QmpEvent::Shutdown { .. }));
        for client in self.clients.values_mut() {
            if client.session.receives_events() {
                for line in &lines {
                    client.queue(line);
                }
            }
        }
    }

    /// Sends what every client has queued; drops the clients that are gone, and watches for
    /// room on the sockets that are full.
    fn flush_all(&mut self) {
        let epoll = &self.epoll;
        self.clients.retain(|fd, client| {
            client.flush();
            let wants_output = client.sent < client.output.len();
            if !client.gone && wants_output != client.watching_output {
                let set = if wants_output {
                    EventSet::IN | EventSet::OUT
                } else {
                    EventSet::IN
                };
                client.gone = epoll
                    .ctl(
                        ControlOperation::Modify,
                        *fd,
                        EpollEvent::new(set, *fd as u64),
                    )
                    .is_err();
                client.watching_output = wants_output;
            }
            // Dropping the client closes its socket, which also leaves the epoll.
            !client.gone
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{RequestError, VmState, VmmRequest, VmmResponse};
    use serde_json::Value;
    use std::io::{BufRead, BufReader, Write};
    use std::sync::{Arc, Mutex};

    /// A VM whose state the commands change, shared with the test.
    #[derive(Clone)]
    struct Vm(Arc<Mutex<VmState>>);

    impl QmpBackend for Vm {
        fn request(&mut self, request: VmmRequest) -> Result<VmmResponse, RequestError> {
            let mut state = self.0.lock().unwrap();
            *state = match request {
                VmmRequest::SetState(crate::RequestedState::Paused) => VmState::Paused,
                VmmRequest::SetState(crate::RequestedState::Resumed) => VmState::Running,
                VmmRequest::Action(crate::ActionType::Shutdown) => VmState::Stopped,
                _ => *state,
            };
            Ok(VmmResponse::Empty)
        }
        fn vcpu_thread_ids(&self) -> Vec<i32> {
            vec![4242]
        }
        fn status(&self) -> VmState {
            *self.0.lock().unwrap()
        }
    }

    struct Peer(BufReader<UnixStream>);

    impl Peer {
        fn connect(path: &std::path::Path) -> Peer {
            let stream = UnixStream::connect(path).unwrap();
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut peer = Peer(BufReader::new(stream));
            assert!(peer.line()["QMP"]["version"]["qemu"]["major"] == 5);
            peer
        }
        fn line(&mut self) -> Value {
            let mut line = String::new();
            self.0.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap()
        }
        fn send(&mut self, command: &str) {
            writeln!(self.0.get_mut(), "{{\"execute\": \"{command}\"}}").unwrap();
        }
        fn run(&mut self, command: &str) -> Value {
            self.send(command);
            self.line()
        }
    }

    #[test]
    fn clients_in_turn_and_together_get_replies_and_events() {
        let dir = std::env::temp_dir().join(format!("chapeau-qmp-server-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let (notifier, inbox) = notice_channel().unwrap();
        let vm = Vm(Arc::new(Mutex::new(VmState::Running)));
        let mut backend = vm.clone();
        let server = std::thread::spawn(move || serve(listener, inbox, &mut backend));

        // One client comes and goes, as Kata's shim does.
        let mut first = Peer::connect(&path);
        assert_eq!(
            first.run("qmp_capabilities")["return"],
            serde_json::json!({})
        );
        assert_eq!(first.run("query-status")["return"]["status"], "running");
        drop(first);

        // Two at once: a STOP one causes reaches both, before the reply.
        let mut a = Peer::connect(&path);
        let mut b = Peer::connect(&path);
        a.run("qmp_capabilities");
        b.run("qmp_capabilities");
        a.send("stop");
        assert_eq!(a.line()["event"], "STOP");
        assert!(a.line().get("return").is_some());
        assert_eq!(b.line()["event"], "STOP");
        assert_eq!(*vm.0.lock().unwrap(), VmState::Paused);

        // `quit` sends SHUTDOWN once; the runtime's own report of the end adds none.
        a.send("quit");
        assert_eq!(a.line()["data"]["reason"], "host-qmp-quit");
        assert!(a.line().get("return").is_some());
        assert_eq!(b.line()["event"], "SHUTDOWN");
        assert!(notifier.notify(QmpNotice::Event(QmpEvent::Shutdown {
            guest: true,
            reason: "guest-shutdown",
        })));
        assert!(notifier.notify(QmpNotice::Event(QmpEvent::Resume)));
        assert_eq!(b.line()["event"], "RESUME");
        assert!(notifier.notify(QmpNotice::Stop));
        server.join().unwrap().unwrap();
        let mut rest = String::new();
        assert_eq!(b.0.read_line(&mut rest).unwrap(), 0, "closed, got {rest}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
