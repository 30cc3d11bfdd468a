//! The jail's root directory: made on disk by the jailer (as root, before the jailed user can
//! write there), entered by the jailed child (bind mounts, pivot_root), removed at the end.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{chown, DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::unistd::{chdir, pivot_root};

use crate::cli::BindMount;
use crate::error::{io_error, JailError, Result};

/// The binary's path inside the jail.
pub const JAIL_BINARY: &str = "/chapeau";

/// The host's device nodes a VM may need, recreated in the jail when the host has them:
/// KVM itself, taps opened by name, vhost-net, the entropy source of virtio-rng.
const DEVICES: [&str; 4] = ["/dev/kvm", "/dev/net/tun", "/dev/vhost-net", "/dev/urandom"];

/// `<base>/chapeau/<id>`: the jail's own directory (root-owned) holding `root`.
pub struct JailDir {
    pub dir: PathBuf,
    pub root: PathBuf,
}

impl JailDir {
    pub fn new(base: &Path, id: &str) -> Self {
        let dir = base.join("chapeau").join(id);
        let root = dir.join("root");
        JailDir { dir, root }
    }

    /// A path inside the jail (`/api.sock`) as the host sees it.
    pub fn host_path(&self, jail_path: &Path) -> PathBuf {
        self.root
            .join(jail_path.strip_prefix("/").unwrap_or(jail_path))
    }

    /// Removes the whole jail directory. Never follows a symlink the jailed user may have left
    /// (std's remove_dir_all works on directory fds with O_NOFOLLOW); only called once the
    /// jail's mount namespace is gone, so no bind mount is crossed.
    pub fn remove(&self) -> Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_error("remove the jail directory", &self.dir)(e))
            }
            _ => Ok(()),
        }
    }
}

/// Refuses a base directory someone other than root could tamper with (a symlink, not owned
/// by root, writable by everyone).
pub fn check_root_owned_dir(step: &'static str, dir: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(dir).map_err(io_error(step, dir))?;
    if !meta.is_dir() {
        return Err(JailError::refused(step, dir, "not a directory"));
    }
    if meta.uid() != 0 {
        return Err(JailError::refused(
            step,
            dir,
            format!("owned by uid {}, not root", meta.uid()),
        ));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(JailError::refused(step, dir, "world-writable"));
    }
    Ok(())
}

/// Whether an ELF executable names a program interpreter (PT_INTERP, the dynamic loader),
/// which would not exist in the jail. Not an ELF file: false (the exec will say why).
pub fn needs_interpreter(path: &Path) -> io::Result<bool> {
    const PT_INTERP: u32 = 3;
    let mut file = File::open(path)?;
    let mut header = [0u8; 64];
    if file.read_exact(&mut header).is_err() || header[..4] != *b"\x7fELF" || header[4] != 2 {
        return Ok(false);
    }
    let field = |at: usize, len: usize| {
        header[at..at + len]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    };
    // ELF64 little-endian: e_phoff at 32, e_phentsize at 54, e_phnum at 56.
    let (phoff, phentsize, phnum) = (field(32, 8), field(54, 2), field(56, 2));
    for index in 0..phnum {
        let mut p_type = [0u8; 4];
        file.seek(SeekFrom::Start(phoff + index * phentsize))?;
        file.read_exact(&mut p_type)?;
        if u32::from_le_bytes(p_type) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

fn make_dir(path: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().mode(mode).create(path)?;
    // The umask may have taken bits away; the mode is what we mean.
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
}

/// Creates `<base>/chapeau/<id>/root` (an id already in use is refused), copies the binary,
/// makes the device nodes and the bind mount points, then hands the root to uid:gid. Until that
/// last step only root can write in the tree, so nothing here can meet a symlink planted by the
/// jailed user. On error, what was made is removed.
pub fn prepare(
    jail: &JailDir,
    exec_file: &Path,
    binds: &[BindMount],
    uid: u32,
    gid: u32,
) -> Result<()> {
    let chapeau_dir = jail.dir.parent().unwrap_or(&jail.dir);
    match make_dir(chapeau_dir, 0o755) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(io_error("create the jails directory", chapeau_dir)(e))
        }
        _ => check_root_owned_dir("check the jails directory", chapeau_dir)?,
    }
    make_dir(&jail.dir, 0o755).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            JailError::refused(
                "create the jail directory",
                &jail.dir,
                "exists: a jail with this id runs or was not cleaned up (chapeau-jailer --cleanup --id ID)",
            )
        } else {
            io_error("create the jail directory", &jail.dir)(e)
        }
    })?;
    let root = &jail.root;
    let made = (|| {
        make_dir(root, 0o700).map_err(io_error("create the jail root", root))?;
        copy_binary(exec_file, &jail.host_path(Path::new(JAIL_BINARY)))?;
        make_devices(jail, uid, gid)?;
        let proc_dir = jail.host_path(Path::new(JAIL_PROC));
        make_dir(&proc_dir, 0o555).map_err(io_error("create the /proc mount point", &proc_dir))?;
        for bind in binds {
            make_mount_point(jail, bind)?;
        }
        chown(root, Some(uid), Some(gid)).map_err(io_error("give the jail root to the uid", root))
    })();
    if made.is_err() {
        let _ = jail.remove();
    }
    made
}

/// A copy, not a link: the jailed process cannot reach (or, being another uid, change) the
/// host's binary, and a later update of the host's binary does not change a running jail.
fn copy_binary(source: &Path, target: &Path) -> Result<()> {
    let step = "copy the binary into the jail";
    let mut from = File::open(source).map_err(io_error(step, source))?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(io_error(step, target))?;
    io::copy(&mut from, &mut to).map_err(io_error(step, target))?;
    Ok(())
}

fn make_devices(jail: &JailDir, uid: u32, gid: u32) -> Result<()> {
    let step = "create the device nodes";
    for host in DEVICES {
        let Ok(meta) = fs::metadata(host) else {
            continue;
        };
        if !meta.file_type().is_char_device() {
            continue;
        }
        let node = jail.host_path(Path::new(host));
        make_parents(&node, step)?;
        mknod(
            &node,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            meta.rdev(),
        )
        .map_err(io_error(step, &node))?;
        chown(&node, Some(uid), Some(gid)).map_err(io_error(step, &node))?;
    }
    Ok(())
}

/// The directories above a path in the jail (mode 0755 under the jailer's umask 022).
fn make_parents(path: &Path, step: &'static str) -> Result<()> {
    match path.parent() {
        Some(parent) => DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io_error(step, parent)),
        None => Ok(()),
    }
}

/// An empty directory or file, like the host path, for a bind mount to cover.
fn make_mount_point(jail: &JailDir, bind: &BindMount) -> Result<()> {
    let step = "create the bind mount point";
    let meta = fs::metadata(&bind.host).map_err(io_error("check the bind source", &bind.host))?;
    let target = jail.host_path(&bind.jail);
    make_parents(&target, step)?;
    if meta.is_dir() {
        match make_dir(&target, 0o755) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io_error(step, &target)(e))
            }
            _ => {}
        }
    } else {
        OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)
            .map_err(io_error(step, &target))?;
    }
    Ok(())
}

/// Where the jail's procfs is mounted.
const JAIL_PROC: &str = "/proc";

/// A procfs of the jail's own PID namespace (chapeau and its threads alone), holding only the
/// per-process directories (`subset=pid`: no /proc/sys, /proc/kcore, ...), nosuid, nodev,
/// noexec. The 9p server needs it: it reopens the files it holds through /proc/self/fd.
fn mount_proc(target: &Path) -> Result<()> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("proc"),
        target,
        Some("proc"),
        flags,
        Some("hidepid=invisible,subset=pid"),
    )
    .map_err(io_error("mount the jail's /proc", target))
}

/// In the child, inside its new mount namespace: stops mount events from leaving it, mounts the
/// binds, and makes the jail root the process's `/` with the host's tree detached.
pub fn enter(jail: &JailDir, binds: &[BindMount]) -> Result<()> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_SLAVE | MsFlags::MS_REC, none)
        .map_err(io_error("make the mounts slave", "/"))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(&jail.root),
        &jail.root,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(io_error("bind the jail root", &jail.root))?;
    for bind in binds {
        let target = jail.host_path(&bind.jail);
        let step = "bind mount";
        mount(
            Some(&bind.host),
            &target,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .map_err(io_error(step, &bind.host))?;
        let mut flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if !bind.writable {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(none, &target, none, flags, none).map_err(io_error(step, &target))?;
    }
    mount_proc(&jail.host_path(Path::new(JAIL_PROC)))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "." then
    // detaches the host's tree without needing a directory for it in the jail.
    chdir(&jail.root).map_err(io_error("pivot_root", &jail.root))?;
    pivot_root(".", ".").map_err(io_error("pivot_root", &jail.root))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(io_error("unmount the host root", "/"))?;
    chdir("/").map_err(io_error("pivot_root", "/"))?;
    Ok(())
}
