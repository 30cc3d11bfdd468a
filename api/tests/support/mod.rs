//! What the REST tests share: a server on a temp socket in front of the fake VMM, and a raw
//! HTTP/1.1 client.
#![allow(dead_code)] // Each test binary uses part of it.

pub mod fake_vmm;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use api::{RequestError, VmmRequest, VmmResponse};
use fake_vmm::FakeVmm;
use vmm_sys_util::eventfd::EventFd;

type Answer = Result<VmmResponse, RequestError>;

/// The fake VMM on its own thread: a request goes over a channel with an eventfd kick, the
/// answer comes back over another channel (the round trip chapeau's `api` thread makes).
struct VmmThread {
    requests: mpsc::Sender<VmmRequest>,
    kick: EventFd,
    answers: mpsc::Receiver<Answer>,
}

impl VmmThread {
    fn start() -> Self {
        let (requests, incoming) = mpsc::channel::<VmmRequest>();
        let (outgoing, answers) = mpsc::channel();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        std::thread::spawn(move || {
            let mut vmm = FakeVmm::new();
            for request in incoming {
                if outgoing.send(vmm.handle(request)).is_err() {
                    break;
                }
            }
        });
        VmmThread {
            requests,
            kick,
            answers,
        }
    }

    fn call(&self, request: VmmRequest) -> Answer {
        self.requests.send(request).unwrap();
        self.kick.write(1).unwrap();
        self.answers.recv().unwrap()
    }
}

pub struct TestServer {
    dir: PathBuf,
    socket: PathBuf,
    stop: EventFd,
    thread: Option<JoinHandle<Result<(), api::rest::ServerError>>>,
}

impl TestServer {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, || {})
    }

    /// Runs `setup` on the server thread before it serves (e.g. to install a seccomp filter).
    /// Requests reach the fake VMM through a channel to its own thread, as in chapeau.
    pub fn start_with(name: &str, setup: impl FnOnce() + Send + 'static) -> Self {
        Self::start_full(name, api::rest::IDLE_TIMEOUT, setup)
    }

    /// A server that closes idle clients after `idle_timeout`.
    pub fn start_with_idle_timeout(name: &str, idle_timeout: Duration) -> Self {
        Self::start_full(name, idle_timeout, || {})
    }

    fn start_full(
        name: &str,
        idle_timeout: Duration,
        setup: impl FnOnce() + Send + 'static,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("chapeau-rest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let server_stop = stop.try_clone().unwrap();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let vmm = VmmThread::start();
                setup();
                api::rest::serve_with_idle_timeout(listener, server_stop, idle_timeout, |request| {
                    vmm.call(request)
                })
            })
            .unwrap();
        TestServer {
            dir,
            socket,
            stop,
            thread: Some(thread),
        }
    }

    pub fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    /// One request on a new connection.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let mut stream = self.connect();
        send(&mut stream, method, path, body);
        read_reply(&mut stream)
    }

    /// Asserts the status and that `fault_message` contains `needle`.
    pub fn fails(&self, method: &str, path: &str, body: Option<&str>, status: u16, needle: &str) {
        let reply = self.call(method, path, body);
        assert_eq!(reply.status, status, "{method} {path}: {reply:?}");
        assert!(reply.fault().contains(needle), "{method} {path}: {reply:?}");
        self.still_serves();
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<&str>) {
        let reply = self.call(method, path, body);
        assert_eq!(reply.status, 204, "{method} {path} {body:?}: {reply:?}");
        assert!(reply.body.is_empty());
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let reply = self.call("GET", path, None);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(
            reply.head.contains("Content-Type: application/json"),
            "{reply:?}"
        );
        serde_json::from_str(&reply.body).unwrap()
    }

    pub fn state(&self) -> String {
        self.get_json("/")["state"].as_str().unwrap().to_string()
    }

    pub fn still_serves(&self) {
        assert_eq!(self.call("GET", "/", None).status, 200);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.write(1).unwrap();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap().unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    pub fn fault(&self) -> String {
        let value: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {self:?}"));
        assert_eq!(value.as_object().unwrap().len(), 1, "{self:?}");
        value["fault_message"].as_str().unwrap().to_string()
    }
}

pub fn send(stream: &mut UnixStream, method: &str, path: &str, body: Option<&str>) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if let Some(body) = body {
        request += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    } else {
        request += "\r\n";
    }
    stream.write_all(request.as_bytes()).unwrap();
}

/// Reads one response: the head, then Content-Length bytes of body.
pub fn read_reply(stream: &mut UnixStream) -> Reply {
    let mut bytes = Vec::new();
    let mut byte = [0u8];
    while !bytes.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "connection closed mid-head"
        );
        bytes.push(byte[0]);
    }
    let head = String::from_utf8(bytes).unwrap();
    let status = head[9..12].parse().unwrap();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |l| l.trim().parse().unwrap());
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    Reply {
        status,
        head,
        body: String::from_utf8(body).unwrap(),
    }
}
