//! QMP, the subset Kata's runtime (govmm) and QEMU's own Python library use: the greeting,
//! capabilities negotiation, the lifecycle commands, the vCPU queries, and the events they
//! cause. [`QmpSession`] is one client's state machine with no I/O: the binary feeds it the bytes
//! it reads, writes back what it returns, and answers its [`VmmRequest`]s through
//! [`QmpBackend`].
//!
//! QMP input is a stream of JSON objects; clients put one per line, but nothing requires it, so
//! objects are split where they end, not at newlines.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::request::{ActionType, RequestError, RequestedState, VmState, VmmRequest, VmmResponse};

/// The QEMU version announced: Kata's govmm refuses majors below 5, and QEMU 6 removed
/// `query-cpus`, which older Kata still calls.
pub const QEMU_VERSION: (u32, u32, u32) = (5, 2, 0);
/// Most bytes of one unfinished JSON object kept; a client sending more is answered with an
/// error and its input dropped, so a client cannot grow our memory without bound.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;

/// What the session needs from the VMM; the binary implements it over its request channel.
pub trait QmpBackend {
    fn request(&mut self, request: VmmRequest) -> Result<VmmResponse, RequestError>;
    /// The host thread ids of vCPU 0, 1, …, which Kata moves into the sandbox's cgroup.
    fn vcpu_thread_ids(&self) -> Vec<i32>;
    fn status(&self) -> VmState;
}

/// An asynchronous QMP event. The binary sends each to every client that negotiated
/// capabilities ([`QmpSession::receives_events`]); it also emits `Shutdown { guest: true, .. }`
/// itself when the guest powers off or resets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEvent {
    Stop,
    Resume,
    Powerdown,
    /// `reason` as QEMU names it: `host-qmp-quit`, `host-qmp-system-reset`, `guest-shutdown`,
    /// `guest-reset`, `guest-panic`, `host-signal`.
    Shutdown {
        guest: bool,
        reason: &'static str,
    },
}

impl QmpEvent {
    pub fn name(&self) -> &'static str {
        match self {
            QmpEvent::Stop => "STOP",
            QmpEvent::Resume => "RESUME",
            QmpEvent::Powerdown => "POWERDOWN",
            QmpEvent::Shutdown { .. } => "SHUTDOWN",
        }
    }

    /// The event as one line, stamped with `now` the way QEMU stamps it.
    pub fn to_line(&self, now: SystemTime) -> String {
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut event = json!({
            "event": self.name(),
            "timestamp": {
                "seconds": since_epoch.as_secs(),
                "microseconds": since_epoch.subsec_micros(),
            },
        });
        if let QmpEvent::Shutdown { guest, reason } = self {
            event["data"] = json!({ "guest": guest, "reason": reason });
        }
        line(&event)
    }
}

/// What one command produced: events (for every client, sent before the reply, as QEMU emits
/// STOP/RESUME/POWERDOWN while the command runs) and the reply for this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpStep {
    pub events: Vec<QmpEvent>,
    /// One line, newline-terminated.
    pub reply: String,
}

/// QMP error classes chapeau answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorClass {
    GenericError,
    CommandNotFound,
}

/// A command's failure: its class and the one-line description clients show.
struct QmpError(ErrorClass, String);

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError(ErrorClass::GenericError, desc.into())
}

fn line(value: &Value) -> String {
    let mut text = value.to_string();
    text.push_str("\r\n");
    text
}

/// Commands that would change the VM's devices or memory; chapeau builds the VM once.
const HOTPLUG_COMMANDS: &[&str] = &[
    "device_add",
    "device_del",
    "object-add",
    "object-del",
    "netdev_add",
    "netdev_del",
    "chardev-add",
    "chardev-remove",
    "blockdev-add",
    "blockdev-del",
    "cpu-add",
    "balloon",
];

/// Every command chapeau answers, as `query-commands` lists them.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "stop",
    "cont",
    "system_powerdown",
    "system_reset",
    "quit",
    "query-version",
    "query-cpus",
    "query-cpus-fast",
    "query-hotpluggable-cpus",
    "query-commands",
];

/// One QMP client.
#[derive(Debug, Default)]
pub struct QmpSession {
    negotiated: bool,
    /// Input received but not yet a whole JSON value.
    pending: Vec<u8>,
}

impl QmpSession {
    pub fn new() -> QmpSession {
        QmpSession::default()
    }

    /// The first line a client gets on connecting.
    pub fn greeting() -> String {
        line(&json!({
            "QMP": { "version": version(), "capabilities": [] }
        }))
    }

    /// Whether this client gets events: only after `qmp_capabilities`, as in QEMU.
    pub fn receives_events(&self) -> bool {
        self.negotiated
    }

    /// Takes bytes as read from the socket and answers every complete request in them, in
    /// order; an unfinished one waits for more bytes.
    pub fn feed<B: QmpBackend>(&mut self, input: &[u8], backend: &mut B) -> Vec<QmpStep> {
        self.pending.extend_from_slice(input);
        let mut steps = Vec::new();
        loop {
            let mut values =
                serde_json::Deserializer::from_slice(&self.pending).into_iter::<Value>();
            match values.next() {
                None => {
                    self.pending.clear();
                    break;
                }
                Some(Ok(value)) => {
                    let used = values.byte_offset();
                    self.pending.drain(..used);
                    steps.push(self.execute(value, backend));
                }
                Some(Err(error)) if error.is_eof() => {
                    if self.pending.len() > MAX_PENDING_INPUT {
                        self.pending.clear();
                        steps.push(error_step(
                            None,
                            generic(format!(
                                "JSON parse error, input larger than {MAX_PENDING_INPUT} bytes"
                            )),
                        ));
                    }
                    break;
                }
                Some(Err(error)) => {
                    // Resynchronize at the next line, where the client's next request begins.
                    match self.pending.iter().position(|b| *b == b'\n') {
                        Some(end) => drop(self.pending.drain(..=end)),
                        None => self.pending.clear(),
                    }
                    steps.push(error_step(
                        None,
                        generic(format!("JSON parse error, {error}")),
                    ));
                }
            }
        }
        steps
    }

    /// Answers one request object.
    fn execute<B: QmpBackend>(&mut self, request: Value, backend: &mut B) -> QmpStep {
        let Value::Object(mut request) = request else {
            return error_step(None, generic("QMP input must be a JSON object"));
        };
        let id = request.remove("id");
        match self.dispatch(request, backend) {
            Ok((result, events)) => {
                let mut reply = json!({ "return": result });
                if let Some(id) = id {
                    reply["id"] = id;
                }
                QmpStep {
                    events,
                    reply: line(&reply),
                }
            }
            Err(error) => error_step(id, error),
        }
    }

    fn dispatch<B: QmpBackend>(
        &mut self,
        mut request: Map<String, Value>,
        backend: &mut B,
    ) -> Result<(Value, Vec<QmpEvent>), QmpError> {
        let command = match request.remove("execute") {
            Some(Value::String(command)) => command,
            Some(_) => return Err(generic("QMP input member 'execute' must be a string")),
            None => return Err(generic("QMP input lacks member 'execute'")),
        };
        let arguments = match request.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(arguments)) => arguments,
            Some(_) => return Err(generic("QMP input member 'arguments' must be an object")),
        };
        if let Some(member) = request.keys().next() {
            return Err(generic(format!(
                "QMP input member '{member}' is unexpected"
            )));
        }
        if !self.negotiated && command != "qmp_capabilities" {
            return Err(QmpError(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            ));
        }
        if HOTPLUG_COMMANDS.contains(&command.as_str()) {
            return Err(generic(format!(
                "{command}: hotplug is not supported yet; the VM keeps running as built"
            )));
        }
        if !COMMANDS.contains(&command.as_str()) {
            return Err(QmpError(
                ErrorClass::CommandNotFound,
                format!("The command {command} has not been found"),
            ));
        }
        if command == "qmp_capabilities" {
            return self.negotiate(arguments);
        }
        if let Some(argument) = arguments.keys().next() {
            return Err(generic(format!("Parameter '{argument}' is unexpected")));
        }
        let done = |events: Vec<QmpEvent>| Ok((json!({}), events));
        let shutdown = |backend: &mut B, reason| {
            vmm(backend, VmmRequest::Action(ActionType::Shutdown))?;
            done(vec![QmpEvent::Shutdown {
                guest: false,
                reason,
            }])
        };
        match command.as_str() {
            "query-status" => Ok((status(backend.status()), Vec::new())),
            // Like QEMU, stopping a stopped VM or continuing a running one succeeds quietly.
            "stop" if backend.status() == VmState::Paused => done(Vec::new()),
            "stop" => {
                vmm(backend, VmmRequest::SetState(RequestedState::Paused))?;
                done(vec![QmpEvent::Stop])
            }
            "cont" if backend.status() == VmState::Running => done(Vec::new()),
            "cont" => {
                vmm(backend, VmmRequest::SetState(RequestedState::Resumed))?;
                done(vec![QmpEvent::Resume])
            }
            "system_powerdown" => {
                vmm(backend, VmmRequest::Action(ActionType::SendCtrlAltDel))?;
                done(vec![QmpEvent::Powerdown])
            }
            // chapeau ends the VM on a reset, as QEMU does with -no-reboot.
            "system_reset" => shutdown(backend, "host-qmp-system-reset"),
            "quit" => shutdown(backend, "host-qmp-quit"),
            "query-version" => Ok((version(), Vec::new())),
            "query-cpus-fast" => Ok((cpus_fast(&backend.vcpu_thread_ids()), Vec::new())),
            "query-cpus" => Ok((cpus(&backend.vcpu_thread_ids()), Vec::new())),
            "query-hotpluggable-cpus" => Ok((
                hotpluggable_cpus(backend.vcpu_thread_ids().len()),
                Vec::new(),
            )),
            _ => Ok((
                COMMANDS
                    .iter()
                    .chain(HOTPLUG_COMMANDS)
                    .map(|name| json!({ "name": name }))
                    .collect(),
                Vec::new(),
            )),
        }
    }

    /// `qmp_capabilities`, with no capability to enable (the greeting offers none).
    fn negotiate(
        &mut self,
        mut arguments: Map<String, Value>,
    ) -> Result<(Value, Vec<QmpEvent>), QmpError> {
        if self.negotiated {
            return Err(QmpError(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored".into(),
            ));
        }
        match arguments.remove("enable") {
            None => {}
            Some(Value::Array(wanted)) => {
                if let Some(capability) = wanted.first() {
                    let name = capability
                        .as_str()
                        .map_or_else(|| capability.to_string(), str::to_string);
                    return Err(generic(format!("Capability '{name}' not available")));
                }
            }
            Some(_) => {
                return Err(generic(
                    "Invalid parameter type for 'enable', expected: array",
                ))
            }
        }
        if let Some(argument) = arguments.keys().next() {
            return Err(generic(format!("Parameter '{argument}' is unexpected")));
        }
        self.negotiated = true;
        Ok((json!({}), Vec::new()))
    }
}

fn error_step(id: Option<Value>, QmpError(class, desc): QmpError) -> QmpStep {
    let class = match class {
        ErrorClass::GenericError => "GenericError",
        ErrorClass::CommandNotFound => "CommandNotFound",
    };
    let mut reply = json!({ "error": { "class": class, "desc": desc } });
    if let Some(id) = id {
        reply["id"] = id;
    }
    QmpStep {
        events: Vec::new(),
        reply: line(&reply),
    }
}

/// Sends one request to the VMM; its refusal becomes a GenericError with its message.
fn vmm<B: QmpBackend>(backend: &mut B, request: VmmRequest) -> Result<VmmResponse, QmpError> {
    backend.request(request).map_err(|e| generic(e.to_string()))
}

fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": { "major": major, "minor": minor, "micro": micro },
        "package": concat!("chapeau ", env!("CARGO_PKG_VERSION")),
    })
}

fn status(state: VmState) -> Value {
    let (status, running) = match state {
        VmState::Configured => ("prelaunch", false),
        VmState::Running => ("running", true),
        VmState::Paused => ("paused", false),
        VmState::Stopped => ("shutdown", false),
    };
    json!({ "status": status, "singlestep": false, "running": running })
}

/// vCPU `index` as QEMU places it with `-smp N,sockets=N`: one socket each.
fn cpu_props(index: usize) -> Value {
    json!({ "socket-id": index, "core-id": 0, "thread-id": 0 })
}

fn qom_path(index: usize) -> String {
    format!("/machine/unattached/device[{index}]")
}

fn cpus_fast(thread_ids: &[i32]) -> Value {
    thread_ids
        .iter()
        .enumerate()
        .map(|(index, thread_id)| {
            json!({
                "cpu-index": index,
                "qom-path": qom_path(index),
                "thread-id": thread_id,
                "props": cpu_props(index),
                "arch": "x86",
                "target": "x86_64",
            })
        })
        .collect()
}

/// The older `query-cpus` shape (removed in QEMU 6, still called by older Kata).
fn cpus(thread_ids: &[i32]) -> Value {
    thread_ids
        .iter()
        .enumerate()
        .map(|(index, thread_id)| {
            json!({
                "CPU": index,
                "current": index == 0,
                "halted": false,
                "qom_path": qom_path(index),
                "arch": "x86",
                "pc": 0,
                "thread_id": thread_id,
                "props": cpu_props(index),
            })
        })
        .collect()
}

/// Every vCPU is present from the start and none can be added.
fn hotpluggable_cpus(count: usize) -> Value {
    (0..count)
        .map(|index| {
            json!({
                "type": "host-x86_64-cpu",
                "vcpus-count": 1,
                "props": cpu_props(index),
                "qom-path": qom_path(index),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Records requests and plays the VMM's part of the state machine.
    struct FakeVmm {
        state: VmState,
        requests: Vec<VmmRequest>,
        refuse: Option<RequestError>,
    }

    impl FakeVmm {
        fn running() -> FakeVmm {
            FakeVmm {
                state: VmState::Running,
                requests: Vec::new(),
                refuse: None,
            }
        }
    }

    impl QmpBackend for FakeVmm {
        fn request(&mut self, request: VmmRequest) -> Result<VmmResponse, RequestError> {
            if let Some(error) = self.refuse.clone() {
                return Err(error);
            }
            self.state = match &request {
                VmmRequest::SetState(RequestedState::Paused) => VmState::Paused,
                VmmRequest::SetState(RequestedState::Resumed) => VmState::Running,
                VmmRequest::Action(ActionType::Shutdown) => VmState::Stopped,
                _ => self.state,
            };
            self.requests.push(request);
            Ok(VmmResponse::Empty)
        }
        fn vcpu_thread_ids(&self) -> Vec<i32> {
            vec![4242, 4243]
        }
        fn status(&self) -> VmState {
            self.state
        }
    }

    fn negotiated() -> QmpSession {
        let mut session = QmpSession::new();
        let steps = session.feed(
            br#"{"execute":"qmp_capabilities"}"#,
            &mut FakeVmm::running(),
        );
        assert_eq!(steps[0].reply, "{\"return\":{}}\r\n");
        assert!(session.receives_events());
        session
    }

    /// Runs one command on a negotiated session: the reply as JSON and the events.
    fn run(vmm: &mut FakeVmm, request: &str) -> (Value, Vec<QmpEvent>) {
        let mut steps = negotiated().feed(request.as_bytes(), vmm);
        assert_eq!(steps.len(), 1, "{steps:?}");
        let step = steps.remove(0);
        assert!(step.reply.ends_with("\r\n"));
        (serde_json::from_str(&step.reply).unwrap(), step.events)
    }

    fn error_of(reply: &Value) -> (&str, &str) {
        (
            reply["error"]["class"].as_str().unwrap(),
            reply["error"]["desc"].as_str().unwrap(),
        )
    }

    #[test]
    fn greeting_announces_qemu_5_2() {
        let greeting: Value = serde_json::from_str(&QmpSession::greeting()).unwrap();
        assert_eq!(
            greeting["QMP"]["version"]["qemu"],
            json!({"major": 5, "minor": 2, "micro": 0})
        );
        assert!(greeting["QMP"]["version"]["package"]
            .as_str()
            .unwrap()
            .starts_with("chapeau "));
        assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    }

    #[test]
    fn commands_before_negotiation_are_refused() {
        let mut session = QmpSession::new();
        let mut vmm = FakeVmm::running();
        let steps = session.feed(b"{\"execute\":\"query-status\",\"id\":7}\n", &mut vmm);
        let reply: Value = serde_json::from_str(&steps[0].reply).unwrap();
        assert_eq!(
            error_of(&reply),
            (
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        );
        assert_eq!(reply["id"], 7);
        assert!(!session.receives_events());
        assert!(vmm.requests.is_empty());
    }

    #[test]
    fn capabilities_once_and_without_extras() {
        let mut vmm = FakeVmm::running();
        let (reply, _) = run(&mut vmm, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(
            error_of(&reply),
            (
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored"
            )
        );
        let mut session = QmpSession::new();
        let steps = session.feed(
            br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#,
            &mut vmm,
        );
        assert!(steps[0].reply.contains("Capability 'oob' not available"));
        assert!(!session.receives_events());
        let steps = session.feed(
            br#"{"execute":"qmp_capabilities","arguments":{"enable":[]}}"#,
            &mut vmm,
        );
        assert_eq!(steps[0].reply, "{\"return\":{}}\r\n");
    }

    #[test]
    fn query_status_follows_the_vm() {
        for (state, status, running) in [
            (VmState::Configured, "prelaunch", false),
            (VmState::Running, "running", true),
            (VmState::Paused, "paused", false),
            (VmState::Stopped, "shutdown", false),
        ] {
            let mut vmm = FakeVmm::running();
            vmm.state = state;
            let (reply, events) = run(&mut vmm, r#"{"execute":"query-status","id":"s"}"#);
            assert_eq!(
                reply,
                json!({"return": {"status": status, "singlestep": false, "running": running}, "id": "s"})
            );
            assert!(events.is_empty());
        }
    }

    #[test]
    fn stop_and_cont() {
        let mut vmm = FakeVmm::running();
        let (reply, events) = run(&mut vmm, r#"{"execute":"stop"}"#);
        assert_eq!(reply, json!({"return": {}}));
        assert_eq!(events, vec![QmpEvent::Stop]);
        assert_eq!(
            vmm.requests,
            vec![VmmRequest::SetState(RequestedState::Paused)]
        );
        // Stopping again is quiet, as in QEMU.
        assert_eq!(run(&mut vmm, r#"{"execute":"stop"}"#).1, vec![]);
        let (_, events) = run(&mut vmm, r#"{"execute":"cont"}"#);
        assert_eq!(events, vec![QmpEvent::Resume]);
        assert_eq!(run(&mut vmm, r#"{"execute":"cont"}"#).1, vec![]);
        assert_eq!(vmm.requests.len(), 2);
    }

    #[test]
    fn powerdown_reset_quit() {
        let mut vmm = FakeVmm::running();
        let (reply, events) = run(&mut vmm, r#"{"execute":"system_powerdown","id":1}"#);
        assert_eq!(reply, json!({"return": {}, "id": 1}));
        assert_eq!(events, vec![QmpEvent::Powerdown]);
        assert_eq!(
            vmm.requests,
            vec![VmmRequest::Action(ActionType::SendCtrlAltDel)]
        );
        for (command, reason) in [
            ("quit", "host-qmp-quit"),
            ("system_reset", "host-qmp-system-reset"),
        ] {
            let mut vmm = FakeVmm::running();
            let (reply, events) = run(&mut vmm, &format!(r#"{{"execute":"{command}"}}"#));
            assert_eq!(reply, json!({"return": {}}));
            assert_eq!(
                events,
                vec![QmpEvent::Shutdown {
                    guest: false,
                    reason
                }]
            );
            assert_eq!(vmm.requests, vec![VmmRequest::Action(ActionType::Shutdown)]);
        }
    }

    #[test]
    fn vmm_refusal_is_a_generic_error() {
        let mut vmm = FakeVmm::running();
        vmm.refuse = Some(RequestError::Conflict("the VM is not running".into()));
        let (reply, events) = run(&mut vmm, r#"{"execute":"stop","id":3}"#);
        assert_eq!(error_of(&reply), ("GenericError", "the VM is not running"));
        assert_eq!(reply["id"], 3);
        assert!(events.is_empty());
    }

    #[test]
    fn version_and_cpus() {
        let mut vmm = FakeVmm::running();
        let (reply, _) = run(&mut vmm, r#"{"execute":"query-version"}"#);
        assert_eq!(reply["return"]["qemu"]["major"], 5);
        assert_eq!(reply["return"]["qemu"]["minor"], 2);
        let (reply, _) = run(&mut vmm, r#"{"execute":"query-cpus-fast"}"#);
        assert_eq!(
            reply["return"][1],
            json!({
                "cpu-index": 1, "qom-path": "/machine/unattached/device[1]", "thread-id": 4243,
                "props": {"socket-id": 1, "core-id": 0, "thread-id": 0},
                "arch": "x86", "target": "x86_64"
            })
        );
        let (reply, _) = run(&mut vmm, r#"{"execute":"query-cpus"}"#);
        assert_eq!(reply["return"][0]["thread_id"], 4242);
        assert_eq!(reply["return"][0]["CPU"], 0);
        assert_eq!(reply["return"][0]["current"], true);
        assert_eq!(
            reply["return"][1]["qom_path"],
            "/machine/unattached/device[1]"
        );
        let (reply, _) = run(&mut vmm, r#"{"execute":"query-hotpluggable-cpus"}"#);
        assert_eq!(reply["return"].as_array().unwrap().len(), 2);
        assert_eq!(reply["return"][0]["type"], "host-x86_64-cpu");
        assert_eq!(reply["return"][0]["vcpus-count"], 1);
        let (reply, _) = run(&mut vmm, r#"{"execute":"query-commands"}"#);
        let names: Vec<&str> = reply["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"query-cpus-fast") && names.contains(&"device_add"));
        assert!(vmm.requests.is_empty());
    }

    #[test]
    fn hotplug_and_unknown_commands() {
        let mut vmm = FakeVmm::running();
        for command in ["device_add", "object-add", "netdev_add"] {
            let (reply, events) = run(
                &mut vmm,
                &format!(r#"{{"execute":"{command}","arguments":{{"driver":"x"}},"id":"h"}}"#),
            );
            let (class, desc) = error_of(&reply);
            assert_eq!(class, "GenericError");
            assert!(desc.contains("hotplug is not supported yet"), "{desc}");
            assert_eq!(reply["id"], "h");
            assert!(events.is_empty());
        }
        let (reply, _) = run(&mut vmm, r#"{"execute":"migrate"}"#);
        assert_eq!(
            error_of(&reply),
            ("CommandNotFound", "The command migrate has not been found")
        );
        assert!(vmm.requests.is_empty());
        assert_eq!(vmm.state, VmState::Running);
    }

    #[test]
    fn malformed_requests() {
        let mut vmm = FakeVmm::running();
        for (input, desc) in [
            ("[1]", "QMP input must be a JSON object"),
            (r#"{"arguments":{}}"#, "QMP input lacks member 'execute'"),
            (
                r#"{"execute":1}"#,
                "QMP input member 'execute' must be a string",
            ),
            (
                r#"{"execute":"stop","arguments":[]}"#,
                "QMP input member 'arguments' must be an object",
            ),
            (
                r#"{"execute":"stop","bogus":1}"#,
                "QMP input member 'bogus' is unexpected",
            ),
            (
                r#"{"execute":"stop","arguments":{"x":1}}"#,
                "Parameter 'x' is unexpected",
            ),
        ] {
            let (reply, _) = run(&mut vmm, input);
            assert_eq!(error_of(&reply), ("GenericError", desc), "{input}");
        }
        assert!(vmm.requests.is_empty());
    }

    #[test]
    fn stream_framing() {
        let mut session = negotiated();
        let mut vmm = FakeVmm::running();
        // Two requests in one read, no newline between them, then one split across reads.
        let steps = session.feed(
            br#"{"execute":"query-status","id":1}{"execute":"query-version","id":2} {"exec"#,
            &mut vmm,
        );
        assert_eq!(steps.len(), 2);
        assert!(steps[1].reply.contains("\"id\":2"));
        let steps = session.feed(b"ute\":\"cont\",\"id\":3}\r\n", &mut vmm);
        assert_eq!(steps.len(), 1);
        assert!(steps[0].reply.contains("\"id\":3"));
        // Garbage is answered, and the next line is served.
        let steps = session.feed(b"nonsense\n{\"execute\":\"query-status\"}\n", &mut vmm);
        assert_eq!(steps.len(), 2);
        assert!(steps[0].reply.contains("JSON parse error"), "{steps:?}");
        assert!(steps[1].reply.contains("running"));
        // An object that never ends is dropped once over the limit.
        let mut huge = b"{\"execute\":\"".to_vec();
        huge.resize(MAX_PENDING_INPUT + 10, b'a');
        let steps = session.feed(&huge, &mut vmm);
        assert!(steps[0].reply.contains("input larger than"));
        assert!(session.pending.is_empty());
        // Deep nesting is refused by the parser's depth limit, not by a stack overflow.
        let deep = "[".repeat(10_000);
        let steps = session.feed(deep.as_bytes(), &mut vmm);
        assert!(steps.iter().all(|s| s.reply.contains("error")));
    }

    #[test]
    fn event_lines() {
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(
            QmpEvent::Stop.to_line(at),
            "{\"event\":\"STOP\",\"timestamp\":{\"microseconds\":123456,\"seconds\":1700000000}}\r\n"
        );
        let shutdown: Value = serde_json::from_str(
            &QmpEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown",
            }
            .to_line(at),
        )
        .unwrap();
        assert_eq!(shutdown["event"], "SHUTDOWN");
        assert_eq!(
            shutdown["data"],
            json!({"guest": true, "reason": "guest-shutdown"})
        );
        for (event, name) in [
            (QmpEvent::Resume, "RESUME"),
            (QmpEvent::Powerdown, "POWERDOWN"),
        ] {
            assert!(event.to_line(at).contains(name));
        }
    }
}
