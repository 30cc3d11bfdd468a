//! `bench net-guest`: TCP through the test guest's virtio-net, chapeau beside QEMU's
//! virtio-net-pci in the same run, each on a tap (vnet_hdr, vhost=off: the userspace
//! datapaths) in a network namespace this benchmark creates, with the same guest.
//!
//! The guest runs `test=netbench`: /bin/guest-bench (resources/guest/guest-bench.c, appended
//! to the initramfs) serves port 5001 without forking. From a thread inside the namespace the
//! host measures guest->host (the guest writes N bytes), host->guest (the guest reads N bytes
//! and answers one byte once it has them all) and round trips of one byte each way on one
//! connection (TCP_NODELAY on both ends), and samples the VMM's CPU time around each test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ::tests::netns::Netns;

use super::guest::{
    all_ran, boot, columns, each_system, host_kind, in_netns, prepare_bench_guest, print_table,
    vmm_cpu_ms,
};
use super::*;

const GUEST_IP: &str = "10.0.0.2";
const PORT: u16 = 5001;
const MAC: &str = "52:54:00:12:34:56";
const READY: &str = "GUEST_BENCH_READY";
const MEMORY_MIB: u64 = 256;
/// How long a transfer may make no progress before the run counts as failed.
const STALL: Duration = Duration::from_secs(120);

struct Options {
    mib: u64,
    round_trips: u32,
    guest: GuestFlags,
}

/// One system's figures, in the table's column order.
struct Figures {
    boot_s: f64,
    g2h_mbps: f64,
    g2h_cpu_ms_per_mib: f64,
    h2g_mbps: f64,
    h2g_cpu_ms_per_mib: f64,
    rr_median_us: f64,
    rr_mean_us: f64,
    rr_cpu_us: f64,
}

pub(crate) fn run(args: &[String]) -> Result<(), Failure> {
    let mut opts = Options {
        mib: 64,
        round_trips: 1000,
        guest: GuestFlags::new(System::QemuMicrovm),
    };
    parse_flags(args, |flag, value| {
        match flag {
            "--mib" => opts.mib = parse_positive(flag, &value()?)?,
            "--round-trips" => opts.round_trips = parse_positive(flag, &value()?)?,
            _ => return opts.guest.apply(flag, value),
        }
        Ok(true)
    })
    .map_err(Failure::Usage)?;
    let cmdline = format!("console=ttyS0 reboot=k panic=1 test=netbench guest_ip={GUEST_IP}");
    let setup = prepare_bench_guest(&opts.guest, &cmdline)?;
    println!(
        "net-guest benchmark: {} MiB each way, {} round trips of 1 byte, 1 vCPU, {MEMORY_MIB} \
         MiB, tap with vnet_hdr in a private namespace, vhost off, host {}",
        opts.mib,
        opts.round_trips,
        host_kind(&setup)
    );
    print_setup(&setup, &opts.guest.systems);

    let rows = each_system(&opts.guest.systems, |sys| run_once(sys, &setup, &opts));
    println!();
    let columns = columns([
        ("boot s", 1, false),
        ("g->h MB/s", 2, true),
        ("g->h VMM ms/MiB", 1, false),
        ("h->g MB/s", 2, true),
        ("h->g VMM ms/MiB", 1, false),
        ("RR median us", 0, false),
        ("RR mean us", 0, false),
        ("RR VMM us", 0, false),
    ]);
    let table: Vec<_> = rows
        .iter()
        .map(|(sys, r)| {
            let values = r.as_ref().map_err(String::clone).map(|f| {
                vec![
                    f.boot_s,
                    f.g2h_mbps,
                    f.g2h_cpu_ms_per_mib,
                    f.h2g_mbps,
                    f.h2g_cpu_ms_per_mib,
                    f.rr_median_us,
                    f.rr_mean_us,
                    f.rr_cpu_us,
                ]
            });
            (*sys, values)
        })
        .collect();
    print_table(&columns, &table);
    println!(
        "MB/s = 10^6 bytes/s of TCP payload; g->h from the request to the last byte, h->g from \
         the first byte sent to the guest's answer that it has them all; RR = one byte to the \
         guest's echo and back; VMM = CPU time of the VMM's non-vCPU threads (utime+stime, \
         ended threads included) during the test; boot = start to {READY}."
    );
    all_ran(&rows)
}

fn run_once(sys: System, setup: &Setup, opts: &Options) -> Result<Figures, String> {
    let ns = Netns::new("netbench", &[1]);
    let mut cmd = command_for(sys, setup, 1, MEMORY_MIB)?;
    match sys {
        System::Chapeau => cmd
            .arg("--net")
            .arg(format!("tap=tap0,mac={MAC},vhost=off")),
        _ => cmd
            .args([
                "-netdev",
                "tap,id=net0,ifname=tap0,script=no,downscript=no,vhost=off",
            ])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=net0,mac={MAC},romfile="),
            ]),
    };
    let (mut vm, boot_s) = boot(
        sys,
        &mut in_netns(&cmd, ns.name()),
        READY,
        opts.guest.timeout,
    )?;
    let pid = vm.pid();
    let (bytes, trips) = (opts.mib << 20, opts.round_trips);
    let mut figures = ns.enter(move || measure(pid, bytes, trips))?;
    figures.boot_s = boot_s;
    // The guest powers off once told to quit.
    let status = vm.try_wait_exit(Duration::from_secs(120))?;
    println!("{}: {status}", sys.name());
    Ok(figures)
}

/// A connection to the guest's server, the request sent: `command` and its byte count.
fn request(command: u8, count: u64) -> Result<TcpStream, String> {
    let addr: SocketAddr = format!("{GUEST_IP}:{PORT}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
    };
    let io = |e: std::io::Error| format!("{addr}: {e}");
    stream.set_nodelay(true).map_err(io)?;
    stream.set_read_timeout(Some(STALL)).map_err(io)?;
    stream.set_write_timeout(Some(STALL)).map_err(io)?;
    let mut header = [command; 9];
    header[1..].copy_from_slice(&count.to_le_bytes());
    stream.write_all(&header).map_err(io)?;
    Ok(stream)
}

fn measure(pid: u32, bytes: u64, trips: u32) -> Result<Figures, String> {
    let io = |e: std::io::Error| format!("{GUEST_IP}:{PORT}: {e}");
    let mib = bytes as f64 / f64::from(1u32 << 20);
    let mut buf = vec![0u8; 256 << 10];

    let cpu0 = vmm_cpu_ms(pid)?;
    let start = Instant::now();
    let mut stream = request(b'G', bytes)?;
    let mut got = 0u64;
    while got < bytes {
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            return Err(format!("the guest closed after {got} of {bytes} bytes"));
        }
        got += n as u64;
    }
    let g2h_s = start.elapsed().as_secs_f64();
    let cpu1 = vmm_cpu_ms(pid)?;
    drop(stream);
    println!("guest->host: {} MiB in {g2h_s:.2} s", bytes >> 20);

    buf.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 131 + 7) as u8);
    let cpu2 = vmm_cpu_ms(pid)?;
    let mut stream = request(b'S', bytes)?;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = buf.len().min((bytes - sent) as usize);
        stream.write_all(&buf[..n]).map_err(io)?;
        sent += n as u64;
    }
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).map_err(io)?;
    let h2g_s = start.elapsed().as_secs_f64();
    let cpu3 = vmm_cpu_ms(pid)?;
    drop(stream);
    println!("host->guest: {} MiB in {h2g_s:.2} s", bytes >> 20);

    let mut stream = request(b'E', 0)?;
    let mut trip = |stream: &mut TcpStream| -> Result<f64, String> {
        let start = Instant::now();
        stream.write_all(b"x").map_err(io)?;
        stream.read_exact(&mut answer).map_err(io)?;
        Ok(start.elapsed().as_secs_f64() * 1e6)
    };
    // The first ones wake the echo up and warm both stacks' paths.
    for _ in 0..10 {
        trip(&mut stream)?;
    }
    let cpu4 = vmm_cpu_ms(pid)?;
    let times = (0..trips)
        .map(|_| trip(&mut stream))
        .collect::<Result<Vec<f64>, String>>()?;
    let cpu5 = vmm_cpu_ms(pid)?;
    drop(stream);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!("round trips: {trips}, mean {mean:.0} us");
    drop(request(b'Q', 0)?);

    Ok(Figures {
        boot_s: 0.0,
        g2h_mbps: bytes as f64 / g2h_s / 1e6,
        g2h_cpu_ms_per_mib: (cpu1.0 - cpu0.0) / mib,
        h2g_mbps: bytes as f64 / h2g_s / 1e6,
        h2g_cpu_ms_per_mib: (cpu3.0 - cpu2.0) / mib,
        rr_median_us: median(&times).unwrap_or(f64::NAN),
        rr_mean_us: mean,
        rr_cpu_us: (cpu5.0 - cpu4.0) * 1000.0 / f64::from(trips),
    })
}
