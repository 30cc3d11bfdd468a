//! The runtime: one `Vmm` per process, on the `vmm` thread. It owns the configuration until the
//! VM starts, then the VM (vCPU threads, devices, guest memory), and serves [`VmmRequest`]s from
//! every front end: the command line calls [`Vmm::handle`] directly, the REST (and QMP) server
//! threads go through an [`ApiClient`]. Nothing else reaches into the VM.
//!
//! Lifecycle: `Configured → Running ⇄ Paused → Stopped`. The VM ends on guest poweroff or
//! reset, a triple fault, a crash, SIGTERM/SIGINT or a `Shutdown` request; on every path the
//! vCPU threads are joined and the devices dropped (which removes the files they created)
//! before [`Vmm::run`] returns why.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use api::{
    ActionType, InstanceInfo, LoggerConfig, MetricsConfig, PendingConfig, PvmParams, RequestError,
    RequestedState, SerialConfig, VmState, VmmRequest, VmmResponse,
};
use devices::virtio::ThreadConfinement;
use devices::{ExitNotifier, ExitReason};
use event_manager::{EventManager, SubscriberOps};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;
use vmm_sys_util::timerfd::TimerFd;

use crate::builder;
use crate::device_manager::DeviceManager;
use crate::event_loop::{
    fd_is_open, ConsoleInput, ControlWake, EventLoopError, Subscriber, TerminationSignals,
};
use crate::seccomp::{self, SeccompConfinement, SeccompFilters};
use crate::vstate::vcpu::{self, ExitCounters, VcpuContext, Vcpus};
use crate::vstate::vm::{self, PausedClock};
use devices::host_files;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot set up {what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |source| RuntimeError::Setup { what, source }
}

/// The api thread's end of the channel to the `vmm` thread.
pub struct ApiClient {
    requests: Sender<VmmRequest>,
    responses: Receiver<Result<VmmResponse, RequestError>>,
    wake: EventFd,
}

impl ApiClient {
    /// Sends one request to the `vmm` thread and waits for its answer.
    pub fn call(&self, request: VmmRequest) -> Result<VmmResponse, RequestError> {
        let gone = || RequestError::Internal("the VMM is shutting down".into());
        self.requests.send(request).map_err(|_| gone())?;
        self.wake.write(1).map_err(|_| gone())?;
        self.responses.recv().map_err(|_| gone())?
    }
}

/// The `vmm` thread's end.
struct ApiChannel {
    requests: Receiver<VmmRequest>,
    responses: Sender<Result<VmmResponse, RequestError>>,
    wake: EventFd,
}

/// Where `PUT /metrics` asked the metrics to go, and the timer that flushes them.
struct MetricsSink {
    file: File,
    timer: TimerFd,
}

/// Restores the terminal's cooked mode when the VM ends, however it ends.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        stdin.lock().set_raw_mode().ok().map(|_| RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// A started VM. Fields drop in order: vCPU threads stopped and joined first, then the device
/// loop and the devices (their files removed), then the VM and its memory.
struct RunningVm {
    vcpus: Vcpus,
    events: EventManager<Subscriber>,
    devices: DeviceManager,
    vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    exits: Arc<ExitCounters>,
    paused_clock: Option<PausedClock>,
    started: Instant,
    _terminal: Option<RawTerminal>,
}

pub struct Vmm {
    id: String,
    state: VmState,
    pending: PendingConfig,
    exit: Arc<ExitNotifier>,
    signals: TerminationSignals,
    api: Option<ApiChannel>,
    metrics: Option<MetricsSink>,
    /// The control sources alone: what the runtime waits on while no device may run.
    control: Epoll,
    /// Set by the device loop when a control source is ready.
    control_pending: Arc<AtomicBool>,
    filters: Arc<SeccompFilters>,
    /// fd 0, taken before anything else could be given that number.
    stdin: Option<OwnedFd>,
    running: Option<RunningVm>,
    end: Option<ExitReason>,
    /// What a boot source configured over the API with `pvm_params: auto` gets: the command
    /// line's `--pvm-params` when it says on or off (the jailer decides it outside the jail,
    /// where /sys/module/kvm_pvm can be seen).
    pvm_default: PvmParams,
}

impl Vmm {
    /// A runtime with nothing started. Call on the thread that will be the `vmm` thread, before
    /// starting any other: it blocks SIGTERM/SIGINT for the threads started after it.
    pub fn new(id: String, pending: PendingConfig) -> Result<Self, RuntimeError> {
        crate::name_current_thread(seccomp::VMM_THREAD);
        let stdin = fd_is_open(0)
            // SAFETY: fd 0 is open and from here on owned by the console input alone.
            .then(|| unsafe { OwnedFd::from_raw_fd(0) });
        let filters = Arc::new(SeccompFilters::builtin()?);
        seccomp::prepare_process()?;
        let signals = TerminationSignals::new()?;
        let exit = Arc::new(ExitNotifier::new().map_err(setup("the exit event"))?);
        let control = Epoll::new().map_err(setup("the control epoll"))?;
        let vmm = Self {
            id,
            state: VmState::Configured,
            pending,
            exit,
            signals,
            api: None,
            metrics: None,
            control,
            control_pending: Arc::new(AtomicBool::new(false)),
            filters,
            stdin,
            running: None,
            end: None,
            pvm_default: PvmParams::Auto,
        };
        vmm.watch(vmm.signals.as_raw_fd())?;
        vmm.watch(vmm.exit.event().as_raw_fd())?;
        Ok(vmm)
    }

    fn watch(&self, fd: RawFd) -> Result<(), RuntimeError> {
        self.control
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .map_err(setup("the control epoll"))
    }

    fn control_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.signals.as_raw_fd(), self.exit.event().as_raw_fd()];
        fds.extend(self.api.as_ref().map(|api| api.wake.as_raw_fd()));
        fds.extend(self.metrics.as_ref().map(|m| m.timer.as_raw_fd()));
        fds
    }

    /// The channel an API server thread talks to this runtime through.
    pub fn api_client(&mut self) -> Result<ApiClient, RuntimeError> {
        let (request_tx, request_rx) = mpsc::channel();
        let (response_tx, response_rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(setup("the API wake event"))?;
        let client = ApiClient {
            requests: request_tx,
            responses: response_rx,
            wake: wake.try_clone().map_err(setup("the API wake event"))?,
        };
        self.watch(wake.as_raw_fd())?;
        self.api = Some(ApiChannel {
            requests: request_rx,
            responses: response_tx,
            wake,
        });
        Ok(client)
    }

    /// Sets what `pvm_params: auto` in an API-configured boot source means.
    pub fn set_pvm_default(&mut self, pvm_params: PvmParams) {
        self.pvm_default = pvm_params;
    }

    /// What the seccomp filters do with a forbidden syscall (`--seccomp`); call before any
    /// thread is started. `off` and `log` are said once at warn level.
    pub fn set_seccomp_mode(&mut self, mode: api::SeccompMode) -> Result<(), RuntimeError> {
        self.filters = Arc::new(SeccompFilters::builtin()?.with_mode(mode));
        if let Some(warning) = seccomp::mode_warning(mode) {
            log::warn!("{warning}");
        }
        Ok(())
    }

    /// The compiled seccomp filters, for the threads the front ends start.
    pub fn seccomp_filters(&self) -> Arc<SeccompFilters> {
        self.filters.clone()
    }

    /// The vCPU threads' kernel thread ids (empty before the VM starts).
    pub fn vcpu_thread_ids(&self) -> Vec<i32> {
        self.running
            .as_ref()
            .map(|vm| vm.vcpus.thread_ids())
            .unwrap_or_default()
    }

    /// Serves the control sources and runs the devices until the VM ends; returns why. With
    /// an API and no VM started, waits for requests (a signal ends it as `Stopped`).
    pub fn run(&mut self) -> ExitReason {
        let mut ready = [EpollEvent::default(); 8];
        loop {
            if let Some(reason) = self.end {
                self.teardown(reason);
                self.close_api();
                return reason;
            }
            let devices_may_run = self.state == VmState::Running;
            match self.running.as_mut() {
                Some(vm) if devices_may_run => {
                    match vm.events.run() {
                        Ok(_) => {}
                        Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                        Err(e) => {
                            log::error!("device event loop: {e}");
                            self.end = Some(ExitReason::Crashed);
                            continue;
                        }
                    }
                    if !self.control_pending.swap(false, Ordering::AcqRel) {
                        continue;
                    }
                }
                _ => match self.control.wait(-1, &mut ready) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => {
                        log::error!("control event loop: {e}");
                        self.end = Some(ExitReason::Crashed);
                        continue;
                    }
                },
            }
            self.serve_control();
        }
    }

    fn serve_control(&mut self) {
        if let Some(signo) = self.signals.take() {
            log::info!("received signal {signo}, stopping the VM");
            self.end.get_or_insert(ExitReason::Stopped);
        }
        let _ = self.exit.event().read();
        if let Some(reason) = self.exit.reason() {
            self.end.get_or_insert(reason);
        }
        if let Some(sink) = self.metrics.as_mut() {
            if sink.timer.wait().is_ok() {
                self.flush_metrics();
            }
        }
        let requests: Vec<VmmRequest> = match &self.api {
            Some(api) => {
                let _ = api.wake.read();
                api.requests.try_iter().collect()
            }
            None => Vec::new(),
        };
        for request in requests {
            let response = self.handle(request);
            if let Some(api) = &self.api {
                // The api thread is gone only when the process is ending.
                let _ = api.responses.send(response);
            }
        }
    }

    /// Answers what the API threads still asked, then drops the channel: a request sent from
    /// now on fails at once instead of waiting for a runtime that no longer serves.
    fn close_api(&mut self) {
        if let Some(api) = self.api.take() {
            for request in api.requests.try_iter() {
                let refused = Err(RequestError::Conflict(format!(
                    "the VM has stopped: {} is not served any more",
                    resource_name(&request)
                )));
                let _ = api.responses.send(refused);
            }
        }
    }

    /// Serves one request.
    pub fn handle(&mut self, request: VmmRequest) -> Result<VmmResponse, RequestError> {
        if request.is_pre_boot() && self.state != VmState::Configured {
            return Err(RequestError::Conflict(format!(
                "the VM has started (state {}): {} can only be configured before InstanceStart",
                state_name(self.state),
                resource_name(&request)
            )));
        }
        match request {
            VmmRequest::GetInfo => Ok(VmmResponse::Info(InstanceInfo {
                id: self.id.clone(),
                state: self.state,
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                app_name: "chapeau".into(),
            })),
            VmmRequest::GetConfig => Ok(VmmResponse::Config(self.pending.to_json())),
            VmmRequest::GetMetrics => Ok(VmmResponse::Metrics(self.metrics_json())),
            VmmRequest::GetVcpuThreadIds => Ok(VmmResponse::VcpuThreadIds(self.vcpu_thread_ids())),
            VmmRequest::PutLogger(logger) => self.configure_logger(&logger),
            VmmRequest::PutMetrics(metrics) => self.configure_metrics(&metrics),
            VmmRequest::Action(ActionType::InstanceStart) => self.start(),
            VmmRequest::Action(ActionType::SendCtrlAltDel) => self.send_ctrl_alt_del(),
            VmmRequest::Action(ActionType::Shutdown) => {
                if self.running.is_none() {
                    return Err(RequestError::Conflict(
                        "no VM is running: InstanceStart first (end the process with SIGTERM)"
                            .into(),
                    ));
                }
                self.end.get_or_insert(ExitReason::Stopped);
                Ok(VmmResponse::Empty)
            }
            VmmRequest::SetState(RequestedState::Paused) => self.pause(),
            VmmRequest::SetState(RequestedState::Resumed) => self.resume(),
            put => {
                self.pending.apply(put)?;
                Ok(VmmResponse::Empty)
            }
        }
    }

    fn configure_logger(&mut self, logger: &LoggerConfig) -> Result<VmmResponse, RequestError> {
        let level = match &logger.level {
            Some(level) => Some(level.parse::<log::LevelFilter>().map_err(|_| {
                RequestError::BadRequest(format!(
                    "level {level:?}: expected error, warn, info, debug or trace"
                ))
            })?),
            None => None,
        };
        if let Some(path) = &logger.log_path {
            let file = host_files::open_append(path).map_err(|e| {
                RequestError::BadRequest(format!("log_path {}: {e}", path.display()))
            })?;
            crate::logger::set_output(file);
        }
        if let Some(level) = level {
            log::set_max_level(level);
        }
        Ok(VmmResponse::Empty)
    }

    fn configure_metrics(&mut self, config: &MetricsConfig) -> Result<VmmResponse, RequestError> {
        if config.interval_s == 0 {
            return Err(RequestError::BadRequest(
                "interval_s must be at least 1 second".into(),
            ));
        }
        if self.metrics.is_some() {
            return Err(RequestError::Conflict(
                "metrics are already configured".into(),
            ));
        }
        let path = &config.metrics_path;
        let file = host_files::open_append(path).map_err(|e| {
            RequestError::BadRequest(format!("metrics_path {}: {e}", path.display()))
        })?;
        let internal =
            |e: &dyn std::fmt::Display| RequestError::Internal(format!("metrics timer: {e}"));
        let mut timer = TimerFd::new().map_err(|e| internal(&e))?;
        set_nonblocking(timer.as_raw_fd()).map_err(|e| internal(&e))?;
        let interval = Duration::from_secs(u64::from(config.interval_s));
        timer
            .reset(interval, Some(interval))
            .map_err(|e| internal(&e))?;
        self.watch(timer.as_raw_fd())
            .map_err(|e| RequestError::Internal(e.to_string()))?;
        self.metrics = Some(MetricsSink { file, timer });
        Ok(VmmResponse::Empty)
    }

    fn metrics_json(&self) -> serde_json::Value {
        let mut value = serde_json::json!({
            "utc_timestamp_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "state": state_name(self.state),
        });
        if let Some(vm) = &self.running {
            let mut exits: serde_json::Map<String, serde_json::Value> = vm
                .exits
                .by_reason()
                .iter()
                .map(|(name, n)| (name.to_string(), (*n).into()))
                .collect();
            exits.insert("total".into(), vm.exits.total().into());
            value["uptime_ms"] = (vm.started.elapsed().as_millis() as u64).into();
            value["vcpu_exits"] = exits.into();
            value["devices"] = vm.devices.metrics();
        }
        value
    }

    fn flush_metrics(&mut self) {
        let line = format!("{}\n", self.metrics_json());
        if let Some(sink) = self.metrics.as_mut() {
            if let Err(e) = sink.file.write_all(line.as_bytes()) {
                log::warn!("cannot write metrics: {e}");
            }
        }
    }

    /// Builds the configured VM and starts its vCPUs; from here on the `vmm` thread runs under
    /// its seccomp filter.
    fn start(&mut self) -> Result<VmmResponse, RequestError> {
        if self.state != VmState::Configured {
            return Err(RequestError::Conflict(format!(
                "the VM has already started (state {})",
                state_name(self.state)
            )));
        }
        let mut config = self.pending.to_config()?;
        if config.boot.pvm_params == PvmParams::Auto {
            config.boot.pvm_params = self.pvm_default;
        }
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            log::warn!(
                "running as root without chapeau-jailer: no namespaces, cgroups or dropped \
                 privileges confine this process, only its seccomp filters"
            );
        }
        let confinement: Arc<dyn ThreadConfinement> =
            Arc::new(SeccompConfinement(self.filters.clone()));
        let built = builder::build_vm(&config, &self.exit, &confinement)
            .map_err(|e| RequestError::BadRequest(format!("cannot start the VM: {e}")))?;
        let internal = |e: &dyn std::fmt::Display| RequestError::Internal(e.to_string());

        let exits = Arc::new(ExitCounters::default());
        let context = VcpuContext {
            pio: built.devices.pio_bus(),
            mmio: built.devices.mmio_bus(),
            exit: self.exit.clone(),
            exits: exits.clone(),
        };
        let mut events: EventManager<Subscriber> = EventManager::new().map_err(|e| internal(&e))?;
        events.add_subscriber(Arc::new(Mutex::new(ControlWake::new(
            self.control_fds(),
            self.control_pending.clone(),
        ))));
        let mut terminal = None;
        if config.serial == SerialConfig::Stdout {
            if let Some(fd) = self.stdin.take() {
                terminal = RawTerminal::enter();
                events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
                    fd,
                    built.devices.serial(),
                ))));
            }
        }
        for subscriber in built.devices.subscribers() {
            events.add_subscriber(subscriber);
        }

        static KICK_HANDLER: Once = Once::new();
        let mut kick = Ok(());
        KICK_HANDLER.call_once(|| kick = vcpu::install_kick_handler());
        kick.map_err(|e| internal(&e))?;
        // From here on no path is opened: Landlock (inherited by the vCPU threads and any
        // thread started later) leaves only the removal of the files chapeau created.
        crate::landlock::restrict_thread(&devices::host_files::created_file_dirs())
            .map_err(|e| internal(&e))?;
        let vcpus = Vcpus::start(built.vcpus, &context, &self.filters).map_err(|e| internal(&e))?;
        // Only now: it sleeps through SRCU grace periods, which the first KVM_RUN need not wait
        // for. It happens before this thread's filter, which does not allow it.
        let pit = vm::discard_lost_pit_ticks(&built.vm);
        self.running = Some(RunningVm {
            vcpus,
            events,
            devices: built.devices,
            vm: built.vm,
            _mem: built.mem,
            exits,
            paused_clock: None,
            started: Instant::now(),
            _terminal: terminal,
        });
        self.state = VmState::Running;
        // The guest runs from here on: a failure now ends the VM, which must not go on with
        // lost ticks reinjected or with this thread unfiltered.
        let finished = pit.map_err(|e| e.to_string()).and_then(|()| {
            seccomp::apply(&self.filters, seccomp::VMM_THREAD).map_err(|e| e.to_string())
        });
        if let Err(e) = finished {
            log::error!("cannot finish starting the VM, so it ends: {e}");
            self.end = Some(ExitReason::Crashed);
            return Err(RequestError::Internal(format!(
                "cannot finish starting the VM, so it ends: {e}"
            )));
        }
        #[cfg(feature = "forbidden-syscall-test")]
        crate::test_hooks::after_start();
        Ok(VmmResponse::Empty)
    }

    fn running_vm(&mut self, wanted: VmState) -> Result<&mut RunningVm, RequestError> {
        let state = self.state;
        match self.running.as_mut() {
            Some(vm) if state == wanted => Ok(vm),
            _ => Err(RequestError::Conflict(format!(
                "the VM is not {} (state {})",
                state_name(wanted).to_lowercase(),
                state_name(state)
            ))),
        }
    }

    fn pause(&mut self) -> Result<VmmResponse, RequestError> {
        let vm = self.running_vm(VmState::Running)?;
        vm.vcpus
            .pause()
            .map_err(|e| RequestError::Internal(e.to_string()))?;
        vm.devices.pause();
        vm.paused_clock = PausedClock::save(&vm.vm);
        self.state = VmState::Paused;
        log::info!("VM paused");
        Ok(VmmResponse::Empty)
    }

    fn resume(&mut self) -> Result<VmmResponse, RequestError> {
        let vm = self.running_vm(VmState::Paused)?;
        if let Some(clock) = vm.paused_clock.take() {
            clock.restore(&vm.vm);
        }
        vm.devices.resume();
        vm.vcpus.resume();
        self.state = VmState::Running;
        log::info!("VM resumed");
        Ok(VmmResponse::Empty)
    }

    fn send_ctrl_alt_del(&mut self) -> Result<VmmResponse, RequestError> {
        let vm = self.running_vm(VmState::Running)?;
        vm.devices
            .request_shutdown()
            .map_err(|e| RequestError::Internal(format!("cannot signal the guest: {e}")))?;
        Ok(VmmResponse::Empty)
    }

    /// Stops and drops the VM: vCPU threads joined, devices dropped.
    fn teardown(&mut self, reason: ExitReason) {
        // The last metrics line, with the VM's final counters.
        if self.metrics.is_some() {
            self.flush_metrics();
        }
        if let Some(vm) = self.running.take() {
            let elapsed = vm.started.elapsed();
            let exits = vm.exits.total();
            log::info!(
                "VM ended ({reason:?}) after {:.3} s; {exits} vCPU exits ({:.0}/s); {} PCI configuration accesses",
                elapsed.as_secs_f64(),
                exits as f64 / elapsed.as_secs_f64().max(1e-9),
                vm.devices.pci_config_exits()
            );
            drop(vm);
        }
        self.state = VmState::Stopped;
    }
}

fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Configured => "Not started",
        VmState::Running => "Running",
        VmState::Paused => "Paused",
        VmState::Stopped => "Stopped",
    }
}

fn resource_name(request: &VmmRequest) -> &'static str {
    match request {
        VmmRequest::PutMachine(_) => "machine-config",
        VmmRequest::PutBoot(_) => "boot-source",
        VmmRequest::PutPmem { .. } => "pmem",
        VmmRequest::PutNet { .. } => "network-interfaces",
        VmmRequest::PutFs { .. } => "fs",
        VmmRequest::PutConsole(_) => "console",
        VmmRequest::PutPort { .. } => "ports",
        VmmRequest::PutSerial(_) => "serial",
        VmmRequest::PutRng(_) => "rng",
        VmmRequest::PutLogger(_) => "logger",
        VmmRequest::PutMetrics(_) => "metrics",
        _ => "this resource",
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let ret = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
