//! The `chapeau` command (or, started as `qemu-system-x86_64` or `chapeau qemu`, the QEMU
//! front end in `qemu.rs`): parse, configure logging, run the VM through the runtime, turn the
//! outcome into an exit status and one line on stderr.

use std::io::Write;

use api::{ActionType, PendingConfig, VmmRequest};
use clap::Parser;
use devices::ExitReason;

use crate::vmm::Vmm;

/// Exit statuses; the README documents them.
pub mod status {
    /// The guest powered off, or the VM was stopped on request (signal, `Shutdown`).
    pub const OK: u8 = 0;
    /// The VM could not be built or started, or the guest crashed (KVM could not run it).
    pub const FAILURE: u8 = 1;
    /// A configuration the user must fix.
    pub const BAD_CONFIG: u8 = 2;
    /// The guest asked for a reset (reboot, `panic=N` after a panic, i8042 or ACPI reset).
    pub const GUEST_RESET: u8 = 3;
    /// The guest triple-faulted.
    pub const TRIPLE_FAULT: u8 = 4;
}

/// The exit status for how the VM ended.
pub fn exit_status(reason: ExitReason) -> u8 {
    match reason {
        ExitReason::Poweroff | ExitReason::Stopped => status::OK,
        ExitReason::Reset => status::GUEST_RESET,
        ExitReason::TripleFault => status::TRIPLE_FAULT,
        ExitReason::Crashed => status::FAILURE,
    }
}

/// The process's entry, called by the binaries' C `main`: they are `#![no_main]`, so Rust's
/// runtime start-up is skipped. On a PVM host it cost ~0.15 ms before `main` (mostly reading
/// /proc/self/maps for the main thread's stack-overflow report) and ~25 us in every thread
/// started later (the signal stack for that report, mapped and unmapped). What of it chapeau
/// relies on is done here: fds 0-2 are open (on /dev/null where they were closed, so that no
/// file chapeau opens takes their place) and SIGPIPE is ignored (a closed pipe or socket is an
/// EPIPE, not our death). A stack overflow still hits a guard page: a plain SIGSEGV, without
/// Rust's message. Standard output is flushed before returning, as Rust's runtime would.
pub fn main() -> libc::c_int {
    open_standard_fds();
    // SAFETY: setting SIGPIPE's disposition to SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let status = run();
    let _ = std::io::stdout().flush();
    libc::c_int::from(status)
}

/// Points every closed fd among 0, 1 and 2 at /dev/null.
fn open_standard_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only reads the fd's flags; open returns a new fd we keep on purpose
        // (it is the lowest free one, `fd` itself, since the lower ones are open).
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) == -1
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
            {
                libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            }
        }
    }
}

fn run() -> u8 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(qemu_args) = crate::qemu::qemu_args(&args) {
        return crate::qemu::main(qemu_args);
    }
    let cli = api::Cli::parse_from(args);
    crate::logger::init(
        cli.log_level
            .as_str()
            .parse()
            .unwrap_or(log::LevelFilter::Warn),
    );
    let config = match cli.boot_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("chapeau: {e}");
            return status::BAD_CONFIG;
        }
    };
    let pending = config.map(PendingConfig::from_config);
    let boot_now = pending.is_some();
    let mut vmm = match Vmm::new(cli.id.clone(), pending.unwrap_or_default()) {
        Ok(vmm) => vmm,
        Err(e) => {
            eprintln!("chapeau: {e}");
            return status::FAILURE;
        }
    };
    vmm.set_pvm_default(cli.pvm_params);
    if let Err(e) = vmm.set_seccomp_mode(cli.seccomp) {
        eprintln!("chapeau: {e}");
        return status::FAILURE;
    }
    let api = match &cli.api_sock {
        Some(path) => match crate::api_server::start(path, &mut vmm) {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("chapeau: {e}");
                return status::FAILURE;
            }
        },
        None => None,
    };
    if boot_now {
        if let Err(e) = vmm.handle(VmmRequest::Action(ActionType::InstanceStart)) {
            eprintln!("chapeau: {e}");
            return status::FAILURE;
        }
    }
    let reason = vmm.run();
    drop(api);
    match reason {
        ExitReason::Crashed => eprintln!("chapeau: the guest crashed"),
        ExitReason::TripleFault => eprintln!("chapeau: the guest triple-faulted"),
        _ => {}
    }
    exit_status(reason)
}
