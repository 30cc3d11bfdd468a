//! What the guest benchmarks `net-guest` and `p9-guest` share: the guest-side helper
//! (resources/guest/guest-bench.c) and the current init.sh appended to a copy of the test
//! initramfs, one boot per system through the tests' harness (`tests::Vm`), the VMM's CPU
//! time, and a table with chapeau/QEMU ratios.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ::tests::Vm;

use super::*;

/// What a guest benchmark runs: the systems `guest` names, booting the bench initramfs
/// (`bench_initramfs`) with `cmdline`. microvm has PCI only with its PCIe host, and chapeau's
/// virtio devices are on PCI.
pub(crate) fn prepare_bench_guest(guest: &GuestFlags, cmdline: &str) -> Result<Setup, String> {
    let mut setup = prepare(&guest.guest_dir, &guest.systems, cmdline, "microvm,pcie=on")?;
    setup.initramfs = bench_initramfs(&setup.initramfs)?;
    Ok(setup)
}

/// target/bench-guest/initramfs.cpio: the test initramfs followed by a second newc archive with
/// resources/guest/init.sh as /init and guest-bench.c (built static) as /bin/guest-bench. The
/// kernel unpacks both in order, later entries replacing earlier ones, so a guest built before
/// init.sh gained the bench modes still runs them, and the test initramfs stays small.
pub(crate) fn bench_initramfs(base: &Path) -> Result<PathBuf, String> {
    let dir = workspace_root().join("target/bench-guest");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sources = workspace_root().join("resources/guest");
    let helper = dir.join("guest-bench");
    run_tool(
        Command::new("gcc")
            .args(["-O2", "-static", "-o"])
            .arg(&helper)
            .arg(sources.join("guest-bench.c")),
    )?;
    let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let mut image = read(base)?;
    // Each archive starts 4-byte aligned; the kernel skips the zeros between archives.
    image.resize(image.len().next_multiple_of(4), 0);
    cpio_entry(&mut image, 1, "init", &read(&sources.join("init.sh"))?);
    cpio_entry(&mut image, 2, "bin/guest-bench", &read(&helper)?);
    cpio_entry(&mut image, 3, "TRAILER!!!", &[]);
    let out = dir.join("initramfs.cpio");
    std::fs::write(&out, image).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(out)
}

/// One newc entry: an executable file owned by root (the trailer has no data and mode 0).
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, data: &[u8]) {
    let mode = if data.is_empty() { 0 } else { 0o100_755 };
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0];
    out.extend_from_slice(b"070701");
    for field in fields.iter().chain(&[name.len() as u32 + 1, 0]) {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// `cmd` run inside network namespace `ns` (`ip netns exec` execs in place: same pid).
pub(crate) fn in_netns(cmd: &Command, ns: &str) -> Command {
    let mut wrapped = Command::new("ip");
    wrapped
        .args(["netns", "exec", ns])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    wrapped
}

/// Starts the VM and waits for `marker` on its console: the VM and the seconds it took.
pub(crate) fn boot(
    sys: System,
    cmd: &mut Command,
    marker: &str,
    timeout: Duration,
) -> Result<(Vm, f64), String> {
    println!("{}: {}", sys.name(), command_line(cmd));
    let start = Instant::now();
    let mut vm = Vm::start_command(cmd);
    vm.try_wait_for(marker, timeout)?;
    let boot_s = start.elapsed().as_secs_f64();
    println!("{}: {marker} after {boot_s:.1} s", sys.name());
    Ok((vm, boot_s))
}

/// Runs `run_once` for each system in turn, saying at once when one fails (the others still
/// run).
pub(crate) fn each_system<T>(
    systems: &[System],
    mut run_once: impl FnMut(System) -> Result<T, String>,
) -> Vec<(System, Result<T, String>)> {
    systems
        .iter()
        .map(|sys| {
            let result = run_once(*sys);
            if let Err(e) = &result {
                println!("{}: FAILED: {e}", sys.name());
            }
            (*sys, result)
        })
        .collect()
}

/// The benchmark's end: every failure, or Ok when all systems ran.
pub(crate) fn all_ran<T>(rows: &[(System, Result<T, String>)]) -> Result<(), Failure> {
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|(sys, r)| r.as_ref().err().map(|e| format!("{}: {e}", sys.name())))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Run(failed.join("; ")))
    }
}

/// "PVM (...)" or "KVM", for the header line.
pub(crate) fn host_kind(setup: &Setup) -> &'static str {
    if setup.pvm_host {
        "PVM (guest kernel mode emulated: guest-driven figures are low)"
    } else {
        "KVM"
    }
}

/// Columns from (name, decimals, whether higher is better).
pub(crate) fn columns<const N: usize>(spec: [(&'static str, usize, bool); N]) -> [Column; N] {
    spec.map(|(name, digits, higher_better)| Column {
        name,
        digits,
        higher_better,
    })
}

/// On-CPU time of a VMM process so far, in ms: (all threads but the vCPUs, the vCPU threads).
/// The process's own stat line still counts threads that ended (QEMU's pool workers come and
/// go between samples); vCPU threads live as long as the VM. Clock-tick resolution (10 ms).
pub(crate) fn vmm_cpu_ms(pid: u32) -> Result<(f64, f64), String> {
    let read = |path: String| std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"));
    let ticks = |stat: &str| parse_stat(stat).map(|(user, system, _)| user + system);
    let total = ticks(&read(format!("/proc/{pid}/stat"))?).ok_or("bad /proc stat line")?;
    let mut vcpu = 0;
    let tasks = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&tasks).map_err(|e| format!("{tasks}: {e}"))? {
        let dir = task.map_err(|e| format!("{tasks}: {e}"))?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if is_vcpu_thread(comm.trim_end()) {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            vcpu += ticks(&stat).unwrap_or(0);
        }
    }
    let ms = |t: u64| t as f64 * 1000.0 / clock_ticks_per_sec() as f64;
    Ok((ms(total.saturating_sub(vcpu)), ms(vcpu)))
}

/// A column of a result table.
pub(crate) struct Column {
    pub name: &'static str,
    pub digits: usize,
    /// Whether a larger value is the better one (shown in the ratio row's legend).
    pub higher_better: bool,
}

/// One row per system, then chapeau/QEMU for each column when both ran.
pub(crate) fn print_table(columns: &[Column], rows: &[(System, Result<Vec<f64>, String>)]) {
    let width = |c: &Column| c.name.len().max(9);
    print!("{:<16}", "system");
    for c in columns {
        print!(" {:>w$}", c.name, w = width(c));
    }
    println!();
    for (sys, row) in rows {
        print!("{:<16}", sys.name());
        match row {
            Ok(values) => {
                for (c, v) in columns.iter().zip(values) {
                    print!(" {:>w$.d$}", v, w = width(c), d = c.digits);
                }
                println!();
            }
            Err(e) => println!(" FAILED: {e}"),
        }
    }
    let ok = |chapeau: bool| {
        rows.iter()
            .find(|(sys, _)| (*sys == System::Chapeau) == chapeau)
            .and_then(|(_, r)| r.as_ref().ok())
    };
    let (Some(ours), Some(peer)) = (ok(true), ok(false)) else {
        return;
    };
    print!("{:<16}", "chapeau/QEMU");
    for ((c, a), b) in columns.iter().zip(ours).zip(peer) {
        let ratio = if *b != 0.0 { a / b } else { f64::NAN };
        print!(" {:>w$.2}", ratio, w = width(c));
    }
    println!();
    let better: Vec<&str> = columns
        .iter()
        .map(|c| if c.higher_better { "higher" } else { "lower" })
        .collect();
    println!(
        "ratios are chapeau's value over QEMU's; the better side per column: {}",
        columns
            .iter()
            .zip(better)
            .map(|(c, b)| format!("{} {b}", c.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
