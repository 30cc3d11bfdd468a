//! vCPUs: per-vCPU setup (CPUID, MSRs, FPU, LAPIC; registers for the boot vCPU), the KVM_RUN
//! loop that dispatches PIO/MMIO exits to the device buses on the vCPU's own thread, and the
//! handles the runtime pauses, resumes and stops them with.
//!
//! A vCPU leaves KVM_RUN on request through `immediate_exit` plus a signal: the runtime sets
//! what it wants (run, pause, stop), then signals the thread; the handler sets the thread's
//! `kvm_run.immediate_exit`, so a signal that lands just before KVM_RUN is not lost (the run
//! returns EINTR at once) and one that lands inside it ends it.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::{Bus, ExitNotifier, ExitReason};
use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestAddress;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{cpuid, lapic, msr, regs};
use crate::seccomp::{self, SeccompFilters};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM_{op} failed: {source}")]
    Setup {
        index: u8,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {source}")]
    Regs { index: u8, source: regs::RegsError },
    #[error("vCPU {index}: too many MSRs to set")]
    Msrs { index: u8 },
    #[error("cannot start thread vcpu{index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    #[error("vCPUs did not {what} within {seconds} s")]
    Timeout { what: &'static str, seconds: u64 },
}

/// vCPU exits by reason, summed over all vCPUs (relaxed counters: statistics, not state).
#[derive(Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub hlt: AtomicU64,
    /// KVM_RUN interrupted by a signal (a kick) or a host interrupt.
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

impl ExitCounters {
    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }

    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("io_in", get(&self.io_in)),
            ("io_out", get(&self.io_out)),
            ("mmio_read", get(&self.mmio_read)),
            ("mmio_write", get(&self.mmio_write)),
            ("hlt", get(&self.hlt)),
            ("interrupted", get(&self.interrupted)),
            ("other", get(&self.other)),
        ]
    }
}

/// The buses and exit path every vCPU shares.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitNotifier>,
    pub exits: Arc<ExitCounters>,
}

/// What the runtime wants every vCPU to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Wanted {
    Run = 0,
    Pause = 1,
    Stop = 2,
}

/// Shared by the runtime and every vCPU thread. `wanted` is read after every exit (one relaxed
/// load on the hot path); parking and waking go through the mutex and condvar.
struct Control {
    wanted: AtomicU8,
    /// vCPU threads currently parked.
    parked: Mutex<usize>,
    changed: Condvar,
}

impl Control {
    fn wanted(&self) -> Wanted {
        match self.wanted.load(Ordering::Acquire) {
            0 => Wanted::Run,
            1 => Wanted::Pause,
            _ => Wanted::Stop,
        }
    }
}

thread_local! {
    /// This vCPU thread's `kvm_run` page, for the kick handler; null on other threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread
        // before its first KVM_RUN and cleared before the VcpuFd (and so the mapping) is
        // dropped; the handler runs on that same thread. A volatile byte store is all it does.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the process-wide kick handler; call once before starting vCPU threads.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::KickHandler)
}

/// The runtime's side of all vCPU threads: pause, resume, stop and join them.
pub struct Vcpus {
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
    /// Kernel thread ids (what /proc/<pid>/task lists; QMP's query-cpus reports them).
    tids: Arc<ThreadIds>,
}

/// The vCPU threads' kernel thread ids by vCPU index, each recorded by its thread as it starts
/// (0 until then).
struct ThreadIds {
    ids: Mutex<Vec<i32>>,
    recorded: Condvar,
}

impl Vcpus {
    /// How long a pause or stop may take before the runtime gives up on a vCPU.
    const WAIT: Duration = Duration::from_secs(10);

    /// Starts every vCPU on its own thread `vcpuN`, each under the vCPU seccomp filter.
    pub fn start(
        vcpus: Vec<Vcpu>,
        context: &VcpuContext,
        filters: &Arc<SeccompFilters>,
    ) -> Result<Self, VcpuError> {
        let mut started = Self {
            control: Arc::new(Control {
                wanted: AtomicU8::new(Wanted::Run as u8),
                parked: Mutex::new(0),
                changed: Condvar::new(),
            }),
            threads: Vec::with_capacity(vcpus.len()),
            tids: Arc::new(ThreadIds {
                ids: Mutex::new(vec![0; vcpus.len()]),
                recorded: Condvar::new(),
            }),
        };
        for vcpu in vcpus {
            let thread = vcpu.spawn(
                context.clone(),
                filters.clone(),
                started.control.clone(),
                started.tids.clone(),
            )?;
            started.threads.push(thread);
        }
        // Kata reads the vCPU thread ids (QMP query-cpus-fast) as soon as the VM has started,
        // to put them in the sandbox's cgroup: wait until every thread has recorded its own
        // (and so has its name: std names a thread before running its closure). Each thread
        // signals as it records, so this wait ends with the last one, not at a polling tick:
        // this thread then installs its own filter while the vCPU threads install theirs.
        let ids = started.tids.ids.lock().unwrap_or_else(|p| p.into_inner());
        drop(
            started
                .tids
                .recorded
                .wait_timeout_while(ids, Duration::from_secs(5), |ids| ids.contains(&0))
                .unwrap_or_else(|p| p.into_inner()),
        );
        Ok(started)
    }

    /// The vCPU threads' kernel thread ids, by vCPU index (0 until a thread has started).
    pub fn thread_ids(&self) -> Vec<i32> {
        self.tids
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn count(&self) -> usize {
        self.threads.len()
    }

    fn request(&self, wanted: Wanted) {
        self.control.wanted.store(wanted as u8, Ordering::Release);
        // Taking the lock orders the store before any parked thread re-checks it.
        drop(
            self.control
                .parked
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        self.control.changed.notify_all();
        for thread in &self.threads {
            if !thread.is_finished() {
                // A thread that has just exited cannot be signalled; nothing to kick then.
                let _ = thread.kill(kick_signal());
            }
        }
    }

    /// Parks every vCPU outside KVM_RUN; returns once all are parked (or have ended).
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.request(Wanted::Pause);
        let deadline = Instant::now() + Self::WAIT;
        let mut parked = self
            .control
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        loop {
            let running = self.threads.iter().filter(|t| !t.is_finished()).count();
            if *parked >= running {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VcpuError::Timeout {
                    what: "pause",
                    seconds: Self::WAIT.as_secs(),
                });
            }
            // Woken by each vCPU that parks; the timeout also covers threads that end.
            parked = self
                .control
                .changed
                .wait_timeout(parked, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn resume(&self) {
        self.request(Wanted::Run);
    }

    /// Makes every vCPU leave its loop and joins the threads.
    pub fn stop(&mut self) -> Result<(), VcpuError> {
        self.request(Wanted::Stop);
        let deadline = Instant::now() + Self::WAIT;
        while self.threads.iter().any(|t| !t.is_finished()) {
            if Instant::now() >= deadline {
                return Err(VcpuError::Timeout {
                    what: "stop",
                    seconds: Self::WAIT.as_secs(),
                });
            }
            // A vCPU that read `wanted` just before the kick may be back in KVM_RUN: kick
            // again until it is out (immediate_exit makes that at most one more run).
            self.request(Wanted::Stop);
            std::thread::sleep(Duration::from_millis(1));
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        Ok(())
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::error!("{e}");
        }
    }
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates and configures vCPU `index` of `count`. The boot vCPU (0) starts at `entry` in
    /// 64-bit mode; the others wait for the guest's INIT/SIPI in the in-kernel LAPIC.
    pub fn new(
        vm: &VmFd,
        index: u8,
        count: u8,
        supported_cpuid: &CpuId,
        supported_msrs: &[u32],
        entry: GuestAddress,
    ) -> Result<Self, VcpuError> {
        let setup = |op| move |source| VcpuError::Setup { index, op, source };
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;

        let mut cpuid = supported_cpuid.clone();
        cpuid::filter_cpuid(&mut cpuid, cpuid::Topology { index, count });
        fd.set_cpuid2(&cpuid).map_err(setup("SET_CPUID2"))?;

        let msrs = msr::boot_msrs(supported_msrs).map_err(|_| VcpuError::Msrs { index })?;
        fd.set_msrs(&msrs).map_err(setup("SET_MSRS"))?;
        fd.set_fpu(&regs::boot_fpu()).map_err(setup("SET_FPU"))?;

        let mut lapic_state = fd.get_lapic().map_err(setup("GET_LAPIC"))?;
        lapic::set_lint(&mut lapic_state);
        fd.set_lapic(&lapic_state).map_err(setup("SET_LAPIC"))?;

        if index == 0 {
            regs::setup_boot_vcpu(&fd, entry)
                .map_err(|source| VcpuError::Regs { index, source })?;
        }
        Ok(Self { index, fd })
    }

    fn spawn(
        self,
        context: VcpuContext,
        filters: Arc<SeccompFilters>,
        control: Arc<Control>,
        tids: Arc<ThreadIds>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // The raw syscall: in a static build glibc's gettid() wrapper is a weak
                // symbol that may be left unresolved.
                // SAFETY: gettid has no arguments and cannot fail.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
                if let Some(slot) = tids
                    .ids
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(usize::from(index))
                {
                    *slot = tid;
                }
                tids.recorded.notify_all();
                if let Err(e) = seccomp::apply(&filters, seccomp::VCPU_THREAD) {
                    log::error!("vcpu{index}: {e}");
                    context.exit.notify(ExitReason::Crashed);
                    return;
                }
                self.run(&context, &control);
            })
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    /// Waits while the runtime wants the vCPUs paused; returns whether to go on running.
    fn park(&self, control: &Control) -> bool {
        let mut parked = control.parked.lock().unwrap_or_else(|p| p.into_inner());
        if control.wanted() == Wanted::Pause {
            // Tells a guest with kvmclock that it was stopped, so its watchdogs do not take
            // the pause for a lockup. EINVAL when the guest does not use kvmclock: nothing
            // to tell.
            let _ = self.fd.kvmclock_ctrl();
            *parked += 1;
            control.changed.notify_all();
            while control.wanted() == Wanted::Pause {
                parked = control
                    .changed
                    .wait(parked)
                    .unwrap_or_else(|p| p.into_inner());
            }
            *parked -= 1;
        }
        control.wanted() == Wanted::Run
    }

    fn run(mut self, context: &VcpuContext, control: &Control) {
        let run_page: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run_page));
        let mut first_run = true;
        loop {
            if control.wanted() != Wanted::Run && !self.park(control) {
                break;
            }
            if first_run && self.index == 0 {
                log::info!("vcpu0: first KVM_RUN at monotonic {} ns", monotonic_ns());
            }
            first_run = false;
            let ended = match self.fd.run() {
                Ok(exit) => handle_exit(self.index, exit, context),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    context.exits.interrupted.fetch_add(1, Ordering::Relaxed);
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => {
                    log::error!("vcpu{}: KVM_RUN failed: {e}", self.index);
                    Some(ExitReason::Crashed)
                }
            };
            if let Some(reason) = ended {
                context.exit.notify(reason);
                break;
            }
        }
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// Handles one exit; returns why the VM must end, if it must.
fn handle_exit(index: u8, exit: VcpuExit, context: &VcpuContext) -> Option<ExitReason> {
    let counters = &context.exits;
    match exit {
        VcpuExit::IoIn(port, data) => {
            counters.io_in.fetch_add(1, Ordering::Relaxed);
            if !context.pio.read(u64::from(port), data) {
                // An empty ISA bus floats high.
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            counters.io_out.fetch_add(1, Ordering::Relaxed);
            context.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            counters.mmio_read.fetch_add(1, Ordering::Relaxed);
            if !context.mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            counters.mmio_write.fetch_add(1, Ordering::Relaxed);
            context.mmio.write(addr, data);
        }
        VcpuExit::Hlt => {
            counters.hlt.fetch_add(1, Ordering::Relaxed);
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {
            counters.interrupted.fetch_add(1, Ordering::Relaxed);
        }
        VcpuExit::Shutdown => {
            // A triple fault: a real machine resets; a guest does not do this on purpose.
            log::warn!("vcpu{index}: guest triple-faulted (shutdown exit); the VM ends");
            return Some(ExitReason::TripleFault);
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Poweroff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                _ => {
                    log::error!("vcpu{index}: guest crashed (system event {kind})");
                    ExitReason::Crashed
                }
            });
        }
        VcpuExit::InternalError => {
            log::error!(
                "vcpu{index}: KVM internal error: the guest executed something KVM cannot emulate"
            );
            return Some(ExitReason::Crashed);
        }
        VcpuExit::FailEntry(reason, cpu) => {
            log::error!("vcpu{index}: KVM entry failed (reason {reason:#x}, cpu {cpu})");
            return Some(ExitReason::Crashed);
        }
        other => {
            counters.other.fetch_add(1, Ordering::Relaxed);
            log::warn!("vcpu{index}: unexpected exit {other:?}; ignored");
        }
    }
    None
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives on our stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
