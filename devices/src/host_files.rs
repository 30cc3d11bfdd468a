//! Opening the host files a VM is given, so that a wrong path fails at once with one line
//! saying what was wrong, and a path in a directory someone else can write cannot make us
//! clobber a file.
//!
//! - Inputs (kernel, initrd, pmem images, the entropy source) are opened O_NONBLOCK, so a FIFO
//!   never hangs open(2), and checked with fstat(2) on the descriptor we got: a regular file
//!   where one is meant (a directory, FIFO or device is refused), a regular file or character
//!   device for the entropy source. Symlinks are followed: images are often reached by one.
//! - Outputs (`--serial file=`, `--console file=`) never follow a symlink (O_NOFOLLOW), and are
//!   truncated only when they are a regular file with one name that belongs to us; a
//!   character device (`/dev/null`, a terminal) is written as it is. A new file is created
//!   with mode 0600: guest output may hold secrets. The descriptor stays non-blocking.

use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    #[error("{what} {} is locked by another process (another instance running?)", path.display())]
    Locked { what: &'static str, path: PathBuf },
    #[error("cannot open {what} {}: {source}", path.display())]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {} is {found}, not {expected}", path.display())]
    WrongKind {
        what: &'static str,
        path: PathBuf,
        found: &'static str,
        expected: &'static str,
    },
    #[error("{what} {} is a symbolic link; not following it", path.display())]
    Symlink { what: &'static str, path: PathBuf },
    #[error(
        "{what} {} has {links} names (hard links); not truncating a file that is also elsewhere",
        path.display()
    )]
    HardLinks {
        what: &'static str,
        path: PathBuf,
        links: u64,
    },
    #[error("{what} {} belongs to uid {owner}, not to us (uid {ours}); not truncating it", path.display())]
    NotOurs {
        what: &'static str,
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error("cannot truncate {what} {}: {source}", path.display())]
    Truncate {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How an input is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// What kind of file a mode is, as a user would say it.
fn kind_of(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_file() {
        "a regular file"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "an unknown kind of file"
    }
}

const REGULAR: &str = "a regular file";
const REGULAR_OR_CHAR: &str = "a regular file or a character device";

/// Opens an input `what` (e.g. "kernel") that must be a regular file.
pub fn open_regular(
    what: &'static str,
    path: &Path,
    access: Access,
) -> Result<File, HostFileError> {
    open_input(what, path, access, REGULAR, |t| t.is_file())
}

/// Opens a byte source (the entropy source): a regular file or a character device, read-only
/// and non-blocking.
pub fn open_byte_source(what: &'static str, path: &Path) -> Result<File, HostFileError> {
    open_input(what, path, Access::Read, REGULAR_OR_CHAR, |t| {
        t.is_file() || t.is_char_device()
    })
}

fn open_input(
    what: &'static str,
    path: &Path,
    access: Access,
    expected: &'static str,
    accept: fn(std::fs::FileType) -> bool,
) -> Result<File, HostFileError> {
    let wrong_kind = |found| HostFileError::WrongKind {
        what,
        path: path.to_path_buf(),
        found,
        expected,
    };
    let open_error = |source| HostFileError::Open {
        what,
        path: path.to_path_buf(),
        source,
    };
    // Refuse what stat already shows (no open(2) side effects on a device), then check the
    // descriptor itself, in case the path changed in between.
    let meta = std::fs::metadata(path).map_err(open_error)?;
    if !accept(meta.file_type()) {
        return Err(wrong_kind(kind_of(meta.file_type())));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(access == Access::ReadWrite)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_error)?;
    let file_type = file.metadata().map_err(open_error)?.file_type();
    if !accept(file_type) {
        return Err(wrong_kind(kind_of(file_type)));
    }
    Ok(file)
}

/// Opens a file to append to (chapeau's log, the metrics), created (mode 0600) if missing and
/// never through a symlink; what is already in it stays.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
}

/// Opens an output file `what` (e.g. "serial output"), creating it (mode 0600) if missing. A
/// symlink is refused; a regular file is truncated only if it has one name and is ours; a
/// character device is accepted untouched; anything else is refused. Non-blocking.
pub fn open_output(what: &'static str, path: &Path) -> Result<File, HostFileError> {
    let file = open_output_untruncated(what, path)?;
    // A character device (/dev/null, a terminal) is written to, never truncated.
    if is_regular(&file) {
        truncate(what, path, &file)?;
    }
    Ok(file)
}

fn is_regular(file: &File) -> bool {
    file.metadata().is_ok_and(|m| m.file_type().is_file())
}

fn truncate(what: &'static str, path: &Path, file: &File) -> Result<(), HostFileError> {
    file.set_len(0).map_err(|source| HostFileError::Truncate {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// [`open_output`] without the truncation, for a caller that must first lock the file.
fn open_output_untruncated(what: &'static str, path: &Path) -> Result<File, HostFileError> {
    let path_buf = || path.to_path_buf();
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| {
            // Say what is there when that is why open failed (ELOOP: a symlink; ENXIO: a FIFO
            // nobody reads or a socket; EISDIR: a directory).
            let found = std::fs::symlink_metadata(path).map(|m| m.file_type());
            match found {
                Ok(t) if t.is_symlink() => HostFileError::Symlink {
                    what,
                    path: path_buf(),
                },
                Ok(t) if !t.is_file() && !t.is_char_device() => HostFileError::WrongKind {
                    what,
                    path: path_buf(),
                    found: kind_of(t),
                    expected: REGULAR_OR_CHAR,
                },
                _ => HostFileError::Open {
                    what,
                    path: path_buf(),
                    source,
                },
            }
        })?;
    let meta = file.metadata().map_err(|source| HostFileError::Open {
        what,
        path: path_buf(),
        source,
    })?;
    let file_type = meta.file_type();
    if file_type.is_char_device() {
        return Ok(file);
    }
    if !file_type.is_file() {
        return Err(HostFileError::WrongKind {
            what,
            path: path_buf(),
            found: kind_of(file_type),
            expected: REGULAR_OR_CHAR,
        });
    }
    if meta.nlink() > 1 {
        return Err(HostFileError::HardLinks {
            what,
            path: path_buf(),
            links: meta.nlink(),
        });
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    let ours = unsafe { libc::geteuid() };
    if meta.uid() != ours {
        return Err(HostFileError::NotOurs {
            what,
            path: path_buf(),
            owner: meta.uid(),
            ours,
        });
    }
    Ok(file)
}

/// A file chapeau created (a socket it listens on, its pidfile); dropping it removes the file
/// if it is still ours (same device and inode), so a file someone else put at the path since
/// is left alone. The removal goes through the directory, held open (O_PATH) since the
/// creation: it needs neither the path again nor a path-based syscall, so the VMM's seccomp
/// filter allows only `unlinkat` and `newfstatat` relative to a directory fd, with fixed flags.
#[derive(Debug)]
pub struct CreatedFile {
    path: PathBuf,
    dir: Option<OwnedFd>,
    name: CString,
    identity: Option<(u64, u64)>,
}

impl CreatedFile {
    /// Starts tracking the file just created at `path`, to remove it on drop.
    pub fn track(path: &Path) -> CreatedFile {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(parent)
            .ok()
            .map(OwnedFd::from);
        if let Some(dir) = &dir {
            remember_created_in(dir);
        }
        let name =
            CString::new(path.file_name().unwrap_or_default().as_bytes()).unwrap_or_default();
        let identity = dir
            .as_ref()
            .and_then(|dir| Self::identity_in_dir(dir, &name));
        CreatedFile {
            path: path.to_path_buf(),
            dir,
            name,
            identity,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of `name` in `dir`, not following a symlink.
    fn identity_in_dir(dir: &OwnedFd, name: &CStr) -> Option<(u64, u64)> {
        // SAFETY: `stat` is plain data; all zeroes is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstatat writes one `stat` into our buffer; `name` is NUL-terminated and
        // `dir` an open directory descriptor.
        let rc = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        (rc == 0).then_some((st.st_dev, st.st_ino))
    }
}

/// Every directory a [`CreatedFile`] was made in, held open (O_PATH): once the VM runs, the
/// VMM's Landlock rules still let it remove its files there and nowhere else.
static CREATED_IN: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());

fn remember_created_in(dir: &OwnedFd) {
    let identity = |fd: &OwnedFd| {
        File::from(fd.try_clone().ok()?)
            .metadata()
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    let mut dirs = CREATED_IN.lock().unwrap_or_else(|e| e.into_inner());
    let new = identity(dir);
    if new.is_some() && !dirs.iter().any(|d| identity(d) == new) {
        if let Ok(copy) = dir.try_clone() {
            dirs.push(copy);
        }
    }
}

/// The directories chapeau created files in (its sockets, its pidfile), as O_PATH descriptors.
pub fn created_file_dirs() -> Vec<OwnedFd> {
    let dirs = CREATED_IN.lock().unwrap_or_else(|e| e.into_inner());
    dirs.iter().filter_map(|d| d.try_clone().ok()).collect()
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        let Some(dir) = &self.dir else { return };
        if self.identity.is_some() && Self::identity_in_dir(dir, &self.name) == self.identity {
            // SAFETY: unlinkat with a directory fd we own and a NUL-terminated name.
            unsafe { libc::unlinkat(dir.as_raw_fd(), self.name.as_ptr(), 0) };
        }
    }
}

/// The pidfile of a running chapeau: holds its pid and an exclusive lock (a second instance
/// given the same file refuses to start, as QEMU's does); removed when dropped.
#[derive(Debug)]
pub struct PidFile {
    // Field order: the file is removed while still locked, then closed.
    _created: CreatedFile,
    _file: File,
}

/// Writes this process's pid to `path`, opened as every output file is ([`open_output`]: no
/// symlink followed, no FIFO waited on, only a file of ours with one link), and locked before
/// it is truncated: a file another running process holds is left untouched.
pub fn create_pid_file(path: &Path) -> Result<PidFile, HostFileError> {
    const WHAT: &str = "PID file";
    let mut file = open_output_untruncated(WHAT, path)?;
    if !is_regular(&file) {
        return Err(HostFileError::WrongKind {
            what: WHAT,
            path: path.to_path_buf(),
            found: "a device",
            expected: "a regular file",
        });
    }
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(HostFileError::Locked {
            what: WHAT,
            path: path.to_path_buf(),
        });
    }
    truncate(WHAT, path, &file)?;
    writeln!(file, "{}", std::process::id()).map_err(|source| HostFileError::Open {
        what: WHAT,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(PidFile {
        _created: CreatedFile::track(path),
        _file: file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chapeau-host-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    fn err(result: Result<File, HostFileError>) -> String {
        result.expect_err("accepted").to_string()
    }

    #[test]
    fn a_pid_file_is_locked_refuses_what_is_not_ours_and_goes_away() {
        let path = scratch("pid");
        let held = create_pid_file(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        // A second instance stops at the lock and leaves the file as it was.
        let second = create_pid_file(&path).unwrap_err().to_string();
        assert!(second.contains("is locked by another process"), "{second}");
        assert!(!std::fs::read_to_string(&path).unwrap().is_empty());
        drop(held);
        assert!(!path.exists());
        // Neither a FIFO (waited on forever by a blocking open) nor a symlink is taken.
        let fifo = scratch("pid-fifo");
        mkfifo(&fifo);
        assert!(create_pid_file(&fifo).is_err());
        let link = scratch("pid-link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let refused = create_pid_file(&link).unwrap_err().to_string();
        assert!(refused.contains("symbolic link"), "{refused}");
        let _ = std::fs::remove_file(&fifo);
        let _ = std::fs::remove_file(&link);
    }

    #[test]
    fn inputs_must_be_regular_files_and_say_what_they_are() {
        let fifo = scratch("fifo");
        mkfifo(&fifo);
        // With nobody writing, a blocking open of the FIFO would hang here.
        assert_eq!(
            err(open_regular("initrd", &fifo, Access::Read)),
            format!("initrd {} is a FIFO, not a regular file", fifo.display())
        );
        let dir = std::env::temp_dir();
        assert_eq!(
            err(open_regular("kernel", &dir, Access::Read)),
            format!(
                "kernel {} is a directory, not a regular file",
                dir.display()
            )
        );
        assert_eq!(
            err(open_regular("initrd", Path::new("/dev/zero"), Access::Read)),
            "initrd /dev/zero is a character device, not a regular file"
        );
        let missing = scratch("missing");
        assert!(err(open_regular("kernel", &missing, Access::ReadWrite))
            .starts_with(&format!("cannot open kernel {}: ", missing.display())));
        let file = scratch("regular");
        std::fs::write(&file, b"x").unwrap();
        open_regular("kernel", &file, Access::ReadWrite).unwrap();
    }

    #[test]
    fn a_byte_source_is_a_device_or_a_file() {
        open_byte_source("entropy source", Path::new("/dev/urandom")).unwrap();
        let dir = std::env::temp_dir();
        assert_eq!(
            err(open_byte_source("entropy source", &dir)),
            format!(
                "entropy source {} is a directory, not a regular file or a character device",
                dir.display()
            )
        );
        let fifo = scratch("rng-fifo");
        mkfifo(&fifo);
        assert!(err(open_byte_source("entropy source", &fifo)).contains("is a FIFO"));
    }

    #[test]
    fn outputs_never_follow_a_symlink_nor_truncate_another_name() {
        let victim = scratch("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = scratch("out-link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert_eq!(
            err(open_output("serial output", &link)),
            format!(
                "serial output {} is a symbolic link; not following it",
                link.display()
            )
        );
        let hard = scratch("out-hard");
        std::fs::hard_link(&victim, &hard).unwrap();
        assert_eq!(
            err(open_output("serial output", &hard)),
            format!(
                "serial output {} has 2 names (hard links); not truncating a file that is also \
                 elsewhere",
                hard.display()
            )
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

        let fifo = scratch("out-fifo");
        mkfifo(&fifo);
        assert!(err(open_output("console output", &fifo)).contains("is a FIFO"));
        let dir = std::env::temp_dir();
        assert_eq!(
            err(open_output("console output", &dir)),
            format!(
                "console output {} is a directory, not a regular file or a character device",
                dir.display()
            )
        );
        open_output("console output", Path::new("/dev/null")).unwrap();
    }

    #[test]
    fn an_output_of_ours_is_created_private_or_truncated() {
        use std::io::Write;
        let path = scratch("out");
        let mut file = open_output("serial output", &path).unwrap();
        file.write_all(b"first run").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let mut file = open_output("serial output", &path).unwrap();
        file.write_all(b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");

        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert!(err(open_output("serial output", &path))
                .ends_with("belongs to uid 65534, not to us (uid 0); not truncating it"));
            assert_eq!(std::fs::read(&path).unwrap(), b"two");
        }
    }
}
