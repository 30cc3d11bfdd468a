//! `bench port`: bytes through a named virtio-console port, host→guest→host, chapeau beside
//! QEMU's virtio-serial on the same guest in the same run.
//!
//! The guest runs `test=echo-port` (its init echoes `/dev/virtio-ports/agent.channel.0` back
//! with `cat`). A host client sends N MiB while reading the echo and checks every byte. Also
//! reported: CPU time of the VMM's non-vCPU threads during the transfer, and the PCI
//! configuration space accesses of the boot (each one a vCPU exit): chapeau logs its count at
//! exit; QEMU's come from its trace events (see `qemu_pci_config_accesses`).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::datapath::Pattern;
use super::*;

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 test=echo-port";
const PORT_NAME: &str = "agent.channel.0";
/// init.sh prints this once the echo loop is about to start.
const ACTION_MARKER: &str = "GUEST_ACTION=echo-port";
const PCI_MARKER: &str = "PCI configuration space accesses (each a vCPU exit): ";
const MEMORY_MIB: u64 = 256;
/// How long the echo may make no progress before the run counts as failed.
const STALL: Duration = Duration::from_secs(120);
/// QEMU's memory region for the ECAM window of microvm's PCIe host (`-M microvm,pcie=on`).
const QEMU_ECAM_REGION: &str = "pcie-mmcfg-mmio";

struct Options {
    mib: u64,
    guest: GuestFlags,
}

struct PortResult {
    boot_s: f64,
    transfer_s: f64,
    bytes: u64,
    /// On-CPU time (schedstat) of the non-vCPU threads during the transfer.
    vmm_ms: f64,
    vcpu_ms: f64,
    /// PCI configuration space accesses, and how they were counted.
    pci: Option<u64>,
    pci_method: &'static str,
}

pub(crate) fn run(args: &[String]) -> Result<(), Failure> {
    let mut opts = Options {
        mib: 16,
        guest: GuestFlags::new(System::QemuMicrovm),
    };
    parse_flags(args, |flag, value| {
        match flag {
            "--mib" => opts.mib = parse_positive(flag, &value()?)?,
            _ => return opts.guest.apply(flag, value),
        }
        Ok(true)
    })
    .map_err(Failure::Usage)?;
    // microvm has PCI only with its PCIe host (GPEX, ECAM); chapeau's devices are on PCI too.
    let setup = prepare(
        &opts.guest.guest_dir,
        &opts.guest.systems,
        CMDLINE,
        "microvm,pcie=on",
    )?;

    println!(
        "port benchmark: {} MiB through {PORT_NAME} and back, 1 vCPU, {MEMORY_MIB} MiB, boot \
         timeout {} s, host {}",
        opts.mib,
        opts.guest.timeout.as_secs(),
        if setup.pvm_host { "PVM" } else { "KVM" }
    );
    print_setup(&setup, &opts.guest.systems);

    let mut results = Vec::new();
    for sys in &opts.guest.systems {
        match run_once(*sys, &setup, &opts) {
            Ok(r) => results.push((*sys, Ok(r))),
            Err(e) => {
                println!("{}: FAILED: {e}", sys.name());
                results.push((*sys, Err(e)));
            }
        }
    }

    println!();
    println!(
        "{:<13} {:>8} {:>6} {:>11} {:>8} {:>12} {:>14} {:>11} {:>12}",
        "system",
        "boot s",
        "MiB",
        "transfer s",
        "MB/s",
        "VMM CPU ms",
        "VMM CPU ms/MiB",
        "vCPU CPU s",
        "PCI cfg acc."
    );
    let mut failed = Vec::new();
    for (sys, r) in &results {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                println!("{:<13} FAILED", sys.name());
                failed.push(format!("{}: {e}", sys.name()));
                continue;
            }
        };
        let mibs = r.bytes as f64 / f64::from(1u32 << 20);
        println!(
            "{:<13} {:>8.1} {:>6.0} {:>11.2} {:>8.3} {:>12.1} {:>14.2} {:>11.1} {:>12}",
            sys.name(),
            r.boot_s,
            mibs,
            r.transfer_s,
            r.bytes as f64 / r.transfer_s / 1e6,
            r.vmm_ms,
            r.vmm_ms / mibs,
            r.vcpu_ms / 1000.0,
            r.pci.map_or_else(|| "n/a".into(), |n| n.to_string()),
        );
    }
    println!(
        "MB/s = 10^6 bytes/s of payload sent and echoed back (each byte crosses the port twice), \
         verified byte for byte; boot = start to {ACTION_MARKER}; VMM CPU = on-CPU time \
         (schedstat) of the non-vCPU threads during the transfer; vCPU CPU = the vCPU threads' \
         (guest, emulated kernel included)."
    );
    for (sys, r) in &results {
        if let Ok(r) = r {
            println!("PCI count, {}: {}", sys.name(), r.pci_method);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Run(failed.join("; ")))
    }
}

fn scratch_file(sys: System, what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "chapeau-bench-port-{}-{}.{what}",
        std::process::id(),
        sys.name()
    ))
}

enum Event {
    /// The echo loop is about to start, at this time.
    Ready(Instant),
    PciCount(u64),
}

/// The child, killed (SIGKILL) and reaped if the run fails early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn run_once(sys: System, setup: &Setup, opts: &Options) -> Result<PortResult, String> {
    let socket = scratch_file(sys, "sock");
    let trace = scratch_file(sys, "trace");
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&trace);
    let mut cmd = command_for(sys, setup, 1, MEMORY_MIB)?;
    let pci_method = match sys {
        System::Chapeau => {
            cmd.arg("--port")
                .arg(format!("name={PORT_NAME},socket={}", socket.display()));
            "chapeau's own count, logged at exit (config accesses happen during enumeration)"
        }
        _ => {
            cmd.args(["-device", "virtio-serial-pci,id=vs0"])
                .arg("-chardev")
                .arg(format!(
                    "socket,id=c0,path={},server=on,wait=off",
                    socket.display()
                ))
                .args([
                    "-device",
                    &format!("virtserialport,chardev=c0,name={PORT_NAME}"),
                ])
                .args(["-trace", "pci_cfg_read", "-trace", "pci_cfg_write"])
                .args(["-trace", "memory_region_ops_read"])
                .args(["-trace", "memory_region_ops_write"])
                .arg("-D")
                .arg(&trace);
            "QEMU trace events memory_region_ops_read/write: accesses to the ECAM region \
             (pcie-mmcfg-mmio) plus to ports 0xcf8-0xcff, each one exit (pci_cfg_read/write \
             would miss the probes of absent devices)"
        }
    };
    println!("{}: {}", sys.name(), command_line(&cmd));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = Running(
        cmd.spawn()
            .map_err(|e| format!("cannot start {}: {e}", cmd.get_program().to_string_lossy()))?,
    );
    let pid = child.0.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.0.stdout.take().ok_or("child has no stdout pipe")?;
    let stderr = child.0.stderr.take().ok_or("child has no stderr pipe")?;
    let out_tx = tx.clone();
    let out_reader = spawn_reader(stdout, move |line| {
        if line.contains(ACTION_MARKER) {
            let _ = out_tx.send(Event::Ready(Instant::now()));
        }
    });
    let err_reader = spawn_reader(stderr, move |line| {
        if let Some(n) = line
            .split(PCI_MARKER)
            .nth(1)
            .and_then(|rest| rest.trim().parse().ok())
        {
            let _ = tx.send(Event::PciCount(n));
        }
    });

    let ready = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Ready(t)) => break t,
            Ok(Event::PciCount(_)) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("lost the child's output".into())
            }
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            drop(child);
            let tail = err_reader.join().unwrap_or_default();
            return Err(format!(
                "exited ({status}) before {ACTION_MARKER}; last stderr line: {}",
                last_line(&tail)
            ));
        }
        if t0.elapsed() > opts.guest.timeout {
            drop(child);
            let tail = out_reader.join().unwrap_or_default();
            return Err(format!(
                "no {ACTION_MARKER} after {} s; last console line: {}",
                opts.guest.timeout.as_secs(),
                last_line(&tail)
            ));
        }
    };
    let boot_s = ready.duration_since(t0).as_secs_f64();
    println!("{}: echo loop up after {boot_s:.1} s", sys.name());

    let mut client = connect(&socket)?;
    // One small round trip first: the guest's cat is running and the session is open.
    round_trip(&mut client, 1, Duration::from_secs(300))?;
    let mut stats = ProcStats::default();
    stats.sample(pid, MEMORY_MIB * 1024);
    let before = cpu_split(&stats);
    let start = Instant::now();
    let bytes = opts.mib << 20;
    round_trip(&mut client, bytes, STALL)?;
    let transfer_s = start.elapsed().as_secs_f64();
    stats.sample(pid, MEMORY_MIB * 1024);
    let after = cpu_split(&stats);
    println!(
        "{}: {} MiB echoed in {transfer_s:.2} s",
        sys.name(),
        opts.mib
    );
    drop(client);

    // SIGTERM: chapeau stops the VM and logs its PCI count; QEMU quits.
    // SAFETY: kill has no memory effects; the child is not reaped yet, so the pid is ours.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while child
        .0
        .try_wait()
        .map_err(|e| format!("wait: {e}"))?
        .is_none()
    {
        if Instant::now() > deadline {
            return Err("did not exit within 30 s of SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    let _ = out_reader.join();
    let _ = err_reader.join();
    let _ = std::fs::remove_file(&socket);
    let pci = match sys {
        System::Chapeau => rx.try_iter().find_map(|e| match e {
            Event::PciCount(n) => Some(n),
            Event::Ready(_) => None,
        }),
        _ => {
            let count = qemu_pci_config_accesses(&trace)?;
            let _ = std::fs::remove_file(&trace);
            println!(
                "{}: PCI config accesses: {} = {} ECAM + {} ports 0xcf8-0xcff \
                 ({} pci_cfg_read/write trace lines, accesses that reached a present device)",
                sys.name(),
                count.exits(),
                count.ecam,
                count.conf1,
                count.traced
            );
            Some(count.exits())
        }
    };
    Ok(PortResult {
        boot_s,
        transfer_s,
        bytes,
        vmm_ms: after.0.saturating_sub(before.0) as f64 / 1e6,
        vcpu_ms: after.1.saturating_sub(before.1) as f64 / 1e6,
        pci,
        pci_method,
    })
}

/// (non-vCPU, vCPU) on-CPU ns, summed over every thread seen so far.
fn cpu_split(stats: &ProcStats) -> (u64, u64) {
    stats.threads.values().fold((0, 0), |(vmm, vcpu), t| {
        let ns = t.run_ns.unwrap_or(0);
        if is_vcpu_thread(&t.comm) {
            (vmm, vcpu + ns)
        } else {
            (vmm + ns, vcpu)
        }
    })
}

fn connect(path: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("connect {}: {e}", path.display())),
        }
    }
}

/// Sends `bytes` of the pattern from a second thread while reading the echo here; fails on
/// the first wrong byte or after `stall` without progress.
fn round_trip(client: &mut UnixStream, bytes: u64, stall: Duration) -> Result<(), String> {
    let mut writer = client.try_clone().map_err(|e| format!("client: {e}"))?;
    let sender = std::thread::spawn(move || Pattern::new().send(&mut writer, bytes));
    client
        .set_read_timeout(Some(stall))
        .map_err(|e| format!("client: {e}"))?;
    Pattern::new().expect(client, bytes, "echo")?;
    sender
        .join()
        .map_err(|_| "the sender thread panicked".to_string())?
}

/// What QEMU's trace log says about PCI configuration space accesses.
#[derive(Debug, Default, PartialEq, Eq)]
struct QemuPciCount {
    /// Accesses to the ECAM window's MMIO region.
    ecam: u64,
    /// Accesses to ports 0xcf8-0xcff (mechanism #1), present or not: the guest probes them
    /// even where they lead nowhere, and each is an exit all the same.
    conf1: u64,
    /// pci_cfg_read/write lines: only accesses that reached a present device.
    traced: u64,
}

impl QemuPciCount {
    /// Every access counts once: memory_region_ops_* sees each MMIO/PIO exit QEMU handles.
    fn exits(&self) -> u64 {
        self.ecam + self.conf1
    }
}

/// Counts from a trace of pci_cfg_read/write and memory_region_ops_read/write, whose lines
/// read `memory_region_ops_read cpu 0 mr 0x… addr 0xcfc value 0x0 size 4 name 'io'`.
fn qemu_pci_config_accesses(trace: &Path) -> Result<QemuPciCount, String> {
    let file =
        std::fs::File::open(trace).map_err(|e| format!("QEMU trace {}: {e}", trace.display()))?;
    let mut count = QemuPciCount::default();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("QEMU trace {}: {e}", trace.display()))?;
        count_trace_line(&line, &mut count);
    }
    Ok(count)
}

fn count_trace_line(line: &str, count: &mut QemuPciCount) {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("pci_cfg_read" | "pci_cfg_write") => count.traced += 1,
        Some("memory_region_ops_read" | "memory_region_ops_write") => {
            let words: Vec<&str> = words.collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .copied()
            };
            let addr = after("addr")
                .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
            match after("name").map(|n| n.trim_matches('\'')) {
                Some(QEMU_ECAM_REGION) => count.ecam += 1,
                // The port I/O root (microvm has no conf1 device) or pc's conf1 regions.
                Some("io") if matches!(addr, Some(0xcf8..=0xcff)) => count.conf1 += 1,
                Some("pci-conf-idx" | "pci-conf-data") => count.conf1 += 1,
                _ => {}
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines() {
        let mut c = QemuPciCount::default();
        for line in [
            "memory_region_ops_read cpu 0 mr 0x5 addr 0x0 value 0x81b36 size 4 name 'pcie-mmcfg-mmio'",
            "memory_region_ops_write cpu 0 mr 0x5 addr 0xcf8 value 0x80000000 size 4 name 'io'",
            "memory_region_ops_read cpu 0 mr 0x5 addr 0x3f8 value 0x0 size 1 name 'serial'",
            "memory_region_ops_read cpu 0 mr 0x5 addr 0x87 value 0x0 size 1 name 'io'",
            "pci_cfg_read gpex-root 00:00.0 @0x0 -> 0x81b36",
        ] {
            count_trace_line(line, &mut c);
        }
        assert_eq!(
            c,
            QemuPciCount {
                ecam: 1,
                conf1: 1,
                traced: 1
            }
        );
        assert_eq!(c.exits(), 2);
    }
}
