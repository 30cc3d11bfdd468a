//! `bench kata`: the command line Kata ran (`../shared/reference/`, with the bench's paths,
//! see `tests::kata`) under chapeau, started as `qemu-system-x86_64` through a symlink, and
//! under QEMU, both with `-daemonize` as Kata runs them, one after the other, `--runs` rounds.
//! Per run: exec to the daemon's parent exiting (sockets listening, VM built), exec to the agent
//! port answering (the guest's init brings up the network and writes over 9p first:
//! `test=kata`), the VMM's RSS then (whole, and beyond the guest RAM the guest touched) and
//! the CPU time of its own threads beside its vCPU threads'. Then `quit` over QMP.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::tests::kata::{open_tap, pass_fd, reference_args, KataPaths, TAP_FD};
use ::tests::netns::Netns;

use super::{
    clock_ticks_per_sec, kib_field, mm_fmt, parse_flags, parse_positive, pvm_params, spawn_reader,
    workspace_root, CpuFigures, Failure, GuestFlags, ProcStats, System,
};

/// Kata's `-m 2048M`: the size of the guest RAM mapping to find in smaps.
const GUEST_RAM_KIB: u64 = 2048 * 1024;
const AGENT_PING: &[u8] = b"kata-bench-ping\n";

struct Options {
    runs: usize,
    guest: GuestFlags,
}

struct KataRun {
    daemon_ready_ms: f64,
    agent_s: f64,
    rss_kib: u64,
    /// Beyond the guest RAM mapping (the NVDIMM image's touched pages count here).
    own_rss_kib: Option<u64>,
    cpu: CpuFigures,
}

pub(crate) fn run(args: &[String]) -> Result<(), Failure> {
    let mut opts = Options {
        runs: 1,
        guest: GuestFlags::new(System::QemuPc),
    };
    parse_flags(args, |flag, value| match flag {
        "--runs" => {
            opts.runs = parse_positive(flag, &value()?)?;
            Ok(true)
        }
        _ => opts.guest.apply(flag, value),
    })
    .map_err(Failure::Usage)?;
    let chapeau = super::chapeau_binary()?;
    let qemu = super::find_in_path("qemu-system-x86_64");
    let pvm = pvm_params(&opts.guest.guest_dir);
    println!(
        "kata benchmark: Kata's QEMU command line (2048 MiB, 1 vCPU, NVDIMM rootfs, \
         virtio-serial, 9p, net on a tap, rng), {} run(s), host {}",
        opts.runs,
        if pvm.is_some() { "PVM" } else { "KVM" }
    );
    println!("chapeau {}", chapeau.display());
    match &qemu {
        Some(q) => println!("qemu {} ({})", q.display(), super::qemu_version(q)),
        None => println!("qemu-system-x86_64 not found: its runs will fail"),
    }
    let mut results: Vec<(System, Vec<KataRun>)> = opts
        .guest
        .systems
        .iter()
        .map(|s| (*s, Vec::new()))
        .collect();
    let mut failed = Vec::new();
    for round in 0..opts.runs {
        for (sys, runs) in &mut results {
            let binary = match sys {
                System::Chapeau => Some(chapeau.as_path()),
                _ => qemu.as_deref(),
            };
            let outcome = binary
                .ok_or_else(|| "qemu-system-x86_64 not found".to_string())
                .and_then(|binary| run_once(*sys, binary, pvm.as_deref(), &opts));
            match outcome {
                Ok(r) => {
                    println!(
                        "round {round} {}: daemon ready {:.0} ms, agent answers {:.1} s",
                        sys.name(),
                        r.daemon_ready_ms,
                        r.agent_s
                    );
                    runs.push(r);
                }
                Err(e) => {
                    println!("round {round} {}: FAILED: {e}", sys.name());
                    failed.push(format!("{}: {e}", sys.name()));
                }
            }
        }
    }
    print_table(&results);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Run(failed.join("; ")))
    }
}

fn print_table(results: &[(System, Vec<KataRun>)]) {
    type Figure = fn(&KataRun) -> Option<f64>;
    let rows: [(&str, Figure, usize); 6] = [
        ("exec -> daemon ready, ms", |r| Some(r.daemon_ready_ms), 0),
        ("exec -> agent port answers, s", |r| Some(r.agent_s), 1),
        ("RSS then, MiB", |r| Some(r.rss_kib as f64 / 1024.0), 1),
        (
            "  beyond guest RAM, MiB",
            |r| r.own_rss_kib.map(|k| k as f64 / 1024.0),
            1,
        ),
        (
            "VMM threads' CPU, ms",
            |r| Some(r.cpu.vmm_run_ms.unwrap_or(r.cpu.vmm_cpu_ms)),
            0,
        ),
        (
            "vCPU threads' CPU, s",
            |r| Some((r.cpu.vcpu_user_ms + r.cpu.vcpu_sys_ms + r.cpu.vcpu_guest_ms) / 1000.0),
            1,
        ),
    ];
    println!();
    print!("{:<32}", "min / median");
    for (sys, _) in results {
        print!("{:>20}", sys.name());
    }
    println!("{:>16}", "chapeau/qemu");
    for (label, figure, digits) in rows {
        print!("{label:<32}");
        let mut medians = Vec::new();
        for (_, runs) in results {
            let values: Vec<f64> = runs.iter().filter_map(figure).collect();
            print!("{:>20}", mm_fmt(&values, digits));
            medians.push(super::median(&values));
        }
        match medians.as_slice() {
            [Some(ours), Some(theirs)] if *theirs > 0.0 => println!("{:>16.2}", ours / theirs),
            _ => println!(),
        }
    }
    println!(
        "RSS and CPU are read from /proc when the agent port first answers; VMM threads = every \
         thread but the vCPUs (on-CPU time from schedstat), vCPU = the vCPU threads' user, \
         system and guest time (guest kernel emulation included on PVM hosts)."
    );
}

/// The daemon, killed if the run ends before it quit.
struct Daemon(u32);

impl Drop for Daemon {
    fn drop(&mut self) {
        if process_exists(self.0) {
            // SAFETY: kill(2) with a pid read from the pidfile we asked for; no memory effects.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
            wait_gone(self.0, Duration::from_secs(10));
        }
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_exists(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A scratch sandbox directory, removed with everything in it.
struct Sandbox(PathBuf);

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_once(
    sys: System,
    binary: &Path,
    pvm: Option<&str>,
    opts: &Options,
) -> Result<KataRun, String> {
    let sandbox = Sandbox(workspace_root().join(format!(
        "target/chapeau-bench/kata-{}-{}",
        sys.name(),
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&sandbox.0);
    std::fs::create_dir_all(sandbox.0.join("shared"))
        .map_err(|e| format!("{}: {e}", sandbox.0.display()))?;
    let kernel = opts.guest.guest_dir.join("vmlinux");
    let image = opts.guest.guest_dir.join("kata-rootfs.img");
    let mut args = reference_args(&KataPaths {
        sandbox: &sandbox.0,
        kernel: &kernel,
        image: &image,
    })
    .map_err(|e| e.to_string())?;
    let mut command = match sys {
        System::Chapeau => {
            // As Kata would run it: `path =` in its configuration names a qemu-system-x86_64.
            let link = sandbox.0.join("qemu-system-x86_64");
            std::os::unix::fs::symlink(binary, &link).map_err(|e| e.to_string())?;
            Command::new(link)
        }
        _ => {
            adapt_for_qemu(&mut args, pvm);
            Command::new(binary)
        }
    };
    command.args(&args);
    let ns = Netns::new(&format!("kata-{}", sys.name()), &[1]);
    let tap = open_tap(&ns);
    pass_fd(&mut command, tap.as_raw_fd(), TAP_FD);

    let started = Instant::now();
    let parent = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    let daemon_ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    drop(tap);
    if !parent.status.success() {
        return Err(format!(
            "the daemon's parent exited {}: {}{}",
            parent.status,
            String::from_utf8_lossy(&parent.stdout),
            String::from_utf8_lossy(&parent.stderr)
        ));
    }
    let pid: u32 = std::fs::read_to_string(sandbox.0.join("pid"))
        .map_err(|e| format!("pidfile: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("pidfile: {e}"))?;
    let daemon = Daemon(pid);

    let stats = Arc::new(Mutex::new(ProcStats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stats, stop) = (stats.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = stats.lock() {
                    s.sample(pid, GUEST_RAM_KIB);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let console = UnixStream::connect(sandbox.0.join("console.sock"))
        .map_err(|e| format!("console socket: {e}"))?;
    let console_tail = spawn_reader(console, |_| {});

    let answered = agent_answer(&sandbox.0.join("kata.sock"), opts.guest.timeout);
    let agent_s = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let mut stats = Arc::try_unwrap(stats)
        .map_err(|_| "the sampler still holds the figures".to_string())?
        .into_inner()
        .map_err(|_| "the sampler panicked".to_string())?;
    // The figures at the answer, whatever the sampler's last tick saw.
    stats.sample(pid, GUEST_RAM_KIB);
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| kib_field(&status, "VmRSS:"))
        .unwrap_or(stats.vm_rss_max_kib);
    if let Err(e) = answered {
        drop(daemon);
        let tail = console_tail.join().unwrap_or_default();
        return Err(format!("{e}; console ends with: {}", tail.join(" | ")));
    }
    quit(&sandbox.0.join("qmp.sock"))?;
    if !wait_gone(pid, Duration::from_secs(30)) {
        return Err("still running 30 s after quit".into());
    }
    for leftover in ["qmp.sock", "console.sock", "kata.sock", "pid"] {
        if sys == System::Chapeau && sandbox.0.join(leftover).exists() {
            return Err(format!("{leftover} left behind after quit"));
        }
    }
    Ok(KataRun {
        daemon_ready_ms,
        agent_s,
        rss_kib,
        own_rss_kib: stats.own_rss_max_kib,
        cpu: stats.cpu_figures(clock_ticks_per_sec()),
    })
}

/// What QEMU needs on this host that chapeau works out itself: on PVM, a CPU model without
/// ARCH_CAPABILITIES and the guest parameters; named threads to tell the vCPUs apart.
fn adapt_for_qemu(args: &mut [String], pvm: Option<&str>) {
    let mut previous = String::new();
    for arg in args.iter_mut() {
        match previous.as_str() {
            "-cpu" if pvm.is_some() => *arg = arg.replacen("host", "host,-arch-capabilities", 1),
            // QEMU 7.2 no longer takes some of Kata's older spellings (chapeau takes both).
            "-global" => *arg = arg.replace("losttickpolicy", "lost_tick_policy"),
            "-machine" => {
                *arg = arg
                    .split(',')
                    .map(|p| match p {
                        "kernel_irqchip" | "nvdimm" => format!("{p}=on"),
                        _ => p.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            }
            "-append" => {
                if let Some(params) = pvm {
                    *arg = format!("{arg} {params}");
                }
            }
            "-name" => *arg = format!("{arg},debug-threads=on"),
            _ => {}
        }
        previous = arg.clone();
    }
}

/// Sends a line on the agent port and waits for its echo: the guest's agent side is up.
fn agent_answer(path: &Path, timeout: Duration) -> Result<(), String> {
    let mut port = UnixStream::connect(path).map_err(|e| format!("agent socket: {e}"))?;
    port.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    port.write_all(AGENT_PING)
        .map_err(|e| format!("agent socket: {e}"))?;
    let mut echoed = vec![0u8; AGENT_PING.len()];
    port.read_exact(&mut echoed)
        .map_err(|e| format!("no echo on the agent port within {timeout:?}: {e}"))?;
    if echoed != AGENT_PING {
        return Err(format!(
            "the agent port answered {:?}",
            String::from_utf8_lossy(&echoed)
        ));
    }
    Ok(())
}

/// `quit` over QMP, as Kata stops a sandbox.
fn quit(path: &Path) -> Result<(), String> {
    let stream = UnixStream::connect(path).map_err(|e| format!("QMP socket: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // The greeting, then one reply per command (events may come between: skip them).
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    for command in ["qmp_capabilities", "quit"] {
        writer
            .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
            .map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                // QEMU may close before answering quit.
                return Ok(());
            }
            if line.contains("\"return\"") {
                break;
            }
            if line.contains("\"error\"") {
                return Err(format!("QMP {command}: {}", line.trim()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_gets_the_pvm_cpu_and_parameters() {
        let mut args: Vec<String> = [
            "-name",
            "sb",
            "-machine",
            "pc,accel=kvm,kernel_irqchip,nvdimm",
            "-cpu",
            "host,pmu=off",
            "-global",
            "kvm-pit.losttickpolicy=discard",
            "-append",
            "quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        adapt_for_qemu(&mut args, Some("noxsave pvm_syscall"));
        assert_eq!(
            args,
            [
                "-name",
                "sb,debug-threads=on",
                "-machine",
                "pc,accel=kvm,kernel_irqchip=on,nvdimm=on",
                "-cpu",
                "host,-arch-capabilities,pmu=off",
                "-global",
                "kvm-pit.lost_tick_policy=discard",
                "-append",
                "quiet noxsave pvm_syscall"
            ]
        );
    }
}
