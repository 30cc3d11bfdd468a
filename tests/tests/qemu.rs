//! chapeau as Kata's QEMU: the command line Kata ran (`../shared/reference/
//! kata-qemu-cmdline.split.txt`, one option per line), with its paths and descriptors
//! replaced by the test's own, run through a `qemu-system-x86_64` symlink, driven over QMP by
//! two clients no one here wrote: QEMU's Python library `qemu.qmp` and Kata's Go library govmm.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::kata::{open_tap, pass_fd, reference_args, KataPaths, GUEST_IP, TAP_FD};
use tests::netns::Netns;
use tests::{boot_timeout, chapeau_bin, guest_file, scratch_dir, workspace_root};

/// A scratch directory with `qemu-system-x86_64` pointing at the chapeau under test.
struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    fn new(tag: &str) -> Sandbox {
        let dir = scratch_dir().join(format!("qemu-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        std::os::unix::fs::symlink(chapeau_bin(), dir.join("qemu-system-x86_64")).unwrap();
        Sandbox { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn qemu(&self) -> Command {
        Command::new(self.path("qemu-system-x86_64"))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `command` to its end within `timeout`, its output captured.
fn run_within(command: &mut Command, timeout: Duration) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("wait"),
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{command:?} did not end within {timeout:?}");
        }
    }
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// Lines the guest prints on the console socket, collected in the background.
#[derive(Clone)]
struct Console(Arc<Mutex<String>>);

impl Console {
    fn attach(path: &Path) -> Console {
        let stream = UnixStream::connect(path).expect("connect to the console socket");
        let seen = Arc::new(Mutex::new(String::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&line));
                line.clear();
            }
        });
        Console(seen)
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.0.lock().unwrap().clone();
            if let Some(line) = seen.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "`{needle}` not on the console after {timeout:?}:\n{seen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The thread id of `pid`'s vCPU 0, from /proc. A new thread names itself once it runs, a
/// moment after it exists: wait for the name.
fn vcpu0_thread(pid: u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|task| task.path())
            .find(|task| {
                std::fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim() == "vcpu0")
            })
            .and_then(|task| Some(task.file_name()?.to_str()?.to_string()));
        if let Some(tid) = found {
            return tid;
        }
        assert!(Instant::now() < deadline, "no vcpu0 thread in {pid}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks the `key=value` lines a QMP client printed; its `thread=` must be `vcpu0_tid`.
fn check_client_output(client: &str, output: &Output, vcpu0_tid: &str) {
    let out = text(output);
    assert!(output.status.success(), "{client} failed:\n{out}");
    for wanted in [
        "version=5",
        "status=running",
        "stopped=paused",
        "continued=running",
        "done=yes",
    ] {
        assert!(out.contains(wanted), "{client}: no `{wanted}` in\n{out}");
    }
    let threads: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(" thread=").map(|(_, t)| t))
        .collect();
    assert_eq!(threads, [vcpu0_tid], "{client}: query-cpus-fast\n{out}");
}

fn python_client(socket: &Path, end: &str) -> Output {
    let script = workspace_root().join("tests/qmp-clients/qemu_qmp_lifecycle.py");
    run_within(
        Command::new("python3")
            .arg(script)
            .arg(socket)
            .args(["--end", end]),
        Duration::from_secs(150),
    )
}

/// Builds the govmm client (Debian's golang-github-kata-containers-govmm-dev) into `dir`.
fn govmm_client(dir: &Path) -> PathBuf {
    let binary = dir.join("govmm_lifecycle");
    let source = workspace_root().join("tests/qmp-clients/govmm_lifecycle.go");
    let output = run_within(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg(source)
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", dir.join("go-cache")),
        Duration::from_secs(300),
    );
    assert!(
        output.status.success(),
        "go build of the govmm client failed (apt-get install golang-go \
         golang-github-kata-containers-govmm-dev):\n{}",
        text(&output)
    );
    binary
}

fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "pid {pid} still there");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kata_command_line_boots_and_real_qmp_clients_drive_it() {
    let sandbox = Sandbox::new("kata");
    let govmm = govmm_client(&sandbox.dir);
    let ns = Netns::new("qemu", &[1]);
    let tap = open_tap(&ns);
    let mut args = reference_args(&KataPaths {
        sandbox: &sandbox.dir,
        kernel: &guest_file("vmlinux"),
        image: &guest_file("kata-rootfs.img"),
    })
    .expect("Kata's command line");
    // chapeau's log, where a daemon's errors can be read.
    args.extend([
        "-D".to_string(),
        sandbox.path("chapeau.log").display().to_string(),
    ]);

    // -daemonize: the parent exits 0 once everything listens and the VM is built, and its
    // output pipes close then (the daemon's standard streams are /dev/null).
    let mut command = sandbox.qemu();
    command.args(&args);
    pass_fd(&mut command, tap.as_raw_fd(), TAP_FD);
    let started = Instant::now();
    let parent = run_within(&mut command, Duration::from_secs(60));
    assert!(parent.status.success(), "parent: {}", text(&parent));
    drop(tap);
    for socket in ["qmp.sock", "console.sock", "kata.sock"] {
        assert!(sandbox.path(socket).exists(), "{socket} not there");
    }
    let pid: u32 = std::fs::read_to_string(sandbox.path("pid"))
        .expect("pidfile")
        .trim()
        .parse()
        .expect("a pid in the pidfile");
    // The pidfile's process owns the vCPUs.
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the daemon is gone: {}",
        std::fs::read_to_string(sandbox.path("chapeau.log")).unwrap_or_default()
    );
    let vcpu0 = vcpu0_thread(pid);
    let console = Console::attach(&sandbox.path("console.sock"));

    // QEMU's Python library: the lifecycle, while the guest boots.
    let qmp = sandbox.path("qmp.sock");
    check_client_output("qemu.qmp", &python_client(&qmp, "none"), &vcpu0);

    // The guest: its console, the network, 9p, the agent port.
    console.wait_for("GUEST_ACTION=kata", boot_timeout());
    eprintln!("guest up after {:?}", started.elapsed());
    assert_eq!(console.wait_for("GUEST_9P=", boot_timeout()), "GUEST_9P=ok");
    let wrote = std::fs::read_to_string(sandbox.path("shared/guest-wrote.txt")).unwrap();
    assert_eq!(wrote, "hello-from-guest\n");
    console.wait_for("GUEST_NET_UP=", boot_timeout());
    let ping = ns.output(&["busybox", "ping", "-c", "3", "-W", "10", GUEST_IP]);
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    let mut agent = UnixStream::connect(sandbox.path("kata.sock")).unwrap();
    agent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    agent.write_all(b"ping-from-the-shim\n").unwrap();
    let mut echoed = [0u8; 19];
    agent.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping-from-the-shim\n");

    // Kata's govmm, on a new connection: the lifecycle, then quit; the VM ends and leaves
    // nothing behind.
    let output = run_within(
        Command::new(&govmm).arg(&qmp).arg("quit"),
        Duration::from_secs(150),
    );
    check_client_output("govmm", &output, &vcpu0);
    assert!(
        text(&output).contains("event=SHUTDOWN"),
        "{}",
        text(&output)
    );
    wait_gone(pid, Duration::from_secs(30));
    for file in ["qmp.sock", "console.sock", "kata.sock", "pid"] {
        assert!(!sandbox.path(file).exists(), "{file} left behind");
    }
}

#[test]
fn qmp_on_an_inherited_socket_and_powerdown_ends_the_vm() {
    let sandbox = Sandbox::new("fd");
    let qmp = sandbox.path("qmp.sock");
    let listener = UnixListener::bind(&qmp).unwrap();
    let mut command = sandbox.qemu();
    command
        .args([
            "-machine",
            "q35,accel=kvm,kernel_irqchip=on",
            "-cpu",
            "host",
        ])
        // -nographic without -nodefaults: the serial console on stdout, as QEMU does.
        .args(["-m", "256M", "-smp", "1", "-nographic"])
        .args(["-qmp", "unix:fd=3,server=on,wait=off"])
        .arg("-kernel")
        .arg(guest_file("vmlinux"))
        .arg("-initrd")
        .arg(tests::initramfs())
        .args(["-append", "console=ttyS0 panic=1 test=wait"])
        .arg("-pidfile")
        .arg(sandbox.path("pid"));
    pass_fd(&mut command, listener.as_raw_fd(), 3);
    let mut vm = tests::Vm::start_command(&mut command);
    drop(listener);
    vm.wait_for("GUEST_ACTION=wait", boot_timeout());
    let vcpu0 = vcpu0_thread(vm.pid());
    // qemu.qmp: system_powerdown, the guest's init powers off, SHUTDOWN reaches the client.
    let output = python_client(&qmp, "powerdown");
    check_client_output("qemu.qmp", &output, &vcpu0);
    let out = text(&output);
    let powerdown = out.find("event=POWERDOWN").expect("POWERDOWN");
    let shutdown = out.find("event=SHUTDOWN").expect("SHUTDOWN");
    assert!(powerdown < shutdown, "{out}");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
    assert!(!sandbox.path("pid").exists(), "pidfile left behind");
}

#[test]
fn qemu_style_errors() {
    let sandbox = Sandbox::new("errors");
    let cases: &[(&[&str], &str)] = &[
        (&["-bogus"], "qemu-system-x86_64: -bogus: invalid option"),
        (&["-smp"], "qemu-system-x86_64: -smp: requires an argument"),
        (
            // A command line that parses, with no kernel there: the daemon's parent exits 1
            // and the reason reaches the caller.
            &[
                "-kernel",
                "/nonexistent/vmlinux",
                "-qmp",
                "unix:QMP,server,nowait",
                "-daemonize",
                "-nodefaults",
            ],
            "/nonexistent/vmlinux",
        ),
    ];
    for (args, wanted) in cases {
        let qmp = sandbox.path("qmp.sock").display().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("QMP", &qmp)).collect();
        let output = run_within(sandbox.qemu().args(&args), Duration::from_secs(30));
        assert_eq!(output.status.code(), Some(1), "{args:?}: {}", text(&output));
        assert!(
            text(&output).contains(wanted),
            "{args:?}: {}",
            text(&output)
        );
        assert!(
            !sandbox.path("qmp.sock").exists(),
            "{args:?} left its socket"
        );
    }
    // The same front end as `chapeau qemu …`.
    let output = run_within(
        Command::new(chapeau_bin()).args(["qemu", "-bogus"]),
        Duration::from_secs(30),
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output).contains("qemu-system-x86_64: -bogus: invalid option"));
}
