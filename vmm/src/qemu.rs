//! chapeau started as `qemu-system-x86_64` (argv[0], e.g. a symlink Kata's `path =` points at)
//! or as `chapeau qemu …`: QEMU's command line is translated into the one `VmConfig`
//! (`api::qemu`), QMP is served on the `qmp` thread, and `-daemonize`/`-pidfile` behave as
//! QEMU's do, so Kata's QEMU driver runs chapeau unchanged.
//!
//! Order of a start: parse (errors go to the caller, exit 1); with `-daemonize`, fork before
//! any thread exists, the parent waiting on a pipe; the pidfile; QMP listening; the VM built
//! and started (its console and port sockets listening); only then is the parent told to exit
//! 0, after the child has pointed its standard streams at /dev/null (a caller reading the
//! parent's output sees its end when the parent exits, as with QEMU).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use api::qemu::{parse_qemu_args, QemuInvocation, QEMU_PROGRAM};
use api::{ActionType, PendingConfig, VmmRequest};
use devices::host_files::{create_pid_file, PidFile};
use devices::ExitReason;

use crate::vmm::Vmm;

/// Exit statuses, as QEMU's: 0 when the VM ended as asked or the guest powered off or reset
/// (chapeau never reboots, as QEMU with `-no-reboot`), 1 for everything else.
const OK: u8 = 0;
const FAILURE: u8 = 1;

/// Whether this process was started as QEMU: by its name, or as `chapeau qemu`. Returns the
/// QEMU arguments (without the program name).
pub fn qemu_args(args: &[std::ffi::OsString]) -> Option<&[std::ffi::OsString]> {
    let program = args.first()?;
    let name = Path::new(program).file_name()?.to_str()?;
    if name.starts_with("qemu-system-x86_64") || name.starts_with("qemu-lite-system-x86_64") {
        return Some(&args[1..]);
    }
    (args.get(1).and_then(|a| a.to_str()) == Some("qemu")).then(|| &args[2..])
}

pub fn main(args: &[std::ffi::OsString]) -> u8 {
    let invocation = match parse_qemu_args(args) {
        Ok(invocation) => invocation,
        Err(e) => {
            eprintln!("{e}");
            return FAILURE;
        }
    };
    crate::logger::init(log::LevelFilter::Warn);
    // Before any thread exists: fork(2) copies only the calling thread.
    let daemon = if invocation.daemonize {
        match Daemon::fork() {
            Ok(Fork::Parent(status)) => return status,
            Ok(Fork::Child(daemon)) => Some(daemon),
            Err(e) => {
                eprintln!("{QEMU_PROGRAM}: cannot daemonize: {e}");
                return FAILURE;
            }
        }
    } else {
        None
    };
    match start(invocation) {
        Ok(mut vm) => {
            if let Some(daemon) = daemon {
                daemon.ready();
            }
            let reason = vm.vmm.run();
            vm.qmp.finish(reason);
            drop(vm.pid_file);
            match reason {
                ExitReason::Poweroff | ExitReason::Stopped | ExitReason::Reset => OK,
                ExitReason::TripleFault | ExitReason::Crashed => {
                    log::error!("the guest {reason:?}; the VM ended");
                    FAILURE
                }
            }
        }
        Err(message) => {
            // The daemon's parent sees the pipe close without "ready" and exits 1; the message
            // reaches the caller through the standard error both still share.
            eprintln!("{QEMU_PROGRAM}: {message}");
            FAILURE
        }
    }
}

/// The started VM and what must outlive it.
struct Started {
    vmm: Vmm,
    qmp: crate::qmp_server::QmpServer,
    pid_file: Option<PidFile>,
}

fn start(invocation: QemuInvocation) -> Result<Started, String> {
    let QemuInvocation {
        config,
        qmp,
        pidfile,
        log_file,
        name,
        notes,
        ..
    } = invocation;
    if let Some(path) = &log_file {
        let file = devices::host_files::open_append(path)
            .map_err(|e| format!("-D {}: {e}", path.display()))?;
        crate::logger::set_output(file);
    }
    for note in &notes {
        log::info!("{note}");
    }
    // QEMU writes the pidfile first, and a second instance with the same one stops here.
    let pid_file = pidfile
        .as_deref()
        .map(create_pid_file)
        .transpose()
        .map_err(|e| e.to_string())?;
    let id = name.unwrap_or_else(|| "chapeau".into());
    let mut vmm = Vmm::new(id, PendingConfig::from_config(config)).map_err(|e| e.to_string())?;
    // Kata cannot work without QMP; QEMU itself would run on, but no one could stop it.
    let endpoint = qmp.ok_or("-qmp is required: without it nothing can stop the VM")?;
    let qmp = crate::qmp_server::start(&endpoint, &mut vmm).map_err(|e| e.to_string())?;
    vmm.handle(VmmRequest::Action(ActionType::InstanceStart))
        .map_err(|e| e.to_string())?;
    Ok(Started { vmm, qmp, pid_file })
}

enum Fork {
    /// The process that ran the command: exits with this status once the child is ready or
    /// has failed.
    Parent(u8),
    Child(Daemon),
}

/// The daemon's end of the pipe its parent waits on, and /dev/null, opened at the fork: once
/// the VM runs, the `vmm` thread's seccomp filter lets it open nothing.
struct Daemon {
    ready: File,
    null: OwnedFd,
}

/// What the child writes when the VM is up.
const READY: &[u8] = b"ready";

impl Daemon {
    fn fork() -> std::io::Result<Fork> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here alone.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        // SAFETY: no other thread exists yet (the caller forks first thing), so the child's
        // copy of the process is consistent: no lock is held by a thread that is not there.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                drop(read);
                // SAFETY: setsid has no arguments; it detaches the child from the caller's
                // session and terminal, as QEMU's daemon does.
                unsafe { libc::setsid() };
                Ok(Fork::Child(Daemon {
                    ready: write,
                    null: null.into(),
                }))
            }
            _ => {
                drop(write);
                Ok(Fork::Parent(Self::wait_for_child(read)))
            }
        }
    }

    /// The parent: 0 once the child says it is ready; 1 when the pipe closes without it (the
    /// child printed why on the standard error they share).
    fn wait_for_child(mut pipe: File) -> u8 {
        let mut said = Vec::new();
        let _ = pipe.read_to_end(&mut said);
        if said == READY {
            OK
        } else {
            FAILURE
        }
    }

    /// Points the standard streams at /dev/null (the log goes to `-D`'s file when given),
    /// then lets the parent exit 0: a caller reading the parent's output sees its end.
    fn ready(mut self) {
        for stream in 0..=2 {
            // SAFETY: dup2 onto a standard stream number; both descriptors are open.
            unsafe { libc::dup2(self.null.as_raw_fd(), stream) };
        }
        let _ = self.ready.write_all(READY);
    }
}
