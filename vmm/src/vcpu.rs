//! vCPUs: per-vCPU setup (CPUID, MSRs, FPU, LAPIC; registers for the boot vCPU) and the KVM_RUN
//! loop that dispatches PIO/MMIO exits to the device buses on the vCPU's own thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::{Bus, ExitNotifier, ExitReason};
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestAddress;

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
}

/// The buses and exit path every vCPU shares.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitNotifier>,
    /// Exits handled by all vCPUs, for the exit-rate figure in the shutdown log.
    pub exit_count: Arc<AtomicU64>,
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

    /// Starts the vCPU on its own thread `vcpuN`, under its own seccomp filter.
    pub fn start(
        self,
        context: VcpuContext,
        filters: Arc<SeccompFilters>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Err(e) = seccomp::apply(&filters, seccomp::VCPU_THREAD) {
                    log::error!("vcpu{index}: {e}");
                    context.exit.notify(ExitReason::Crashed);
                    return;
                }
                self.run(&context);
            })
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(mut self, context: &VcpuContext) {
        let mut first_run = true;
        loop {
            if first_run && self.index == 0 {
                log::info!("vcpu0: first KVM_RUN at monotonic {} ns", monotonic_ns());
            }
            first_run = false;
            let result = self.fd.run();
            context.exit_count.fetch_add(1, Ordering::Relaxed);
            let ended = match result {
                Ok(exit) => handle_exit(self.index, exit, context),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => {
                    log::error!("vcpu{}: KVM_RUN failed: {e}", self.index);
                    Some(ExitReason::Crashed)
                }
            };
            if let Some(reason) = ended {
                context.exit.notify(reason);
                break;
            }
            if context.exit.reason().is_some() {
                break;
            }
        }
        // The VM is ending; the VMM thread tears the process down. Park rather than spin.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Handles one exit; returns why the VM must end, if it must.
fn handle_exit(index: u8, exit: VcpuExit, context: &VcpuContext) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !context.pio.read(u64::from(port), data) {
                // An empty ISA bus floats high.
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            context.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !context.mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            context.mmio.write(addr, data);
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => {
            // A triple fault: what a real machine answers with a reset.
            log::info!("vcpu{index}: guest triple-faulted (shutdown exit)");
            return Some(ExitReason::Reset);
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
