//! `bench p9-guest`: the test guest on a 9p share, chapeau's virtio-9p beside QEMU's
//! virtio-9p-pci (`-fsdev local,security_model=none`) in the same run, same guest, same host
//! directory (emptied between the systems).
//!
//! The guest runs `test=9p-bench`: it mounts the share as Kata does (`trans=virtio,
//! version=9p2000.L,msize=512000,cache=none`) and /bin/guest-bench (resources/guest/
//! guest-bench.c, appended to the initramfs) writes a file in 1 MiB writes then fsyncs it,
//! reads it back, and creates, fstats, closes and unlinks small files, timing each phase with
//! the guest's clock. The host checks the file's size and samples the VMM's CPU time over the
//! whole run of the helper. The helper's GUEST_P9_SNAP lines (the guest's CPU ticks and virtio
//! interrupt counts around each phase) are printed as they came; with `--kvm-events`, `perf
//! stat` counts the VM's KVM exits, MMIO writes (kicks) and injected interrupts over the same
//! span.

use std::time::Duration;

use super::guest::{
    all_ran, boot, columns, each_system, host_kind, prepare_bench_guest, print_table, vmm_cpu_ms,
};
use super::*;

const ACTION: &str = "GUEST_ACTION=9p-bench";
const RESULT: &str = "GUEST_P9_BENCH";
const TAG: &str = "kataShared";
const MEMORY_MIB: u64 = 256;

struct Options {
    mib: u64,
    files: u64,
    kvm_events: bool,
    guest: GuestFlags,
}

/// KVM tracepoints `--kvm-events` counts: every exit, MMIO accesses (a virtio-pci kick is an
/// MMIO write), MSIs delivered through irqfds, interrupts injected into the vCPU.
const KVM_EVENTS: &str =
    "kvm:kvm_exit,kvm:kvm_mmio,kvm:kvm_fast_mmio,kvm:kvm_msi_set_irq,kvm:kvm_inj_virq";

pub(crate) fn run(args: &[String]) -> Result<(), Failure> {
    let mut opts = Options {
        mib: 64,
        files: 1000,
        kvm_events: false,
        guest: GuestFlags::new(System::QemuMicrovm),
    };
    parse_flags(args, |flag, value| {
        match flag {
            "--mib" => opts.mib = parse_positive(flag, &value()?)?,
            "--files" => opts.files = parse_positive(flag, &value()?)?,
            "--kvm-events" => opts.kvm_events = true,
            _ => return opts.guest.apply(flag, value),
        }
        Ok(true)
    })
    .map_err(Failure::Usage)?;
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 test=9p-bench bench_mib={} bench_files={}",
        opts.mib, opts.files
    );
    let setup = prepare_bench_guest(&opts.guest, &cmdline)?;
    let export = ::tests::scratch_dir().join("bench-p9-guest");
    println!(
        "p9-guest benchmark: {} MiB written and read in 1 MiB calls, {} small files, on {} \
         (tag {TAG}, msize=512000, cache=none), 1 vCPU, {MEMORY_MIB} MiB, host {}",
        opts.mib,
        opts.files,
        export.display(),
        host_kind(&setup)
    );
    print_setup(&setup, &opts.guest.systems);

    let rows = each_system(&opts.guest.systems, |sys| {
        run_once(sys, &setup, &opts, &export)
    });
    let _ = std::fs::remove_dir_all(&export);
    println!();
    let columns = columns([
        ("boot s", 1, false),
        ("write MB/s", 2, true),
        ("read MB/s", 2, true),
        ("files/s", 1, true),
        ("VMM CPU ms", 0, false),
        ("vCPU CPU s", 1, false),
    ]);
    print_table(&columns, &rows);
    println!(
        "MB/s = 10^6 bytes/s, timed in the guest (write includes the fsync); files/s = \
         create+fstat+close+unlink per second; VMM CPU = CPU time of the VMM's non-vCPU threads \
         (utime+stime, ended threads included) from {ACTION} to the result line, mount \
         included; boot = start to {ACTION}."
    );
    all_ran(&rows)
}

/// One system's row: boot s, write MB/s, read MB/s, files/s, VMM CPU ms, vCPU CPU s.
fn run_once(
    sys: System,
    setup: &Setup,
    opts: &Options,
    export: &std::path::Path,
) -> Result<Vec<f64>, String> {
    let _ = std::fs::remove_dir_all(export);
    std::fs::create_dir_all(export).map_err(|e| format!("{}: {e}", export.display()))?;
    let mut cmd = command_for(sys, setup, 1, MEMORY_MIB)?;
    match sys {
        System::Chapeau => cmd.arg("--fs").arg(format!(
            "tag={TAG},path={},security_model=none",
            export.display()
        )),
        _ => cmd
            .arg("-fsdev")
            .arg(format!(
                "local,id=fs0,path={},security_model=none",
                export.display()
            ))
            .args([
                "-device",
                &format!("virtio-9p-pci,fsdev=fs0,mount_tag={TAG}"),
            ]),
    };
    let (mut vm, boot_s) = boot(sys, &mut cmd, ACTION, opts.guest.timeout)?;
    let pid = vm.pid();
    let perf = if opts.kvm_events {
        Some(
            std::process::Command::new("perf")
                .args(["stat", "-x,", "-e", KVM_EVENTS, "-p", &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("perf: {e}"))?,
        )
    } else {
        None
    };
    let before = vmm_cpu_ms(pid)?;
    vm.try_wait_for(RESULT, opts.guest.timeout)?;
    let after = vmm_cpu_ms(pid)?;
    if let Some(perf) = perf {
        // SAFETY: kill(2) on the pid of our own child, which we have not waited for yet.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        let out = perf.wait_with_output().map_err(|e| format!("perf: {e}"))?;
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            // CSV: count,unit,event,...
            let mut fields = line.split(',');
            if let (Some(count), Some(event)) = (fields.next(), fields.nth(1)) {
                println!("{}: {event} {count}", sys.name());
            }
        }
    }
    // The guest powers off after its result line; only then is the line surely complete (the
    // console can be slow enough to show half of it).
    let status = vm.try_wait_exit(Duration::from_secs(300))?;
    println!("{}: {status}", sys.name());
    let stdout = vm.stdout();
    let line = stdout
        .lines()
        .find(|l| l.contains(RESULT))
        .ok_or("the result line went missing")?;
    println!("{}: {line}", sys.name());
    for snap in stdout.lines().filter(|l| l.contains("GUEST_P9_SNAP")) {
        println!("{}: {}", sys.name(), snap.trim());
    }
    let field = |key: &str| -> Result<f64, String> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {key} in {line:?}"))
    };
    let row = vec![
        boot_s,
        field("write_mbps=")?,
        field("read_mbps=")?,
        field("files_per_s=")?,
        after.0 - before.0,
        (after.1 - before.1) / 1000.0,
    ];
    let size = std::fs::metadata(export.join("seq"))
        .map_err(|e| format!("the guest's file: {e}"))?
        .len();
    if size != opts.mib << 20 {
        return Err(format!(
            "the guest's file has {size} bytes, not {}",
            opts.mib << 20
        ));
    }
    Ok(row)
}
