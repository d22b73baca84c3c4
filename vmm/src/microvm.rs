//! The embedding API: configure a microVM with [`MicroVm::builder`], then
//! either [`MicroVm::start`] it on a VMM thread of its own and drive it
//! through a [`MicroVmHandle`], or [`MicroVm::run`] it on the calling thread
//! until the guest ends (what `ember-vmm` does).
//!
//! The builder fills the same [`VmConfig`] that the Firecracker JSON
//! (`--config-file`, `GET /vm/config`) describes; [`MicroVmBuilder::config`]
//! takes a whole one.
//!
//! # Threads
//!
//! A started microVM has a VMM thread (`ember_vmm` with [`MicroVm::start`],
//! the calling thread with [`MicroVm::run`]) running the event loop and
//! every device, one thread per vCPU (`ember_vcpu<N>`) and, with
//! [`MicroVmBuilder::api_socket`], an API thread (`ember_api`). Nothing on
//! the VMM thread waits on the guest.
//!
//! # Seccomp
//!
//! Off by default for embedders ([`SeccompLevel::None`]). With
//! [`SeccompLevel::Confined`] every ember thread installs its own filter
//! (see [`crate::seccomp`]) before it handles guest or API input. The
//! filters allow exactly the allocator syscalls of glibc's malloc as
//! configured by [`crate::seccomp::configure_allocator`], which must be
//! called first thing in `main`, **while the process has one thread**:
//! without it the first allocation that takes another path kills the process
//! by SIGSYS. A thread that cannot install its filter ends the process with
//! status 1 (it must not run unconfined after confinement was asked for).

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::SubscriberOps;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::actions::{ActionError, InstanceState, VmmAction, VmmData};
use crate::api::server::{ApiRequest, ApiThread, ServerError};
use crate::config::{
    BootSourceConfig, ConfigError, DriveConfig, NetworkInterfaceConfig, VmConfig, VsockDeviceConfig,
};
use crate::controller::{Controller, Waker};
use crate::seccomp::{SeccompError, ThreadKind};
use crate::{EventManager, ExitCode};

/// Errors building, starting or running a microVM.
#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    /// The configuration is invalid (checked by [`MicroVmBuilder::build`]).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The config file of [`MicroVmBuilder::config_file`] cannot be read.
    #[error("cannot read {path}: {err}")]
    ConfigFileRead {
        /// The file.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// The config file is not a valid Firecracker-shaped JSON config.
    #[error("invalid config file {path}: {msg}")]
    ConfigFileParse {
        /// The file.
        path: String,
        /// The JSON error.
        msg: String,
    },
    /// The config file's configuration was refused.
    #[error("{path}: {err}")]
    ConfigFileApply {
        /// The file.
        path: String,
        /// Why it was refused.
        err: ActionError,
    },
    /// Booting the guest failed (KVM, loading the kernel, devices).
    #[error("{0}")]
    Start(ActionError),
    /// A pause, resume or Ctrl-Alt-Del request failed.
    #[error("{0}")]
    Action(ActionError),
    /// The event loop could not be created.
    #[error("event manager: {0}")]
    EventManager(event_manager::Error),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(event_manager::Error),
    /// An eventfd or channel of the VMM could not be created.
    #[error("controller: {0}")]
    Controller(std::io::Error),
    /// SIGTERM handling could not be set up.
    #[error("SIGTERM handling: {0}")]
    Term(#[from] crate::term::TermError),
    /// The API socket could not be served.
    #[error("cannot serve the API on {sock}: {err}")]
    Api {
        /// The socket path.
        sock: String,
        /// Why.
        err: ServerError,
    },
    /// The VMM thread could not install its seccomp filters.
    #[error("vmm thread: {0}")]
    Seccomp(#[from] SeccompError),
    /// The VMM thread could not be spawned.
    #[error("cannot spawn the VMM thread: {0}")]
    Spawn(std::io::Error),
    /// The VMM thread has already ended (or panicked).
    #[error("the VMM thread has ended")]
    Gone,
}

impl MicroVmError {
    /// The `ember-vmm` exit status for this error: configuration and boot
    /// errors are [`ExitCode::BadConfiguration`], the rest
    /// [`ExitCode::GenericError`].
    pub fn exit_code(&self) -> ExitCode {
        match self {
            MicroVmError::Config(_)
            | MicroVmError::ConfigFileRead { .. }
            | MicroVmError::ConfigFileParse { .. }
            | MicroVmError::ConfigFileApply { .. }
            | MicroVmError::Start(_) => ExitCode::BadConfiguration,
            _ => ExitCode::GenericError,
        }
    }
}

pub use crate::console::{ConsoleCallback, Serial};
pub use crate::exit::ExitReason;

/// Whether ember's threads confine themselves with seccomp filters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SeccompLevel {
    /// No filters (the default for embedders).
    #[default]
    None,
    /// Every ember thread installs its filter before it handles input (what
    /// `ember-vmm` does). Call [`crate::seccomp::configure_allocator`] first
    /// thing in `main`, while the process has one thread.
    Confined,
    /// As [`SeccompLevel::Confined`], with the programs of a compiled filter
    /// file (`ember-vmm --seccomp-filter`) instead of the built-in ones.
    Custom(Arc<crate::seccomp::FilterMap>),
}

/// Configures a microVM; see [`MicroVm::builder`].
#[derive(Debug, Default)]
pub struct MicroVmBuilder {
    config: VmConfig,
    drives: Vec<DriveConfig>,
    nets: Vec<NetworkInterfaceConfig>,
    config_file: Option<PathBuf>,
    serial: Option<Serial>,
    seccomp: SeccompLevel,
    id: Option<String>,
    api_socket: Option<PathBuf>,
    sigterm: bool,
    stdin: bool,
    trigger: Option<ThreadKind>,
    mmds_size_limit: Option<usize>,
    api_max_payload: Option<usize>,
    mmds_content: Option<serde_json::Value>,
    metrics: Option<crate::config::metrics::MetricsConfig>,
    boot_timer: bool,
    start_times: StartTimes,
    restore: Option<crate::config::snapshot::SnapshotLoadParams>,
}

/// Firecracker's `--start-time-us`, `--start-time-cpu-us` and
/// `--parent-cpu-time-us`: when the process (or its jailer) started, by the
/// wall clock and in CPU time, in microseconds. With them the start-up time
/// is reported once the API is up (logged, and in the metrics'
/// `api_server` group).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartTimes {
    /// Wall clock (`CLOCK_MONOTONIC`, as Firecracker's jailer takes it), µs.
    pub start_us: Option<u64>,
    /// Process CPU time at start, µs.
    pub start_cpu_us: Option<u64>,
    /// CPU time the parent (the jailer) spent before exec, µs.
    pub parent_cpu_us: Option<u64>,
}

fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn path_string(p: impl Into<PathBuf>) -> String {
    p.into().to_string_lossy().into_owned()
}

impl MicroVmBuilder {
    fn boot_source(&mut self) -> &mut BootSourceConfig {
        self.config.boot_source.get_or_insert_with(Default::default)
    }

    /// The guest kernel: an ELF vmlinux (Linux 64-bit boot protocol, or PVH
    /// when the image has the note) or a bzImage.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.boot_source().kernel_image_path = path_string(path);
        self
    }

    /// An initrd loaded next to the kernel.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.boot_source().initrd_path = Some(path_string(path));
        self
    }

    /// The kernel command line (default
    /// [`crate::config::DEFAULT_KERNEL_CMDLINE`]). ember appends the
    /// virtio-mmio devices and the root drive.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.boot_source().boot_args = Some(cmdline.into());
        self
    }

    /// Number of vCPUs (1 to 32; default 1).
    pub fn vcpus(mut self, n: u8) -> Self {
        self.config.machine_config.vcpu_count = n;
        self
    }

    /// Guest memory in MiB (default 128).
    pub fn memory_mib(mut self, mib: usize) -> Self {
        self.config.machine_config.mem_size_mib = mib;
        self
    }

    /// Adds a virtio-blk drive (`PUT /drives/{id}`); the root drive becomes
    /// `/dev/vda`.
    pub fn drive(mut self, drive: DriveConfig) -> Self {
        self.drives.push(drive);
        self
    }

    /// Adds a virtio-net interface on an existing TAP
    /// (`PUT /network-interfaces/{id}`).
    pub fn net(mut self, iface: NetworkInterfaceConfig) -> Self {
        self.nets.push(iface);
        self
    }

    /// The virtio-vsock device (`PUT /vsock`), backed by a unix socket.
    pub fn vsock(mut self, vsock: VsockDeviceConfig) -> Self {
        self.config.vsock = Some(vsock);
        self
    }

    /// Replaces the whole configuration (as from Firecracker's JSON);
    /// builder calls after this one add to it.
    pub fn config(mut self, config: VmConfig) -> Self {
        self.config = config;
        self
    }

    /// Reads the configuration from this Firecracker-shaped JSON file on the
    /// VMM thread, once its seccomp filters are on and the API is up
    /// (`ember-vmm --config-file`). It replaces anything else configured
    /// and the guest boots at once.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// Where the guest console goes (default: the config's
    /// `serial.serial_out_path` if set, else stdout).
    pub fn serial(mut self, serial: Serial) -> Self {
        self.serial = Some(serial);
        self
    }

    /// Seccomp confinement of ember's threads (default
    /// [`SeccompLevel::None`]); see the module documentation.
    pub fn seccomp(mut self, level: SeccompLevel) -> Self {
        self.seccomp = level;
        self
    }

    /// The instance id reported by the API's `GET /` (default
    /// `anonymous-instance`).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Serves Firecracker's per-VM API on this unix socket from an API
    /// thread. With an API and no kernel configured, the guest boots when a
    /// client sends `InstanceStart`.
    pub fn api_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.api_socket = Some(path.into());
        self
    }

    /// Installs a process-wide SIGTERM handler that stops the VMM through its
    /// event loop ([`ExitReason::Terminated`]) and blocks SIGTERM on ember's
    /// other threads. For a process that runs one microVM (`ember-vmm`).
    pub fn handle_sigterm(mut self, on: bool) -> Self {
        self.sigterm = on;
        self
    }

    /// Forwards the process's stdin to the guest's COM1 (default off).
    pub fn stdin(mut self, on: bool) -> Self {
        self.stdin = on;
        self
    }

    /// Largest guest-visible MMDS store in bytes (`--mmds-size-limit`;
    /// default: the API payload limit, as in Firecracker).
    pub fn mmds_size_limit(mut self, bytes: usize) -> Self {
        self.mmds_size_limit = Some(bytes);
        self
    }

    /// Largest API request body in bytes (`--http-api-max-payload-size`,
    /// default 51200).
    pub fn api_max_payload(mut self, bytes: usize) -> Self {
        self.api_max_payload = Some(bytes);
        self
    }

    /// Initial MMDS contents (`--metadata`).
    pub fn mmds_content(mut self, v: serde_json::Value) -> Self {
        self.mmds_content = Some(v);
        self
    }

    /// Writes metrics lines to this file or FIFO from the start
    /// (`--metrics-path`).
    pub fn metrics(mut self, m: crate::config::metrics::MetricsConfig) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Attaches Firecracker's boot-time probe (`--boot-timer`).
    pub fn boot_timer(mut self, on: bool) -> Self {
        self.boot_timer = on;
        self
    }

    /// Start times to report the start-up time from.
    pub fn start_times(mut self, t: StartTimes) -> Self {
        self.start_times = t;
        self
    }

    /// Test-only: right after installing its filter, the thread of this
    /// kind calls `socket(AF_INET)`, outside every filter.
    #[doc(hidden)]
    pub fn seccomp_test_trigger(mut self, kind: Option<ThreadKind>) -> Self {
        self.trigger = kind;
        self
    }

    /// Starts from a snapshot instead of booting: the VMM loads it as
    /// `PUT /snapshot/load` with these parameters would (the state file,
    /// the memory backend, `resume_vm`, the overrides). Kernel, machine and
    /// device settings must be left unset: the snapshot brings its own.
    ///
    /// ```no_run
    /// use vmm::config::snapshot::{MemoryBackend, SnapshotLoadParams};
    /// # fn main() -> Result<(), vmm::MicroVmError> {
    /// let p: SnapshotLoadParams = serde_json::from_value(serde_json::json!({
    ///     "snapshot_path": "vm.state",
    ///     "mem_backend": {"backend_type": "File", "backend_path": "vm.mem"},
    ///     "resume_vm": true
    /// })).expect("valid parameters");
    /// let mut vm = vmm::MicroVm::builder().restore(p).build()?.start()?;
    /// vm.wait()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn restore(mut self, params: crate::config::snapshot::SnapshotLoadParams) -> Self {
        self.restore = Some(params);
        self
    }

    /// Checks the configuration. Without a config file, an API socket or a
    /// snapshot to restore, a kernel is required.
    pub fn build(mut self) -> Result<MicroVm, MicroVmError> {
        for d in std::mem::take(&mut self.drives) {
            self.config.upsert_drive(d)?;
        }
        for n in std::mem::take(&mut self.nets) {
            self.config.upsert_net(n)?;
        }
        if self.restore.is_some() {
            if self.config_file.is_some() || self.config.boot_source.is_some() {
                return Err(MicroVmError::Action(ActionError::LoadAfterConfig));
            }
        } else if self.config_file.is_none() {
            if self.api_socket.is_none() || self.config.boot_source.is_some() {
                self.config.validate()?;
            } else {
                self.config
                    .machine_config
                    .validate()
                    .map_err(ConfigError::from)?;
            }
        }
        Ok(MicroVm { b: self })
    }
}

/// A configured microVM, not yet started.
#[derive(Debug)]
pub struct MicroVm {
    b: MicroVmBuilder,
}

/// A request from a [`MicroVmHandle`] to the VMM thread.
type HandleRequest = (VmmAction, Sender<Result<VmmData, ActionError>>);

/// The VMM thread's end of a [`MicroVmHandle`].
struct Commands {
    rx: Receiver<HandleRequest>,
    stop: Arc<AtomicBool>,
}

/// Installs `kind`'s filters on the calling thread when confined, then fires
/// the test trigger if it names `kind`.
fn confine(
    kind: ThreadKind,
    level: &SeccompLevel,
    trigger: Option<ThreadKind>,
) -> Result<(), SeccompError> {
    match level {
        SeccompLevel::None => {}
        SeccompLevel::Confined => crate::seccomp::install(kind)?,
        SeccompLevel::Custom(map) => crate::seccomp::install_from(map, kind)?,
    }
    if trigger == Some(kind) {
        eprintln!(
            "ember-vmm: seccomp test trigger: the {} thread calls socket(AF_INET)",
            kind.name()
        );
        let ok = crate::seccomp::forbidden_syscall();
        eprintln!(
            "ember-vmm: seccomp test trigger: the {} thread survived (socket {})",
            kind.name(),
            if ok { "created" } else { "refused" }
        );
    }
    Ok(())
}

/// [`confine`] for threads that cannot report an error: ends the process.
fn confine_or_die(kind: ThreadKind, level: &SeccompLevel, trigger: Option<ThreadKind>) {
    if let Err(e) = confine(kind, level, trigger) {
        eprintln!("ember-vmm: {} thread: {e}", kind.name());
        std::process::exit(ExitCode::GenericError as i32);
    }
}

impl MicroVm {
    /// A builder with the default configuration (1 vCPU, 128 MiB, no
    /// devices, no seccomp, console on stdout).
    pub fn builder() -> MicroVmBuilder {
        MicroVmBuilder::default()
    }

    /// The configuration the guest will boot with (before a config file is
    /// read).
    pub fn config(&self) -> &VmConfig {
        &self.b.config
    }

    /// Boots the guest on a new VMM thread (`ember_vmm`) and returns once it
    /// runs, or with the error that kept it from booting.
    pub fn start(self) -> Result<MicroVmHandle, MicroVmError> {
        let (tx, rx) = channel();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(MicroVmError::Controller)?;
        let stop = Arc::new(AtomicBool::new(false));
        let commands = Commands {
            rx,
            stop: stop.clone(),
        };
        let thread_wake = wake.try_clone().map_err(MicroVmError::Controller)?;
        let (ready_tx, ready_rx) = channel();
        let thread = std::thread::Builder::new()
            .name("ember_vmm".into())
            .spawn(move || self.run_loop(Some((commands, thread_wake)), Some(ready_tx)))
            .map_err(MicroVmError::Spawn)?;
        match ready_rx.recv() {
            Ok(()) => Ok(MicroVmHandle {
                requests: tx,
                wake,
                stop,
                thread: Some(thread),
                finished: None,
            }),
            // The thread ended before the guest ran: its result says why.
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(MicroVmError::Gone),
            },
        }
    }

    /// Runs the VMM on the calling thread until the guest ends (or SIGTERM,
    /// with [`MicroVmBuilder::handle_sigterm`]). Guest output is flushed,
    /// the vCPUs stopped and the API and vsock sockets removed before it
    /// returns.
    pub fn run(self) -> Result<ExitReason, MicroVmError> {
        self.run_loop(None, None)
    }

    fn run_loop(
        self,
        commands: Option<(Commands, EventFd)>,
        ready: Option<Sender<()>>,
    ) -> Result<ExitReason, MicroVmError> {
        let b = self.b;
        let level = b.seccomp.clone();
        let vcpu_level = level.clone();
        let api_level = level.clone();
        let trigger = b.trigger;
        let sigterm = b.sigterm;
        let mut em = EventManager::new().map_err(MicroVmError::EventManager)?;
        // SIGTERM ends the VMM through this thread's event loop (see
        // crate::term); the other threads block it.
        let terminated = if sigterm {
            Some(crate::term::install(&mut em)?)
        } else {
            None
        };
        let commands = match commands {
            Some((c, wake)) => {
                em.add_subscriber(Arc::new(Mutex::new(Waker::new(
                    wake,
                    Arc::new(AtomicBool::new(false)),
                ))));
                Some(c)
            }
            None => None,
        };
        // Each vCPU thread confines itself before it first enters the guest.
        let vcpu_hook: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if sigterm {
                crate::term::block_on_this_thread();
            }
            confine_or_die(ThreadKind::Vcpu, &vcpu_level, trigger)
        });
        let mut controller = Controller::new(
            b.id.clone().unwrap_or_else(|| "anonymous-instance".into()),
            b.serial,
            b.stdin,
            &mut em,
            Some(vcpu_hook),
            b.mmds_size_limit
                .unwrap_or(crate::mmds::DEFAULT_MMDS_SIZE_LIMIT),
        )
        .map_err(MicroVmError::Controller)?;
        controller.boot_timer = b.boot_timer;
        if let Some(m) = &b.metrics {
            controller
                .metrics()
                .lock()
                .expect("metrics poisoned")
                .configure(m)
                .map_err(|e| MicroVmError::Start(e.into()))?;
        }
        if let Some(v) = b.mmds_content.clone() {
            controller
                .handle(VmmAction::PutMmds(v), &mut em)
                .map_err(MicroVmError::Start)?;
        }

        // The API comes up before the configuration is applied, so a client
        // can watch the instance from its first moment.
        let api = match &b.api_socket {
            None => None,
            Some(sock) => Some(
                ApiThread::spawn(
                    &sock.to_string_lossy(),
                    &mut em,
                    Some(Box::new(move || {
                        if sigterm {
                            crate::term::block_on_this_thread();
                        }
                        confine_or_die(ThreadKind::Api, &api_level, trigger)
                    })),
                    b.api_max_payload
                        .unwrap_or(crate::api::server::DEFAULT_MAX_PAYLOAD),
                )
                .map_err(|err| MicroVmError::Api {
                    sock: sock.display().to_string(),
                    err,
                })?,
            ),
        };
        if api.is_some() {
            report_start_time(&controller, b.start_times);
        }
        let result = Self::serve(
            b.config,
            b.config_file,
            b.restore,
            &mut controller,
            &mut em,
            api.as_ref(),
            commands,
            terminated,
            level,
            trigger,
            ready,
        );
        controller.shutdown();
        if let Some(api) = api {
            api.cleanup();
        }
        result
    }

    /// Confines the VMM thread, applies the configuration, boots if it has a
    /// kernel, then turns the event loop until the guest ends.
    #[allow(clippy::too_many_arguments)]
    fn serve(
        config: VmConfig,
        config_file: Option<PathBuf>,
        restore: Option<crate::config::snapshot::SnapshotLoadParams>,
        controller: &mut Controller,
        em: &mut EventManager,
        api: Option<&ApiThread>,
        commands: Option<Commands>,
        terminated: Option<Arc<AtomicBool>>,
        level: SeccompLevel,
        trigger: Option<ThreadKind>,
        ready: Option<Sender<()>>,
    ) -> Result<ExitReason, MicroVmError> {
        // The VMM thread confines itself before it reads the config file or
        // handles any API request or guest event. The filter covers
        // InstanceStart (KVM setup, device backends, spawning the vCPU
        // threads, which inherit it and stack their own).
        confine(ThreadKind::Vmm, &level, trigger)?;
        match config_file {
            Some(path) => {
                let p = path.display().to_string();
                let text =
                    std::fs::read_to_string(&path).map_err(|err| MicroVmError::ConfigFileRead {
                        path: p.clone(),
                        err,
                    })?;
                let cfg: VmConfig =
                    serde_json::from_str(&text).map_err(|e| MicroVmError::ConfigFileParse {
                        path: p.clone(),
                        msg: e.to_string(),
                    })?;
                controller
                    .set_config(cfg)
                    .map_err(|err| MicroVmError::ConfigFileApply { path: p, err })?;
                controller
                    .handle(VmmAction::InstanceStart, em)
                    .map_err(MicroVmError::Start)?;
            }
            None => {
                let boot = config.boot_source.is_some();
                controller.set_config(config).map_err(MicroVmError::Start)?;
                if let Some(p) = restore {
                    controller
                        .handle(VmmAction::LoadSnapshot(p), em)
                        .map_err(MicroVmError::Start)?;
                } else if boot {
                    controller
                        .handle(VmmAction::InstanceStart, em)
                        .map_err(MicroVmError::Start)?;
                }
            }
        }
        if let Some(r) = ready {
            let _ = r.send(());
        }

        loop {
            if let Err(e) = em.run() {
                if e.to_string().contains("Interrupted") {
                    continue;
                }
                return Err(MicroVmError::EventLoop(e));
            }
            if let Some(api) = api {
                while let Ok(ApiRequest { action, conn }) = api.requests.try_recv() {
                    let key = crate::metrics::api_counter(&action);
                    controller
                        .metrics()
                        .lock()
                        .expect("metrics poisoned")
                        .count_request(key);
                    let result = controller.handle(action, em);
                    if result.is_err() {
                        controller
                            .metrics()
                            .lock()
                            .expect("metrics poisoned")
                            .count_failure(key);
                    }
                    let (status, body) = crate::api::reply(result);
                    api.answer(conn, status, body);
                }
            }
            if let Some(c) = &commands {
                while let Ok((action, reply)) = c.rx.try_recv() {
                    let _ = reply.send(controller.handle(action, em));
                }
                if c.stop.load(Ordering::SeqCst) {
                    return Ok(ExitReason::Stopped);
                }
            }
            if let Some(done) = controller.check_exit() {
                return Ok(done);
            }
            if let Some(t) = &terminated {
                if t.load(Ordering::SeqCst) {
                    return Ok(ExitReason::Terminated);
                }
            }
        }
    }
}

/// Logs and records the start-up time, as Firecracker's
/// `ProcessTimeReporter` does once its API is up.
fn report_start_time(controller: &Controller, t: StartTimes) {
    let mut m = controller.metrics().lock().expect("metrics poisoned");
    if let Some(start) = t.start_us {
        let us = monotonic_us().saturating_sub(start);
        m.set_gauge("api_server", "process_startup_time_us", us);
        log::info!("Process start-up time: {us} us");
    }
    if let Some(start_cpu) = t.start_cpu_us {
        let cpu = crate::boot_timer::process_cpu_us().saturating_sub(start_cpu)
            + t.parent_cpu_us.unwrap_or(0);
        m.set_gauge("api_server", "process_startup_time_cpu_us", cpu);
        log::info!("Process start-up CPU time: {cpu} us");
    }
}

/// A running microVM started by [`MicroVm::start`]. Dropping it stops the
/// guest and waits for the VMM thread.
pub struct MicroVmHandle {
    requests: Sender<HandleRequest>,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<ExitReason, MicroVmError>>>,
    finished: Option<ExitReason>,
}

impl fmt::Debug for MicroVmHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MicroVmHandle")
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl MicroVmHandle {
    fn request(&self, action: VmmAction) -> Result<VmmData, MicroVmError> {
        let (tx, rx) = channel();
        self.requests
            .send((action, tx))
            .map_err(|_| MicroVmError::Gone)?;
        self.wake.write(1).map_err(MicroVmError::Controller)?;
        rx.recv()
            .map_err(|_| MicroVmError::Gone)?
            .map_err(MicroVmError::Action)
    }

    /// Stops every vCPU (devices keep running); returns once all have
    /// stopped. Pausing a paused microVM does nothing.
    pub fn pause(&self) -> Result<(), MicroVmError> {
        self.request(VmmAction::Pause).map(|_| ())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), MicroVmError> {
        self.request(VmmAction::Resume).map(|_| ())
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> Result<bool, MicroVmError> {
        match self.request(VmmAction::GetInstanceInfo)? {
            VmmData::InstanceInfo(i) => Ok(i.state == InstanceState::Paused),
            _ => Ok(false),
        }
    }

    /// Writes a snapshot of the paused microVM, as `PUT /snapshot/create`
    /// does: its state file and (`Full`) all of guest memory. Load it with
    /// [`MicroVmBuilder::restore`] or `PUT /snapshot/load` in another VMM.
    pub fn create_snapshot(
        &self,
        params: crate::config::snapshot::SnapshotCreateParams,
    ) -> Result<(), MicroVmError> {
        self.request(VmmAction::CreateSnapshot(params)).map(|_| ())
    }

    /// Sends Ctrl-Alt-Del through the i8042 keyboard: a guest that acts on
    /// it resets ([`ExitReason::I8042Reset`]).
    pub fn send_ctrl_alt_del(&self) -> Result<(), MicroVmError> {
        self.request(VmmAction::SendCtrlAltDel).map(|_| ())
    }

    /// Asks the VMM thread to stop the guest; [`MicroVmHandle::wait`] then
    /// returns [`ExitReason::Stopped`] (unless the guest ended first).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// The exit reason if the microVM has ended, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitReason>, MicroVmError> {
        if let Some(r) = &self.finished {
            return Ok(Some(r.clone()));
        }
        match &self.thread {
            Some(t) if t.is_finished() => self.join().map(Some),
            Some(_) => Ok(None),
            None => Err(MicroVmError::Gone),
        }
    }

    /// Waits until the microVM ends and returns why.
    pub fn wait(&mut self) -> Result<ExitReason, MicroVmError> {
        if let Some(r) = &self.finished {
            return Ok(r.clone());
        }
        self.join()
    }

    fn join(&mut self) -> Result<ExitReason, MicroVmError> {
        let t = self.thread.take().ok_or(MicroVmError::Gone)?;
        let r = t.join().map_err(|_| MicroVmError::Gone)??;
        self.finished = Some(r.clone());
        Ok(r)
    }
}

impl Drop for MicroVmHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
            let _ = self.join();
        }
    }
}
