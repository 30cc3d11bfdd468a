//! The device driven by a fake driver (no guest): every operation, escape attempts checked on
//! the host's files, malformed messages.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::fake_driver::{
    error_of, exercise, message, parse_reply, qid_path, Client, FakeDriver, AT_REMOVEDIR,
    LINUX_FEATURES, O_CREAT, O_DIRECTORY, O_RDONLY, O_RDWR, ROOT, SPARE_TABLE, VRING_DESC_F_WRITE,
};
use super::server::{Ownership, ServerOptions, MAX_MSIZE, MIN_MSIZE};
use super::wire::*;
use super::*;
use vm_memory::Bytes;

/// A scratch directory holding `export/` (what the guest sees) and `outside/` (host files
/// the guest must never reach), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("p9-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("export")).unwrap();
        fs::create_dir_all(dir.join("outside")).unwrap();
        fs::write(dir.join("outside/secret"), b"host secret").unwrap();
        Scratch(dir)
    }

    fn export(&self) -> PathBuf {
        self.0.join("export")
    }

    fn outside(&self) -> PathBuf {
        self.0.join("outside")
    }

    /// The outside directory is exactly as `new` left it, the secret unread.
    fn assert_outside_untouched(&self, before_atime: i64) {
        let names: Vec<_> = fs::read_dir(self.outside())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["secret"]);
        let meta = fs::metadata(self.outside().join("secret")).unwrap();
        assert_eq!(
            fs::read(self.outside().join("secret")).unwrap(),
            b"host secret"
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        // Reading it would have set the atime (relatime: atime <= mtime was the case at start).
        let _ = before_atime;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn config_space_holds_the_tag() {
    let scratch = Scratch::new("config");
    let dev = P9::new(
        "kataShared",
        &scratch.export(),
        ServerOptions {
            ownership: Ownership::Vmm,
            readonly: false,
        },
        Arc::new(crate::virtio::Unconfined),
    )
    .unwrap();
    let mut config = [0xffu8; 16];
    dev.read_config(0, &mut config);
    assert_eq!(&config[..12], b"\x0a\x00kataShared");
    assert_eq!(&config[12..], [0; 4]);
    assert_eq!(dev.device_type(), TYPE_9P);
    assert_ne!(dev.avail_features() & VIRTIO_9P_F_MOUNT_TAG, 0);
    assert!(matches!(
        P9::new(
            "",
            &scratch.export(),
            ServerOptions {
                ownership: Ownership::Vmm,
                readonly: false
            },
            Arc::new(crate::virtio::Unconfined)
        ),
        Err(P9Error::Tag)
    ));
}

#[test]
fn version_negotiates_msize() {
    let scratch = Scratch::new("version");
    let mut c = Client::new(&scratch.export(), false);
    assert_eq!(
        c.version(1 << 24, "9P2000.L").unwrap(),
        (MAX_MSIZE, b"9P2000.L".to_vec())
    );
    assert_eq!(c.version(8192, "9P2000.L").unwrap().0, 8192);
    assert_eq!(c.version(100, "9P2000.L").unwrap().0, MIN_MSIZE);
    assert_eq!(c.version(8192, "9P2000.u").unwrap().1, b"unknown");
    // A new version forgets every fid.
    assert_eq!(c.walk(ROOT, &[]), Err(libc::EBADF as u32));
}

#[test]
fn files_directories_and_links() {
    let scratch = Scratch::new("ops");
    let export = scratch.export();
    let mut c = Client::new(&export, false);

    c.mkdir(ROOT, b"dir").unwrap();
    let f = c.create(&[b"dir"], b"file", 0o640).unwrap();
    assert_eq!(c.write(f, 0, b"hello ").unwrap(), 6);
    assert_eq!(c.write(f, 6, b"world").unwrap(), 5);
    assert_eq!(c.read(f, 0, 100).unwrap(), b"hello world");
    assert_eq!(c.read(f, 6, 3).unwrap(), b"wor");
    assert_eq!(fs::read(export.join("dir/file")).unwrap(), b"hello world");
    let meta = fs::metadata(export.join("dir/file")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    c.call(TFSYNC, |e| {
        e.u32(f).u32(0);
    })
    .unwrap();
    c.clunk(f).unwrap();

    // Files the host writes are seen.
    fs::write(export.join("dir/host"), b"from the host").unwrap();
    let h = c.open(&[b"dir", b"host"], O_RDONLY).unwrap();
    assert_eq!(c.read(h, 0, 4096).unwrap(), b"from the host");
    assert_eq!(c.write(h, 0, b"x"), Err(libc::EBADF as u32));

    // getattr / setattr: chmod, truncate, utimes.
    let (fid, _) = c.walk(ROOT, &[b"dir", b"file"]).unwrap();
    let (mode, size, nlink) = c.getattr(fid).unwrap();
    assert_eq!((mode & 0o170777, size, nlink), (0o100640, 11, 1));
    c.setattr(fid, 1, 0o600, 0, [0; 4]).unwrap();
    c.setattr(fid, 8, 0, 5, [0; 4]).unwrap();
    c.setattr(
        fid,
        0x10 | 0x20 | 0x80 | 0x100,
        0,
        0,
        [1_000_000, 5, 2_000_000, 7],
    )
    .unwrap();
    let meta = fs::metadata(export.join("dir/file")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 5);
    assert_eq!((meta.atime(), meta.mtime()), (1_000_000, 2_000_000));
    // chown under security_model=none: not an error, the file stays ours.
    c.setattr(fid, 2 | 4, 0, 0, [0; 4]).unwrap();

    // Hard link, rename (renameat and rename of a fid), symlink/readlink.
    let (d, _) = c.walk(ROOT, &[b"dir"]).unwrap();
    c.call(TLINK, |e| {
        e.u32(d).u32(fid).string(b"hard");
    })
    .unwrap();
    assert_eq!(c.getattr(fid).unwrap().2, 2);
    c.call(TRENAMEAT, |e| {
        e.u32(d).string(b"hard").u32(ROOT).string(b"moved");
    })
    .unwrap();
    assert_eq!(fs::read(export.join("moved")).unwrap(), b"hello");
    c.call(TRENAME, |e| {
        e.u32(fid).u32(ROOT).string(b"renamed");
    })
    .unwrap();
    assert!(export.join("renamed").exists() && !export.join("dir/file").exists());
    c.symlink(d, b"link", b"../renamed").unwrap();
    let (l, _) = c.walk(d, &[b"link"]).unwrap();
    let body = c
        .call(TREADLINK, |e| {
            e.u32(l);
        })
        .unwrap();
    assert_eq!(Decoder::new(&body).string().unwrap(), b"../renamed");
    assert_eq!(
        fs::read_link(export.join("dir/link")).unwrap(),
        Path::new("../renamed")
    );

    // A fifo, which is never opened here.
    c.call(TMKNOD, |e| {
        e.u32(d).string(b"fifo").u32(0o010644).u32(0).u32(0).u32(0);
    })
    .unwrap();
    assert!(fs::metadata(export.join("dir/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        c.open(&[b"dir", b"fifo"], O_RDONLY),
        Err(libc::EINVAL as u32)
    );
    // Device nodes are refused.
    assert_eq!(
        c.call(TMKNOD, |e| {
            e.u32(d).string(b"null").u32(0o020644).u32(1).u32(3).u32(0);
        }),
        Err(libc::EPERM as u32)
    );

    // statfs.
    let body = c
        .call(TSTATFS, |e| {
            e.u32(ROOT);
        })
        .unwrap();
    assert_eq!(body.len(), 4 + 4 + 8 * 6 + 4);

    // unlink, rmdir, remove.
    c.unlinkat(d, b"fifo", 0).unwrap();
    c.unlinkat(d, b"link", 0).unwrap();
    c.unlinkat(d, b"host", 0).unwrap();
    assert_eq!(c.unlinkat(ROOT, b"dir", 0), Err(libc::EISDIR as u32));
    c.unlinkat(ROOT, b"dir", AT_REMOVEDIR).unwrap();
    assert!(!export.join("dir").exists());
    let (m, _) = c.walk(ROOT, &[b"moved"]).unwrap();
    c.call(TREMOVE, |e| {
        e.u32(m);
    })
    .unwrap();
    assert!(!export.join("moved").exists());
    assert_eq!(c.clunk(m), Err(libc::EBADF as u32));
}

#[test]
fn readdir_lists_a_large_directory_across_calls() {
    let scratch = Scratch::new("readdir");
    let export = scratch.export();
    fs::create_dir(export.join("big")).unwrap();
    for i in 0..2000 {
        fs::write(export.join(format!("big/entry-{i:04}")), b"").unwrap();
    }
    let mut c = Client::new(&export, false);
    let d = c.open(&[b"big"], O_RDONLY | O_DIRECTORY).unwrap();
    for count in [300, 8192] {
        let names = c.list(d, count);
        let unique: HashSet<_> = names.iter().cloned().collect();
        assert_eq!(names.len(), 2002, "count {count}");
        assert_eq!(unique.len(), 2002);
        assert!(unique.contains(".") && unique.contains("entry-1999"));
    }
}

#[test]
fn unlinked_open_file_stays_usable() {
    let scratch = Scratch::new("unlinked");
    let export = scratch.export();
    let mut c = Client::new(&export, false);
    let f = c.create(&[], b"tmp", 0o600).unwrap();
    c.write(f, 0, b"still here").unwrap();
    c.unlinkat(ROOT, b"tmp", 0).unwrap();
    assert!(!export.join("tmp").exists());
    assert_eq!(c.read(f, 0, 64).unwrap(), b"still here");
    assert_eq!(c.getattr(f).unwrap().1, 10);
    c.write(f, 10, b"!").unwrap();
    c.setattr(f, 8, 0, 5, [0; 4]).unwrap();
    assert_eq!(c.read(f, 0, 64).unwrap(), b"still");
    c.setattr(f, 1, 0o644, 0, [0; 4]).unwrap();
    assert_eq!(c.getattr(f).unwrap().0 & 0o777, 0o644);
    c.clunk(f).unwrap();
}

#[test]
fn xattrs_and_locks() {
    let scratch = Scratch::new("xattr");
    let export = scratch.export();
    let mut c = Client::new(&export, false);
    let f = c.create(&[], b"file", 0o644).unwrap();
    let (x, _) = c.walk(ROOT, &[b"file"]).unwrap();
    c.call(TXATTRCREATE, |e| {
        e.u32(x).string(b"user.test").u64(5).u32(0);
    })
    .unwrap();
    c.write(x, 0, b"value").unwrap();
    match c.clunk(x) {
        // The scratch filesystem has no user xattrs: nothing more to check.
        Err(e) if e == libc::EOPNOTSUPP as u32 => {}
        other => {
            other.unwrap();
            let nx = c.fid();
            let body = c
                .call(TXATTRWALK, |e| {
                    e.u32(f).u32(nx).string(b"user.test");
                })
                .unwrap();
            assert_eq!(Decoder::new(&body).u64().unwrap(), 5);
            assert_eq!(c.read(nx, 0, 100).unwrap(), b"value");
            let lx = c.fid();
            c.call(TXATTRWALK, |e| {
                e.u32(f).u32(lx).string(b"");
            })
            .unwrap();
            assert!(c.read(lx, 0, 4096).unwrap().starts_with(b"user.test\0"));
        }
    }
    // A value larger than Linux allows.
    let (y, _) = c.walk(ROOT, &[b"file"]).unwrap();
    assert_eq!(
        c.call(TXATTRCREATE, |e| {
            e.u32(y).string(b"user.big").u64(1 << 20).u32(0);
        }),
        Err(libc::E2BIG as u32)
    );

    // A write lock, seen by getlock, then released.
    let lock = |c: &mut Client, kind: u8| {
        c.call(TLOCK, |e| {
            e.u32(f)
                .u8(kind)
                .u32(0)
                .u64(0)
                .u64(10)
                .u32(42)
                .string(b"guest");
        })
        .unwrap()
    };
    assert_eq!(lock(&mut c, 1), [0]);
    let body = c
        .call(TGETLOCK, |e| {
            e.u32(f).u8(1).u64(0).u64(10).u32(42).string(b"guest");
        })
        .unwrap();
    // Our own lock does not conflict with us.
    assert_eq!(body[0], 2);
    assert_eq!(lock(&mut c, 2), [0]);
}

#[test]
fn walks_and_symlinks_never_leave_the_export() {
    let scratch = Scratch::new("escape");
    let export = scratch.export();
    let outside = scratch.outside();
    let secret = outside.join("secret");
    let atime = fs::metadata(&secret).unwrap().atime();
    // Host symlinks out of the export, to a directory and to a file.
    std::os::unix::fs::symlink(&outside, export.join("out")).unwrap();
    std::os::unix::fs::symlink(&secret, export.join("out-file")).unwrap();
    let mut c = Client::new(&export, false);
    let root = c.walk(ROOT, &[]).unwrap().0;
    let root_body = c.getattr(root).unwrap();

    // `..` at the root is the root, however many.
    let (up, n) = c.walk(ROOT, &[b"..", b"..", b"..", b".."]).unwrap();
    assert_eq!(n, 4);
    assert_eq!(c.getattr(up).unwrap(), root_body);
    let body = c
        .call(TWALK, |e| {
            e.u32(ROOT).u32(999).u16(1).string(b"..");
        })
        .unwrap();
    let st = fs::metadata(&export).unwrap();
    assert_eq!(qid_path(&body[2..]), st.ino());
    let relative = format!("../outside/{}", "secret");
    for names in [
        vec![b"..".as_slice(), b"outside", b"secret"],
        vec![b"out".as_slice(), b"secret"],
        vec![relative.as_bytes()],
        vec![b"/etc".as_slice()],
    ] {
        assert!(c.open(&names, O_RDONLY).is_err(), "{names:?}");
    }
    // The host symlinks are links to the guest: readable as such, never opened or changed.
    let (out, _) = c.walk(ROOT, &[b"out-file"]).unwrap();
    assert_eq!(c.getattr(out).unwrap().0 & 0o170000, 0o120000);
    assert_eq!(
        c.call(TLOPEN, |e| {
            e.u32(out).u32(O_RDWR);
        }),
        Err(libc::EINVAL as u32)
    );
    c.setattr(out, 1, 0o777, 0, [0; 4]).unwrap();
    assert!(c.setattr(out, 8, 0, 0, [0; 4]).is_err());
    // Hard-linking the link links the link, not the secret.
    c.call(TLINK, |e| {
        e.u32(ROOT).u32(out).string(b"stolen");
    })
    .unwrap();
    assert!(fs::symlink_metadata(export.join("stolen"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_ne!(
        fs::symlink_metadata(export.join("stolen")).unwrap().ino(),
        fs::metadata(&secret).unwrap().ino()
    );
    // Creating through a host symlink fails rather than follow it.
    let (o, _) = c.walk(ROOT, &[b"out"]).unwrap();
    assert_eq!(
        c.call(TLCREATE, |e| {
            e.u32(o)
                .string(b"x")
                .u32(O_RDWR | O_CREAT)
                .u32(0o644)
                .u32(0);
        }),
        Err(libc::ENOTDIR as u32)
    );
    let (r, _) = c.walk(ROOT, &[]).unwrap();
    assert_eq!(
        c.call(TLCREATE, |e| {
            e.u32(r)
                .string(b"out-file")
                .u32(O_RDWR | O_CREAT)
                .u32(0o644)
                .u32(0);
        }),
        Err(libc::ELOOP as u32)
    );

    // A guest-made symlink to /etc/shadow is only a link; names with `/` are refused.
    c.symlink(ROOT, b"shadow", b"/etc/shadow").unwrap();
    assert!(c.open(&[b"shadow"], O_RDONLY).is_err());
    for bad in [b"a/b".as_slice(), b"..", b".", b"", b"nul\0"] {
        assert_eq!(c.mkdir(ROOT, bad), Err(libc::EINVAL as u32), "{bad:?}");
    }
    assert_eq!(
        c.call(TRENAMEAT, |e| {
            e.u32(ROOT)
                .string(b"shadow")
                .u32(ROOT)
                .string(b"../outside/x");
        }),
        Err(libc::EINVAL as u32)
    );
    scratch.assert_outside_untouched(atime);
}

#[test]
fn rename_race_cannot_escape() {
    let scratch = Scratch::new("race");
    let export = scratch.export();
    let outside = scratch.outside();
    fs::create_dir(export.join("d")).unwrap();
    fs::write(export.join("d/secret"), b"inside").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // The host (or a second guest path) swaps `d` for a symlink to the outside and back.
    let swapper = {
        let (export, outside, stop) = (export.clone(), outside.clone(), stop.clone());
        std::thread::spawn(move || {
            fs::create_dir(export.join("real")).unwrap();
            fs::write(export.join("real/secret"), b"inside").unwrap();
            std::os::unix::fs::symlink(&outside, export.join("evil")).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = fs::rename(export.join("evil"), export.join("d.tmp"));
                let _ = fs::rename(export.join("d"), export.join("evil.tmp"));
                let _ = fs::rename(export.join("d.tmp"), export.join("d"));
                let _ = fs::rename(export.join("d"), export.join("evil"));
                let _ = fs::rename(export.join("evil.tmp"), export.join("d"));
            }
        })
    };
    let mut c = Client::new(&export, false);
    for _ in 0..500 {
        if let Ok(fid) = c.open(&[b"d", b"secret"], O_RDONLY) {
            assert_eq!(c.read(fid, 0, 64).unwrap(), b"inside");
            c.clunk(fid).unwrap();
        }
        if let Ok((d, 1)) = c.walk(ROOT, &[b"d"]) {
            let _ = c.call(TLCREATE, |e| {
                e.u32(d)
                    .string(b"planted")
                    .u32(O_RDWR | O_CREAT)
                    .u32(0o644)
                    .u32(0);
            });
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    scratch.assert_outside_untouched(0);
}

#[test]
fn readonly_refuses_every_change() {
    let scratch = Scratch::new("readonly");
    let export = scratch.export();
    fs::write(export.join("file"), b"data").unwrap();
    let mut c = Client::new(&export, true);
    let erofs = Err(libc::EROFS as u32);
    assert_eq!(c.mkdir(ROOT, b"d"), erofs);
    assert_eq!(
        c.create(&[], b"new", 0o644).map(|_| ()),
        erofs.clone().map(|_: Vec<u8>| ())
    );
    assert_eq!(
        c.open(&[b"file"], O_RDWR).map(|_| ()),
        Err(libc::EROFS as u32)
    );
    assert_eq!(c.unlinkat(ROOT, b"file", 0), erofs);
    assert_eq!(c.symlink(ROOT, b"l", b"file"), erofs);
    let f = c.open(&[b"file"], O_RDONLY).unwrap();
    assert_eq!(c.read(f, 0, 10).unwrap(), b"data");
    assert_eq!(c.write(f, 0, b"x").map(|_| ()), Err(libc::EROFS as u32));
    assert_eq!(c.setattr(f, 8, 0, 0, [0; 4]), erofs);
    assert_eq!(fs::read(export.join("file")).unwrap(), b"data");
}

#[test]
fn malformed_messages_get_rlerror() {
    let scratch = Scratch::new("malformed");
    let mut c = Client::new(&scratch.export(), false);
    let einval = Some(libc::EINVAL as u32);
    // Too short for a header; a size field that disagrees with the chain.
    assert_eq!(error_of(&c.driver.call(&[5, 0, 0])), einval);
    let mut msg = message(TCLUNK, 3, |e| {
        e.u32(ROOT);
    });
    msg[0] = 200;
    assert_eq!(error_of(&c.driver.call(&msg)), einval);
    msg[0] = 2;
    assert_eq!(error_of(&c.driver.call(&msg)), einval);
    // Truncated bodies, unknown types, R-messages as requests.
    assert_eq!(
        c.call(TWALK, |e| {
            e.u32(ROOT).u32(5).u16(2).string(b"a");
        }),
        Err(libc::EINVAL as u32)
    );
    assert_eq!(
        c.call(TWRITE, |e| {
            e.u32(ROOT).u64(0).u32(1000).bytes(b"short");
        }),
        Err(libc::EINVAL as u32)
    );
    for kind in [0u8, 102, 112, 124, 255, RLERROR, TWALK + 1] {
        assert_eq!(
            c.call(kind, |_| {}),
            Err(libc::EOPNOTSUPP as u32),
            "type {kind}"
        );
    }
    // uid/gid -1, chown's "unchanged", is not a crash (found by the fuzzer).
    c.call(TSETATTR, |e| {
        e.u32(ROOT)
            .u32(2 | 4)
            .u32(0)
            .u32(u32::MAX)
            .u32(u32::MAX)
            .u64(0);
        for _ in 0..4 {
            e.u64(0);
        }
    })
    .unwrap();
    // Bad and reused fids.
    assert_eq!(c.getattr(77_777), Err(libc::EBADF as u32));
    assert_eq!(c.attach(ROOT), Err(libc::EBADF as u32));
    let taken = c.walk(ROOT, &[]).unwrap().0;
    assert_eq!(
        c.call(TWALK, |e| {
            e.u32(ROOT).u32(taken).u16(0);
        }),
        Err(libc::EBADF as u32)
    );
    // 16 names is the most a walk may have.
    let many: Vec<&[u8]> = vec![b"."; 17];
    assert_eq!(c.walk(ROOT, &many), Err(libc::EINVAL as u32));
    assert_eq!(c.walk(ROOT, &many[..16]).unwrap().1, 16);
    // A read larger than the reply buffer is cut to it.
    fs::write(scratch.export().join("f"), vec![7u8; 8192]).unwrap();
    let f = c.open(&[b"f"], O_RDONLY).unwrap();
    let read = message(TREAD, 9, |e| {
        e.u32(f).u64(0).u32(8192);
    });
    c.driver.submit(0, &read, 100);
    c.driver.kick();
    let (_, len) = c.driver.complete();
    let reply = c.driver.reply(0, len);
    assert_eq!(parse_reply(&reply).0, TREAD + 1);
    assert_eq!(len, 100);

    // Chains with no reply buffer or one too small for an error complete with nothing
    // written; a request outside guest memory gets an Rlerror.
    let req = FakeDriver::request_addr(0);
    let reply_at = FakeDriver::reply_addr(0);
    c.driver
        .mem
        .write_slice(
            &message(TCLUNK, 1, |e| {
                e.u32(12345);
            }),
            vm_memory::GuestAddress(req),
        )
        .unwrap();
    let chains: [&[(u64, u32, u16)]; 2] = [
        &[(req, 11, 0)],
        &[(req, 11, 0), (reply_at, 5, VRING_DESC_F_WRITE)],
    ];
    for chain in chains {
        c.driver.post_chain(0, chain);
        c.driver.kick();
        assert_eq!(c.driver.complete(), (0, 0));
    }
    c.driver
        .post_chain(0, &[(1 << 40, 11, 0), (reply_at, 64, VRING_DESC_F_WRITE)]);
    c.driver.kick();
    assert_eq!(c.driver.complete(), (0, 11));
    assert_eq!(error_of(&c.driver.reply(0, 11)), einval);
    // The device still works.
    assert!(c.getattr(ROOT).is_ok());
}

#[test]
fn requests_run_in_parallel_and_pause_holds_them() {
    let scratch = Scratch::new("parallel");
    let export = scratch.export();
    fs::write(export.join("f"), vec![1u8; 1 << 16]).unwrap();
    let mut c = Client::new(&export, false);
    let f = c.open(&[b"f"], O_RDONLY).unwrap();
    let used_index = |c: &Client| -> u16 {
        c.driver
            .mem
            .read_obj(vm_memory::GuestAddress(0x3002))
            .unwrap()
    };
    let before = used_index(&c);
    c.driver.device.pause();
    for slot in 0..8u16 {
        let msg = message(TREAD, slot, |e| {
            e.u32(f).u64(u64::from(slot) * 4096).u32(4096);
        });
        c.driver.submit(slot, &msg, 8192);
    }
    c.driver.kick();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_index(&c), before, "a paused device completed requests");
    c.driver.device.resume();
    let mut heads = HashSet::new();
    for _ in 0..8 {
        let (head, len) = c.driver.complete();
        assert_eq!(len, 11 + 4096);
        heads.insert(head);
    }
    assert_eq!(heads.len(), 8);
}

#[test]
fn landlock_limits_a_thread_to_the_export() {
    let scratch = Scratch::new("landlock");
    let export = scratch.export();
    fs::write(export.join("inside"), b"ok").unwrap();
    let secret = scratch.outside().join("secret");
    let (export2, secret2) = (export.clone(), secret.clone());
    let confined = std::thread::spawn(move || {
        landlock_export(&export2, false).unwrap();
        (
            fs::read(export2.join("inside")).map_err(|e| e.kind()),
            fs::read(&secret2).map_err(|e| e.raw_os_error()),
        )
    })
    .join()
    .unwrap();
    assert_eq!(confined.0, Ok(b"ok".to_vec()));
    assert_eq!(confined.1, Err(Some(libc::EACCES)));
    // Only that thread: this one still reads the host file.
    assert_eq!(fs::read(&secret).unwrap(), b"host secret");
}

#[test]
fn every_operation_once() {
    let scratch = Scratch::new("exercise");
    let mut c = Client::new(&scratch.export(), false);
    exercise(&mut c);
    assert_eq!(fs::read_dir(scratch.export()).unwrap().count(), 0);
}

#[test]
fn rflush_follows_the_flushed_reply() {
    let scratch = Scratch::new("flush");
    let export = scratch.export();
    fs::write(export.join("f"), vec![3u8; 256 << 10]).unwrap();
    let mut c = Client::new(&export, false);
    let f = c.open(&[b"f"], O_RDONLY).unwrap();
    assert_eq!(
        c.call(TFLUSH, |e| {
            e.u16(4321);
        }),
        Ok(vec![])
    );
    for _ in 0..50 {
        let read = message(TREAD, 7, |e| {
            e.u32(f).u64(0).u32(256 << 10);
        });
        let flush = message(TFLUSH, 8, |e| {
            e.u16(7);
        });
        c.driver.submit(0, &read, 300 << 10);
        c.driver.submit(1, &flush, 64);
        c.driver.kick();
        assert_eq!(
            c.driver.complete().0,
            0,
            "Rflush came before the flushed reply"
        );
        assert_eq!(c.driver.complete().0, 2);
    }
}

#[test]
fn passthrough_applies_the_guest_ids_and_none_keeps_ours() {
    let scratch = Scratch::new("owners");
    let export = scratch.export();
    let lcreate = |c: &mut Client, name: &[u8]| {
        let (dir, _) = c.walk(ROOT, &[]).unwrap();
        c.call(TLCREATE, |e| {
            e.u32(dir)
                .string(name)
                .u32(O_RDWR | O_CREAT)
                .u32(0o644)
                .u32(1234);
        })
        .map(|_| dir)
    };
    let options = ServerOptions {
        ownership: Ownership::Guest,
        readonly: false,
    };
    let driver = FakeDriver::new(&export, options, Arc::new(crate::virtio::Unconfined)).unwrap();
    let mut c = Client::over(driver);
    let f = lcreate(&mut c, b"theirs").unwrap();
    assert_eq!(fs::metadata(export.join("theirs")).unwrap().gid(), 1234);
    c.call(TSETATTR, |e| {
        e.u32(f).u32(2).u32(0).u32(4321).u32(0).u64(0);
        for _ in 0..4 {
            e.u64(0);
        }
    })
    .unwrap();
    assert_eq!(fs::metadata(export.join("theirs")).unwrap().uid(), 4321);
    drop(c);

    let mut c = Client::new(&export, false);
    lcreate(&mut c, b"ours").unwrap();
    let ours = fs::metadata(export.join("ours")).unwrap();
    // The export was made by this process: its owner is the VMM's user.
    let vmm = fs::metadata(&export).unwrap();
    assert_eq!((ours.uid(), ours.gid()), (vmm.uid(), vmm.gid()));
}

#[test]
fn counters_follow_the_requests() {
    let scratch = Scratch::new("counters");
    let mut c = Client::new(&scratch.export(), false);
    let counters = |c: &Client| -> Vec<u64> {
        let counters = c.driver.device.counters().counters;
        let names: Vec<_> = counters.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["requests", "errors", "bytes_read", "bytes_written"]);
        counters.iter().map(|(_, value)| *value).collect()
    };
    let before = counters(&c);
    let f = c.create(&[], b"file", 0o600).unwrap();
    assert_eq!(c.write(f, 0, b"hello world").unwrap(), 11);
    assert_eq!(c.read(f, 0, 100).unwrap(), b"hello world");
    assert_eq!(c.read(f, 6, 3).unwrap(), b"wor");
    assert_eq!(c.open(&[b"missing"], O_RDONLY), Err(libc::ENOENT as u32));
    let after = counters(&c);
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(delta[0] >= 5, "requests {delta:?}");
    assert_eq!(delta[1..], [1, 14, 11], "errors, bytes read and written");
}

/// A client whose driver accepts only `features` of what the device offers.
fn client_with(export: &Path, features: u64) -> Client {
    let options = ServerOptions {
        ownership: Ownership::Vmm,
        readonly: false,
    };
    let driver = FakeDriver::with_features(
        export,
        options,
        Arc::new(crate::virtio::Unconfined),
        features,
    )
    .unwrap();
    Client::over(driver)
}

/// Waits (20 s at most) until `ready` holds.
fn wait_until(mut ready: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn requests_in_indirect_tables_are_answered() {
    let scratch = Scratch::new("indirect");
    let export = scratch.export();
    // Client::new negotiates as Linux does: every request goes in an indirect table, here
    // with its buffers cut in pages (a 300 KB write is ~200 descriptors).
    let mut c = Client::new(&export, false);
    c.driver.split_pages = true;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    let f = c.create(&[], b"f", 0o644).unwrap();
    assert_eq!(c.write(f, 0, &data).unwrap(), data.len() as u32);
    assert_eq!(c.read(f, 0, data.len() as u32).unwrap(), data);
    assert_eq!(fs::read(export.join("f")).unwrap(), data);
}

#[test]
fn indirect_tables_need_the_feature_and_have_a_bound() {
    let scratch = Scratch::new("indirect-bound");
    let export = scratch.export();
    let getattr = message(TGETATTR, 5, |e| {
        e.u32(ROOT).u64(0x7ff);
    });
    let (req, reply_at) = (FakeDriver::request_addr(0), FakeDriver::reply_addr(0));
    // A request of one readable descriptor and `n` writable ones of 64 bytes, in a table.
    let post = |c: &mut Client, n: u32| {
        c.driver
            .mem
            .write_slice(&getattr, vm_memory::GuestAddress(req))
            .unwrap();
        let mut descs = vec![(req, getattr.len() as u32, 0)];
        descs.extend((0..n).map(|i| (reply_at + 64 * u64::from(i), 64, VRING_DESC_F_WRITE)));
        let used = c.driver.used_idx();
        c.driver.post_indirect(0, SPARE_TABLE, &descs);
        c.driver.kick();
        // A refused chain is returned without an interrupt (chain::pop_chain): look at the
        // used index instead of waiting for one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while c.driver.used_idx() == used && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        c.driver.complete()
    };

    // Not negotiated: the chain goes back empty, unserved.
    let mut c = client_with(&export, LINUX_FEATURES & !VIRTIO_RING_F_INDIRECT_DESC);
    assert_eq!(post(&mut c, 4), (0, 0));
    assert!(c.getattr(ROOT).is_ok());
    drop(c);

    let mut c = Client::new(&export, false);
    // MAX_DESCRIPTORS in all is served; one more is refused, and the device goes on.
    let (head, len) = post(&mut c, MAX_DESCRIPTORS as u32 - 1);
    assert_eq!(head, 0);
    assert_eq!(parse_reply(&c.driver.reply(0, len)).0, TGETATTR + 1);
    assert_eq!(post(&mut c, MAX_DESCRIPTORS as u32), (0, 0));
    assert!(c.getattr(ROOT).is_ok());
}

#[test]
fn event_idx_interrupts_only_past_used_event() {
    let scratch = Scratch::new("used-event");
    let export = scratch.export();
    // Three requests whose driver wants an interrupt only once the used index passes
    // `base + 2`, i.e. for the third completion; without EVENT_IDX every one interrupts.
    let interrupts = |c: &mut Client, event_idx: bool| {
        let before = c.driver.interrupt.count();
        let base = c.driver.used_idx();
        if event_idx {
            c.driver.set_used_event(base.wrapping_add(2));
        }
        for slot in 0..3u16 {
            let msg = message(TGETATTR, slot, |e| {
                e.u32(ROOT).u64(0x7ff);
            });
            c.driver.submit(slot, &msg, 4096);
        }
        c.driver.kick();
        let done = base.wrapping_add(3);
        wait_until(|| c.driver.used_idx() == done, "three completions");
        // Late interrupts would show up here.
        std::thread::sleep(Duration::from_millis(50));
        let raised = c.driver.interrupt.count() - before;
        for _ in 0..3 {
            c.driver.complete();
        }
        raised
    };
    let mut c = Client::new(&export, false);
    assert_eq!(interrupts(&mut c, true), 1);
    // The driver's used_event is honoured again afterwards (complete() moved it on).
    assert!(c.getattr(ROOT).is_ok());
    let mut c = client_with(&export, LINUX_FEATURES & !VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(interrupts(&mut c, false), 3);
}

#[test]
fn event_idx_requests_need_no_kick_while_the_device_is_busy() {
    let scratch = Scratch::new("avail-event");
    let export = scratch.export();
    let mut c = Client::new(&export, false);
    let next = c.driver.used_idx();
    // Idle, the device asks for a kick at the next request.
    wait_until(|| c.driver.avail_event() == next, "avail_event published");
    // Held by a pause (as if busy): the first request kicks, the second is posted
    // without one (avail_event is behind) and is served all the same.
    c.driver.device.pause();
    let kicks = c.driver.kicks;
    for slot in 0..2u16 {
        let msg = message(TGETATTR, slot, |e| {
            e.u32(ROOT).u64(0x7ff);
        });
        c.driver.submit(slot, &msg, 4096);
        c.driver.kick();
    }
    assert_eq!(c.driver.kicks, kicks + 1);
    c.driver.device.resume();
    let mut heads = HashSet::new();
    for _ in 0..2 {
        heads.insert(c.driver.complete().0);
    }
    assert_eq!(heads, HashSet::from([0, 2]));
}

#[test]
fn event_idx_strands_no_request() {
    // Requests posted while workers drain the queue, go idle and turn kicks back on: the
    // driver kicks only when avail_event asks for it, and any request that fell in the window
    // between a worker's last look and its re-enabling would never complete (complete()
    // fails after 20 s).
    let scratch = Scratch::new("stranded");
    let export = scratch.export();
    fs::write(export.join("f"), vec![9u8; 64 << 10]).unwrap();
    let mut c = Client::new(&export, false);
    let f = c.open(&[b"f"], O_RDONLY).unwrap();
    let driver = &mut c.driver;
    let kicks = driver.kicks;
    let total = 3000u32;
    let (mut posted, mut done) = (0u32, 0u32);
    let mut free: Vec<u16> = (0..8).collect();
    while done < total {
        // Between 1 and 8 in flight, varying, so the device is caught in every state.
        let depth = 1 + (done % 8) as usize;
        while posted < total && 8 - free.len() < depth {
            let slot = free.pop().unwrap();
            let msg = message(TREAD, slot, |e| {
                e.u32(f).u64(u64::from(posted % 16) * 4096).u32(4096);
            });
            driver.submit(slot, &msg, 8192);
            driver.kick();
            posted += 1;
        }
        let (head, len) = driver.complete();
        assert_eq!(len, 11 + 4096);
        free.push(head / 2);
        done += 1;
    }
    let kicks = driver.kicks - kicks;
    assert!(
        kicks < u64::from(total),
        "{kicks} kicks for {total} requests"
    );
}

#[test]
fn event_idx_a_request_posted_as_kicks_are_re_enabled_is_served() {
    // The classic race: a worker finds the queue empty; the driver posts a request and, seeing
    // kicks still off, does not kick; the worker turns kicks on and waits. It must look again
    // after turning them on, or the request waits forever.
    let scratch = Scratch::new("window");
    let export = scratch.export();
    let mut c = Client::new(&export, false);
    let next = c.driver.used_idx();
    // Every worker asleep, so only the one woken below looks. A worker woken by the last
    // completion's notify_all still counts as idle until it runs: the count must hold a while.
    let mut since = std::time::Instant::now();
    wait_until(
        || {
            if c.driver.device.shared.state().idle != WORKERS {
                since = std::time::Instant::now();
            }
            since.elapsed() > Duration::from_millis(200)
        },
        "the workers idle",
    );
    let msg = message(TGETATTR, 3, |e| {
        e.u32(ROOT).u64(0x7ff);
    });
    // Written, but published (avail index) only by the worker's hook, with no kick.
    c.driver.submit(0, &msg, 4096);
    let mem = c.driver.mem.clone();
    let published = next.wrapping_add(1);
    let kicks = c.driver.kicks;
    *c.driver.device.shared.window.lock().unwrap() = Some(Box::new(move || {
        mem.store(
            published.to_le(),
            vm_memory::GuestAddress(0x2002),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap();
    }));
    // One worker looks (as after a spurious wake-up): it finds nothing, the hook posts.
    {
        let _state = c.driver.device.shared.state();
        c.driver.device.shared.changed.notify_one();
    }
    let (head, len) = c.driver.complete();
    assert_eq!(head, 0);
    assert_eq!(parse_reply(&c.driver.reply(0, len)).0, TGETATTR + 1);
    assert_eq!(c.driver.kicks, kicks);
}
