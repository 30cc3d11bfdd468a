//! `bench p9`: the real virtio-9p device driven in-process by a fake driver (no guest, no
//! KVM), on an export in target/chapeau-tests: sequential write and read MB/s in 512 KiB
//! messages with `--depth` requests in flight, and small files created, stat'ed and unlinked
//! per second (walk + Tlcreate + Tgetattr + Tclunk + Tunlinkat each, as a guest's
//! `open(O_CREAT)`, `fstat`, `close`, `unlink` with cache=none).
//!
//! The driver negotiates EVENT_IDX and indirect descriptors as Linux does (kicks only when the
//! device asks, each request an indirect table of its two buffers); `--pages` cuts the buffers
//! in 4 KiB-multiple pieces as Linux's page lists are (~130 descriptors a request); `--plain`
//! negotiates neither feature (two ring descriptors a request, a kick each time). It prints
//! the kicks and interrupts it saw.

use std::sync::Arc;
use std::time::Instant;

use devices::virtio::chain::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use devices::virtio::p9::fake_driver::{
    message, Client, FakeDriver, LINUX_FEATURES, MAX_SLOTS, ROOT,
};
use devices::virtio::p9::server::{Ownership, ServerOptions};
use devices::virtio::p9::wire::{TREAD, TWRITE};
use devices::virtio::Unconfined;

use super::{parse_flags, parse_positive, Failure};

/// Payload per message: the largest msize Linux asks for over virtio (512 KiB) less headers.
const CHUNK: usize = (512 << 10) - 4096;

pub(crate) fn run(args: &[String]) -> Result<(), Failure> {
    let mut mib: u64 = 256;
    let mut files: u32 = 5000;
    let mut depth: u16 = 4;
    let mut pages = false;
    let mut plain = false;
    parse_flags(args, |flag, value| {
        match flag {
            "--mib" => mib = parse_positive(flag, &value()?)?,
            "--files" => files = parse_positive(flag, &value()?)?,
            "--depth" => depth = parse_positive(flag, &value()?)?,
            "--pages" => pages = true,
            "--plain" => plain = true,
            _ => return Ok(false),
        }
        Ok(true)
    })
    .map_err(Failure::Usage)?;
    if depth > MAX_SLOTS {
        return Err(Failure::Usage(format!("--depth is at most {MAX_SLOTS}")));
    }
    let export = ::tests::scratch_dir().join("bench-p9");
    let _ = std::fs::remove_dir_all(&export);
    std::fs::create_dir_all(&export).map_err(|e| Failure::Run(format!("{e}")))?;
    let options = ServerOptions {
        ownership: Ownership::Vmm,
        readonly: false,
    };
    let features = if plain {
        LINUX_FEATURES & !(VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC)
    } else {
        LINUX_FEATURES
    };
    let mut driver = FakeDriver::with_features(&export, options, Arc::new(Unconfined), features)
        .map_err(|e| Failure::Run(e.to_string()))?;
    driver.split_pages = pages;
    let mut client = Client::over(driver);
    let ring = match (plain, pages) {
        (true, _) => "no EVENT_IDX, no indirect descriptors",
        (false, false) => "EVENT_IDX, indirect tables of 2 buffers",
        (false, true) => "EVENT_IDX, indirect tables of page-sized pieces",
    };
    println!("virtio-9p in-process: {mib} MiB sequential, {CHUNK}-byte messages, depth {depth}; {files} small files; {ring}");

    let file = client
        .create(&[], b"seq", 0o644)
        .map_err(|e| Failure::Run(format!("create: errno {e}")))?;
    let total = mib << 20;
    let data = vec![0x5au8; CHUNK];
    let write = stream(&mut client, depth, total, |offset, len| {
        message(TWRITE, 0, |e| {
            e.u32(file).u64(offset).u32(len as u32).bytes(&data[..len]);
        })
    });
    let read = stream(&mut client, depth, total, |offset, len| {
        message(TREAD, 0, |e| {
            e.u32(file).u64(offset).u32(len as u32);
        })
    });
    let mb = total as f64 / 1e6;
    println!("sequential write: {:.0} MB/s", mb / write);
    println!("sequential read:  {:.0} MB/s", mb / read);
    let (kicks, interrupts) = (client.driver.kicks, client.driver.interrupt.count());

    let start = Instant::now();
    for i in 0..files {
        let name = format!("small-{i}");
        let fid = client
            .create(&[], name.as_bytes(), 0o644)
            .map_err(|e| Failure::Run(format!("create {name}: errno {e}")))?;
        client
            .getattr(fid)
            .map_err(|e| Failure::Run(format!("getattr: errno {e}")))?;
        client
            .clunk(fid)
            .map_err(|e| Failure::Run(format!("clunk: errno {e}")))?;
        client
            .unlinkat(ROOT, name.as_bytes(), 0)
            .map_err(|e| Failure::Run(format!("unlink: errno {e}")))?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "small files: {:.0} create+stat+unlink per second",
        f64::from(files) / secs
    );
    // Per small file: walk, Tlcreate, Tgetattr, Tclunk, Tunlinkat.
    let requests = 2 * (total.div_ceil(CHUNK as u64)) + 5 * u64::from(files);
    println!(
        "kicks: {kicks} sequential + {} small files; interrupts: {interrupts} + {}; for ~{requests} requests",
        client.driver.kicks - kicks,
        client.driver.interrupt.count() - interrupts
    );
    drop(client);
    let _ = std::fs::remove_dir_all(&export);
    Ok(())
}

/// Sends `total` bytes' worth of `build(offset, len)` messages, `depth` in flight; seconds.
fn stream(
    client: &mut Client,
    depth: u16,
    total: u64,
    mut build: impl FnMut(u64, usize) -> Vec<u8>,
) -> f64 {
    let driver = &mut client.driver;
    let start = Instant::now();
    let mut offset = 0u64;
    let mut in_flight = 0u16;
    let mut free: Vec<u16> = (0..depth).collect();
    while offset < total || in_flight > 0 {
        while offset < total {
            let Some(slot) = free.pop() else { break };
            let len = (total - offset).min(CHUNK as u64) as usize;
            driver.submit(slot, &build(offset, len), (CHUNK + 4096) as u32);
            offset += len as u64;
            in_flight += 1;
        }
        driver.kick();
        let (head, _) = driver.complete();
        free.push(head / 2);
        in_flight -= 1;
    }
    start.elapsed().as_secs_f64()
}
