//! A 9P2000.L server over one exported host directory, shared by the device's worker threads.
//!
//! Confinement rests on file descriptors, not on path strings: every fid holds an `O_PATH` fd
//! of the file it names, reached from the export's root fd one component at a time with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so no host symlink
//! is ever followed and no name can climb out; `..` is answered by the fid's own parent except
//! at the root, which is its own parent. A guest symlink to `/etc/shadow` is just a link: the
//! guest kernel reads it and walks the target itself, from the root of this export.
//!
//! Opening a file for I/O, chmod, utimes, link and xattrs on a fid go through
//! `/proc/self/fd/N` of the fid's own fd (opened once, before any sandboxing): the magic link
//! lands on exactly the inode the fid holds, so it is not a path lookup a guest can steer, and
//! it works on files that have been unlinked while open.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, RawDir, ResolveFlags, Stat, Timespec, Timestamps, XattrFlags,
    UTIME_NOW, UTIME_OMIT,
};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};

use super::wire::*;

/// Largest message we accept or send: 512 KiB of payload plus headers.
pub const MAX_MSIZE: u32 = (512 << 10) + 4096;
/// Smallest msize a client may ask for (QEMU's too): a page, which every reply fits.
pub const MIN_MSIZE: u32 = 4096;
/// Most names in one Twalk (9P's MAXWELEM).
const MAX_WALK_NAMES: u16 = 16;
/// Most fids a guest may hold; each may hold host file descriptors.
pub const MAX_FIDS: usize = 1 << 16;
/// Linux's XATTR_SIZE_MAX: the largest xattr value.
const MAX_XATTR_SIZE: u64 = 64 << 10;
/// Open flags a guest may pass on (Linux's P9_DOTL_* values are x86's O_* values). O_DIRECT
/// would need aligned buffers, O_NOATIME is refused unless we own the file, O_NONBLOCK and the
/// rest mean nothing here.
const PASSED_OPEN_FLAGS: u32 =
    (libc::O_ACCMODE | libc::O_TRUNC | libc::O_APPEND | libc::O_DSYNC | libc::O_SYNC) as u32;
const WRITE_OPEN_FLAGS: u32 = (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC) as u32;

/// Tsetattr `valid` bits.
const SETATTR_MODE: u32 = 1 << 0;
const SETATTR_UID: u32 = 1 << 1;
const SETATTR_GID: u32 = 1 << 2;
const SETATTR_SIZE: u32 = 1 << 3;
const SETATTR_ATIME: u32 = 1 << 4;
const SETATTR_MTIME: u32 = 1 << 5;
const SETATTR_ATIME_SET: u32 = 1 << 7;
const SETATTR_MTIME_SET: u32 = 1 << 8;
/// Rgetattr `valid`: every field up to `blocks`.
const GETATTR_BASIC: u64 = 0x7ff;
/// Qid types.
const QT_DIR: u8 = 0x80;
const QT_SYMLINK: u8 = 0x02;
/// Tlock types and Rlock statuses.
const LOCK_TYPE_UNLCK: u8 = 2;
const LOCK_SUCCESS: u8 = 0;
const LOCK_BLOCKED: u8 = 1;
const LOCK_ERROR: u8 = 2;

type Result<T> = std::result::Result<T, Errno>;

/// Who owns what the guest creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// The VMM's user; chown failures are ignored (QEMU's `security_model=none`).
    Vmm,
    /// The guest's uid/gid (QEMU's `passthrough`).
    Guest,
}

#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    pub ownership: Ownership,
    pub readonly: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    fn of(st: &Stat) -> Kind {
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

/// An open file and, for a directory, the lock that keeps seek+getdents together.
struct Open {
    file: File,
    dir_position: Mutex<()>,
}

/// An xattr fid: a value read by Txattrwalk, or one Txattrcreate is collecting.
enum Xattr {
    Read(Vec<u8>),
    Write {
        name: CString,
        size: usize,
        flags: XattrFlags,
        data: Vec<u8>,
    },
}

/// A Tlock/Tgetlock: the open file and the byte range as an fcntl lock.
struct LockRequest {
    open: Arc<Open>,
    flock: libc::flock,
    proc_id: u32,
    client: Vec<u8>,
}

#[derive(Clone)]
struct Fid {
    /// `O_PATH | O_NOFOLLOW` fd of the file; never a followed host symlink.
    path: Arc<OwnedFd>,
    kind: Kind,
    /// The directory and name the fid was reached by, for Tremove and Trename; checked against
    /// `path`'s inode before use since either may have changed.
    parent: Option<(Arc<OwnedFd>, CString)>,
    open: Option<Arc<Open>>,
    xattr: Option<Arc<Mutex<Xattr>>>,
    /// The guest user from Tattach, owner of what it creates under `passthrough`.
    uid: u32,
}

pub struct Server {
    root: Arc<OwnedFd>,
    root_id: (u64, u64),
    /// `/proc/self/fd`, opened before any sandboxing.
    proc_fds: OwnedFd,
    options: ServerOptions,
    msize: AtomicU32,
    fids: Mutex<HashMap<u32, Fid>>,
}

fn io_errno(e: io::Error) -> Errno {
    Errno::from_io_error(&e).unwrap_or(Errno::IO)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked left consistent data: every critical section is one map/vec op.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn qid_of(st: &Stat) -> Qid {
    let kind = match Kind::of(st) {
        Kind::Dir => QT_DIR,
        Kind::Symlink => QT_SYMLINK,
        _ => 0,
    };
    Qid {
        kind,
        version: 0,
        path: st.st_ino,
    }
}

/// A single file name: not empty, no `/`, no NUL; `.` and `..` only where `dots` allows.
fn name(bytes: &[u8], dots: bool) -> Result<CString> {
    if bytes.is_empty() || bytes.contains(&b'/') {
        return Err(Errno::INVAL);
    }
    if !dots && (bytes == b"." || bytes == b"..") {
        return Err(Errno::INVAL);
    }
    CString::new(bytes).map_err(|_| Errno::INVAL)
}

/// Resolves one name under `dir` without following any symlink or leaving `dir`.
fn open_beneath(dir: &OwnedFd, name: &CStr, flags: OFlags, mode: Mode) -> Result<OwnedFd> {
    rustix::fs::openat2(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        mode,
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

fn lookup(dir: &OwnedFd, name: &CStr) -> Result<OwnedFd> {
    open_beneath(dir, name, OFlags::PATH, Mode::empty())
}

fn stat_fd(fd: &OwnedFd) -> Result<Stat> {
    rustix::fs::fstat(fd)
}

fn stat_name(dir: &OwnedFd, name: &CStr) -> Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
}

/// A guest's uid; -1 (which chown reads as "unchanged") is no uid at all.
fn uid(raw: u32) -> Option<Uid> {
    (raw != u32::MAX).then(|| Uid::from_raw(raw))
}

fn gid(raw: u32) -> Option<Gid> {
    (raw != u32::MAX).then(|| Gid::from_raw(raw))
}

fn same_file(a: &Stat, b: &Stat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

impl Server {
    /// Serves the directory `root`; fails if it is not a directory or `/proc` is not mounted.
    pub fn new(root: &Path, options: ServerOptions) -> io::Result<Server> {
        let root = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = stat_fd(&root)?;
        let proc_fds = rustix::fs::open(
            "/proc/self/fd",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Server {
            root: Arc::new(root),
            root_id: (st.st_dev, st.st_ino),
            proc_fds,
            options,
            msize: AtomicU32::new(MAX_MSIZE),
            fids: Mutex::new(HashMap::new()),
        })
    }

    /// The negotiated maximum message size.
    pub fn msize(&self) -> u32 {
        self.msize.load(Ordering::Relaxed)
    }

    /// Forgets every fid (device reset).
    pub fn reset(&self) {
        lock(&self.fids).clear();
    }

    /// Answers one message (`request` is the whole message, header included) into `reply`,
    /// which never exceeds `max_reply` bytes; a reply that would is replaced by an Rlerror.
    pub fn handle(&self, request: &[u8], reply: &mut Vec<u8>, max_reply: usize) {
        let mut dec = Decoder::new(request);
        let header = (|| Ok::<_, Truncated>((dec.u32()?, dec.u8()?, dec.u16()?)))();
        let Ok((size, kind, tag)) = header else {
            encode_error(reply, u16::MAX, libc::EINVAL);
            return;
        };
        let max_reply = max_reply.min(self.msize() as usize);
        let result = if usize::try_from(size).ok() != Some(request.len()) {
            Err(Errno::INVAL)
        } else {
            self.dispatch(kind, tag, &mut dec, reply, max_reply)
        };
        match result {
            Ok(()) if reply.len() <= max_reply => {}
            Ok(()) => encode_error(reply, tag, libc::EMSGSIZE),
            Err(e) => encode_error(reply, tag, e.raw_os_error()),
        }
    }

    fn dispatch(
        &self,
        kind: u8,
        tag: u16,
        dec: &mut Decoder,
        reply: &mut Vec<u8>,
        max_reply: usize,
    ) -> Result<()> {
        let mut enc = Encoder::new(reply, kind.wrapping_add(1), tag);
        let trunc = |_| Errno::INVAL;
        match kind {
            TVERSION => self.version(dec, &mut enc).map_err(trunc)?,
            TATTACH => self.attach(dec, &mut enc)?,
            TWALK => self.walk(dec, &mut enc)?,
            TLOPEN => self.lopen(dec, &mut enc)?,
            TLCREATE => self.lcreate(dec, &mut enc)?,
            TREAD => self.read(dec, &mut enc, max_reply)?,
            TWRITE => self.write(dec, &mut enc)?,
            TREADDIR => self.readdir(dec, &mut enc, max_reply)?,
            TGETATTR => self.getattr(dec, &mut enc)?,
            TSETATTR => self.setattr(dec)?,
            TMKDIR => self.mkdir(dec, &mut enc)?,
            TSYMLINK => self.symlink(dec, &mut enc)?,
            TMKNOD => self.mknod(dec, &mut enc)?,
            TREADLINK => self.readlink(dec, &mut enc)?,
            TLINK => self.link(dec)?,
            TRENAMEAT => self.renameat(dec)?,
            TRENAME => self.rename(dec)?,
            TUNLINKAT => self.unlinkat(dec)?,
            TREMOVE => self.remove(dec)?,
            TCLUNK => self.clunk(dec)?,
            TSTATFS => self.statfs(dec, &mut enc)?,
            TFSYNC => self.fsync(dec)?,
            TXATTRWALK => self.xattrwalk(dec, &mut enc)?,
            TXATTRCREATE => self.xattrcreate(dec)?,
            TLOCK => self.lock(dec, &mut enc)?,
            TGETLOCK => self.getlock(dec, &mut enc)?,
            // Requests are served as they come; there is nothing to cancel.
            TFLUSH => {
                dec.u16().map_err(trunc)?;
            }
            // Tauth (no authentication), the 9P2000/9P2000.u messages, R-messages.
            _ => return Err(Errno::OPNOTSUPP),
        }
        enc.finish();
        Ok(())
    }

    fn fid(&self, id: u32) -> Result<Fid> {
        lock(&self.fids).get(&id).cloned().ok_or(Errno::BADF)
    }

    /// Adds or replaces fid `id`.
    fn set_fid(&self, id: u32, fid: Fid) -> Result<()> {
        let mut fids = lock(&self.fids);
        if fids.len() >= MAX_FIDS && !fids.contains_key(&id) {
            return Err(Errno::NFILE);
        }
        fids.insert(id, fid);
        Ok(())
    }

    /// Adds fid `id`, which must be free.
    fn new_fid(&self, id: u32, fid: Fid) -> Result<()> {
        if lock(&self.fids).contains_key(&id) {
            return Err(Errno::BADF);
        }
        self.set_fid(id, fid)
    }

    fn writable(&self) -> Result<()> {
        if self.options.readonly {
            Err(Errno::ROFS)
        } else {
            Ok(())
        }
    }

    /// `/proc/self/fd/N` of `fd` as a name under `proc_fds`.
    fn proc_name(fd: &impl AsRawFd) -> CString {
        CString::new(fd.as_raw_fd().to_string()).unwrap_or_default()
    }

    /// Opens the very inode `fd` holds, with `flags`.
    fn reopen(&self, fd: &OwnedFd, flags: OFlags) -> Result<File> {
        let fd = rustix::fs::openat(
            &self.proc_fds,
            Self::proc_name(fd),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// `/proc/self/fd/N` as an absolute path, for the path-only xattr calls.
    fn proc_path(fd: &OwnedFd) -> CString {
        CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
    }

    /// Gives a new file the guest's ids under `passthrough`; with `none` it stays ours.
    fn own(&self, dir: &OwnedFd, name: &CStr, owner: u32, group: u32) -> Result<()> {
        if self.options.ownership == Ownership::Guest {
            rustix::fs::chownat(dir, name, uid(owner), gid(group), AtFlags::SYMLINK_NOFOLLOW)?;
        }
        Ok(())
    }

    fn version(&self, dec: &mut Decoder, enc: &mut Encoder) -> std::result::Result<(), Truncated> {
        let msize = dec.u32()?;
        let version = dec.string()?;
        // A new session: every fid of the old one is gone.
        self.reset();
        let msize = msize.clamp(MIN_MSIZE, MAX_MSIZE);
        self.msize.store(msize, Ordering::Relaxed);
        let version: &[u8] = if version.starts_with(b"9P2000.L") {
            b"9P2000.L"
        } else {
            b"unknown"
        };
        enc.u32(msize).string(version);
        Ok(())
    }

    fn attach(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid = dec.u32().map_err(trunc)?;
        let _afid = dec.u32().map_err(trunc)?;
        let _uname = dec.string().map_err(trunc)?;
        // The export is the only tree; the guest's aname does not choose another.
        let _aname = dec.string().map_err(trunc)?;
        let uid = dec.u32().map_err(trunc)?;
        let st = stat_fd(&self.root)?;
        self.new_fid(
            fid,
            Fid {
                path: self.root.clone(),
                kind: Kind::Dir,
                parent: None,
                open: None,
                xattr: None,
                uid,
            },
        )?;
        enc.qid(qid_of(&st));
        Ok(())
    }

    fn walk(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid_id = dec.u32().map_err(trunc)?;
        let newfid = dec.u32().map_err(trunc)?;
        let count = dec.u16().map_err(trunc)?;
        if count > MAX_WALK_NAMES {
            return Err(Errno::INVAL);
        }
        let mut names = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            names.push(name(dec.string().map_err(trunc)?, true)?);
        }
        let start = self.fid(fid_id)?;
        if newfid != fid_id && lock(&self.fids).contains_key(&newfid) {
            return Err(Errno::BADF);
        }
        let mut current = start.path.clone();
        let mut parent = start.parent.clone();
        let mut kind = start.kind;
        let mut qids = Vec::with_capacity(names.len());
        for (i, name) in names.into_iter().enumerate() {
            let step = self.step(&current, &name);
            let (next, st) = match step {
                Ok(found) => found,
                // The first name must resolve; later failures end the walk short.
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            };
            kind = Kind::of(&st);
            qids.push(qid_of(&st));
            parent = Some((current, name));
            current = next;
        }
        enc.u16(qids.len() as u16);
        for qid in &qids {
            enc.qid(*qid);
        }
        if qids.len() == usize::from(count) {
            self.set_fid(
                newfid,
                Fid {
                    path: current,
                    kind,
                    parent,
                    open: None,
                    xattr: None,
                    uid: start.uid,
                },
            )?;
        }
        Ok(())
    }

    /// One walk step from directory `dir`.
    fn step(&self, dir: &Arc<OwnedFd>, name: &CStr) -> Result<(Arc<OwnedFd>, Stat)> {
        let next = match name.to_bytes() {
            b"." => dir.clone(),
            b".." => {
                let st = stat_fd(dir)?;
                if (st.st_dev, st.st_ino) == self.root_id {
                    // The root is its own parent: the walk stays in the export.
                    return Ok((dir.clone(), st));
                }
                // `dir` is below the root (every fid was reached from it by names or `..`),
                // so its parent is the root or below it.
                Arc::new(rustix::fs::openat(
                    dir.as_ref(),
                    c"..",
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?)
            }
            _ => Arc::new(lookup(dir, name)?),
        };
        let st = stat_fd(&next)?;
        Ok((next, st))
    }

    fn lopen(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid_id = dec.u32().map_err(trunc)?;
        let flags = dec.u32().map_err(trunc)?;
        let mut fid = self.fid(fid_id)?;
        if flags & WRITE_OPEN_FLAGS != 0 {
            self.writable()?;
        }
        let file = match fid.kind {
            Kind::Dir => File::from(rustix::fs::openat(
                fid.path.as_ref(),
                c".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?),
            Kind::File => self.reopen(
                &fid.path,
                OFlags::from_bits_retain(flags & PASSED_OPEN_FLAGS),
            )?,
            // Fifos, sockets and devices are the guest kernel's own; never open them here,
            // where a fifo would block a worker.
            Kind::Symlink | Kind::Other => return Err(Errno::INVAL),
        };
        let st = rustix::fs::fstat(&file)?;
        fid.open = Some(Arc::new(Open {
            file,
            dir_position: Mutex::new(()),
        }));
        self.set_fid(fid_id, fid)?;
        enc.qid(qid_of(&st)).u32(0);
        Ok(())
    }

    fn lcreate(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid_id = dec.u32().map_err(trunc)?;
        let file_name = name(dec.string().map_err(trunc)?, false)?;
        let flags = dec.u32().map_err(trunc)?;
        let mode = dec.u32().map_err(trunc)?;
        let gid = dec.u32().map_err(trunc)?;
        self.writable()?;
        let dir = self.fid(fid_id)?;
        if dir.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let mut oflags = OFlags::from_bits_retain(flags & PASSED_OPEN_FLAGS) | OFlags::CREATE;
        if flags & libc::O_EXCL as u32 != 0 {
            oflags |= OFlags::EXCL;
        }
        let fd = open_beneath(
            &dir.path,
            &file_name,
            oflags,
            Mode::from_raw_mode(mode & 0o7777),
        )?;
        let file = File::from(fd);
        // The fid's path is the inode just opened, not a second lookup of the name.
        let path = rustix::fs::openat(
            &self.proc_fds,
            Self::proc_name(&file),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        self.own(&dir.path, &file_name, dir.uid, gid)?;
        let st = rustix::fs::fstat(&file)?;
        self.set_fid(
            fid_id,
            Fid {
                path: Arc::new(path),
                kind: Kind::File,
                parent: Some((dir.path.clone(), file_name)),
                open: Some(Arc::new(Open {
                    file,
                    dir_position: Mutex::new(()),
                })),
                xattr: None,
                uid: dir.uid,
            },
        )?;
        enc.qid(qid_of(&st)).u32(0);
        Ok(())
    }

    fn read(&self, dec: &mut Decoder, enc: &mut Encoder, max_reply: usize) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid = self.fid(dec.u32().map_err(trunc)?)?;
        let offset = dec.u64().map_err(trunc)?;
        let count = dec.u32().map_err(trunc)? as usize;
        let count = count.min(max_reply.saturating_sub(IO_HEADER_SIZE));
        if let Some(xattr) = &fid.xattr {
            let Xattr::Read(value) = &*lock(xattr) else {
                return Err(Errno::BADF);
            };
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(value.len());
            let data = &value[start..value.len().min(start + count)];
            enc.u32(data.len() as u32).bytes(data);
            return Ok(());
        }
        let open = fid.open.ok_or(Errno::BADF)?;
        if fid.kind != Kind::File {
            return Err(Errno::ISDIR);
        }
        enc.u32(0);
        let buf = enc.buf();
        let start = buf.len();
        buf.resize(start + count, 0);
        let got = open
            .file
            .read_at(&mut buf[start..], offset)
            .map_err(io_errno);
        let got = match got {
            Ok(n) => n,
            Err(e) => {
                buf.truncate(start);
                return Err(e);
            }
        };
        buf.truncate(start + got);
        buf[start - 4..start].copy_from_slice(&(got as u32).to_le_bytes());
        Ok(())
    }

    fn write(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid = self.fid(dec.u32().map_err(trunc)?)?;
        let offset = dec.u64().map_err(trunc)?;
        let count = dec.u32().map_err(trunc)?;
        let data = dec.bytes(count as usize).map_err(trunc)?;
        if let Some(xattr) = &fid.xattr {
            let mut xattr = lock(xattr);
            let Xattr::Write {
                size, data: value, ..
            } = &mut *xattr
            else {
                return Err(Errno::BADF);
            };
            if offset != value.len() as u64 || value.len() + data.len() > *size {
                return Err(Errno::INVAL);
            }
            value.extend_from_slice(data);
            enc.u32(count);
            return Ok(());
        }
        self.writable()?;
        let open = fid.open.ok_or(Errno::BADF)?;
        let written = open.file.write_at(data, offset).map_err(io_errno)?;
        enc.u32(written as u32);
        Ok(())
    }

    fn readdir(&self, dec: &mut Decoder, enc: &mut Encoder, max_reply: usize) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid = self.fid(dec.u32().map_err(trunc)?)?;
        let offset = dec.u64().map_err(trunc)?;
        let count = dec.u32().map_err(trunc)? as usize;
        let count = count.min(max_reply.saturating_sub(IO_HEADER_SIZE));
        let open = fid.open.ok_or(Errno::BADF)?;
        if fid.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let _position = lock(&open.dir_position);
        rustix::fs::seek(&open.file, rustix::fs::SeekFrom::Start(offset))?;
        enc.u32(0);
        let start = enc.buf().len();
        // Linux dirents are at most 8 bytes longer than ours; entries read past `count` are
        // read again on the next call, which seeks to the last one sent.
        let mut raw = vec![MaybeUninit::<u8>::uninit(); count.max(512)];
        let mut dir = RawDir::new(&open.file, &mut raw);
        let mut used = 0;
        while let Some(entry) = dir.next() {
            let entry = entry?;
            let entry_name = entry.file_name().to_bytes();
            let size = QID_SIZE + 8 + 1 + 2 + entry_name.len();
            if used + size > count {
                break;
            }
            used += size;
            let file_type = entry.file_type();
            let kind = match file_type {
                FileType::Directory => QT_DIR,
                FileType::Symlink => QT_SYMLINK,
                _ => 0,
            };
            enc.qid(Qid {
                kind,
                version: 0,
                path: entry.ino(),
            })
            .u64(entry.next_entry_cookie())
            // d_type: DT_* is the S_IFMT nibble.
            .u8((file_type.as_raw_mode() >> 12) as u8)
            .string(entry_name);
        }
        let buf = enc.buf();
        let len = (buf.len() - start) as u32;
        buf[start - 4..start].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }

    fn getattr(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid = self.fid(dec.u32().map_err(trunc)?)?;
        let _mask = dec.u64().map_err(trunc)?;
        let st = stat_fd(&fid.path)?;
        enc.u64(GETATTR_BASIC)
            .qid(qid_of(&st))
            .u32(st.st_mode)
            .u32(st.st_uid)
            .u32(st.st_gid)
            .u64(st.st_nlink)
            .u64(st.st_rdev)
            .u64(st.st_size as u64)
            .u64(st.st_blksize as u64)
            .u64(st.st_blocks as u64)
            .u64(st.st_atime as u64)
            .u64(st.st_atime_nsec as u64)
            .u64(st.st_mtime as u64)
            .u64(st.st_mtime_nsec as u64)
            .u64(st.st_ctime as u64)
            .u64(st.st_ctime_nsec as u64)
            // btime, gen, data_version: not in `valid`.
            .u64(0)
            .u64(0)
            .u64(0)
            .u64(0);
        Ok(())
    }

    fn setattr(&self, dec: &mut Decoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid = self.fid(dec.u32().map_err(trunc)?)?;
        let valid = dec.u32().map_err(trunc)?;
        let mode = dec.u32().map_err(trunc)?;
        let new_uid = dec.u32().map_err(trunc)?;
        let new_gid = dec.u32().map_err(trunc)?;
        let size = dec.u64().map_err(trunc)?;
        let mut times = [0u64; 4];
        for t in &mut times {
            *t = dec.u64().map_err(trunc)?;
        }
        if valid == 0 {
            return Ok(());
        }
        self.writable()?;
        let proc_name = Self::proc_name(fid.path.as_ref());
        if valid & SETATTR_MODE != 0 && fid.kind != Kind::Symlink {
            rustix::fs::chmodat(
                &self.proc_fds,
                &proc_name,
                Mode::from_raw_mode(mode & 0o7777),
                AtFlags::empty(),
            )?;
        }
        if valid & (SETATTR_UID | SETATTR_GID) != 0 {
            let owner = uid(new_uid).filter(|_| valid & SETATTR_UID != 0);
            let group = gid(new_gid).filter(|_| valid & SETATTR_GID != 0);
            let chown = rustix::fs::chownat(
                fid.path.as_ref(),
                c"",
                owner,
                group,
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            );
            // Under `none` the files stay ours whatever the guest asks (QEMU's semantics).
            if self.options.ownership == Ownership::Guest {
                chown?;
            }
        }
        if valid & SETATTR_SIZE != 0 {
            if fid.kind != Kind::File {
                return Err(Errno::INVAL);
            }
            let file = self.reopen(&fid.path, OFlags::WRONLY)?;
            file.set_len(size).map_err(io_errno)?;
        }
        if valid & (SETATTR_ATIME | SETATTR_MTIME) != 0 {
            let time = |set: u32, given: u32, sec: u64, nsec: u64| {
                if valid & set == 0 {
                    Timespec {
                        tv_sec: 0,
                        tv_nsec: UTIME_OMIT,
                    }
                } else if valid & given != 0 {
                    Timespec {
                        tv_sec: sec as i64,
                        tv_nsec: (nsec as i64).clamp(0, 999_999_999),
                    }
                } else {
                    Timespec {
                        tv_sec: 0,
                        tv_nsec: UTIME_NOW,
                    }
                }
            };
            let stamps = Timestamps {
                last_access: time(SETATTR_ATIME, SETATTR_ATIME_SET, times[0], times[1]),
                last_modification: time(SETATTR_MTIME, SETATTR_MTIME_SET, times[2], times[3]),
            };
            if fid.kind == Kind::Symlink {
                rustix::fs::utimensat(
                    fid.path.as_ref(),
                    c"",
                    &stamps,
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )?;
            } else {
                rustix::fs::utimensat(&self.proc_fds, &proc_name, &stamps, AtFlags::empty())?;
            }
        }
        Ok(())
    }

    /// The directory fid `id` and a valid new name in it, for the calls that create.
    fn dir_and_name(&self, dec: &mut Decoder) -> Result<(Fid, CString)> {
        let trunc = |_| Errno::INVAL;
        let dir = self.fid(dec.u32().map_err(trunc)?)?;
        let entry = name(dec.string().map_err(trunc)?, false)?;
        if dir.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        Ok((dir, entry))
    }

    fn mkdir(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let (dir, entry) = self.dir_and_name(dec)?;
        let mode = dec.u32().map_err(trunc)?;
        let gid = dec.u32().map_err(trunc)?;
        self.writable()?;
        rustix::fs::mkdirat(
            dir.path.as_ref(),
            &entry,
            Mode::from_raw_mode(mode & 0o7777),
        )?;
        self.own(&dir.path, &entry, dir.uid, gid)?;
        enc.qid(qid_of(&stat_name(&dir.path, &entry)?));
        Ok(())
    }

    fn symlink(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let (dir, entry) = self.dir_and_name(dec)?;
        // Any target: it is stored, never followed here.
        let target = CString::new(dec.string().map_err(trunc)?).map_err(|_| Errno::INVAL)?;
        let gid = dec.u32().map_err(trunc)?;
        self.writable()?;
        rustix::fs::symlinkat(&target, dir.path.as_ref(), &entry)?;
        self.own(&dir.path, &entry, dir.uid, gid)?;
        enc.qid(qid_of(&stat_name(&dir.path, &entry)?));
        Ok(())
    }

    fn mknod(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let (dir, entry) = self.dir_and_name(dec)?;
        let mode = dec.u32().map_err(trunc)?;
        let _major = dec.u32().map_err(trunc)?;
        let _minor = dec.u32().map_err(trunc)?;
        let gid = dec.u32().map_err(trunc)?;
        self.writable()?;
        let file_type = FileType::from_raw_mode(mode);
        // No device nodes: host programs could open one the guest made.
        if !matches!(
            file_type,
            FileType::Fifo | FileType::Socket | FileType::RegularFile
        ) {
            return Err(Errno::PERM);
        }
        rustix::fs::mknodat(
            dir.path.as_ref(),
            &entry,
            file_type,
            Mode::from_raw_mode(mode & 0o7777),
            0,
        )?;
        self.own(&dir.path, &entry, dir.uid, gid)?;
        enc.qid(qid_of(&stat_name(&dir.path, &entry)?));
        Ok(())
    }

    fn readlink(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let fid = self.fid(dec.u32().map_err(|_| Errno::INVAL)?)?;
        if fid.kind != Kind::Symlink {
            return Err(Errno::INVAL);
        }
        let target = rustix::fs::readlinkat(fid.path.as_ref(), c"", Vec::new())?;
        enc.string(target.as_bytes());
        Ok(())
    }

    fn link(&self, dec: &mut Decoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let dir = self.fid(dec.u32().map_err(trunc)?)?;
        let target = self.fid(dec.u32().map_err(trunc)?)?;
        let entry = name(dec.string().map_err(trunc)?, false)?;
        self.writable()?;
        if dir.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        if target.kind == Kind::Dir {
            return Err(Errno::PERM);
        }
        if target.kind == Kind::Symlink {
            // The link itself, by the name it was reached by: never what it points to.
            let (old_dir, old_name) = Self::still_at(&target)?;
            rustix::fs::linkat(
                old_dir.as_ref(),
                &old_name,
                dir.path.as_ref(),
                &entry,
                AtFlags::empty(),
            )?;
            return Ok(());
        }
        // Links the inode the fid holds (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
        rustix::fs::linkat(
            &self.proc_fds,
            Self::proc_name(target.path.as_ref()),
            dir.path.as_ref(),
            &entry,
            AtFlags::SYMLINK_FOLLOW,
        )?;
        Ok(())
    }

    fn renameat(&self, dec: &mut Decoder) -> Result<()> {
        let (old_dir, old_name) = self.dir_and_name(dec)?;
        let (new_dir, new_name) = self.dir_and_name(dec)?;
        self.writable()?;
        rustix::fs::renameat(
            old_dir.path.as_ref(),
            &old_name,
            new_dir.path.as_ref(),
            &new_name,
        )?;
        Ok(())
    }

    /// The directory and name fid `fid` was reached by, if they still name its inode.
    fn still_at(fid: &Fid) -> Result<(Arc<OwnedFd>, CString)> {
        let (dir, entry) = fid.parent.clone().ok_or(Errno::BUSY)?;
        if !same_file(&stat_name(&dir, &entry)?, &stat_fd(&fid.path)?) {
            return Err(Errno::NOENT);
        }
        Ok((dir, entry))
    }

    fn rename(&self, dec: &mut Decoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid_id = dec.u32().map_err(trunc)?;
        let mut fid = self.fid(fid_id)?;
        let (new_dir, new_name) = self.dir_and_name(dec)?;
        self.writable()?;
        let (old_dir, old_name) = Self::still_at(&fid)?;
        rustix::fs::renameat(
            old_dir.as_ref(),
            &old_name,
            new_dir.path.as_ref(),
            &new_name,
        )?;
        fid.parent = Some((new_dir.path, new_name));
        self.set_fid(fid_id, fid)
    }

    fn unlinkat(&self, dec: &mut Decoder) -> Result<()> {
        let (dir, entry) = self.dir_and_name(dec)?;
        let flags = dec.u32().map_err(|_| Errno::INVAL)?;
        self.writable()?;
        let flags = if flags & libc::AT_REMOVEDIR as u32 != 0 {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(dir.path.as_ref(), &entry, flags)?;
        Ok(())
    }

    fn remove(&self, dec: &mut Decoder) -> Result<()> {
        let fid_id = dec.u32().map_err(|_| Errno::INVAL)?;
        // Tremove clunks the fid whether or not the removal works.
        let fid = lock(&self.fids).remove(&fid_id).ok_or(Errno::BADF)?;
        self.writable()?;
        let (dir, entry) = Self::still_at(&fid)?;
        let flags = if fid.kind == Kind::Dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(dir.as_ref(), &entry, flags)?;
        Ok(())
    }

    fn clunk(&self, dec: &mut Decoder) -> Result<()> {
        let fid_id = dec.u32().map_err(|_| Errno::INVAL)?;
        let fid = lock(&self.fids).remove(&fid_id).ok_or(Errno::BADF)?;
        let Some(xattr) = fid.xattr else {
            return Ok(());
        };
        let xattr = lock(&xattr);
        let Xattr::Write {
            name,
            size,
            flags,
            data,
        } = &*xattr
        else {
            return Ok(());
        };
        // The guest wrote the value it announced, or nothing is set.
        if data.len() != *size {
            return Err(Errno::INVAL);
        }
        self.writable()?;
        let path = Self::proc_path(&fid.path);
        if *size == 0 && flags.contains(XattrFlags::REPLACE) {
            return rustix::fs::removexattr(&path, name);
        }
        rustix::fs::setxattr(&path, name, data, *flags)
    }

    fn statfs(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let fid = self.fid(dec.u32().map_err(|_| Errno::INVAL)?)?;
        let st = rustix::fs::fstatfs(fid.path.as_ref())?;
        // SAFETY: `f_fsid` is two ints, plain data, read as a byte copy.
        let fsid: [i32; 2] = unsafe { std::mem::transmute(st.f_fsid) };
        enc.u32(st.f_type as u32)
            .u32(st.f_bsize as u32)
            .u64(st.f_blocks)
            .u64(st.f_bfree)
            .u64(st.f_bavail)
            .u64(st.f_files)
            .u64(st.f_ffree)
            .u64(u64::from(fsid[0] as u32) | u64::from(fsid[1] as u32) << 32)
            .u32(st.f_namelen as u32);
        Ok(())
    }

    fn fsync(&self, dec: &mut Decoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid = self.fid(dec.u32().map_err(trunc)?)?;
        let datasync = dec.u32().map_err(trunc)?;
        let open = fid.open.ok_or(Errno::BADF)?;
        if datasync != 0 {
            open.file.sync_data().map_err(io_errno)
        } else {
            open.file.sync_all().map_err(io_errno)
        }
    }

    fn xattrwalk(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid = self.fid(dec.u32().map_err(trunc)?)?;
        let newfid = dec.u32().map_err(trunc)?;
        let attr = dec.string().map_err(trunc)?;
        if fid.kind == Kind::Symlink {
            return Err(Errno::NODATA);
        }
        let path = Self::proc_path(&fid.path);
        let mut value = vec![0u8; MAX_XATTR_SIZE as usize];
        let len = if attr.is_empty() {
            rustix::fs::listxattr(&path, &mut value[..])?
        } else {
            let attr = CString::new(attr).map_err(|_| Errno::INVAL)?;
            rustix::fs::getxattr(&path, &attr, &mut value[..])?
        };
        value.truncate(len);
        enc.u64(len as u64);
        self.new_fid(
            newfid,
            Fid {
                open: None,
                xattr: Some(Arc::new(Mutex::new(Xattr::Read(value)))),
                ..fid
            },
        )
    }

    fn xattrcreate(&self, dec: &mut Decoder) -> Result<()> {
        let trunc = |_| Errno::INVAL;
        let fid_id = dec.u32().map_err(trunc)?;
        let attr = CString::new(dec.string().map_err(trunc)?).map_err(|_| Errno::INVAL)?;
        let size = dec.u64().map_err(trunc)?;
        let flags = dec.u32().map_err(trunc)?;
        self.writable()?;
        if size > MAX_XATTR_SIZE {
            return Err(Errno::TOOBIG);
        }
        let mut fid = self.fid(fid_id)?;
        if fid.kind == Kind::Symlink {
            return Err(Errno::OPNOTSUPP);
        }
        fid.open = None;
        fid.xattr = Some(Arc::new(Mutex::new(Xattr::Write {
            name: attr,
            size: size as usize,
            flags: XattrFlags::from_bits_truncate(flags),
            data: Vec::new(),
        })));
        self.set_fid(fid_id, fid)
    }

    /// `fid[4] type[1] [flags[4]] start[8] length[8] proc_id[4] client_id[s]`, as a host
    /// open-file-description lock request.
    fn lock_args(&self, dec: &mut Decoder, with_flags: bool) -> Result<LockRequest> {
        let trunc = |_| Errno::INVAL;
        let fid = self.fid(dec.u32().map_err(trunc)?)?;
        let kind = dec.u8().map_err(trunc)?;
        if with_flags {
            dec.u32().map_err(trunc)?;
        }
        let start = dec.u64().map_err(trunc)?;
        let length = dec.u64().map_err(trunc)?;
        let proc_id = dec.u32().map_err(trunc)?;
        let client = dec.string().map_err(trunc)?.to_vec();
        let open = fid.open.ok_or(Errno::BADF)?;
        let l_type = match kind {
            0 => libc::F_RDLCK,
            1 => libc::F_WRLCK,
            LOCK_TYPE_UNLCK => libc::F_UNLCK,
            _ => return Err(Errno::INVAL),
        };
        // SAFETY: `flock` is plain data; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = l_type as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = i64::try_from(start).map_err(|_| Errno::INVAL)?;
        // 0 is "to the end" in both 9P and fcntl.
        fl.l_len = i64::try_from(length).map_err(|_| Errno::INVAL)?;
        Ok(LockRequest {
            open,
            flock: fl,
            proc_id,
            client,
        })
    }

    fn fcntl_lock(open: &Open, cmd: libc::c_int, fl: &mut libc::flock) -> Result<()> {
        // SAFETY: `fl` is a valid flock for the call's duration; the fd is open.
        let ret = unsafe { libc::fcntl(open.file.as_fd().as_raw_fd(), cmd, fl as *mut _) };
        if ret < 0 {
            Err(Errno::from_raw_os_error(
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            ))
        } else {
            Ok(())
        }
    }

    /// Locks are open-file-description locks on the host file: the guest's processes are
    /// arbitrated by the guest kernel, and host processes see the guest's locks. Never blocks.
    fn lock(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let mut request = self.lock_args(dec, true)?;
        let status = match Self::fcntl_lock(&request.open, libc::F_OFD_SETLK, &mut request.flock) {
            Ok(()) => LOCK_SUCCESS,
            Err(Errno::AGAIN) | Err(Errno::ACCESS) => LOCK_BLOCKED,
            Err(_) => LOCK_ERROR,
        };
        enc.u8(status);
        Ok(())
    }

    fn getlock(&self, dec: &mut Decoder, enc: &mut Encoder) -> Result<()> {
        let LockRequest {
            open,
            flock: mut fl,
            proc_id,
            client,
        } = self.lock_args(dec, false)?;
        Self::fcntl_lock(&open, libc::F_OFD_GETLK, &mut fl)?;
        let kind = match i32::from(fl.l_type) {
            libc::F_RDLCK => 0,
            libc::F_WRLCK => 1,
            _ => LOCK_TYPE_UNLCK,
        };
        let proc_id = if kind == LOCK_TYPE_UNLCK {
            proc_id
        } else {
            fl.l_pid as u32
        };
        enc.u8(kind)
            .u64(fl.l_start as u64)
            .u64(fl.l_len as u64)
            .u32(proc_id)
            .string(&client);
        Ok(())
    }
}
