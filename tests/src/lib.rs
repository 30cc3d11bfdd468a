//! Harness for integration tests that boot real guests with the `chapeau` binary.
//!
//! Guest boots are slow where guest kernel mode is emulated (PVM hosts: ~80 s to the test
//! guest's init), so tests boot once per scenario, check several things per boot, and take
//! their timeouts from `boot_timeout()`.

pub mod kata;
pub mod netns;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The command line every test guest starts from.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the guest artifacts are: `CHAPEAU_GUEST_DIR`; else our own build in `target/guest`
/// (`resources/guest/build.sh target/guest`, what `.ci/run` does) once it finished (build.sh
/// writes SHA256SUMS last, so a build that stopped halfway is not used); else the shared set in
/// `../shared/guest` beside the repo.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CHAPEAU_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let ours = workspace_root().join("target/guest");
    if ours.join("SHA256SUMS").exists() {
        return ours;
    }
    workspace_root().join("../shared/guest")
}

pub fn guest_file(name: &str) -> PathBuf {
    let path = guest_dir().join(name);
    assert!(
        path.exists(),
        "guest artifact {} is missing (set CHAPEAU_GUEST_DIR)",
        path.display()
    );
    path
}

pub fn scratch_dir() -> PathBuf {
    let dir = workspace_root().join("target/chapeau-tests");
    std::fs::create_dir_all(&dir).expect("create target/chapeau-tests");
    dir
}

/// The test initramfs, uncompressed: on a PVM host gunzip in the guest costs about a minute.
pub fn initramfs() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let plain = guest_dir().join("initramfs.cpio");
        if plain.exists() {
            return plain;
        }
        let out = scratch_dir().join("initramfs.cpio");
        let gz = guest_file("initramfs.cpio.gz");
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        let data = Command::new("gzip")
            .arg("-dc")
            .arg(&gz)
            .output()
            .expect("run gzip");
        assert!(data.status.success(), "gzip -dc {} failed", gz.display());
        std::fs::write(&tmp, data.stdout).expect("write initramfs.cpio");
        std::fs::rename(&tmp, &out).expect("rename initramfs.cpio");
        out
    })
    .clone()
}

pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// How long a boot may take before a test gives up. Measured on PVM hosts: ~80 s for the test
/// guest to reach init with 1 vCPU alone on the machine, 160 s for 2 vCPUs beside another guest,
/// and over 400 s when four guests shared two cores. Emulated guest time stretches with load, so
/// allow 900 s: a slow pass beats a flaky failure. Hardware KVM boots in well under a second.
/// `CHAPEAU_BOOT_TIMEOUT` (s) overrides.
pub fn boot_timeout() -> Duration {
    let default = if is_pvm_host() { 900 } else { 60 };
    let secs = std::env::var("CHAPEAU_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Duration::from_secs(secs)
}

/// The `chapeau` built with this package. Cargo builds a package's binaries before its
/// integration tests and puts them one level above the test executables (target/<profile>/);
/// `CHAPEAU_BIN` overrides.
pub fn chapeau_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CHAPEAU_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("chapeau-under-test");
    assert!(
        bin.exists(),
        "{} not built (run the tests with cargo test)",
        bin.display()
    );
    bin
}

/// `chapeau` built with the vmm's `forbidden-syscall-test` feature (its test hooks, see
/// vmm/src/test_hooks.rs), in a target directory of its own so that neither the binary under
/// test nor a release build ever has them. Built once per test process (debug profile).
pub fn chapeau_with_test_hooks() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let target_dir = workspace_root().join("target/test-hooks");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "vmm", "--bin", "chapeau"])
            .args(["--features", "forbidden-syscall-test", "--target-dir"])
            .arg(&target_dir)
            .current_dir(workspace_root())
            .status()
            .expect("run cargo");
        assert!(
            status.success(),
            "building chapeau with its test hooks failed"
        );
        // .cargo/config.toml names the target, so its outputs live under the triple.
        target_dir.join("x86_64-unknown-linux-gnu/debug/chapeau")
    })
    .clone()
}

/// Where each thread of process `pid` is: name, scheduler state, the syscall it sits in (an
/// `ioctl(KVM_RUN)` is named as such) and its kernel stack. Printed when a wait times out, so that
/// a guest that stopped can be told apart from a VMM thread that blocked.
pub fn thread_report(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    let mut report = Vec::new();
    for task in tasks.flatten() {
        let read = |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
        let comm = read("comm");
        // Field 3 of stat, after the parenthesised name: R, S, D, ...
        let stat = read("stat");
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .unwrap_or("?")
            .to_string();
        let syscall = read("syscall");
        let mut fields = syscall.split_whitespace();
        let what = match (fields.next(), fields.next(), fields.next()) {
            // x86_64 ioctl is 16; KVM_RUN is _IO(0xAE, 0x80).
            (Some("16"), Some(_), Some("0xae80")) => "in KVM_RUN".to_string(),
            _ => format!("syscall {}", syscall.trim()),
        };
        let stack: Vec<String> = read("stack").lines().take(8).map(str::to_string).collect();
        report.push(format!(
            "{} [{state}] {what}\n    {}",
            comm.trim(),
            stack.join("\n    ")
        ));
    }
    report.sort();
    report.join("\n")
}

/// Each thread of process `pid` (but KVM's own) and its `Seccomp:` mode from /proc: 0 none,
/// 2 filtered; sorted by name.
pub fn thread_seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut threads: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .unwrap_or("?")
                .trim()
                .to_string();
            (comm.trim().to_string(), mode)
        })
        // KVM's own worker thread in our process is KVM's, not ours.
        .filter(|(comm, _)| !comm.starts_with("kvm-"))
        .collect();
    threads.sort();
    threads
}

#[derive(Default)]
struct Output {
    stdout: Vec<String>,
    stderr: Vec<String>,
}

/// A running `chapeau` whose stdout and stderr are collected line by line.
pub struct Vm {
    child: Child,
    output: Arc<(Mutex<Output>, Condvar)>,
    status: Option<ExitStatus>,
}

fn collect<R: Read + Send + 'static>(
    mut stream: R,
    output: Arc<(Mutex<Output>, Condvar)>,
    is_stderr: bool,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Whether the last stored line still waits for its newline: a guest may print a
        // partial line and then compute for minutes ("Decompressing Linux... ").
        let mut open = false;
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            let (lock, cond) = &*output;
            let mut out = lock.lock().unwrap();
            let lines = if is_stderr {
                &mut out.stderr
            } else {
                &mut out.stdout
            };
            for piece in buf[..n].split_inclusive(|b| *b == b'\n') {
                let text = String::from_utf8_lossy(piece);
                let text = text.trim_end_matches(['\r', '\n']);
                match lines.last_mut() {
                    Some(last) if open => last.push_str(text),
                    _ => lines.push(text.to_string()),
                }
                open = !piece.ends_with(b"\n");
            }
            cond.notify_all();
        }
    });
}

impl Vm {
    /// Starts `chapeau` with `args` (stdin is /dev/null).
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vm {
        Self::start_command(Command::new(chapeau_bin()).args(args))
    }

    pub fn start_command(command: &mut Command) -> Vm {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chapeau");
        let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        collect(child.stdout.take().expect("stdout"), output.clone(), false);
        collect(child.stderr.take().expect("stderr"), output.clone(), true);
        Vm {
            child,
            output,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line containing `needle` on stdout (or stderr); returns the line, or panics
    /// with everything seen so far.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        self.try_wait_for(needle, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_in(needle, timeout, true)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Vm::wait_for`] for callers that go on after a failure (the benchmarks): the error
    /// holds everything seen so far.
    pub fn try_wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        self.wait_for_in(needle, timeout, false)
    }

    fn wait_for_in(
        &mut self,
        needle: &str,
        timeout: Duration,
        stderr: bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            let lines = if stderr { &out.stderr } else { &out.stdout };
            if let Some(line) = lines.iter().find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            let now = Instant::now();
            let exited = self.child.try_wait().ok().flatten();
            if now >= deadline || exited.is_some() {
                drop(out);
                // Give the reader threads a moment to drain what the process wrote last.
                std::thread::sleep(Duration::from_millis(200));
                let out = lock.lock().unwrap();
                let lines = if stderr { &out.stderr } else { &out.stdout };
                if let Some(line) = lines.iter().find(|l| l.contains(needle)) {
                    return Ok(line.clone());
                }
                let threads = match exited {
                    Some(_) => String::new(),
                    None => format!("\n--- threads ---\n{}", thread_report(self.pid())),
                };
                return Err(format!(
                    "`{needle}` not seen after {:?} (exit: {exited:?})\n--- stdout ---\n{}\n--- stderr ---\n{}{threads}",
                    timeout,
                    out.stdout.join("\n"),
                    out.stderr.join("\n")
                ));
            }
            out = cond
                .wait_timeout(out, (deadline - now).min(Duration::from_millis(500)))
                .unwrap()
                .0;
        }
    }

    pub fn stdout(&self) -> String {
        self.output.0.lock().unwrap().stdout.join("\n")
    }

    pub fn stderr(&self) -> String {
        self.output.0.lock().unwrap().stderr.join("\n")
    }

    /// Waits for the process to exit; panics with its output if it does not in time.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.try_wait_exit(timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Vm::wait_exit`] for callers that go on after a failure.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.child.try_wait().map_err(|e| format!("wait: {e}"))?;
            if let Some(status) = status {
                self.status = Some(status);
                std::thread::sleep(Duration::from_millis(100));
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "chapeau still running after {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.stdout(),
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `chapeau` to completion for inputs that must be refused before any guest runs.
pub fn run_to_exit<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (ExitStatus, String, String) {
    let out = Command::new(chapeau_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run chapeau");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Connects to a unix socket chapeau listens on, waiting up to `timeout` for it to appear.
pub fn connect(path: &Path, timeout: Duration) -> std::os::unix::net::UnixStream {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(stream) => return stream,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("connect {}: {e}", path.display()),
        }
    }
}

/// Reads exactly `len` bytes, failing the test after `timeout` without them.
pub fn read_exactly(
    stream: &mut std::os::unix::net::UnixStream,
    len: usize,
    timeout: Duration,
) -> Vec<u8> {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut got = vec![0u8; len];
    stream.read_exact(&mut got).expect("echo from the guest");
    got
}

/// One HTTP request to chapeau's API socket through curl (a real HTTP client): the status and
/// the body.
pub fn api_call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--path-as-is", "--max-time", "30", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(body) = body {
        command.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    command.arg(format!("http://localhost{path}"));
    let out = command.output().expect("run curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let status = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "{method} {path}: no HTTP status from curl: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (status, body.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_report_names_each_thread_and_where_it_waits() {
        let sleeper = std::thread::Builder::new()
            .name("sleeper".into())
            .spawn(|| std::thread::sleep(std::time::Duration::from_secs(2)))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let report = super::thread_report(std::process::id());
        let line = report.lines().find(|l| l.starts_with("sleeper")).unwrap();
        // clock_nanosleep is 230 on x86_64.
        assert!(line.contains("[S] syscall 230"), "{report}");
        sleeper.join().unwrap();
        assert!(super::thread_report(u32::MAX).contains("gone"));
    }
}
