//! `bench boot`: wall time to `GUEST_BOOT_OK` and to exit, peak RSS and the VMM's own costs,
//! chapeau beside QEMU `-M microvm` and `-M pc`, run by run.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 test=poweroff";

pub(crate) const KVM_RUN_MARKER: &str = "first KVM_RUN at monotonic ";

/// /proc is sampled densely while the VMM sets up (threads may be short-lived then), sparsely
/// afterwards so the sampling does not steal much CPU from the guest on a shared machine.
const FAST_SAMPLE: Duration = Duration::from_millis(10);
const FAST_PERIOD: Duration = Duration::from_secs(1);
const SLOW_SAMPLE: Duration = Duration::from_millis(50);

struct Options {
    runs: usize,
    cpus: u32,
    memory_mib: u64,
    systems: Vec<System>,
    guest_dir: PathBuf,
    timeout: Duration,
    /// Rounds of the start-up figures (chapeau and Firecracker, killed at their first KVM_RUN).
    startup_runs: usize,
    /// Only the start-up figures, no full boots (minutes each on a PVM host).
    startup_only: bool,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut opts = Options {
        runs: 3,
        cpus: 1,
        memory_mib: 128,
        // Firecracker only where it was built (it is not packaged).
        systems: System::ALL
            .into_iter()
            .filter(|s| *s != System::Firecracker || firecracker_available())
            .collect(),
        guest_dir: default_guest_dir(),
        timeout: Duration::from_secs(400),
        startup_runs: 5,
        startup_only: false,
    };
    parse_flags(args, |flag, value| {
        match flag {
            "--runs" => opts.runs = parse_positive(flag, &value()?)?,
            "--cpus" => opts.cpus = parse_positive(flag, &value()?)?,
            "--memory" => opts.memory_mib = parse_positive(flag, &value()?)?,
            "--timeout" => opts.timeout = Duration::from_secs(parse_positive(flag, &value()?)?),
            "--guest-dir" => opts.guest_dir = PathBuf::from(value()?),
            "--systems" => opts.systems = parse_systems(&value()?, &System::ALL)?,
            "--startup-runs" => opts.startup_runs = parse_positive(flag, &value()?)?,
            "--startup-only" => opts.startup_only = true,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(opts)
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
fn run_once(sys: System, setup: &Setup, opts: &Options) -> Result<RunResult, String> {
    let mut cmd = command_for(sys, setup, opts.cpus, opts.memory_mib)?;
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

pub(crate) fn run(args: &[String]) -> Result<(), Failure> {
    let opts = parse_args(args).map_err(Failure::Usage)?;
    let setup = prepare(&opts.guest_dir, &opts.systems, CMDLINE, "microvm")?;

    println!(
        "boot benchmark: {} run(s), {} vCPU(s), {} MiB, timeout {} s, host {}",
        opts.runs,
        opts.cpus,
        opts.memory_mib,
        opts.timeout.as_secs(),
        if setup.pvm_host { "PVM" } else { "KVM" }
    );
    print_setup(&setup, &opts.systems);

    // First, while the machine is as idle as it gets: milliseconds, not minutes.
    if opts.systems.iter().any(|s| startup::SYSTEMS.contains(s)) {
        match startup::measure(
            &opts.systems,
            &setup,
            opts.cpus,
            opts.memory_mib,
            opts.startup_runs,
        ) {
            Ok(startup) => startup::print_summary(&startup, opts.startup_runs),
            Err(e) => println!("start-up figures skipped: {e}"),
        }
        println!();
    }
    if opts.startup_only {
        return Ok(());
    }

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
        return Err(Failure::Run("chapeau failed at least one run".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse_args(&a("--runs 2 --cpus=2 --systems qemu-pc,chapeau")).unwrap();
        assert_eq!((o.runs, o.cpus), (2, 2));
        assert_eq!(o.systems, vec![System::QemuPc, System::Chapeau]);
        assert!(parse_args(&a("--runs 0")).is_err());
        assert!(parse_args(&a("--systems xen")).is_err());
        assert!(parse_args(&a("bench")).is_err());
        assert!(parse_args(&a("--memory")).is_err());
        let o = parse_args(&a("--startup-only --startup-runs 7")).unwrap();
        assert!(o.startup_only);
        assert_eq!(o.startup_runs, 7);
    }
}
