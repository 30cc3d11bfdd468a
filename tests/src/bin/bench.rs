//! Benchmarks chapeau against QEMU on the same guest.
//!
//! `bench boot` boots the shared test guest (`test=poweroff`) with chapeau, QEMU `-M microvm` and
//! QEMU `-M pc`, run by run, and reports wall time to `GUEST_BOOT_OK` and to exit, peak RSS, and
//! the VMM's own costs (DESIGN.md section 8): exec to first KVM_RUN, CPU time outside the guest,
//! RSS beyond the guest memory it touched. Where guest kernel mode is emulated (PVM hosts) the
//! wall times mostly measure the emulator; the VMM's own figures are the honest comparison.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: bench boot [--runs N] [--cpus N] [--memory MIB] \
[--systems chapeau,qemu-microvm,qemu-pc] [--guest-dir DIR] [--timeout S]";

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 test=poweroff";

/// What QEMU needs appended on a PVM host when the guest dir has no `pvm-cmdline` (chapeau adds
/// its own set).
const DEFAULT_PVM_PARAMS: &str = "noxsave clearcpuid=cx16,rdtscp,rdpid,popcnt,smap,clwb,fsgsbase,\
pcid,invpcid,erms,fsrm pvm_syscall noreplace-smp nowatchdog tsc=reliable";

const BOOT_MARKER: &str = "GUEST_BOOT_OK";
const KVM_RUN_MARKER: &str = "first KVM_RUN at monotonic ";

/// /proc is sampled densely while the VMM sets up (threads may be short-lived then), sparsely
/// afterwards so the sampling does not steal much CPU from the guest on a shared machine.
const FAST_SAMPLE: Duration = Duration::from_millis(10);
const FAST_PERIOD: Duration = Duration::from_secs(1);
const SLOW_SAMPLE: Duration = Duration::from_millis(50);

/// Output lines kept per stream to explain a failure.
const TAIL_LINES: usize = 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Chapeau,
    QemuMicrovm,
    QemuPc,
}

impl System {
    const ALL: [System; 3] = [System::Chapeau, System::QemuMicrovm, System::QemuPc];

    fn name(self) -> &'static str {
        match self {
            System::Chapeau => "chapeau",
            System::QemuMicrovm => "qemu-microvm",
            System::QemuPc => "qemu-pc",
        }
    }

    fn parse(s: &str) -> Option<System> {
        System::ALL.into_iter().find(|sys| sys.name() == s)
    }
}

struct Options {
    runs: usize,
    cpus: u32,
    memory_mib: u64,
    systems: Vec<System>,
    guest_dir: PathBuf,
    timeout: Duration,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut iter = args.iter();
    match iter.next().map(String::as_str) {
        Some("boot") => {}
        Some(other) => return Err(format!("unknown benchmark {other:?}")),
        None => return Err("missing benchmark name".into()),
    }
    let mut opts = Options {
        runs: 3,
        cpus: 1,
        memory_mib: 128,
        systems: System::ALL.to_vec(),
        guest_dir: std::env::var_os("CHAPEAU_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("../shared/guest")),
        timeout: Duration::from_secs(400),
    };
    while let Some(arg) = iter.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| iter.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "--runs" => opts.runs = parse_positive(flag, &value()?)?,
            "--cpus" => opts.cpus = parse_positive(flag, &value()?)?,
            "--memory" => opts.memory_mib = parse_positive(flag, &value()?)?,
            "--timeout" => opts.timeout = Duration::from_secs(parse_positive(flag, &value()?)?),
            "--guest-dir" => opts.guest_dir = PathBuf::from(value()?),
            "--systems" => {
                let list = value()?;
                let mut systems = Vec::new();
                for name in list.split(',').filter(|s| !s.is_empty()) {
                    let sys = System::parse(name)
                        .ok_or_else(|| format!("unknown system {name:?} in --systems"))?;
                    if !systems.contains(&sys) {
                        systems.push(sys);
                    }
                }
                if systems.is_empty() {
                    return Err("--systems is empty".into());
                }
                opts.systems = systems;
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(opts)
}

fn parse_positive<T: std::str::FromStr + PartialOrd + Default>(
    flag: &str,
    value: &str,
) -> Result<T, String> {
    match value.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(format!("{flag} wants a positive integer, got {value:?}")),
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives on our stack. CLOCK_MONOTONIC
    // cannot fail on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// The last values seen for one thread.
#[derive(Default, Clone)]
struct ThreadStat {
    comm: String,
    utime: u64,
    stime: u64,
    guest_time: u64,
    /// On-CPU time in ns from schedstat: unlike utime/stime, not rounded to clock ticks.
    run_ns: Option<u64>,
}

/// What polling /proc/<pid> saw while the VMM ran.
#[derive(Default)]
struct ProcStats {
    threads: HashMap<u32, ThreadStat>,
    vm_rss_max_kib: u64,
    rollup_rss_max_kib: u64,
    /// Rss of the guest RAM mapping: the guest memory the guest touched.
    guest_rss_max_kib: Option<u64>,
    /// Rss of everything else, taken from the same smaps read.
    own_rss_max_kib: Option<u64>,
}

fn is_vcpu_thread(comm: &str) -> bool {
    // chapeau names them vcpuN; QEMU (with debug-threads=on) "CPU N/KVM".
    comm.starts_with("vcpu") || (comm.starts_with("CPU ") && comm.ends_with("/KVM"))
}

/// Fields 14, 15 and 43 (utime, stime, guest_time) of a stat line. The comm in field 2 may hold
/// spaces and parentheses, so fields are counted after the last ')'.
fn parse_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some((field(14)?, field(15)?, field(43)?))
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        line.strip_prefix(key)?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// From /proc/<pid>/smaps: (Rss of the guest RAM mapping, Rss of all mappings). The guest RAM is
/// the anonymous read-write mapping whose size is the guest memory size; if several match (a
/// coincidence with some other allocation) the one holding most memory is the guest's.
fn parse_smaps(smaps: &str, guest_kib: u64) -> (Option<u64>, u64) {
    let mut total = 0;
    let mut guest: Option<u64> = None;
    let mut candidate = false;
    let mut size = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let perms = words.next().unwrap_or("");
            let path = words.nth(3);
            candidate = perms.starts_with("rw") && path.is_none();
            size = 0;
        } else if first == "Size:" {
            size = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        } else if first == "Rss:" {
            let rss: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            total += rss;
            if candidate && size == guest_kib {
                guest = Some(guest.map_or(rss, |g| g.max(rss)));
            }
        }
    }
    (guest, total)
}

impl ProcStats {
    /// Reads what it can: threads and the process itself may vanish mid-read when the VM ends,
    /// which just leaves the previous values.
    fn sample(&mut self, pid: u32, guest_kib: u64) {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        if let Ok(tasks) = std::fs::read_dir(proc_dir.join("task")) {
            for task in tasks.flatten() {
                let Some(tid) = task
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let dir = task.path();
                let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
                    continue;
                };
                let Some((utime, stime, guest_time)) = parse_stat(&stat) else {
                    continue;
                };
                let entry = self.threads.entry(tid).or_default();
                // Re-read each time: a thread names itself after it starts.
                if let Ok(comm) = std::fs::read_to_string(dir.join("comm")) {
                    entry.comm = comm.trim_end_matches('\n').to_string();
                }
                entry.utime = utime;
                entry.stime = stime;
                entry.guest_time = guest_time;
                if let Ok(schedstat) = std::fs::read_to_string(dir.join("schedstat")) {
                    if let Some(ns) = schedstat
                        .split_whitespace()
                        .next()
                        .and_then(|w| w.parse().ok())
                    {
                        entry.run_ns = Some(ns);
                    }
                }
            }
        }
        if let Ok(status) = std::fs::read_to_string(proc_dir.join("status")) {
            if let Some(kib) = kib_field(&status, "VmRSS:") {
                self.vm_rss_max_kib = self.vm_rss_max_kib.max(kib);
            }
        }
        if let Ok(rollup) = std::fs::read_to_string(proc_dir.join("smaps_rollup")) {
            if let Some(kib) = kib_field(&rollup, "Rss:") {
                self.rollup_rss_max_kib = self.rollup_rss_max_kib.max(kib);
            }
        }
        if let Ok(smaps) = std::fs::read_to_string(proc_dir.join("smaps")) {
            let (guest, total) = parse_smaps(&smaps, guest_kib);
            if let Some(guest) = guest {
                self.guest_rss_max_kib = Some(self.guest_rss_max_kib.unwrap_or(0).max(guest));
                let own = total.saturating_sub(guest);
                self.own_rss_max_kib = Some(self.own_rss_max_kib.unwrap_or(0).max(own));
            }
        }
    }

    fn cpu_figures(&self, hz: u64) -> CpuFigures {
        let ms = |ticks: u64| ticks as f64 * 1000.0 / hz as f64;
        let mut fig = CpuFigures::default();
        let mut run_ns_complete = true;
        let mut vmm_run_ns = 0;
        for t in self.threads.values() {
            if is_vcpu_thread(&t.comm) {
                fig.vcpu_threads += 1;
                fig.vcpu_user_ms += ms(t.utime.saturating_sub(t.guest_time));
                fig.vcpu_sys_ms += ms(t.stime);
                fig.vcpu_guest_ms += ms(t.guest_time);
            } else {
                fig.other_threads += 1;
                fig.vmm_cpu_ms += ms(t.utime + t.stime);
                match t.run_ns {
                    Some(ns) => vmm_run_ns += ns,
                    None => run_ns_complete = false,
                }
            }
        }
        if run_ns_complete && fig.other_threads > 0 {
            fig.vmm_run_ms = Some(vmm_run_ns as f64 / 1e6);
        }
        fig
    }
}

#[derive(Default, Clone)]
struct CpuFigures {
    other_threads: usize,
    vcpu_threads: usize,
    /// utime+stime of the non-vCPU threads, ms (clock-tick resolution).
    vmm_cpu_ms: f64,
    /// The same from schedstat, ns resolution.
    vmm_run_ms: Option<f64>,
    /// vCPU threads' user time minus guest time: exit handling in user space.
    vcpu_user_ms: f64,
    vcpu_sys_ms: f64,
    vcpu_guest_ms: f64,
}

struct RunResult {
    boot_s: f64,
    exit_s: f64,
    maxrss_kib: u64,
    first_kvm_run_ms: Option<f64>,
    cpu: CpuFigures,
    /// CPU time of all threads from wait4 (exact), ms.
    total_cpu_ms: f64,
    vm_rss_max_kib: u64,
    rollup_rss_max_kib: u64,
    guest_rss_kib: Option<u64>,
    own_rss_sampled_kib: Option<u64>,
    /// 1-minute load average just before the run: wall times on a shared host depend on it.
    load: Option<f64>,
}

impl RunResult {
    /// Peak RSS minus the guest memory the guest touched.
    fn beyond_guest_kib(&self) -> Option<u64> {
        self.guest_rss_kib
            .map(|guest| self.maxrss_kib.saturating_sub(guest))
    }
}

enum Event {
    BootOk(Instant),
    FirstKvmRun(u64),
    Exited(Instant),
    WaitFailed(String),
}

/// Reads `stream` line by line, reporting `marker` lines through `on_line`; returns the last
/// lines for failure messages.
fn spawn_reader<R, F>(stream: R, on_line: F) -> JoinHandle<Vec<String>>
where
    R: Read + Send + 'static,
    F: Fn(&str) + Send + 'static,
{
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut tail = std::collections::VecDeque::new();
        let mut line = Vec::new();
        while reader
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            on_line(text);
            if !text.trim().is_empty() {
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(text.to_string());
            }
            line.clear();
        }
        tail.into()
    })
}

struct Setup {
    chapeau: PathBuf,
    qemu: Option<PathBuf>,
    kernel: PathBuf,
    initramfs: PathBuf,
    pvm_host: bool,
    qemu_append: String,
}

fn command_for(sys: System, setup: &Setup, opts: &Options) -> Result<Command, String> {
    let memory = opts.memory_mib.to_string();
    let cpus = opts.cpus.to_string();
    match sys {
        System::Chapeau => {
            let mut cmd = Command::new(&setup.chapeau);
            cmd.arg("--kernel")
                .arg(&setup.kernel)
                .arg("--initrd")
                .arg(&setup.initramfs)
                .args(["--cmdline", CMDLINE, "--cpus", &cpus, "--memory", &memory])
                // info level: the first-KVM_RUN timestamp.
                .args(["--log-level", "info"]);
            Ok(cmd)
        }
        System::QemuMicrovm | System::QemuPc => {
            let qemu = setup
                .qemu
                .as_ref()
                .ok_or("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")?;
            let machine = if sys == System::QemuMicrovm {
                "microvm"
            } else {
                "pc"
            };
            let mut cmd = Command::new(qemu);
            cmd.args([
                "-enable-kvm",
                "-M",
                machine,
                "-cpu",
                "host,-arch-capabilities",
            ])
            .args(["-m", &memory, "-smp", &cpus])
            .args(["-nographic", "-nodefaults", "-no-user-config"])
            .args(["-serial", "stdio", "-no-reboot"])
            // Thread names only, so vCPU threads can be told apart from the rest.
            .args(["-name", "bench,debug-threads=on"])
            .arg("-kernel")
            .arg(&setup.kernel)
            .arg("-initrd")
            .arg(&setup.initramfs)
            .args(["-append", &setup.qemu_append]);
            Ok(cmd)
        }
    }
}

fn last_line(tail: &[String]) -> String {
    tail.last()
        .map(|l| l.chars().take(160).collect())
        .unwrap_or_else(|| "(none)".into())
}

fn run_once(sys: System, setup: &Setup, opts: &Options) -> Result<RunResult, String> {
    let mut cmd = command_for(sys, setup, opts)?;
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|w| w.parse().ok()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let guest_kib = opts.memory_mib * 1024;

    // Taken just before spawn: the clock chapeau stamps its first KVM_RUN with.
    let mono0 = monotonic_ns();
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cmd.get_program().to_string_lossy()))?;
    let pid = child.id();

    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().ok_or("child has no stdout pipe")?;
    let stderr = child.stderr.take().ok_or("child has no stderr pipe")?;
    let out_tx = tx.clone();
    let out_reader = spawn_reader(stdout, move |line| {
        if line.contains(BOOT_MARKER) {
            let _ = out_tx.send(Event::BootOk(Instant::now()));
        }
    });
    let err_tx = tx.clone();
    let err_reader = spawn_reader(stderr, move |line| {
        if let Some(rest) = line.split(KVM_RUN_MARKER).nth(1) {
            if let Some(ns) = rest.split_whitespace().next().and_then(|w| w.parse().ok()) {
                let _ = err_tx.send(Event::FirstKvmRun(ns));
            }
        }
    });
    // Waits without reaping (WNOWAIT), so the exit time is exact and the pid stays ours to
    // kill until the main thread reaps it with wait4 below.
    let wait_tx = tx;
    std::thread::spawn(move || loop {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value for waitid to overwrite.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t, which lives on this stack.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            let _ = wait_tx.send(Event::Exited(Instant::now()));
            return;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            let _ = wait_tx.send(Event::WaitFailed(format!("waitid({pid}): {err}")));
            return;
        }
    });

    let mut stats = ProcStats::default();
    let mut boot_at = None;
    let mut kvm_run_ns = None;
    let mut killed = false;
    let deadline = t0 + opts.timeout;
    let exit_at = loop {
        let interval = if t0.elapsed() < FAST_PERIOD {
            FAST_SAMPLE
        } else {
            SLOW_SAMPLE
        };
        match rx.recv_timeout(interval) {
            Ok(Event::BootOk(t)) => boot_at = boot_at.or(Some(t)),
            Ok(Event::FirstKvmRun(ns)) => kvm_run_ns = kvm_run_ns.or(Some(ns)),
            Ok(Event::Exited(t)) => break t,
            Ok(Event::WaitFailed(e)) => return Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("lost track of the child process".into())
            }
        }
        stats.sample(pid, guest_kib);
        if !killed && Instant::now() >= deadline {
            // SAFETY: kill has no memory effects; the pid is not reaped yet, so it is our child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            killed = true;
        }
    };

    let mut status = 0;
    // SAFETY: rusage is plain data; zeroed is valid for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 writes an int and one rusage, both on our stack.
    let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    if rc < 0 {
        return Err(format!("wait4({pid}): {}", std::io::Error::last_os_error()));
    }
    // The pipes close when the process is gone; the readers then hand back their tails.
    let out_tail = out_reader.join().unwrap_or_default();
    let err_tail = err_reader.join().unwrap_or_default();
    for event in rx.try_iter() {
        match event {
            Event::BootOk(t) => boot_at = boot_at.or(Some(t)),
            Event::FirstKvmRun(ns) => kvm_run_ns = kvm_run_ns.or(Some(ns)),
            Event::Exited(_) | Event::WaitFailed(_) => {}
        }
    }

    let secs = |t: Instant| t.duration_since(t0).as_secs_f64();
    let boot_note = match boot_at {
        Some(t) => format!("after GUEST_BOOT_OK at {:.3} s", secs(t)),
        None => "before GUEST_BOOT_OK".into(),
    };
    if killed {
        return Err(format!(
            "timed out after {} s {boot_note}; last console line: {}",
            opts.timeout.as_secs(),
            last_line(&out_tail)
        ));
    }
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !exited_ok {
        let how = if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exited with status {}", libc::WEXITSTATUS(status))
        };
        return Err(format!(
            "{how} {boot_note}; last stderr line: {}",
            last_line(&err_tail)
        ));
    }
    let Some(boot_at) = boot_at else {
        return Err(format!(
            "exited 0 without printing {BOOT_MARKER}; last console line: {}",
            last_line(&out_tail)
        ));
    };

    let tv_ms = |tv: libc::timeval| tv.tv_sec as f64 * 1000.0 + tv.tv_usec as f64 / 1000.0;
    Ok(RunResult {
        boot_s: secs(boot_at),
        exit_s: secs(exit_at),
        // ru_maxrss is in KiB on Linux.
        maxrss_kib: usage.ru_maxrss.max(0) as u64,
        first_kvm_run_ms: kvm_run_ns.map(|ns: u64| ns.saturating_sub(mono0) as f64 / 1e6),
        cpu: stats.cpu_figures(clock_ticks_per_sec()),
        total_cpu_ms: tv_ms(usage.ru_utime) + tv_ms(usage.ru_stime),
        vm_rss_max_kib: stats.vm_rss_max_kib,
        rollup_rss_max_kib: stats.rollup_rss_max_kib,
        guest_rss_kib: stats.guest_rss_max_kib,
        own_rss_sampled_kib: stats.own_rss_max_kib,
        load,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn opt_fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

fn run_line(sys: System, run: usize, runs: usize, r: &RunResult) -> String {
    let mut line = format!(
        "{:<13} run {run}/{runs}  boot {:>8.3} s  exit {:>8.3} s  maxrss {:>6.1} MiB",
        sys.name(),
        r.boot_s,
        r.exit_s,
        mib(r.maxrss_kib)
    );
    if sys == System::Chapeau {
        line += &format!("  exec->KVM_RUN {} ms", opt_fmt(r.first_kvm_run_ms, 3));
    }
    line += &format!(
        "  vmm-cpu {:.0} ms (schedstat {} ms, {} thr)  vcpu user-guest {:.0} ms sys {:.0} ms  \
         total cpu {:.0} ms  guest-touched {} MiB  beyond-guest {} MiB (sampled {} MiB, \
         VmRSS {:.1}, smaps_rollup {:.1})  load {}",
        r.cpu.vmm_cpu_ms,
        opt_fmt(r.cpu.vmm_run_ms, 1),
        r.cpu.other_threads,
        r.cpu.vcpu_user_ms,
        r.cpu.vcpu_sys_ms,
        r.total_cpu_ms,
        opt_fmt(r.guest_rss_kib.map(mib), 1),
        opt_fmt(r.beyond_guest_kib().map(mib), 2),
        opt_fmt(r.own_rss_sampled_kib.map(mib), 2),
        mib(r.vm_rss_max_kib),
        mib(r.rollup_rss_max_kib),
        opt_fmt(r.load, 2),
    );
    line
}

fn min_median(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((v[0], median))
}

fn mm_fmt(values: &[f64], digits: usize) -> String {
    min_median(values).map_or_else(
        || "n/a".into(),
        |(min, med)| format!("{min:.digits$} / {med:.digits$}"),
    )
}

fn median(values: &[f64]) -> Option<f64> {
    min_median(values).map(|(_, m)| m)
}

fn print_summary(opts: &Options, results: &[(System, Vec<RunResult>, Vec<String>)]) {
    println!();
    println!(
        "summary: {} run(s), {} vCPU(s), {} MiB; min / median",
        opts.runs, opts.cpus, opts.memory_mib
    );
    println!(
        "{:<13} {:>5}  {:>21}  {:>21}  {:>17}",
        "system", "ok", "GUEST_BOOT_OK (s)", "exit (s)", "peak RSS (MiB)"
    );
    let col = |rs: &[RunResult], f: fn(&RunResult) -> f64| rs.iter().map(f).collect::<Vec<_>>();
    for (sys, rs, failures) in results {
        println!(
            "{:<13} {:>5}  {:>21}  {:>21}  {:>17}",
            sys.name(),
            format!("{}/{}", rs.len(), rs.len() + failures.len()),
            mm_fmt(&col(rs, |r| r.boot_s), 3),
            mm_fmt(&col(rs, |r| r.exit_s), 3),
            mm_fmt(&col(rs, |r| mib(r.maxrss_kib)), 1),
        );
    }

    let chapeau = results.iter().find(|(s, _, _)| *s == System::Chapeau);
    if let Some((_, ours, _)) = chapeau {
        println!();
        println!("ratio peer/chapeau of medians (>1: chapeau faster/smaller)");
        println!(
            "{:<13} {:>14}  {:>8}  {:>14}",
            "peer", "GUEST_BOOT_OK", "exit", "peak RSS"
        );
        let ratio = |peer: &[RunResult], f: fn(&RunResult) -> f64| match (
            median(&col(peer, f)),
            median(&col(ours, f)),
        ) {
            (Some(p), Some(c)) if c > 0.0 => format!("{:.2}x", p / c),
            _ => "n/a".into(),
        };
        for (sys, rs, _) in results.iter().filter(|(s, _, _)| *s != System::Chapeau) {
            println!(
                "{:<13} {:>14}  {:>8}  {:>14}",
                sys.name(),
                ratio(rs, |r| r.boot_s),
                ratio(rs, |r| r.exit_s),
                ratio(rs, |r| mib(r.maxrss_kib)),
            );
        }
    }

    println!();
    println!("VMM's own costs, min / median (targets, DESIGN.md 8: exec->KVM_RUN < 2 ms, VMM CPU < 20 ms, RSS beyond guest < 3 MiB)");
    println!(
        "{:<13} {:>17}  {:>19}  {:>19}  {:>19}  {:>20}  {:>19}",
        "system",
        "exec->KVM_RUN ms",
        "VMM CPU ms (ticks)",
        "VMM CPU ms (sched)",
        "vcpu user-guest ms",
        "RSS beyond guest MiB",
        "vcpu sys+guest s"
    );
    for (sys, rs, _) in results {
        let kvm: Vec<f64> = rs.iter().filter_map(|r| r.first_kvm_run_ms).collect();
        let sched: Vec<f64> = rs.iter().filter_map(|r| r.cpu.vmm_run_ms).collect();
        let beyond: Vec<f64> = rs
            .iter()
            .filter_map(|r| r.beyond_guest_kib().map(mib))
            .collect();
        println!(
            "{:<13} {:>17}  {:>19}  {:>19}  {:>19}  {:>20}  {:>19}",
            sys.name(),
            if *sys == System::Chapeau {
                mm_fmt(&kvm, 3)
            } else {
                "-".into()
            },
            mm_fmt(&col(rs, |r| r.cpu.vmm_cpu_ms), 0),
            mm_fmt(&sched, 1),
            mm_fmt(&col(rs, |r| r.cpu.vcpu_user_ms), 0),
            mm_fmt(&beyond, 2),
            mm_fmt(
                &col(rs, |r| (r.cpu.vcpu_sys_ms + r.cpu.vcpu_guest_ms) / 1000.0),
                1
            ),
        );
    }
    println!(
        "VMM CPU = utime+stime of the non-vCPU threads (sampled from /proc every {} ms; the last \
         sample before exit may miss a few ms); vcpu user-guest = vCPU threads' user time minus \
         guest time (exit handling in user space); RSS beyond guest = wait4 peak RSS minus the Rss \
         of the guest RAM mapping in smaps; vcpu sys+guest = vCPU threads' system and guest time \
         (the guest's own work, emulated kernel included).",
        SLOW_SAMPLE.as_millis()
    );
    if Path::new("/sys/module/kvm_pvm").exists() {
        println!(
            "PVM host: the emulated guest kernel time is accounted to the vCPU threads' system \
             time, so wall times mostly measure the emulator."
        );
    }

    println!();
    let ran: Vec<String> = results
        .iter()
        .filter(|(_, rs, _)| !rs.is_empty())
        .map(|(s, rs, _)| format!("{} ({} run(s))", s.name(), rs.len()))
        .collect();
    println!(
        "ran: {}",
        if ran.is_empty() {
            "nothing".into()
        } else {
            ran.join(", ")
        }
    );
    let failed: Vec<&String> = results.iter().flat_map(|(_, _, f)| f).collect();
    if failed.is_empty() {
        println!("failed: none");
    } else {
        println!("failed:");
        for f in failed {
            println!("  {f}");
        }
    }
}

/// The uncompressed initramfs: gunzip in the guest costs about a minute on a PVM host.
fn initramfs(guest_dir: &Path) -> Result<PathBuf, String> {
    let plain = guest_dir.join("initramfs.cpio");
    if plain.exists() {
        return Ok(plain);
    }
    let out_dir = workspace_root().join("target/chapeau-tests");
    let out = out_dir.join("initramfs.cpio");
    if out.exists() {
        return Ok(out);
    }
    let gz = guest_dir.join("initramfs.cpio.gz");
    if !gz.exists() {
        return Err(format!(
            "neither {} nor {} exists (set --guest-dir or CHAPEAU_GUEST_DIR)",
            plain.display(),
            gz.display()
        ));
    }
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let data = Command::new("gzip")
        .arg("-dc")
        .arg(&gz)
        .output()
        .map_err(|e| format!("cannot run gzip: {e}"))?;
    if !data.status.success() {
        return Err(format!("gzip -dc {} failed: {}", gz.display(), data.status));
    }
    // Written under a private name and renamed, so a concurrent reader never sees half a file.
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &data.stdout)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &out).map_err(|e| format!("cannot rename to {}: {e}", out.display()))?;
    println!("gunzipped {} into {}", gz.display(), out.display());
    Ok(out)
}

/// chapeau next to this binary (same profile), building it if it is missing.
fn chapeau_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CHAPEAU_BIN") {
        return Ok(PathBuf::from(path));
    }
    let bin = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("chapeau")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| workspace_root().join("target/release/chapeau"));
    if bin.exists() {
        return Ok(bin);
    }
    println!(
        "{} is missing: building it with cargo build --release -p vmm",
        bin.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "vmm"])
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() || !bin.exists() {
        return Err(format!(
            "cargo build --release -p vmm failed ({status}); {} still missing",
            bin.display()
        ));
    }
    Ok(bin)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn prepare(opts: &Options) -> Result<Setup, String> {
    let kernel = opts.guest_dir.join("vmlinux");
    if !kernel.exists() {
        return Err(format!(
            "{} is missing (set --guest-dir or CHAPEAU_GUEST_DIR)",
            kernel.display()
        ));
    }
    let initramfs = initramfs(&opts.guest_dir)?;
    let chapeau = if opts.systems.contains(&System::Chapeau) {
        chapeau_binary()?
    } else {
        PathBuf::new()
    };
    let pvm_host = Path::new("/sys/module/kvm_pvm").exists();
    let qemu_append = if pvm_host {
        let params = match std::fs::read_to_string(opts.guest_dir.join("pvm-cmdline")) {
            Ok(text) if !text.trim().is_empty() => {
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            }
            _ => DEFAULT_PVM_PARAMS.to_string(),
        };
        format!("{CMDLINE} {params}")
    } else {
        CMDLINE.to_string()
    };
    Ok(Setup {
        chapeau,
        qemu: find_in_path("qemu-system-x86_64"),
        kernel,
        initramfs,
        pvm_host,
        qemu_append,
    })
}

fn qemu_version(qemu: &Path) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown version".into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let opts = match parse_args(&args) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("bench: {e}");
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let setup = match prepare(&opts) {
        Ok(setup) => setup,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    };

    println!(
        "boot benchmark: {} run(s), {} vCPU(s), {} MiB, timeout {} s, host {}",
        opts.runs,
        opts.cpus,
        opts.memory_mib,
        opts.timeout.as_secs(),
        if setup.pvm_host { "PVM" } else { "KVM" }
    );
    println!("kernel {}", setup.kernel.display());
    println!("initramfs {}", setup.initramfs.display());
    println!("cmdline (chapeau adds its own PVM params) {CMDLINE}");
    if opts.systems.iter().any(|s| *s != System::Chapeau) {
        match &setup.qemu {
            Some(q) => println!("qemu {} ({})", q.display(), qemu_version(q)),
            None => println!("qemu-system-x86_64 not found: QEMU runs will fail"),
        }
        println!("qemu -append {}", setup.qemu_append);
    }
    if opts.systems.contains(&System::Chapeau) {
        println!("chapeau {}", setup.chapeau.display());
    }
    println!();

    let mut results: Vec<(System, Vec<RunResult>, Vec<String>)> = opts
        .systems
        .iter()
        .map(|s| (*s, Vec::new(), Vec::new()))
        .collect();
    // Systems alternate within each run, so load drifts on a shared machine hit all alike.
    for run in 1..=opts.runs {
        for (sys, ok, failed) in results.iter_mut() {
            match run_once(*sys, &setup, &opts) {
                Ok(r) => {
                    println!("{}", run_line(*sys, run, opts.runs, &r));
                    ok.push(r);
                }
                Err(e) => {
                    let msg = format!("{} run {run}/{}: {e}", sys.name(), opts.runs);
                    println!("{msg}  FAILED");
                    failed.push(msg);
                }
            }
        }
    }

    print_summary(&opts, &results);
    let chapeau_failed = results
        .iter()
        .any(|(s, _, f)| *s == System::Chapeau && !f.is_empty());
    if chapeau_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[14 - 3] = "7".into();
        fields[15 - 3] = "9".into();
        fields[43 - 3] = "5".into();
        let stat = format!("123 (a) b (c)) {}", fields.join(" "));
        assert_eq!(parse_stat(&stat), Some((7, 9, 5)));
    }

    #[test]
    fn smaps_guest_mapping() {
        let smaps = "\
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 \nSize:             131072 kB\nRss:               40960 kB\n\
55d000000000-55d000100000 r-xp 00000000 08:01 123  /usr/bin/chapeau\nSize:               1024 kB\nRss:                 800 kB\n\
7f1000000000-7f1000021000 rw-p 00000000 00:00 0 \nSize:                132 kB\nRss:                  12 kB\n";
        assert_eq!(parse_smaps(smaps, 131072), (Some(40960), 41772));
    }

    #[test]
    fn args() {
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse_args(&a("boot --runs 2 --cpus=2 --systems qemu-pc,chapeau")).unwrap();
        assert_eq!((o.runs, o.cpus), (2, 2));
        assert_eq!(o.systems, vec![System::QemuPc, System::Chapeau]);
        assert!(parse_args(&a("boot --runs 0")).is_err());
        assert!(parse_args(&a("boot --systems xen")).is_err());
        assert!(parse_args(&a("bench")).is_err());
        assert!(parse_args(&a("boot --memory")).is_err());
    }
}
