//! Raw 9P2000.L messages against a scratch export: the input is a stream of messages, each
//! cut at its own size field, served after a version and an attach (fid 1). Findings are
//! panics, sanitizer reports, and any change to the directory beside the export.

#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use devices::virtio::p9::server::{Ownership, Server, ServerOptions, MAX_MSIZE};
use libfuzzer_sys::fuzz_target;

struct Scratch {
    export: PathBuf,
    outside: PathBuf,
    server: Server,
}

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = ((7 + body.len()) as u32).to_le_bytes().to_vec();
    m.push(kind);
    m.extend_from_slice(&1u16.to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("p9-fuzz-{}", std::process::id()));
        let export = root.join("export");
        let outside = root.join("outside");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&export).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), b"secret").unwrap();
        let options = ServerOptions {
            ownership: Ownership::Vmm,
            readonly: false,
        };
        let server = Server::new(&export, options).unwrap();
        Scratch {
            export,
            outside,
            server,
        }
    })
}

/// The export as every run starts it: a directory, a file, a symlink out of the export.
fn reset_export(s: &Scratch) {
    let _ = fs::remove_dir_all(&s.export);
    fs::create_dir_all(s.export.join("d")).unwrap();
    fs::write(s.export.join("d/f"), b"0123456789").unwrap();
    let _ = std::os::unix::fs::symlink(&s.outside, s.export.join("out"));
}

fuzz_target!(|data: &[u8]| {
    let s = scratch();
    reset_export(s);
    let mut reply = Vec::new();
    let mut version = MAX_MSIZE.to_le_bytes().to_vec();
    version.extend_from_slice(&8u16.to_le_bytes());
    version.extend_from_slice(b"9P2000.L");
    s.server.handle(&message(100, &version), &mut reply, MAX_MSIZE as usize);
    let mut attach = 1u32.to_le_bytes().to_vec();
    attach.extend_from_slice(&u32::MAX.to_le_bytes());
    attach.extend_from_slice(&[0, 0, 0, 0]);
    attach.extend_from_slice(&0u32.to_le_bytes());
    s.server.handle(&message(104, &attach), &mut reply, MAX_MSIZE as usize);

    let mut rest = data;
    while rest.len() >= 4 {
        let size = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let take = size.clamp(4, rest.len());
        s.server.handle(&rest[..take], &mut reply, MAX_MSIZE as usize);
        assert!(reply.len() <= MAX_MSIZE as usize && reply.len() >= 7);
        rest = &rest[take..];
    }
    s.server.reset();
    let names: Vec<_> = fs::read_dir(&s.outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret"], "the guest changed a directory outside the export");
    assert_eq!(fs::read(s.outside.join("secret")).unwrap(), b"secret");
});
