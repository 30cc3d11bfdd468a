//! `bench net`: the real virtio-net device in-process on a tap in a network namespace this
//! benchmark creates (its own thread unshares one; everything in it goes with the thread), a
//! fake driver (datapath's split rings) on the guest side, no guest and no KVM.
//!
//! guest->host: the driver queues 1514-byte frames (12-byte virtio-net header in front, one
//! descriptor each) that the namespace's stack receives and drops (they are for another MAC);
//! host->guest: a host thread sends 1472-byte UDP datagrams to the "guest" address, the driver
//! keeps the rx ring full of 4 KiB buffers. Each way: frames/s, MB/s of frames, and the queue
//! thread's (`net0-q0`) CPU time per MiB from its schedstat.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use devices::virtio::net::{Net, NetParams, Tap};
use devices::virtio::Unconfined;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::datapath::{activate, mib_and_runs, DriverQueue, GUEST_MEM};
use super::{median, opt_fmt, Failure};

const TAP: &str = "bench0";
const FRAME: usize = 1514;
const DATAGRAM: usize = 1472;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

pub(crate) fn run(args: &[String]) -> Result<(), Failure> {
    let (mib, runs) = mib_and_runs(args)?;
    let handle = std::thread::spawn(move || -> Result<(), String> {
        // SAFETY: unshare changes only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {} (needs root)",
                std::io::Error::last_os_error()
            ));
        }
        bench(mib << 20, runs)
    });
    handle
        .join()
        .map_err(|_| Failure::Run("the benchmark thread panicked".into()))??;
    Ok(())
}

fn ip(args: &str) -> Result<(), String> {
    let status = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("ip {args} failed"))
}

/// The queue thread's run time so far (ns), from its schedstat.
fn thread_run_ns(name: &str) -> Result<u64, String> {
    for task in std::fs::read_dir("/proc/self/task").map_err(|e| e.to_string())? {
        let dir = task.map_err(|e| e.to_string())?.path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name) {
            let stat = std::fs::read_to_string(dir.join("schedstat")).map_err(|e| e.to_string())?;
            return stat
                .split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| "bad schedstat".to_string());
        }
    }
    Err(format!("no thread {name}"))
}

struct Outcome {
    frames: u64,
    bytes: u64,
    seconds: f64,
    cpu_ns: u64,
}

fn bench(total: u64, runs: usize) -> Result<(), String> {
    let taps = Tap::open_named(TAP, 1).map_err(|e| e.to_string())?;
    ip("link set lo up")?;
    ip(&format!(
        "link set dev {TAP} addrgenmode none address 02:00:00:00:00:01"
    ))?;
    ip(&format!("addr add 10.0.0.1/24 dev {TAP}"))?;
    ip(&format!("link set {TAP} up"))?;
    ip(&format!(
        "neigh add 10.0.0.2 lladdr 52:54:00:12:34:56 dev {TAP}"
    ))?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_MEM)])
        .map_err(|e| format!("guest memory: {e}"))?;
    let net = Net::new(NetParams {
        index: 0,
        mac: GUEST_MAC,
        taps,
        vhost: Vec::new(),
        confinement: Arc::new(Unconfined),
    })
    .map_err(|e| e.to_string())?;
    let net = std::sync::Mutex::new(net);
    let mut queues = activate(&net, &mem, 0, 0)?;
    // The queue thread names itself once it runs.
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while thread_run_ns("net0-q0").is_err() && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (rx, rest) = queues.split_at_mut(1);
    let (rx, tx) = (&mut rx[0], &mut rest[0]);

    println!(
        "net benchmark: {} MiB per test, {runs} run(s); tap {TAP} in a private namespace; \
         device thread net0-q0, fake driver on this thread",
        total >> 20
    );
    println!(
        "{:<14} {:>4} {:>9} {:>10} {:>9} {:>11} {:>11}",
        "test", "run", "seconds", "frames/s", "MB/s", "dev CPU ms", "CPU ms/MiB"
    );
    let mut summary = Vec::new();
    for (name, guest_to_host) in [("guest->host", true), ("host->guest", false)] {
        let (mut pps, mut rates, mut costs) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=runs {
            let r = if guest_to_host {
                send(&mem, tx, total)?
            } else {
                receive(&mem, rx, total)?
            };
            let mibs = r.bytes as f64 / f64::from(1u32 << 20);
            let cpu_ms = r.cpu_ns as f64 / 1e6;
            pps.push(r.frames as f64 / r.seconds);
            rates.push(r.bytes as f64 / r.seconds / 1e6);
            costs.push(cpu_ms / mibs);
            println!(
                "{name:<14} {run:>4} {:>9.3} {:>10.0} {:>9.1} {cpu_ms:>11.1} {:>11.3}",
                r.seconds,
                r.frames as f64 / r.seconds,
                r.bytes as f64 / r.seconds / 1e6,
                cpu_ms / mibs
            );
        }
        summary.push((name, median(&pps), median(&rates), median(&costs)));
    }
    println!();
    println!("median of {runs} run(s)");
    println!(
        "{:<14} {:>10} {:>9} {:>11}",
        "test", "frames/s", "MB/s", "CPU ms/MiB"
    );
    for (name, pps, rate, cost) in summary {
        println!(
            "{name:<14} {:>10} {:>9} {:>11}",
            opt_fmt(pps, 0),
            opt_fmt(rate, 1),
            opt_fmt(cost, 3)
        );
    }
    println!(
        "frames are {FRAME}-byte Ethernet frames guest->host, {}-byte host->guest (UDP, \
         {DATAGRAM}-byte payload); MB/s = 10^6 bytes/s of frames; dev CPU = run time of \
         net0-q0 during the test",
        DATAGRAM + 42
    );
    drop(queues);
    Ok(())
}

/// guest->host: keeps the tx ring full of frames until `total` bytes went out.
fn send(mem: &GuestMemoryMmap, tx: &mut DriverQueue, total: u64) -> Result<Outcome, String> {
    let mut frame = vec![0u8; 12 + FRAME];
    frame[12..18].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frame[18..24].copy_from_slice(&GUEST_MAC);
    frame[24..26].copy_from_slice(&[0x88, 0xb5]);
    let cpu0 = thread_run_ns("net0-q0")?;
    let start = Instant::now();
    let (mut sent, mut frames) = (0u64, 0u64);
    while sent < total {
        let mut posted = false;
        while let Some(id) = tx.take_free() {
            mem.write_slice(&frame, tx.buffer(id))
                .map_err(|e| format!("guest memory: {e}"))?;
            tx.post(mem, id, frame.len() as u32, false)?;
            posted = true;
        }
        if posted {
            tx.kick(mem)?;
        }
        tx.wait("tx")?;
        let done = tx.reap(mem)?;
        frames += done.len() as u64;
        sent += done.len() as u64 * FRAME as u64;
    }
    Ok(Outcome {
        frames,
        bytes: sent,
        seconds: start.elapsed().as_secs_f64(),
        cpu_ns: thread_run_ns("net0-q0")? - cpu0,
    })
}

/// host->guest: a host thread floods UDP datagrams; the driver recycles rx buffers until
/// `total` bytes of frames arrived.
fn receive(mem: &GuestMemoryMmap, rx: &mut DriverQueue, total: u64) -> Result<Outcome, String> {
    rx.fill(mem)?;
    rx.kick(mem)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let sock = std::net::UdpSocket::bind("10.0.0.1:0").map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || {
        let payload = [0x5au8; DATAGRAM];
        while !stopping.load(Ordering::Relaxed) {
            let _ = sock.send_to(&payload, "10.0.0.2:9");
        }
    });
    let cpu0 = thread_run_ns("net0-q0")?;
    let start = Instant::now();
    let (mut got, mut frames) = (0u64, 0u64);
    let result = (|| {
        while got < total {
            rx.wait("rx")?;
            for (_, len) in rx.reap(mem)? {
                got += u64::from(len.saturating_sub(12));
                frames += 1;
            }
            rx.fill(mem)?;
            rx.kick(mem)?;
        }
        Ok::<(), String>(())
    })();
    let seconds = start.elapsed().as_secs_f64();
    let cpu_ns = thread_run_ns("net0-q0")? - cpu0;
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    result?;
    Ok(Outcome {
        frames,
        bytes: got,
        seconds,
        cpu_ns,
    })
}
