//! `bench boot`'s start-up figures: how fast a VMM gets from exec to a served API socket and to
//! the guest's first instruction, chapeau beside Firecracker in the same run.
//!
//! Timestamps come from a private tracefs instance (root only): `sched_process_exec` for the
//! exec and `sys_enter_ioctl`/`sys_exit_ioctl` for KVM_RUN and the other KVM ioctls, all on
//! CLOCK_MONOTONIC (`trace_clock mono`, microsecond resolution), restricted to the bench and its
//! children (`set_event_pid` with `event-fork`). The same probe for both VMMs, no ptrace, and a
//! few microseconds per traced syscall. The bench stamps "socket ready" and "InstanceStart sent"
//! with the same clock. Each VMM is killed right after its first KVM_RUN: the guest's boot is
//! not what is measured here.

use std::collections::HashSet;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;
/// The ioctl type of every KVM ioctl (`KVMIO`), bits 8..16 of the command.
const KVMIO: u64 = 0xae;

const CONNECT_POLL: Duration = Duration::from_micros(200);
const TRACE_POLL: Duration = Duration::from_millis(1);
/// Generous: a loaded PVM host may take a while, and a run that never reaches KVM_RUN fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The systems that have both an API socket and a command-line boot to compare.
pub(crate) const SYSTEMS: [System; 2] = [System::Chapeau, System::Firecracker];

/// One event from the trace, timestamps in CLOCK_MONOTONIC ns. Events name threads (tids);
/// which process a thread belongs to follows from the forks (the tgid column tracefs can add
/// is blank for a thread it has not seen scheduled yet, which is exactly a new VMM's case).
#[derive(Debug, PartialEq)]
enum TraceEvent {
    Fork {
        parent: u32,
        child: u32,
        ns: u64,
    },
    /// A CPU switched from thread `prev` to thread `next`.
    Switch {
        prev: u32,
        next: u32,
        ns: u64,
    },
    Exec {
        pid: u32,
        ns: u64,
    },
    IoctlEnter {
        tid: u32,
        ns: u64,
        cmd: u64,
    },
    IoctlExit {
        tid: u32,
        ns: u64,
    },
}

impl TraceEvent {
    fn ns(&self) -> u64 {
        match *self {
            TraceEvent::Fork { ns, .. }
            | TraceEvent::Switch { ns, .. }
            | TraceEvent::Exec { ns, .. }
            | TraceEvent::IoctlEnter { ns, .. }
            | TraceEvent::IoctlExit { ns, .. } => ns,
        }
    }
}

/// The value of `name=` in a tracepoint's `a=1 b=2` text.
fn field<'a>(event: &'a str, name: &str) -> Option<&'a str> {
    event
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// `"3923.601361"` (seconds.microseconds) as ns, without going through a float.
fn parse_timestamp(text: &str) -> Option<u64> {
    let (secs, micros) = text.split_once('.')?;
    Some(secs.parse::<u64>().ok()? * 1_000_000_000 + micros.parse::<u64>().ok()? * 1_000)
}

/// One line of a tracefs instance: `comm-tid [cpu] flags secs.usecs: event`. The comm may
/// hold spaces and dashes ("fc_vcpu 0"), so the tid is found from the `[cpu]` backwards.
fn parse_trace_line(line: &str) -> Option<TraceEvent> {
    let (header, event) = line.split_once(": ")?;
    let cpu_at = header.rfind('[')?;
    let ns = parse_timestamp(header.split_whitespace().last()?)?;
    let tid = header[..cpu_at].trim().rsplit_once('-')?.1.parse().ok()?;
    if let Some(args) = event.strip_prefix("sched_process_fork") {
        return Some(TraceEvent::Fork {
            parent: field(args, "pid")?.parse().ok()?,
            child: field(args, "child_pid")?.parse().ok()?,
            ns,
        });
    }
    if let Some(args) = event.strip_prefix("sched_switch") {
        return Some(TraceEvent::Switch {
            prev: field(args, "prev_pid")?.parse().ok()?,
            next: field(args, "next_pid")?.parse().ok()?,
            ns,
        });
    }
    if let Some(args) = event.strip_prefix("sched_process_exec") {
        return Some(TraceEvent::Exec {
            pid: field(args, "pid")?.parse().ok()?,
            ns,
        });
    }
    if event.starts_with("sys_ioctl ->") {
        return Some(TraceEvent::IoctlExit { tid, ns });
    }
    let args = event.strip_prefix("sys_ioctl(")?;
    let cmd = args.split(", ").find_map(|a| a.strip_prefix("cmd: "))?;
    let cmd = u64::from_str_radix(cmd.trim_start_matches("0x"), 16).ok()?;
    Some(TraceEvent::IoctlEnter { tid, ns, cmd })
}

/// A private tracefs instance recording exec and ioctl events of this process's descendants.
/// Dropping it removes the instance.
struct KvmTrace {
    dir: PathBuf,
    pipe: File,
    partial: Vec<u8>,
}

impl KvmTrace {
    fn new() -> Result<KvmTrace, String> {
        let root = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("instances").is_dir())
            .ok_or("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")?;
        let dir = root
            .join("instances")
            .join(format!("chapeau-bench-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e} (needs root)", dir.display()))?;
        // From here on Drop removes the instance, even if a setting below fails.
        let mut trace = KvmTrace {
            pipe: File::open("/dev/null").map_err(|e| e.to_string())?,
            dir,
            partial: Vec::new(),
        };
        trace.write("trace_clock", "mono")?;
        trace.write("buffer_size_kb", "4096")?;
        trace.write("options/event-fork", "1")?;
        trace.write("set_event_pid", &std::process::id().to_string())?;
        for event in [
            "sched/sched_process_fork",
            "sched/sched_switch",
            "sched/sched_process_exec",
            "syscalls/sys_enter_ioctl",
            "syscalls/sys_exit_ioctl",
        ] {
            trace.write(&format!("events/{event}/enable"), "1")?;
        }
        let pipe_path = trace.dir.join("trace_pipe");
        trace.pipe = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe_path)
            .map_err(|e| format!("{}: {e}", pipe_path.display()))?;
        trace.write("tracing_on", "1")?;
        Ok(trace)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The events recorded since the last call (the pipe consumes them).
    fn drain(&mut self) -> Vec<TraceEvent> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break, // EAGAIN: nothing more for now.
            }
        }
        let complete = match self.partial.iter().rposition(|b| *b == b'\n') {
            Some(at) => at + 1,
            None => return Vec::new(),
        };
        let lines: Vec<u8> = self.partial.drain(..complete).collect();
        String::from_utf8_lossy(&lines)
            .lines()
            .filter_map(parse_trace_line)
            .collect()
    }
}

impl Drop for KvmTrace {
    fn drop(&mut self) {
        let _ = self.write("tracing_on", "0");
        // The pipe must be closed before the instance can go.
        self.pipe = match File::open("/dev/null") {
            Ok(f) => f,
            Err(_) => return,
        };
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("bench: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// What the trace says about one process up to its first KVM_RUN.
#[derive(Debug, PartialEq)]
struct ProcessTrace {
    /// The process's threads seen so far: its pid and what it cloned.
    tids: HashSet<u32>,
    /// Its threads on a CPU now.
    on_cpu: HashSet<u32>,
    /// KVM ioctls under way, by thread: when they entered and which.
    open: HashMap<u32, (u64, u64)>,
    exec_ns: Option<u64>,
    first_kvm_run_ns: Option<u64>,
    /// Time inside KVM ioctls other than KVM_RUN before the first KVM_RUN, and how many.
    kvm_ioctl_ns: u64,
    kvm_ioctls: u32,
    /// The longest of them: (command, ns).
    slowest_kvm_ioctl: Option<(u64, u64)>,
    /// Wall time from exec to the first KVM_RUN during which at least one thread was on a CPU
    /// outside a KVM ioctl: the VMM's own work, without the waits for a CPU or for the kernel.
    own_on_cpu_ns: u64,
    /// Wall time from exec to the first KVM_RUN during which no thread worked on its own but a
    /// KVM ioctl was under way: what the VMM waited for KVM, overlaps with own work excluded.
    kvm_wait_ns: u64,
    /// How many threads are working on their own now, and since when the sum above is current.
    working: usize,
    counted_to: u64,
}

impl ProcessTrace {
    fn new(pid: u32) -> ProcessTrace {
        ProcessTrace {
            tids: HashSet::from([pid]),
            on_cpu: HashSet::new(),
            open: HashMap::new(),
            exec_ns: None,
            first_kvm_run_ns: None,
            kvm_ioctl_ns: 0,
            kvm_ioctls: 0,
            slowest_kvm_ioctl: None,
            own_on_cpu_ns: 0,
            kvm_wait_ns: 0,
            working: 0,
            counted_to: 0,
        }
    }

    fn is_working(&self, tid: u32) -> bool {
        self.on_cpu.contains(&tid) && !self.open.contains_key(&tid)
    }

    /// Applies `change` to thread `tid`'s state, keeping the count of working threads.
    fn update(&mut self, tid: u32, change: impl FnOnce(&mut Self)) {
        let before = self.is_working(tid);
        change(self);
        match (before, self.is_working(tid)) {
            (false, true) => self.working += 1,
            (true, false) => self.working -= 1,
            _ => {}
        }
    }

    fn add(&mut self, event: &TraceEvent) {
        // Own time runs between exec and the first KVM_RUN while any thread works.
        let ns = event.ns();
        if self.exec_ns.is_some() && self.first_kvm_run_ns.is_none() && ns > self.counted_to {
            if self.working > 0 {
                self.own_on_cpu_ns += ns - self.counted_to;
            } else if !self.open.is_empty() {
                self.kvm_wait_ns += ns - self.counted_to;
            }
            self.counted_to = ns;
        }
        match *event {
            TraceEvent::Fork { parent, child, .. } if self.tids.contains(&parent) => {
                self.tids.insert(child);
            }
            TraceEvent::Switch { prev, next, .. } => {
                if self.tids.contains(&prev) {
                    self.update(prev, |s| {
                        s.on_cpu.remove(&prev);
                    });
                }
                if self.tids.contains(&next) {
                    self.update(next, |s| {
                        s.on_cpu.insert(next);
                    });
                }
            }
            TraceEvent::Exec { pid, ns } if self.tids.contains(&pid) && self.exec_ns.is_none() => {
                // The thread is running: it is the one calling exec.
                self.exec_ns = Some(ns);
                self.counted_to = ns;
                self.update(pid, |s| {
                    s.on_cpu.insert(pid);
                });
            }
            TraceEvent::IoctlEnter { tid, ns, cmd } if self.tids.contains(&tid) => {
                if cmd == KVM_RUN {
                    self.first_kvm_run_ns = self.first_kvm_run_ns.or(Some(ns));
                } else if (cmd >> 8) & 0xff == KVMIO && self.first_kvm_run_ns.is_none() {
                    self.update(tid, |s| {
                        s.open.insert(tid, (ns, cmd));
                    });
                }
            }
            TraceEvent::IoctlExit { tid, ns } => {
                let mut ended = None;
                self.update(tid, |s| ended = s.open.remove(&tid));
                if let Some((start, cmd)) = ended {
                    let took = ns.saturating_sub(start);
                    self.kvm_ioctl_ns += took;
                    self.kvm_ioctls += 1;
                    if self.slowest_kvm_ioctl.is_none_or(|(_, max)| took > max) {
                        self.slowest_kvm_ioctl = Some((cmd, took));
                    }
                }
            }
            _ => {}
        }
    }
}

/// The start-up figures of one system in one run, ms.
#[derive(Default)]
pub(crate) struct StartupRun {
    /// API path: exec → connect succeeds.
    socket_ms: Option<f64>,
    /// API path: InstanceStart written → first KVM_RUN.
    start_to_run_ms: Option<f64>,
    /// Command-line path: exec → first KVM_RUN, and the KVM ioctls inside it.
    cli_run_ms: Option<f64>,
    cli_kvm_ioctl_ms: Option<f64>,
    /// Waiting for KVM ioctls and own work on a CPU (see `ProcessTrace`).
    cli_kvm_wait_ms: Option<f64>,
    cli_own_on_cpu_ms: Option<f64>,
    cli_kvm_ioctls: u32,
    /// The slowest of those KVM ioctls: (command, ms).
    cli_slowest_kvm_ioctl: Option<(u64, f64)>,
    /// chapeau only: its own log line's exec → KVM_RUN on the command-line path (cross-check).
    cli_logged_run_ms: Option<f64>,
}

impl StartupRun {
    fn own_ms(&self) -> Option<f64> {
        Some(self.cli_run_ms? - self.cli_kvm_wait_ms?)
    }
}

/// A VMM being measured: killed (and reaped) when dropped.
struct Running {
    child: Child,
    logged_run_ns: std::sync::mpsc::Receiver<u64>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Result<Running, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", cmd.get_program().to_string_lossy()))?;
        let (tx, logged_run_ns) = std::sync::mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            spawn_reader(stderr, move |line| {
                if let Some(ns) = logged_kvm_run_ns(line) {
                    let _ = tx.send(ns);
                }
            });
        }
        Ok(Running {
            child,
            logged_run_ns,
        })
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn logged_kvm_run_ns(line: &str) -> Option<u64> {
    let rest = line.split(super::boot::KVM_RUN_MARKER).nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Reads trace events into `seen` until the process has reached KVM_RUN.
fn wait_for_kvm_run(
    trace: &mut KvmTrace,
    vmm: &mut Running,
    seen: &mut ProcessTrace,
) -> Result<(), String> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        for event in trace.drain() {
            seen.add(&event);
        }
        if seen.first_kvm_run_ns.is_some() {
            return Ok(());
        }
        if vmm.exited() {
            return Err("exited before its first KVM_RUN".into());
        }
        if Instant::now() >= deadline {
            return Err(format!("no KVM_RUN within {} s", RUN_TIMEOUT.as_secs()));
        }
        std::thread::sleep(TRACE_POLL);
    }
}

/// One HTTP/1.1 request on `stream`; fails unless the answer is 2xx. The reply is read only as
/// far as its status line, headers and Content-Length body, to keep the connection usable.
fn http_put(stream: &mut UnixStream, path: &str, body: &str) -> Result<(), String> {
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("PUT {path}: {e}"))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = reply.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("PUT {path}: {e}"))?;
        if n == 0 {
            return Err(format!("PUT {path}: connection closed"));
        }
        reply.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&reply[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("PUT {path}: no status line in {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while reply.len() < head_end + length {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("PUT {path}: {e}"))?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    if !(200..300).contains(&status) {
        let body = String::from_utf8_lossy(&reply[head_end..]);
        return Err(format!("PUT {path}: {status} {body}"));
    }
    Ok(())
}

/// Connects to `socket` as soon as the VMM listens; returns the connection and when it
/// succeeded (CLOCK_MONOTONIC ns).
fn connect_when_ready(socket: &Path, vmm: &mut Running) -> Result<(UnixStream, u64), String> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            return Ok((stream, monotonic_ns()));
        }
        if vmm.exited() {
            return Err("exited before serving its API socket".into());
        }
        if Instant::now() >= deadline {
            return Err(format!("{} not served in time", socket.display()));
        }
        std::thread::sleep(CONNECT_POLL);
    }
}

/// The API requests that boot `sys`, in its own schema.
fn api_boot_requests(
    sys: System,
    setup: &Setup,
    cpus: u32,
    memory_mib: u64,
) -> [(&str, String); 2] {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (machine, boot) = if sys == System::Chapeau {
        (
            serde_json::json!({ "vcpus": cpus, "memory_mib": memory_mib }),
            serde_json::json!({
                "kernel": path(&setup.kernel),
                "initrd": path(&setup.initramfs),
                "cmdline": setup.cmdline,
            }),
        )
    } else {
        (
            serde_json::json!({ "vcpu_count": cpus, "mem_size_mib": memory_mib }),
            serde_json::json!({
                "kernel_image_path": path(&setup.kernel),
                "initrd_path": path(&setup.initramfs),
                "boot_args": firecracker_boot_args(setup),
            }),
        )
    };
    [
        ("/machine-config", machine.to_string()),
        ("/boot-source", boot.to_string()),
    ]
}

fn ns_to_ms(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1e6
}

/// The API path: exec → socket served, then configure, InstanceStart → first KVM_RUN.
fn api_run(
    sys: System,
    setup: &Setup,
    cpus: u32,
    memory_mib: u64,
    trace: &mut KvmTrace,
    dir: &Path,
    run: &mut StartupRun,
) -> Result<(), String> {
    let socket = dir.join(format!("{}.sock", sys.name()));
    let mut cmd = match sys {
        System::Chapeau => {
            let mut cmd = Command::new(&setup.chapeau);
            cmd.args(["--log-level", "info"]);
            cmd
        }
        _ => {
            let mut cmd = Command::new(setup.firecracker.as_ref().ok_or("no firecracker")?);
            cmd.args(["--level", "Warning"]);
            cmd
        }
    };
    cmd.arg("--api-sock").arg(&socket);
    let mut vmm = Running::spawn(cmd)?;
    let pid = vmm.child.id();
    let (mut stream, ready_ns) = connect_when_ready(&socket, &mut vmm)?;
    for (path, body) in api_boot_requests(sys, setup, cpus, memory_mib) {
        http_put(&mut stream, path, &body)?;
    }
    let start_ns = monotonic_ns();
    http_put(
        &mut stream,
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    )?;
    let mut seen = ProcessTrace::new(pid);
    wait_for_kvm_run(trace, &mut vmm, &mut seen)?;
    drop(vmm);
    // The socket file is left behind by a killed VMM.
    let _ = std::fs::remove_file(&socket);
    let exec_ns = seen
        .exec_ns
        .ok_or_else(|| format!("no exec of pid {pid} in the trace"))?;
    run.socket_ms = Some(ns_to_ms(exec_ns, ready_ns));
    run.start_to_run_ms = seen.first_kvm_run_ns.map(|ns| ns_to_ms(start_ns, ns));
    Ok(())
}

/// The command-line path: exec → first KVM_RUN, and the KVM ioctls within.
fn cli_run(
    sys: System,
    setup: &Setup,
    cpus: u32,
    memory_mib: u64,
    trace: &mut KvmTrace,
    run: &mut StartupRun,
) -> Result<(), String> {
    let mut vmm = Running::spawn(command_for(sys, setup, cpus, memory_mib)?)?;
    let pid = vmm.child.id();
    let mut seen = ProcessTrace::new(pid);
    wait_for_kvm_run(trace, &mut vmm, &mut seen)?;
    // chapeau logs just before its KVM_RUN; give its stderr a moment to arrive.
    let logged = vmm
        .logged_run_ns
        .recv_timeout(Duration::from_millis(if sys == System::Chapeau {
            500
        } else {
            0
        }));
    drop(vmm);
    let exec_ns = seen
        .exec_ns
        .ok_or_else(|| format!("no exec of pid {pid} in the trace"))?;
    let first_run = seen.first_kvm_run_ns.unwrap_or(exec_ns);
    run.cli_run_ms = Some(ns_to_ms(exec_ns, first_run));
    run.cli_kvm_ioctl_ms = Some(seen.kvm_ioctl_ns as f64 / 1e6);
    run.cli_kvm_wait_ms = Some(seen.kvm_wait_ns as f64 / 1e6);
    run.cli_own_on_cpu_ms = Some(seen.own_on_cpu_ns as f64 / 1e6);
    run.cli_kvm_ioctls = seen.kvm_ioctls;
    run.cli_slowest_kvm_ioctl = seen
        .slowest_kvm_ioctl
        .map(|(cmd, ns)| (cmd, ns as f64 / 1e6));
    run.cli_logged_run_ms = logged.ok().map(|ns| ns_to_ms(exec_ns, ns));
    Ok(())
}

/// Removes the bench's socket directory on every exit path.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) struct StartupResults {
    pub(crate) runs: Vec<(System, Vec<StartupRun>, Vec<String>)>,
}

/// `runs` rounds; in each, every system's API path then command-line path.
pub(crate) fn measure(
    systems: &[System],
    setup: &Setup,
    cpus: u32,
    memory_mib: u64,
    runs: usize,
) -> Result<StartupResults, String> {
    let mut trace = KvmTrace::new()?;
    let dir = TempDir(std::env::temp_dir().join(format!("chapeau-bench-{}", std::process::id())));
    std::fs::create_dir(&dir.0).map_err(|e| format!("{}: {e}", dir.0.display()))?;
    let mut results: Vec<(System, Vec<StartupRun>, Vec<String>)> = systems
        .iter()
        .filter(|s| SYSTEMS.contains(s))
        .map(|s| (*s, Vec::new(), Vec::new()))
        .collect();
    for round in 1..=runs {
        for (sys, ok, failed) in results.iter_mut() {
            let mut run = StartupRun::default();
            let outcome = api_run(*sys, setup, cpus, memory_mib, &mut trace, &dir.0, &mut run)
                .map_err(|e| format!("API path: {e}"))
                .and_then(|()| {
                    cli_run(*sys, setup, cpus, memory_mib, &mut trace, &mut run)
                        .map_err(|e| format!("command-line path: {e}"))
                });
            match outcome {
                Ok(()) => {
                    println!("{}", startup_line(*sys, round, runs, &run));
                    ok.push(run);
                }
                Err(e) => {
                    let msg = format!("{} start-up {round}/{runs}: {e}", sys.name());
                    println!("{msg}  FAILED");
                    failed.push(msg);
                }
            }
        }
    }
    Ok(StartupResults { runs: results })
}

/// `KVM_CREATE_VM 0.250 ms`: the names of the VM-building ioctls (`_IO*(KVMIO, nr)`), else
/// the number.
fn kvm_ioctl_name(cmd: u64, ms: f64) -> String {
    let name = match cmd & 0xff {
        0x01 => "KVM_CREATE_VM",
        0x02 => "KVM_GET_MSR_INDEX_LIST",
        0x03 => "KVM_CHECK_EXTENSION",
        0x04 => "KVM_GET_VCPU_MMAP_SIZE",
        0x05 => "KVM_GET_SUPPORTED_CPUID",
        0x41 => "KVM_CREATE_VCPU",
        0x46 => "KVM_SET_USER_MEMORY_REGION",
        0x47 => "KVM_SET_TSS_ADDR",
        0x48 => "KVM_SET_IDENTITY_MAP_ADDR",
        0x60 => "KVM_CREATE_IRQCHIP",
        0x6a => "KVM_SET_GSI_ROUTING",
        0x71 => "KVM_REINJECT_CONTROL",
        0x76 => "KVM_IRQFD",
        0x77 => "KVM_CREATE_PIT2",
        0x79 => "KVM_IOEVENTFD",
        0x90 => "KVM_SET_CPUID2",
        _ => return format!("KVM ioctl {cmd:#x} {ms:.3} ms"),
    };
    format!("{name} {ms:.3} ms")
}

fn startup_line(sys: System, round: usize, runs: usize, r: &StartupRun) -> String {
    let mut line = format!(
        "{:<13} start-up {round}/{runs}  exec->socket {} ms  InstanceStart->KVM_RUN {} ms  \
         cli exec->KVM_RUN {} ms (KVM ioctls {} ms in {}{}, waiting on them {} ms, own {} ms, own on CPU {} ms)",
        sys.name(),
        opt_fmt(r.socket_ms, 3),
        opt_fmt(r.start_to_run_ms, 3),
        opt_fmt(r.cli_run_ms, 3),
        opt_fmt(r.cli_kvm_ioctl_ms, 3),
        r.cli_kvm_ioctls,
        r.cli_slowest_kvm_ioctl
            .map_or_else(String::new, |(cmd, ms)| format!(
                ", slowest {}",
                kvm_ioctl_name(cmd, ms)
            )),
        opt_fmt(r.cli_kvm_wait_ms, 3),
        opt_fmt(r.own_ms(), 3),
        opt_fmt(r.cli_own_on_cpu_ms, 3),
    );
    if let Some(logged) = r.cli_logged_run_ms {
        line += &format!("  (own log: {logged:.3} ms)");
    }
    line
}

/// The start-up table: min / median per system and the chapeau/Firecracker ratio of medians.
pub(crate) fn print_summary(results: &StartupResults, runs: usize) {
    type Figure = fn(&StartupRun) -> Option<f64>;
    let figures: [(&str, Figure); 7] = [
        ("exec -> API socket ready", |r| r.socket_ms),
        ("InstanceStart -> first KVM_RUN", |r| r.start_to_run_ms),
        ("cli exec -> first KVM_RUN", |r| r.cli_run_ms),
        ("  KVM ioctls (sum)", |r| r.cli_kvm_ioctl_ms),
        ("  waiting on KVM ioctls", |r| r.cli_kvm_wait_ms),
        ("  own share (the rest)", |r| r.own_ms()),
        ("    of which on a CPU", |r| r.cli_own_on_cpu_ms),
    ];
    println!();
    println!(
        "start-up, {runs} run(s), ms, min / median (target: chapeau's own share < 2 ms); \
         ratio = chapeau/firecracker of medians (<1: chapeau faster)"
    );
    let mut header = format!("{:<32}", "figure");
    for (sys, _, _) in &results.runs {
        header += &format!(" {:>17}", sys.name());
    }
    println!("{header} {:>7}", "ratio");
    let values = |rs: &[StartupRun], f: Figure| rs.iter().filter_map(f).collect::<Vec<_>>();
    let of = |sys: System| results.runs.iter().find(|(s, _, _)| *s == sys);
    for (name, f) in figures {
        let mut line = format!("{name:<32}");
        for (_, rs, _) in &results.runs {
            line += &format!(" {:>17}", mm_fmt(&values(rs, f), 3));
        }
        let ratio = match (of(System::Chapeau), of(System::Firecracker)) {
            (Some((_, ours, _)), Some((_, theirs, _))) => {
                match (median(&values(ours, f)), median(&values(theirs, f))) {
                    (Some(c), Some(p)) if p > 0.0 => format!("{:.2}", c / p),
                    _ => "n/a".into(),
                }
            }
            _ => "-".into(),
        };
        println!("{line} {ratio:>7}");
    }
    println!(
        "exec = sched_process_exec, KVM_RUN = sys_enter_ioctl(KVM_RUN) of the VMM (tracefs, \
         trace_clock mono, us resolution); socket ready = first successful connect (polled every \
         {} us); KVM ioctls = time inside KVM ioctls other than KVM_RUN (sys_enter to sys_exit \
         per thread) before the first KVM_RUN; waiting on them = while no VMM thread was on a \
         CPU outside one (sched_switch), so an ioctl overlapped by own work does not count; own \
         share = the rest; on a CPU = while a VMM thread ran outside a KVM ioctl (the part that \
         does not stretch with the host's load).",
        CONNECT_POLL.as_micros()
    );
    for (_, _, failed) in &results.runs {
        for f in failed {
            println!("failed: {f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines() {
        let fork = "           bench-30600   [000] .....  3923.600400: sched_process_fork: \
                    comm=bench pid=30600 child_comm=bench child_pid=30642";
        assert_eq!(
            parse_trace_line(fork),
            Some(TraceEvent::Fork {
                parent: 30600,
                child: 30642,
                ns: 3_923_600_400_000
            })
        );
        let switch = "  fc_vcpu 0-30650 [001] d..2. 1.000002: sched_switch: prev_comm=fc_vcpu 0 \
                      prev_pid=30650 prev_prio=120 prev_state=S ==> next_comm=swapper/1 \
                      next_pid=0 next_prio=120";
        assert_eq!(
            parse_trace_line(switch),
            Some(TraceEvent::Switch {
                prev: 30650,
                next: 0,
                ns: 1_000_002_000
            })
        );
        let exec = "       chapeau-30642   [000] .....  3923.600485: \
                    sched_process_exec: filename=/x/chapeau pid=30642 old_pid=30642";
        assert_eq!(
            parse_trace_line(exec),
            Some(TraceEvent::Exec {
                pid: 30642,
                ns: 3_923_600_485_000
            })
        );
        let enter = "     fc_vcpu 0-30650   [001] ..... 12.000001: \
                     sys_ioctl(fd: c, cmd: ae80, arg: 0)";
        assert_eq!(
            parse_trace_line(enter),
            Some(TraceEvent::IoctlEnter {
                tid: 30650,
                ns: 12_000_001_000,
                cmd: KVM_RUN
            })
        );
        let exit = "  a-b-7 [001] d.... 1.000010: sys_ioctl -> 0x0";
        assert_eq!(
            parse_trace_line(exit),
            Some(TraceEvent::IoctlExit {
                tid: 7,
                ns: 1_000_010_000
            })
        );
        assert_eq!(parse_trace_line("# tracer: nop"), None);
    }

    #[test]
    fn kvm_ioctls_and_own_work_before_the_first_run() {
        let mut seen = ProcessTrace::new(9);
        let enter = |tid, ns, cmd| TraceEvent::IoctlEnter { tid, ns, cmd };
        let exit = |tid, ns| TraceEvent::IoctlExit { tid, ns };
        let switch = |prev, next, ns| TraceEvent::Switch { prev, next, ns };
        for event in [
            TraceEvent::Exec { pid: 9, ns: 100 },
            enter(9, 200, 0xae01), // KVM_CREATE_VM: 50 ns
            exit(9, 250),
            enter(9, 300, 0x5401), // TCGETS: not KVM, own work
            exit(9, 310),
            enter(8, 320, 0xae41), // another process
            exit(8, 400),
            TraceEvent::Fork {
                parent: 9,
                child: 10,
                ns: 400,
            },
            switch(9, 0, 420), // 9 waits (for a CPU): neither own nor KVM
            switch(0, 10, 430),
            enter(10, 450, 0x71),   // not KVMIO: own work
            enter(10, 460, 0xae71), // KVM_REINJECT_CONTROL: 40 ns, asleep from 470
            switch(10, 9, 470),     // 9 works beside it from 470 to 490
            switch(9, 0, 490),      // nothing works, 10 is in KVM: 490 to 500 waits on KVM
            exit(10, 500),
            enter(10, 550, KVM_RUN),
            enter(9, 600, 0xae41), // after the first run: not counted
            exit(9, 700),
        ] {
            seen.add(&event);
        }
        assert_eq!(seen.exec_ns, Some(100));
        assert_eq!(seen.first_kvm_run_ns, Some(550));
        assert_eq!((seen.kvm_ioctl_ns, seen.kvm_ioctls), (90, 2));
        assert_eq!(seen.slowest_kvm_ioctl, Some((0xae01, 50)));
        // KVM: 200-250 on 9; 460-470 and 490-500 with 10 alone in REINJECT.
        assert_eq!(seen.kvm_wait_ns, 70);
        // Own: 100-200, 250-420 on 9; 430-460 on 10; 470-490 on 9.
        assert_eq!(seen.own_on_cpu_ns, 100 + 170 + 30 + 20);
    }

    #[test]
    fn timestamps_without_floats() {
        assert_eq!(parse_timestamp("3923.000001"), Some(3_923_000_001_000));
        assert_eq!(parse_timestamp("x.1"), None);
    }
}
