//! `bench pmem`: the Kata rootfs on persistent memory.
//!
//! Builds (once, under target/bench-pmem) a Kata-format image of `--image-mib` MiB whose ext4
//! root holds `/bench.dat` (`--data-mib` MiB) and `/bin/mmap-read` (resources/guest/
//! mmap-read.c), then for each system boots it as a read-only NVDIMM with Kata's root
//! parameters and `test=mmap-read`: the guest maps the file from its DAX root and sums it twice.
//! The second pass runs on mapped pages in guest user mode (native even where guest kernel
//! mode is emulated), so it measures how guest loads reach the image through the VMM's
//! mapping; the first pass includes a guest page fault per page. Also reported: time from
//! exec to `GUEST_BOOT_OK` booting from pmem, and, for chapeau, booting the same kernel from the
//! initramfs instead; and the peak RSS of each VMM with the image mapped.
//!
//! QEMU needs `-M pc` for an NVDIMM (microvm has no memory hotplug), which boots through
//! SeaBIOS: its boot time is not comparable, its mmap figures are.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

const KATA_ROOT: &str =
    "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4";
const READ_MARKER: &str = "GUEST_MMAP_READ=";
const MEMORY_MIB: u64 = 256;

struct Options {
    image_mib: u64,
    data_mib: u64,
    guest: GuestFlags,
}

/// What one boot showed.
struct Outcome {
    boot_s: Option<f64>,
    read_line: Option<String>,
    peak_rss_kib: u64,
    /// Peak RssAnon: the VMM's own memory plus the guest RAM it touched; the rest of its RSS is
    /// file pages (the image's page cache, shared with every VM using the image).
    peak_anon_kib: u64,
}

pub(crate) fn run(args: &[String]) -> Result<(), Failure> {
    let mut opts = Options {
        image_mib: 512,
        data_mib: 32,
        guest: GuestFlags::new(System::QemuPc),
    };
    opts.guest.timeout = Duration::from_secs(1200);
    parse_flags(args, |flag, value| {
        match flag {
            "--image-mib" => opts.image_mib = parse_positive(flag, &value()?)?,
            "--data-mib" => opts.data_mib = parse_positive(flag, &value()?)?,
            _ => return opts.guest.apply(flag, value),
        }
        Ok(true)
    })
    .map_err(Failure::Usage)?;
    if opts.data_mib + 16 > opts.image_mib {
        return Err(Failure::Usage(
            "--data-mib must leave 16 MiB of the image for the rest of the root".into(),
        ));
    }
    let image = bench_image(opts.image_mib, opts.data_mib)?;
    let cmdline = format!("console=ttyS0 reboot=k panic=1 {KATA_ROOT} test=mmap-read");
    let setup = prepare(
        &opts.guest.guest_dir,
        &opts.guest.systems,
        &cmdline,
        "microvm",
    )?;
    println!(
        "pmem benchmark: {} MiB image {} as a read-only NVDIMM, {} MiB read through mmap, \
         1 vCPU, {MEMORY_MIB} MiB RAM, host {}",
        opts.image_mib,
        image.display(),
        opts.data_mib,
        if setup.pvm_host { "PVM" } else { "KVM" }
    );
    print_setup(&setup, &opts.guest.systems);

    let mut rows = Vec::new();
    for sys in &opts.guest.systems {
        let cmd = pmem_command(*sys, &setup, &image, opts.image_mib)?;
        let outcome = watch(cmd, &[READ_MARKER], opts.guest.timeout);
        rows.push((format!("{} (pmem root)", sys.name()), outcome));
    }
    if opts.guest.systems.contains(&System::Chapeau) {
        let initramfs_boot = prepare(
            &opts.guest.guest_dir,
            &[System::Chapeau],
            "console=ttyS0 reboot=k panic=1 test=poweroff",
            "microvm",
        )?;
        let cmd = command_for(System::Chapeau, &initramfs_boot, 1, MEMORY_MIB)?;
        rows.push((
            "chapeau (initramfs)".into(),
            watch(cmd, &[], opts.guest.timeout),
        ));
    }

    println!();
    println!(
        "{:<26} {:>15} {:>13} {:>14} {:>14} {:>14}",
        "boot", "GUEST_BOOT_OK s", "peak RSS MiB", "of it anon", "1st pass MB/s", "2nd pass MB/s"
    );
    let mut failed = Vec::new();
    for (name, outcome) in &rows {
        match outcome {
            Ok(o) => {
                let (first, second) = o.read_line.as_deref().map_or(("-", "-"), speeds);
                println!(
                    "{name:<26} {:>15} {:>13.1} {:>14.1} {first:>14} {second:>14}",
                    opt_fmt(o.boot_s, 1),
                    mib(o.peak_rss_kib),
                    mib(o.peak_anon_kib),
                );
            }
            Err(e) => {
                println!("{name:<26} FAILED: {e}");
                failed.push(format!("{name}: {e}"));
            }
        }
    }
    println!(
        "1st pass: every page faulted in by the guest kernel (emulated on PVM hosts); 2nd pass: \
         mapped pages only, guest user mode. Peak RSS: VmRSS of the VMM process, sampled; anon: \
         RssAnon (own memory + guest RAM touched), the rest is the image's shared page cache."
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Run(failed.join("; ")))
    }
}

/// The two MB/s figures of a `GUEST_MMAP_READ=` line.
fn speeds(line: &str) -> (&str, &str) {
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or("?")
    };
    (field("first_mbps="), field("second_mbps="))
}

/// The VM booting from `image` as a read-only NVDIMM, no initramfs.
fn pmem_command(
    sys: System,
    setup: &Setup,
    image: &Path,
    image_mib: u64,
) -> Result<Command, String> {
    let memory = MEMORY_MIB.to_string();
    match sys {
        System::Chapeau => {
            let mut cmd = Command::new(&setup.chapeau);
            cmd.arg("--kernel")
                .arg(&setup.kernel)
                .args(["--cmdline", &setup.cmdline, "--memory", &memory])
                .arg("--pmem")
                .arg(format!("file={}", image.display()));
            Ok(cmd)
        }
        _ => {
            let qemu = setup
                .qemu
                .as_ref()
                .ok_or("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")?;
            let mut cmd = Command::new(qemu);
            cmd.args(["-enable-kvm", "-M", "pc,nvdimm=on"])
                .args(["-cpu", "host,-arch-capabilities"])
                .args(["-m", &format!("{memory},slots=2,maxmem=4G"), "-smp", "1"])
                .args(["-nographic", "-nodefaults", "-no-user-config"])
                .args(["-serial", "stdio", "-no-reboot"])
                .arg("-object")
                .arg(format!(
                    "memory-backend-file,id=mem1,share=on,mem-path={},size={image_mib}M,readonly=on",
                    image.display()
                ))
                .args(["-device", "nvdimm,id=nv1,memdev=mem1,unarmed=on"])
                .arg("-kernel")
                .arg(&setup.kernel)
                .args(["-append", &setup.qemu_append]);
            Ok(cmd)
        }
    }
}

/// Runs `cmd` to its end (or the timeout), sampling its RSS; returns when `GUEST_BOOT_OK` came
/// and the first line holding any of `wanted`.
fn watch(mut cmd: Command, wanted: &[&str], timeout: Duration) -> Result<Outcome, String> {
    let program = cmd.get_program().to_string_lossy().to_string();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("child has no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    let wanted: Vec<String> = wanted.iter().map(|s| s.to_string()).collect();
    let reader = spawn_reader(stdout, move |line| {
        if line.contains(BOOT_MARKER) || wanted.iter().any(|w| line.contains(w.as_str())) {
            let _ = tx.send((start.elapsed(), line.to_string()));
        }
    });
    let mut stats = ProcStats::default();
    let mut outcome = Outcome {
        boot_s: None,
        read_line: None,
        peak_rss_kib: 0,
        peak_anon_kib: 0,
    };
    let status = loop {
        stats.sample(pid, MEMORY_MIB * 1024);
        if let Some(kib) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| kib_field(&status, "RssAnon:"))
        {
            outcome.peak_anon_kib = outcome.peak_anon_kib.max(kib);
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let tail = reader.join().unwrap_or_default();
    for (at, line) in rx.try_iter() {
        if line.contains(BOOT_MARKER) {
            outcome.boot_s.get_or_insert(at.as_secs_f64());
        } else {
            outcome.read_line.get_or_insert(line);
        }
    }
    outcome.peak_rss_kib = stats.vm_rss_max_kib;
    match status {
        Some(status) if outcome.boot_s.is_some() => {
            println!(
                "{program}: {status} after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            Ok(outcome)
        }
        Some(status) => Err(format!(
            "exited ({status}) before {BOOT_MARKER}; last console line: {}",
            last_line(&tail)
        )),
        None => Err(format!(
            "not done after {} s; last console line: {}",
            timeout.as_secs(),
            last_line(&tail)
        )),
    }
}

/// target/bench-pmem/bench-<image>m-<data>m.img, built on first use with our image builder:
/// the data file is a fixed pseudo-random pattern, so rebuilding gives the same image.
fn bench_image(image_mib: u64, data_mib: u64) -> Result<PathBuf, String> {
    let dir = workspace_root().join("target/bench-pmem");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let image = dir.join(format!("bench-{image_mib}m-{data_mib}m.img"));
    if image.exists() {
        return Ok(image);
    }
    let guest = workspace_root().join("resources/guest");
    let program = dir.join("mmap-read");
    run_tool(
        Command::new("gcc")
            .args(["-O2", "-static", "-o"])
            .arg(&program)
            .arg(guest.join("mmap-read.c")),
    )?;
    let data = dir.join("bench.dat");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..(data_mib << 20) / 8)
        .flat_map(|_| {
            // xorshift64: fast, fixed, incompressible enough for a read benchmark.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    std::fs::write(&data, bytes).map_err(|e| format!("{}: {e}", data.display()))?;
    let partial = image.with_extension("partial");
    run_tool(
        Command::new(guest.join("make-kata-image.py"))
            .args(["--size-mib", &image_mib.to_string()])
            .arg("--add")
            .arg(format!("{}:/bin/mmap-read", program.display()))
            .arg("--add")
            .arg(format!("{}:/bench.dat", data.display()))
            .arg(&partial),
    )?;
    std::fs::rename(&partial, &image).map_err(|e| format!("{}: {e}", image.display()))?;
    let _ = std::fs::remove_file(&data);
    Ok(image)
}
