//! Benchmarks for chapeau, each a subcommand:
//!
//! - `bench boot` boots the test guest (`test=poweroff`) with chapeau, QEMU `-M microvm` and QEMU
//!   `-M pc`, run by run, and reports wall time to `GUEST_BOOT_OK` and to exit, peak RSS, and the
//!   VMM's own costs (DESIGN.md section 8): exec to first KVM_RUN, CPU time outside the guest, RSS
//!   beyond the guest memory it touched. Before that, start-up figures of chapeau beside
//!   Firecracker (API socket, InstanceStart and command-line start to the first KVM_RUN; see
//!   `startup.rs`).
//! - `bench datapath` drives the real virtio-console (one named port) and virtio-rng in-process
//!   from a fake driver on the host: MB/s and device-thread CPU time per MiB. No guest, no KVM:
//!   the number that tracks our datapath from commit to commit.
//! - `bench kata` runs the command line Kata ran under chapeau (as `qemu-system-x86_64`) and
//!   under QEMU: time to the daemon being ready and to the agent port answering, RSS and CPU.
//! - `bench net` drives the real virtio-net in-process between a fake driver and a tap in a
//!   private network namespace: frames/s, MB/s and queue-thread CPU per MiB each way.
//! - `bench net-guest` runs TCP through the test guest's virtio-net under chapeau and QEMU
//!   (virtio-net-pci, vhost off) on taps in a private namespace: MB/s each way, round-trip
//!   latency and VMM CPU time, with chapeau/QEMU ratios.
//! - `bench p9` drives the real virtio-9p device in-process from a fake driver: sequential
//!   write and read MB/s and small files created, stat'ed and unlinked per second.
//! - `bench p9-guest` has the test guest do the same on a 9p mount (as Kata mounts it) under
//!   chapeau and QEMU (virtio-9p-pci, `-fsdev local`), on the same directory, with ratios.
//! - `bench port` boots the guest with `test=echo-port` under chapeau and QEMU (virtio-serial),
//!   pushes N MiB through the named port `agent.channel.0` and back, and reports round-trip MB/s,
//!   VMM CPU time during the transfer, and the PCI configuration space accesses of each boot.
//!
//! Where guest kernel mode is emulated (PVM hosts) guest-driven wall times mostly measure the
//! emulator; the VMM's own figures and `datapath` are the honest comparisons. How to run them:
//! tests/README.md.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread::JoinHandle;

mod boot;
mod datapath;
mod guest;
mod kata;
mod net;
mod net_guest;
mod p9;
mod p9_guest;
mod pmem;
mod port;
mod startup;

const USAGE: &str = "usage: bench boot [--runs N] [--cpus N] [--memory MIB] \
[--systems chapeau,qemu-microvm,qemu-pc,firecracker] [--guest-dir DIR] [--timeout S]
                  [--startup-runs N] [--startup-only]
       bench datapath [--mib N] [--runs N]
       bench kata [--runs N] [--systems chapeau,qemu-pc] [--guest-dir DIR] [--timeout S]
       bench net [--mib N] [--runs N]
       bench net-guest [--mib N] [--round-trips N] [--systems chapeau,qemu-microvm] [--guest-dir DIR] [--timeout S]
       bench p9 [--mib N] [--files N] [--depth N] [--pages] [--plain]
       bench p9-guest [--mib N] [--files N] [--kvm-events] [--systems chapeau,qemu-microvm] [--guest-dir DIR] [--timeout S]
       bench port [--mib N] [--systems chapeau,qemu-microvm] [--guest-dir DIR] [--timeout S]
       bench pmem [--image-mib N] [--data-mib N] [--systems chapeau,qemu-pc] [--guest-dir DIR] [--timeout S]";

/// What QEMU needs appended on a PVM host when the guest dir has no `pvm-cmdline` (chapeau adds
/// its own set).
const DEFAULT_PVM_PARAMS: &str = "noxsave clearcpuid=cx16,rdtscp,rdpid,popcnt,smap,clwb,fsgsbase,\
pcid,invpcid,erms,fsrm pvm_syscall rcupdate.rcu_cpu_stall_suppress=1 noreplace-smp nowatchdog \
tsc=reliable";

const BOOT_MARKER: &str = "GUEST_BOOT_OK";

/// Output lines kept per stream to explain a failure.
const TAIL_LINES: usize = 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Chapeau,
    QemuMicrovm,
    QemuPc,
    Firecracker,
}

impl System {
    const ALL: [System; 4] = [
        System::Chapeau,
        System::QemuMicrovm,
        System::QemuPc,
        System::Firecracker,
    ];

    fn name(self) -> &'static str {
        match self {
            System::Chapeau => "chapeau",
            System::QemuMicrovm => "qemu-microvm",
            System::QemuPc => "qemu-pc",
            System::Firecracker => "firecracker",
        }
    }

    fn parse(s: &str) -> Option<System> {
        System::ALL.into_iter().find(|sys| sys.name() == s)
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Walks `--flag value` and `--flag=value` arguments. `apply(flag, value)` fetches the flag's
/// value by calling `value()` and returns whether it knew the flag.
type FlagValue<'a> = &'a mut dyn FnMut() -> Result<String, String>;

fn parse_flags(
    args: &[String],
    mut apply: impl FnMut(&str, FlagValue) -> Result<bool, String>,
) -> Result<(), String> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
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
        if !apply(flag, &mut value)? {
            return Err(format!("unknown argument {arg:?}"));
        }
    }
    Ok(())
}

/// A `--systems` list: known names, no repeats, not empty.
fn parse_systems(list: &str, allowed: &[System]) -> Result<Vec<System>, String> {
    let mut systems = Vec::new();
    for name in list.split(',').filter(|s| !s.is_empty()) {
        let sys = System::parse(name)
            .filter(|s| allowed.contains(s))
            .ok_or_else(|| format!("unknown system {name:?} in --systems"))?;
        if !systems.contains(&sys) {
            systems.push(sys);
        }
    }
    if systems.is_empty() {
        return Err("--systems is empty".into());
    }
    Ok(systems)
}

/// The flags of the benchmarks that boot the guest under chapeau and one QEMU: `--systems`
/// (of those two), `--guest-dir` and `--timeout` (seconds a boot may take).
struct GuestFlags {
    systems: Vec<System>,
    /// The QEMU machine that may run beside chapeau.
    peer: System,
    guest_dir: PathBuf,
    timeout: std::time::Duration,
}

impl GuestFlags {
    /// chapeau and `qemu`, the tests' guest, 900 s.
    fn new(qemu: System) -> Self {
        GuestFlags {
            systems: vec![System::Chapeau, qemu],
            peer: qemu,
            guest_dir: default_guest_dir(),
            timeout: std::time::Duration::from_secs(900),
        }
    }

    /// Takes `flag` if it is one of these; whether it was.
    fn apply(&mut self, flag: &str, value: FlagValue) -> Result<bool, String> {
        match flag {
            "--timeout" => {
                self.timeout = std::time::Duration::from_secs(parse_positive(flag, &value()?)?)
            }
            "--guest-dir" => self.guest_dir = PathBuf::from(value()?),
            "--systems" => self.systems = parse_systems(&value()?, &[System::Chapeau, self.peer])?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// `--guest-dir`'s default: the integration tests' guest (CHAPEAU_GUEST_DIR, else our own
/// build in target/guest, else the shared guest).
fn default_guest_dir() -> PathBuf {
    ::tests::guest_dir()
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
    // chapeau names them vcpuN; QEMU (with debug-threads=on) "CPU N/KVM"; Firecracker "fc_vcpu N".
    comm.starts_with("vcpu")
        || comm.starts_with("fc_vcpu")
        || (comm.starts_with("CPU ") && comm.ends_with("/KVM"))
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

/// How much larger than the guest's RAM its mapping may be.
const GUEST_MAPPING_SLACK_KIB: u64 = 1024;

/// One mapping of /proc/<pid>/smaps.
struct Mapping {
    start: u64,
    end: u64,
    writable_private: bool,
    anonymous: bool,
    rss_kib: u64,
}

/// From /proc/<pid>/smaps: (Rss of the guest RAM, Rss of all mappings). The guest RAM is a run
/// of adjacent private read-write mappings the size of the guest memory, starting with an
/// anonymous one: anonymous throughout, or with the kernel and initrd mapped from their files
/// over parts of it (chapeau does). Where several runs match (a coincidence with some other
/// allocation next to it) the one holding most memory is the guest's.
fn parse_smaps(smaps: &str, guest_kib: u64) -> (Option<u64>, u64) {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let (start, end) = first.split_once('-').unwrap_or(("0", "0"));
            let address = |hex: &str| u64::from_str_radix(hex, 16).unwrap_or(0);
            let perms = words.next().unwrap_or("");
            mappings.push(Mapping {
                start: address(start),
                end: address(end),
                writable_private: perms.starts_with("rw") && perms.ends_with('p'),
                anonymous: words.nth(3).is_none(),
                rss_kib: 0,
            });
        } else if first == "Rss:" {
            if let Some(mapping) = mappings.last_mut() {
                mapping.rss_kib = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            }
        }
    }
    let total = mappings.iter().map(|m| m.rss_kib).sum();
    // chapeau maps a little more than the guest's RAM when it is large (2 GiB: 260 KiB).
    let (least, most) = (guest_kib << 10, (guest_kib + GUEST_MAPPING_SLACK_KIB) << 10);
    let mut guest: Option<u64> = None;
    for (first, head) in mappings.iter().enumerate() {
        if !(head.writable_private && head.anonymous) {
            continue;
        }
        let (mut end, mut rss) = (head.start, 0);
        for piece in &mappings[first..] {
            if piece.start != end || !piece.writable_private || piece.end - head.start > most {
                break;
            }
            end = piece.end;
            rss += piece.rss_kib;
        }
        if end - head.start >= least {
            guest = Some(guest.map_or(rss, |g| g.max(rss)));
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
    /// The kernel command line chapeau gets (it appends its own PVM parameters).
    cmdline: String,
    qemu_append: String,
    /// `-M` for QemuMicrovm.
    microvm_machine: String,
    /// Built from source outside the repo: `FIRECRACKER` or `firecracker` on PATH.
    firecracker: Option<PathBuf>,
}

fn firecracker_available() -> bool {
    std::env::var_os("FIRECRACKER").is_some() || find_in_path("firecracker").is_some()
}

/// Firecracker ends when the guest resets (i8042), not on ACPI power-off, so its guest is told
/// to reboot instead of powering off.
fn firecracker_boot_args(setup: &Setup) -> String {
    setup.qemu_append.replace("test=poweroff", "test=reboot")
}

fn firecracker_config_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "chapeau-bench-firecracker-{}.json",
        std::process::id()
    ))
}

/// Firecracker's boot without its API socket: a config file in the same JSON its API takes.
/// Firecracker ends when the guest resets (i8042), not on ACPI power-off, so its guest is told
/// to reboot instead of powering off.
fn firecracker_command(setup: &Setup, cpus: &str, memory: &str) -> Result<Command, String> {
    let firecracker = setup.firecracker.as_ref().ok_or(
        "firecracker not found: build it from source and set FIRECRACKER=PATH or put it on PATH",
    )?;
    let boot_args = firecracker_boot_args(setup);
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": setup.kernel,
            "initrd_path": setup.initramfs,
            "boot_args": boot_args,
        },
        "drives": [],
        "machine-config": {
            "vcpu_count": cpus.parse::<u32>().map_err(|e| e.to_string())?,
            "mem_size_mib": memory.parse::<u64>().map_err(|e| e.to_string())?,
        },
    });
    // One file per bench process, rewritten for each run (runs are sequential) and removed
    // when the bench ends; created afresh, so a planted symlink is not followed.
    let path = firecracker_config_path();
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, config.to_string().as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cmd = Command::new(firecracker);
    cmd.args(["--no-api", "--level", "Warning", "--config-file"])
        .arg(&path);
    Ok(cmd)
}

/// The VM of `sys`, without any device beyond the serial console.
fn command_for(sys: System, setup: &Setup, cpus: u32, memory_mib: u64) -> Result<Command, String> {
    let memory = memory_mib.to_string();
    let cpus = cpus.to_string();
    match sys {
        System::Chapeau => {
            let mut cmd = Command::new(&setup.chapeau);
            cmd.arg("--kernel")
                .arg(&setup.kernel)
                .arg("--initrd")
                .arg(&setup.initramfs)
                .args([
                    "--cmdline",
                    &setup.cmdline,
                    "--cpus",
                    &cpus,
                    "--memory",
                    &memory,
                ])
                // info level: the first-KVM_RUN timestamp.
                .args(["--log-level", "info"]);
            Ok(cmd)
        }
        System::Firecracker => firecracker_command(setup, &cpus, &memory),
        System::QemuMicrovm | System::QemuPc => {
            let qemu = setup
                .qemu
                .as_ref()
                .ok_or("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")?;
            let machine = if sys == System::QemuMicrovm {
                setup.microvm_machine.as_str()
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

/// `program arg arg ...`, as printed before a run.
fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn last_line(tail: &[String]) -> String {
    tail.last()
        .map(|l| l.chars().take(160).collect())
        .unwrap_or_else(|| "(none)".into())
}
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn opt_fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
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
        .unwrap_or_else(|| {
            workspace_root().join("target/x86_64-unknown-linux-gnu/release/chapeau")
        });
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

/// Runs a build tool to its end; its stderr says why when it fails.
fn run_tool(cmd: &mut Command) -> Result<(), String> {
    let program = cmd.get_program().to_string_lossy().to_string();
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// On a PVM host, the kernel parameters QEMU's guest needs (chapeau adds its own): the guest
/// dir's `pvm-cmdline`, else our default set.
fn pvm_params(guest_dir: &Path) -> Option<String> {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        return None;
    }
    Some(
        match std::fs::read_to_string(guest_dir.join("pvm-cmdline")) {
            Ok(text) if !text.trim().is_empty() => {
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            }
            _ => DEFAULT_PVM_PARAMS.to_string(),
        },
    )
}

/// Finds the guest, chapeau (when `systems` has it) and QEMU; `cmdline` is the guest's kernel
/// command line before any PVM parameters.
fn prepare(
    guest_dir: &Path,
    systems: &[System],
    cmdline: &str,
    microvm_machine: &str,
) -> Result<Setup, String> {
    let kernel = guest_dir.join("vmlinux");
    if !kernel.exists() {
        return Err(format!(
            "{} is missing (set --guest-dir or CHAPEAU_GUEST_DIR)",
            kernel.display()
        ));
    }
    let initramfs = initramfs(guest_dir)?;
    let chapeau = if systems.contains(&System::Chapeau) {
        chapeau_binary()?
    } else {
        PathBuf::new()
    };
    let pvm = pvm_params(guest_dir);
    let pvm_host = pvm.is_some();
    let qemu_append = match pvm {
        Some(params) => format!("{cmdline} {params}"),
        None => cmdline.to_string(),
    };
    Ok(Setup {
        chapeau,
        qemu: find_in_path("qemu-system-x86_64"),
        kernel,
        initramfs,
        pvm_host,
        cmdline: cmdline.to_string(),
        qemu_append,
        microvm_machine: microvm_machine.to_string(),
        firecracker: std::env::var_os("FIRECRACKER")
            .map(PathBuf::from)
            .or_else(|| find_in_path("firecracker")),
    })
}

/// What a benchmark runs, printed before it starts.
fn print_setup(setup: &Setup, systems: &[System]) {
    println!("kernel {}", setup.kernel.display());
    println!("initramfs {}", setup.initramfs.display());
    println!(
        "cmdline (chapeau adds its own PVM params) {}",
        setup.cmdline
    );
    if systems.iter().any(|s| *s != System::Chapeau) {
        match &setup.qemu {
            Some(q) => println!("qemu {} ({})", q.display(), qemu_version(q)),
            None => println!("qemu-system-x86_64 not found: QEMU runs will fail"),
        }
        println!("qemu -append {}", setup.qemu_append);
    }
    if systems.contains(&System::Chapeau) {
        println!("chapeau {}", setup.chapeau.display());
    }
    println!();
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
    let (name, rest) = match args.split_first() {
        Some((name, rest)) => (name.as_str(), rest),
        None => ("", &[][..]),
    };
    let result = match name {
        "boot" => boot::run(rest),
        "datapath" => datapath::run(rest),
        "kata" => kata::run(rest),
        "net" => net::run(rest),
        "net-guest" => net_guest::run(rest),
        "p9" => p9::run(rest),
        "p9-guest" => p9_guest::run(rest),
        "port" => port::run(rest),
        "pmem" => pmem::run(rest),
        "" => Err(Failure::Usage("missing benchmark name".into())),
        other => Err(Failure::Usage(format!("unknown benchmark {other:?}"))),
    };
    let _ = std::fs::remove_file(firecracker_config_path());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("bench: {e}");
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why a benchmark stopped: bad arguments (exit 2, with the usage) or a failed run (exit 1).
enum Failure {
    Usage(String),
    Run(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Run(e)
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
    fn smaps_guest_mapping_with_the_kernel_mapped_over_it() {
        // 128 MiB of guest RAM: anonymous, then the kernel's segment from its file, then
        // anonymous again; a thread's stack right below it.
        let smaps = "\
7eff00000000-7eff00200000 rw-p 00000000 00:00 0 \nSize:               2048 kB\nRss:                  16 kB\n\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \nSize:               1024 kB\nRss:                 100 kB\n\
7f0000100000-7f0000300000 rw-p 00000000 08:01 77  /k/vmlinux\nSize:               2048 kB\nRss:                2048 kB\n\
7f0000300000-7f0008000000 rw-p 00000000 00:00 0 \nSize:             128000 kB\nRss:               30000 kB\n\
55d000000000-55d000100000 r-xp 00000000 08:01 123  /usr/bin/chapeau\nSize:               1024 kB\nRss:                 800 kB\n";
        assert_eq!(parse_smaps(smaps, 131072), (Some(32148), 32964));
    }
}
