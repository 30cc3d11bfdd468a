//! Per-thread seccomp filters, compiled from resources/seccomp/x86_64.json by build.rs.
//! Every thread installs its own filter before it touches guest data; a syscall outside its
//! policy kills the process, saying which thread made which syscall: the filters trap
//! (SECCOMP_RET_TRAP), and our SIGSYS handler writes
//! `chapeau: seccomp: thread <comm> made forbidden syscall <nr>` to stderr and exits with
//! [`SECCOMP_EXIT_STATUS`]. The handler uses only write(2) and exit_group(2), which every
//! thread's policy allows; if SIGSYS is blocked the kernel kills the process with it instead.
//!
//! `--seccomp log` turns every trap into SECCOMP_RET_LOG (the syscall runs and the kernel logs
//! it), `--seccomp off` installs no filter: both for debugging a policy, and both say so.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Once;

use api::SeccompMode;
use seccompiler::{sock_filter, BpfProgram};

pub const VMM_THREAD: &str = "vmm";
pub const VCPU_THREAD: &str = "vcpu";
pub const API_THREAD: &str = "api";
pub const QMP_THREAD: &str = "qmp";

static COMPILED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_filters.bin"));

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the built-in seccomp filters are corrupt")]
    Corrupt,
    #[error("no seccomp filter for thread category `{0}`")]
    Missing(String),
    #[error("cannot install the SIGSYS handler that reports seccomp violations: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the seccomp filter for `{name}`: {source}")]
    Install {
        name: String,
        source: seccompiler::Error,
    },
}

pub struct SeccompFilters {
    filters: HashMap<String, BpfProgram>,
    mode: SeccompMode,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SeccompError> {
        if self.0.len() < n {
            return Err(SeccompError::Corrupt);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, SeccompError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

impl SeccompFilters {
    pub fn builtin() -> Result<Self, SeccompError> {
        let mut reader = Reader(COMPILED);
        let mut filters = HashMap::new();
        while !reader.0.is_empty() {
            let name_len = reader.u32()? as usize;
            let name =
                std::str::from_utf8(reader.take(name_len)?).map_err(|_| SeccompError::Corrupt)?;
            let count = reader.u32()? as usize;
            let program = reader
                .take(count.checked_mul(8).ok_or(SeccompError::Corrupt)?)?
                .chunks_exact(8)
                .map(|c| sock_filter {
                    code: u16::from_le_bytes([c[0], c[1]]),
                    jt: c[2],
                    jf: c[3],
                    k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                })
                .collect();
            filters.insert(name.to_string(), program);
        }
        Ok(Self {
            filters,
            mode: SeccompMode::Enforce,
        })
    }

    /// The same policies under `mode`: with `Log`, every instruction that would trap returns
    /// SECCOMP_RET_LOG instead (the policy's only non-allow action is `trap`; the build checks
    /// nothing else, so the rewrite covers the default and every argument mismatch alike).
    pub fn with_mode(mut self, mode: SeccompMode) -> Self {
        if mode == SeccompMode::Log {
            for program in self.filters.values_mut() {
                for insn in program.iter_mut() {
                    if insn.code == BPF_RET_K && insn.k == libc::SECCOMP_RET_TRAP {
                        insn.k = libc::SECCOMP_RET_LOG;
                    }
                }
            }
        }
        self.mode = mode;
        self
    }

    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    pub fn get(&self, name: &str) -> Option<&BpfProgram> {
        self.filters.get(name)
    }
}

/// BPF_RET | BPF_K: return the constant `k`.
const BPF_RET_K: u16 = 0x06;

/// The exit status after a seccomp violation: 128 + SIGSYS, what a shell reports for a process
/// killed by SIGSYS.
pub const SECCOMP_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// Linux's comm length, NUL included.
const COMM_LEN: usize = 16;

thread_local! {
    /// The thread's name (comm), read when its filter is installed, for the SIGSYS handler:
    /// the handler may not make syscalls the filter forbids, such as prctl or open.
    static THREAD_NAME: Cell<[u8; COMM_LEN]> = const { Cell::new([0; COMM_LEN]) };
}

/// si_code of a SIGSYS raised by a seccomp trap.
const SYS_SECCOMP: i32 = 1;
/// Offset of `si_syscall` in x86_64's siginfo_t: si_signo, si_errno, si_code, padding (16
/// bytes), then the sigsys union member's `void *_call_addr` (8), then `int _syscall`.
const SI_SYSCALL_OFFSET: usize = 24;

/// Appends `bytes` to `buf` at `*len`, as far as it fits.
fn push(buf: &mut [u8], len: &mut usize, bytes: &[u8]) {
    for &b in bytes {
        if *len < buf.len() {
            buf[*len] = b;
            *len += 1;
        }
    }
}

/// The line the SIGSYS handler writes, built without allocating.
fn violation_line(buf: &mut [u8; 128], comm: &[u8; COMM_LEN], nr: i32) -> usize {
    let mut len = 0;
    push(buf, &mut len, b"chapeau: seccomp: thread ");
    let name_len = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    push(buf, &mut len, &comm[..name_len]);
    push(buf, &mut len, b" made forbidden syscall ");
    let mut digits = [0u8; 11];
    let mut n = nr.unsigned_abs();
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        push(buf, &mut len, b"-");
    }
    push(buf, &mut len, &digits[start..]);
    push(buf, &mut len, b"\n");
    len
}

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let mut buf = [0u8; 128];
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; for SYS_SECCOMP
    // its sigsys member is filled in, and si_syscall is an int at SI_SYSCALL_OFFSET.
    let (code, nr) = unsafe {
        let code = (*info).si_code;
        let nr = info
            .cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned();
        (code, nr)
    };
    let len = if code == SYS_SECCOMP {
        // A const-initialised thread-local without a destructor: a plain TLS read.
        violation_line(&mut buf, &THREAD_NAME.get(), nr)
    } else {
        let line = b"chapeau: SIGSYS not raised by seccomp\n";
        buf[..line.len()].copy_from_slice(line);
        line.len()
    };
    // SAFETY: write(2) from a live buffer and _exit are async-signal-safe, and every thread's
    // policy allows write and exit_group.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(SECCOMP_EXIT_STATUS);
    }
}

/// Has glibc's malloc do, before any filter, the once-per-process work it would otherwise do
/// lazily from a filtered thread: the first time a thread's arena shrinks it opens
/// /proc/sys/vm/overcommit_memory (check_may_shrink_heap), and once there are more than 8
/// arenas it asks sched_getaffinity how many to allow. `set_allocator_limits` fixes the arena
/// limit (glibc's own default, 8 per CPU) before any thread exists; `warm_up_allocator` shrinks
/// one thread arena, which leaves nothing for later.
fn set_allocator_limits() {
    const TRIM_THRESHOLD: libc::c_int = 128 << 10;
    let cpus = cpus_allowed();
    let arenas = libc::c_int::try_from(8 * cpus).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets malloc parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Shrinks a thread arena once per process, before the first filter (see
/// `set_allocator_limits`); later calls return at once, and a call made while it runs waits.
/// It runs on the first thread that calls it: the `vm-setup` thread while the kernel loads, or
/// the `api`/`qmp` thread before it confines itself. The main thread allocates from the main
/// arena, which is not shrunk this way, so there it runs on a short-lived thread of its own.
///
/// The trim threshold is fixed at glibc's default (128 KiB) so that freeing 256 KiB surely
/// trims: glibc otherwise raises it, up to 64 MiB, each time a large block is freed. The
/// warm-up takes four 64 KiB blocks, below the 128 KiB above which malloc maps a block of its
/// own instead of growing the arena: the arena grows in four steps, where 1024 blocks of 1 KiB
/// grew it page by page (some 250 mprotect calls, a millisecond of start-up). The blocks are
/// never written: filling them cost 64 page faults (~0.25 ms on a PVM host), and malloc needs
/// only their headers to grow and trim the arena.
pub fn warm_up_allocator() {
    static WARM_UP: Once = Once::new();
    WARM_UP.call_once(|| {
        if is_main_thread() {
            let helper = std::thread::Builder::new()
                .name("malloc-warmup".into())
                .spawn(shrink_own_arena);
            if let Ok(thread) = helper {
                let _ = thread.join();
            }
        } else {
            shrink_own_arena();
        }
    });
}

fn shrink_own_arena() {
    let blocks: Vec<Vec<u8>> = (0..4).map(|_| Vec::with_capacity(64 << 10)).collect();
    drop(std::hint::black_box(blocks));
}

fn is_main_thread() -> bool {
    // SAFETY: getpid and gettid have no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) == libc::c_long::from(libc::getpid()) }
}

/// The CPUs this process may run on: glibc's own measure for its arena limit. One syscall,
/// where `available_parallelism` also reads the cgroup's CPU quota from /proc and /sys.
fn cpus_allowed() -> usize {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes at most its size into it,
    // and CPU_COUNT only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        usize::try_from(libc::CPU_COUNT(&set)).map_or(1, |n| n.max(1))
    }
}

/// Once per process, before any thread is filtered: the SIGSYS reporter and the allocator's
/// lazy set-up. `apply` calls it too; calling it first thing keeps every thread covered.
pub fn prepare_process() -> Result<(), SeccompError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        #[cfg(feature = "forbidden-syscall-test")]
        crate::test_hooks::init();
        set_allocator_limits();
        // SAFETY: a zeroed sigaction is valid; we set an SA_SIGINFO handler with the matching
        // signature and an empty mask, and pass valid pointers.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_sigsys;
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    });
    result
}

/// Remembers the calling thread's comm for the SIGSYS handler.
fn remember_thread_name() {
    let mut comm = [0u8; COMM_LEN];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the buffer we pass.
    let rc = unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    if rc != 0 {
        comm[..1].copy_from_slice(b"?");
    }
    THREAD_NAME.set(comm);
}

/// Confines device threads with the filter of their kind (`net`, `9p`), after Landlock: the 9p
/// workers have limited themselves to their export already; any other device thread (started
/// while the VM is built, before the `vmm` thread's own Landlock) may reach no path at all.
pub struct SeccompConfinement(pub Arc<SeccompFilters>);

impl devices::virtio::ThreadConfinement for SeccompConfinement {
    fn confine(&self, kind: &str) -> Result<(), String> {
        if kind != "9p" {
            crate::landlock::restrict_thread(&[]).map_err(|e| e.to_string())?;
        }
        apply(&self.0, kind).map_err(|e| e.to_string())
    }
}

/// Installs the filter of category `name` on the calling thread (and, once per process, the
/// SIGSYS handler that reports a violation); with `--seccomp off`, none.
pub fn apply(filters: &SeccompFilters, name: &str) -> Result<(), SeccompError> {
    let program = filters
        .get(name)
        .ok_or_else(|| SeccompError::Missing(name.into()))?;
    prepare_process()?;
    warm_up_allocator();
    remember_thread_name();
    unblock_sigsys();
    if filters.mode != SeccompMode::Off {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            name: name.into(),
            source,
        })?;
    }
    #[cfg(feature = "forbidden-syscall-test")]
    crate::test_hooks::after_filter(name);
    Ok(())
}

/// Lets SIGSYS reach the calling thread's handler: threads that block every signal (the net
/// workers do) would otherwise be killed by a violation without a word.
fn unblock_sigsys() {
    // SAFETY: sigemptyset/sigaddset initialise the set on our stack; pthread_sigmask reads it
    // and changes only this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// The warn line `--seccomp off` or `log` earns at start, `None` for `enforce`.
pub fn mode_warning(mode: SeccompMode) -> Option<&'static str> {
    match mode {
        SeccompMode::Enforce => None,
        SeccompMode::Off => Some(
            "--seccomp off: no thread runs under a seccomp filter; a compromised thread may make \
             any syscall. For debugging only",
        ),
        SeccompMode::Log => Some(
            "--seccomp log: forbidden syscalls are allowed and only logged by the kernel \
             (dmesg/audit: type=SECCOMP); nothing is stopped. For debugging only",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_category_has_a_filter() {
        let filters = SeccompFilters::builtin().unwrap();
        for name in [VMM_THREAD, VCPU_THREAD, API_THREAD, QMP_THREAD, "net", "9p"] {
            let program = filters.get(name).unwrap();
            assert!(program.len() > 10, "{name} filter is suspiciously short");
        }
    }

    /// What a forked child did: its wait status and what it wrote to stderr.
    struct Child {
        status: i32,
        stderr: String,
    }

    impl Child {
        fn exited_with(&self, code: i32) -> bool {
            libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == code
        }
    }

    /// Runs `body` in a forked child whose thread is named `comm`, with stderr captured; the
    /// child exits 0 when `body` returns.
    fn in_child(comm: &str, body: impl FnOnce()) -> Child {
        use std::io::Read;
        use std::os::fd::FromRawFd;
        let comm = std::ffi::CString::new(comm).unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array we pass.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only sets up stderr, runs `body` and exits; it never returns into
        // the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: fd and name arguments are valid.
            unsafe {
                libc::dup2(fds[1], 2);
                libc::prctl(libc::PR_SET_NAME, comm.as_ptr());
            }
            body();
            // SAFETY: _exit ends the child.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: we own the read end; closing our copy of the write end lets read see EOF.
        let mut reader = unsafe {
            libc::close(fds[1]);
            std::fs::File::from_raw_fd(fds[0])
        };
        let mut stderr = String::new();
        reader.read_to_string(&mut stderr).unwrap();
        let mut status = 0;
        // SAFETY: waits for the child we forked; status is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        Child { status, stderr }
    }

    /// Runs `body` in a forked child that first installs the `name` filter with [`apply`].
    fn in_filtered_child(name: &str, body: fn()) -> Child {
        in_child_under(SeccompMode::Enforce, name, body)
    }

    /// [`in_filtered_child`] with the filters in `mode`.
    fn in_child_under(mode: SeccompMode, name: &str, body: fn()) -> Child {
        let filters = SeccompFilters::builtin().unwrap().with_mode(mode);
        in_child(&format!("filtered-{name}"), move || {
            if apply(&filters, name).is_err() {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(100) };
            }
            body();
        })
    }

    /// The vmm thread removes the socket files it created at the VM's end under its filter, by
    /// name relative to the directory held since the bind; a path-based unlink stays
    /// forbidden (it could remove any host file).
    #[test]
    fn the_vmm_thread_removes_its_sockets_but_no_path() {
        let dir = std::env::temp_dir().join(format!("chapeau-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ours.sock");
        let _ = std::fs::remove_file(&sock);
        let filters = SeccompFilters::builtin().unwrap();
        let bound = sock.clone();
        let child = in_child("vmm-cleanup", move || {
            let (listener, file) = devices::unix_socket::bind_unix_listener(&bound).unwrap();
            if apply(&filters, VMM_THREAD).is_err() {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(100) };
            }
            drop(listener);
            drop(file);
        });
        assert!(
            libc::WIFEXITED(child.status) && libc::WEXITSTATUS(child.status) == 0,
            "{:#x}: {}",
            child.status,
            child.stderr
        );
        assert!(!sock.exists(), "the socket file must be removed");

        let victim = dir.join("not-ours");
        std::fs::write(&victim, b"host file").unwrap();
        let child = in_filtered_child(VMM_THREAD, || {
            let path = std::env::temp_dir().join(format!(
                "chapeau-seccomp-{}/not-ours",
                // SAFETY: getppid has no arguments: the test process's pid names the dir.
                unsafe { libc::getppid() }
            ));
            let _ = std::fs::remove_file(path);
        });
        assert_eq!(
            libc::WEXITSTATUS(child.status),
            SECCOMP_EXIT_STATUS,
            "{}",
            child.stderr
        );
        assert!(victim.exists(), "a path-based unlink must be refused");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A thread that installs `name` and returns, joined by an unfiltered main thread: what
    /// every vCPU does when the VM ends. Returns the child's wait status.
    fn thread_ends_under(name: &'static str) -> i32 {
        let filters = SeccompFilters::builtin().unwrap();
        let program = filters.get(name).unwrap().clone();
        // SAFETY: the child only spawns and joins one thread, then exits without returning
        // into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let thread = std::thread::spawn(move || {
                if seccompiler::apply_filter(&program).is_err() {
                    // SAFETY: _exit is always safe to call.
                    unsafe { libc::_exit(100) };
                }
                // Some heap churn, as a thread's last work does.
                drop(vec![0u8; 1 << 16]);
            });
            let code = if thread.join().is_ok() { 0 } else { 101 };
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child we forked; status is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn vcpu_threads_may_end_under_their_filter() {
        let status = thread_ends_under(VCPU_THREAD);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
    }

    #[test]
    fn a_violation_names_the_thread_and_syscall_and_exits_159() {
        for name in [VMM_THREAD, VCPU_THREAD] {
            let child = in_filtered_child(name, || {
                // SAFETY: socket(2) with constant arguments; no memory is passed.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            });
            assert!(
                child.exited_with(SECCOMP_EXIT_STATUS),
                "{name}: {:#x}",
                child.status
            );
            assert_eq!(
                child.stderr,
                format!("chapeau: seccomp: thread filtered-{name} made forbidden syscall 41\n")
            );
        }
    }

    /// The `Seccomp:` field of the calling thread's /proc status: 0 none, 2 filtered.
    fn seccomp_status() -> String {
        std::fs::read_to_string("/proc/thread-self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
            .unwrap()
    }

    /// `--seccomp log`: a syscall outside the policy runs (the kernel logs it) and the thread
    /// lives on, still filtered; `--seccomp off`: no filter at all. `enforce` keeps every trap.
    #[test]
    fn log_mode_lets_a_forbidden_syscall_through_and_off_installs_nothing() {
        let traps = |mode| {
            let filters = SeccompFilters::builtin().unwrap().with_mode(mode);
            let program = filters.get(VMM_THREAD).unwrap();
            let count = |k| {
                program
                    .iter()
                    .filter(|i| i.code == BPF_RET_K && i.k == k)
                    .count()
            };
            (count(libc::SECCOMP_RET_TRAP), count(libc::SECCOMP_RET_LOG))
        };
        let (enforced, _) = traps(SeccompMode::Enforce);
        assert!(enforced > 0);
        assert_eq!(traps(SeccompMode::Log), (0, enforced));

        for (mode, field) in [(SeccompMode::Log, "2"), (SeccompMode::Off, "0")] {
            let child = in_child_under(mode, VMM_THREAD, || {
                // SAFETY: socket(2) with constant arguments; the fd is closed at once.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                let code = if fd < 0 { 1 } else { 0 };
                let code = code + if seccomp_status() == "2" { 10 } else { 20 };
                // SAFETY: _exit ends the child with a code the parent decodes.
                unsafe { libc::_exit(code) };
            });
            let want = if field == "2" { 10 } else { 20 };
            assert!(
                child.exited_with(want),
                "{mode:?}: {:#x}: {}",
                child.status,
                child.stderr
            );
        }
        assert!(mode_warning(SeccompMode::Enforce).is_none());
        assert!(mode_warning(SeccompMode::Off)
            .unwrap()
            .contains("--seccomp off"));
        assert!(mode_warning(SeccompMode::Log)
            .unwrap()
            .contains("--seccomp log"));
    }

    /// A thread that blocked every signal before its filter (as the net workers do) is still
    /// reported, not killed silently by the kernel.
    #[test]
    fn a_thread_that_blocks_every_signal_still_reports_its_violation() {
        let filters = SeccompFilters::builtin().unwrap();
        let child = in_child("all-blocked", move || {
            // SAFETY: sigfillset initialises the set on our stack; pthread_sigmask changes
            // only this thread's mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut set);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            if apply(&filters, VCPU_THREAD).is_err() {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(100) };
            }
            // SAFETY: socket(2) with constant arguments; no memory is passed.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert!(
            child.exited_with(SECCOMP_EXIT_STATUS),
            "{:#x}: {}",
            child.status,
            child.stderr
        );
        assert_eq!(
            child.stderr,
            "chapeau: seccomp: thread all-blocked made forbidden syscall 41\n"
        );
    }

    #[test]
    fn the_violation_line_is_built_without_allocating() {
        let mut buf = [0u8; 128];
        let mut comm = [0u8; COMM_LEN];
        comm[..15].copy_from_slice(b"a-fifteen-bytes");
        let len = violation_line(&mut buf, &comm, -7);
        assert_eq!(
            &buf[..len],
            b"chapeau: seccomp: thread a-fifteen-bytes made forbidden syscall -7\n"
        );
        let len = violation_line(&mut buf, &[0; COMM_LEN], i32::MIN);
        assert!(buf[..len].ends_with(b"thread  made forbidden syscall -2147483648\n"));
    }

    /// mmap(2) of `prot`, anonymous and private; the address (MAP_FAILED on error).
    fn map_anonymous(prot: libc::c_int) -> *mut libc::c_void {
        // SAFETY: a new anonymous mapping; nothing existing is touched.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        }
    }

    #[test]
    fn no_thread_may_map_executable_memory() {
        for name in [VMM_THREAD, VCPU_THREAD] {
            let child = in_filtered_child(name, || {
                let p = map_anonymous(libc::PROT_READ | libc::PROT_WRITE);
                assert_ne!(p, libc::MAP_FAILED);
                // SAFETY: changes the protection of the mapping we just made and never use.
                unsafe { libc::mprotect(p, 4096, libc::PROT_READ) };
                map_anonymous(libc::PROT_READ | libc::PROT_EXEC);
            });
            assert!(
                child.exited_with(SECCOMP_EXIT_STATUS),
                "{name}: {:#x}",
                child.status
            );
            assert!(
                child.stderr.ends_with(" made forbidden syscall 9\n"),
                "{name}: {}",
                child.stderr
            );

            let child = in_filtered_child(name, || {
                let p = map_anonymous(libc::PROT_READ);
                // SAFETY: as above.
                unsafe { libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC) };
            });
            assert!(
                child.stderr.ends_with(" made forbidden syscall 10\n"),
                "{name}: {}",
                child.stderr
            );
        }
    }

    #[test]
    fn the_vmm_thread_can_join_a_thread() {
        let filters = SeccompFilters::builtin().unwrap();
        let child = in_child("join-test", move || {
            let worker = std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
            });
            apply(&filters, VMM_THREAD).unwrap();
            worker.join().unwrap();
        });
        assert!(
            child.exited_with(0),
            "{:#x}: {}",
            child.status,
            child.stderr
        );
    }

    /// A vCPU thread's glibc arena grows with mprotect and shrinks with madvise: under the vcpu
    /// filter a thread allocates and frees megabytes in small blocks, contending a mutex and a
    /// condvar with another thread (futex), and survives. Runs in a fresh process (this test
    /// binary again), whose malloc state is a VMM's at start, not the test harness's.
    #[test]
    fn a_vcpu_thread_grows_and_shrinks_its_malloc_arena() {
        for _ in 0..3 {
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "seccomp::tests::arena_child",
                    "--include-ignored",
                ])
                .args(["--nocapture", "--test-threads=1"])
                .env("CHAPEAU_ARENA_CHILD", "1")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{:?}: {stderr}", output.status);
            assert!(
                String::from_utf8_lossy(&output.stdout).contains("1 passed"),
                "the child ran no test"
            );
        }
    }

    #[test]
    #[ignore = "run by a_vcpu_thread_grows_and_shrinks_its_malloc_arena in its own process"]
    fn arena_child() {
        use std::sync::{Arc, Condvar, Mutex};
        const ROUNDS: u64 = 4;
        const BLOCKS: usize = 4096;
        if std::env::var_os("CHAPEAU_ARENA_CHILD").is_none() {
            return;
        }
        let filters = SeccompFilters::builtin().unwrap();
        let shared = Arc::new((Mutex::new(0u64), Condvar::new()));
        let theirs = shared.clone();
        let vcpu = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                apply(&filters, VCPU_THREAD).unwrap();
                for _ in 0..ROUNDS {
                    // 4 MiB in 1 KiB blocks: below the mmap threshold, so from the arena.
                    let blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![i as u8; 1024]).collect();
                    let (lock, cvar) = &*theirs;
                    *lock.lock().unwrap() += blocks.len() as u64;
                    cvar.notify_all();
                    drop(blocks);
                }
            })
            .unwrap();
        let (lock, cvar) = &*shared;
        let mut count = lock.lock().unwrap();
        while *count < ROUNDS * BLOCKS as u64 {
            count = cvar.wait(count).unwrap();
        }
        drop(count);
        vcpu.join().unwrap();
    }

    #[test]
    fn vcpus_may_program_msi_routes_and_hand_out_queue_eventfds() {
        let child = in_filtered_child(VCPU_THREAD, || {
            // SAFETY: ioctls on an invalid fd with a null argument fail with EBADF before the
            // kernel reads anything; fcntl duplicates stderr; close closes the duplicate.
            unsafe {
                libc::ioctl(-1, 0x4008_ae6a, std::ptr::null::<u8>()); // KVM_SET_GSI_ROUTING
                libc::ioctl(-1, 0x4040_ae79, std::ptr::null::<u8>()); // KVM_IOEVENTFD
                let fd = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
                libc::close(fd);
            }
        });
        assert!(
            child.exited_with(0),
            "{:#x}: {}",
            child.status,
            child.stderr
        );
        // Other KVM ioctls stay forbidden (KVM_IRQFD: only the vmm thread wires irqfds, at boot).
        let child = in_filtered_child(VCPU_THREAD, || {
            // SAFETY: as above, an invalid fd.
            unsafe { libc::ioctl(-1, 0x4020_ae76, std::ptr::null::<u8>()) };
        });
        assert!(
            child.exited_with(SECCOMP_EXIT_STATUS),
            "{:#x}",
            child.status
        );
    }

    #[test]
    fn an_allowed_syscall_succeeds() {
        for name in [VMM_THREAD, VCPU_THREAD] {
            let child = in_filtered_child(name, || {
                // SAFETY: an empty write to stderr passes no memory the kernel reads; F_GETFD
                // (what std's debug builds call before closing a File) only reads fd flags.
                unsafe {
                    libc::write(2, std::ptr::null(), 0);
                    libc::fcntl(2, libc::F_GETFD);
                }
            });
            assert!(child.exited_with(0), "{name}: {:#x}", child.status);
        }
    }
}
