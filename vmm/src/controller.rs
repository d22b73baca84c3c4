//! The VMM thread's state machine: configuration before boot, the running
//! microVM after, and how the process ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::serial::SerialOut;
use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::actions::{ActionError, Allowed, InstanceInfo, InstanceState, VmmAction, VmmData};
use crate::builder::{
    build_and_boot, build_from_snapshot, save_virtio, ExitSignals, RestoreOptions, RunningVm,
};
use crate::config::snapshot::{
    MemorySource, SnapshotConfigError, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
};
use crate::config::{check_path_id, refusals, ConfigError};
use crate::console::Serial;
use crate::exit::ExitReason;
use crate::metrics::{Metrics, PeriodicMetrics};
use crate::mmds::MmdsStore;
use crate::snapshot::dirty::{self, DirtyError};
use crate::snapshot::uffd::{self, UffdBackend};
use crate::snapshot::{format, memory, MicroVmState, SnapshotError};
use crate::stdin::SerialStdin;
use crate::vstate::vcpu::{VcpuCommand, VcpuEvent, VcpuResponse};
use crate::EventManager;

/// An EventFd watched by the event loop that only records that it fired.
pub(crate) struct Waker {
    evt: EventFd,
    fired: Arc<AtomicBool>,
}

impl Waker {
    /// Watches `evt`; `fired` is set when it is written.
    pub fn new(evt: EventFd, fired: Arc<AtomicBool>) -> Self {
        Waker { evt, fired }
    }
}

impl MutEventSubscriber for Waker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.fired.store(true, Ordering::SeqCst);
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            eprintln!("ember-vmm: cannot watch an eventfd: {e}");
        }
    }
}

/// How long a vCPU gets to acknowledge pause/resume.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Owns the VM configuration and, once booted, the running microVM.
pub(crate) struct Controller {
    id: String,
    config: crate::config::VmConfig,
    /// Where guest output goes; `None`: the config's serial path or stdout.
    serial: Option<Serial>,
    /// Forward the process's stdin to COM1.
    stdin: bool,
    running: Option<RunningVm>,
    vcpu_events: Receiver<VcpuEvent>,
    signals: ExitSignals,
    reset_fired: Arc<AtomicBool>,
    vcpu_exit_fired: Arc<AtomicBool>,
    vcpu_start_hook: Option<Arc<dyn Fn() + Send + Sync>>,
    metrics: Arc<Mutex<Metrics>>,
    mmds: MmdsStore,
    /// What the guest's MMDS requests are answered from (the store's
    /// contents, the version, the session tokens).
    mmds_service: devices::mmds::SharedMmds,
    /// `--boot-timer`.
    pub boot_timer: bool,
    /// The page-fault handler's connection and the userfaultfd of guest
    /// memory loaded with the Uffd backend, held for the VM's life.
    uffd: Option<UffdBackend>,
}

impl Controller {
    /// A controller with default configuration. Registers its wakers with `em`.
    pub fn new(
        id: String,
        serial: Option<Serial>,
        stdin: bool,
        em: &mut EventManager,
        vcpu_start_hook: Option<Arc<dyn Fn() + Send + Sync>>,
        mmds_size_limit: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel();
        let signals = ExitSignals {
            vcpu_events: tx,
            vcpu_exit_evt: EventFd::new(EFD_NONBLOCK)?,
            reset_evt: EventFd::new(EFD_NONBLOCK)?,
        };
        let reset_fired = Arc::new(AtomicBool::new(false));
        let vcpu_exit_fired = Arc::new(AtomicBool::new(false));
        em.add_subscriber(Arc::new(Mutex::new(Waker::new(
            signals.reset_evt.try_clone()?,
            reset_fired.clone(),
        ))));
        em.add_subscriber(Arc::new(Mutex::new(Waker::new(
            signals.vcpu_exit_evt.try_clone()?,
            vcpu_exit_fired.clone(),
        ))));
        Ok(Controller {
            metrics: Arc::new(Mutex::new(Metrics::new(&id))),
            mmds: MmdsStore::new(mmds_size_limit),
            mmds_service: Default::default(),
            boot_timer: false,
            uffd: None,
            id,
            config: Default::default(),
            serial,
            stdin,
            running: None,
            vcpu_events: rx,
            signals,
            reset_fired,
            vcpu_exit_fired,
            vcpu_start_hook,
        })
    }

    fn state(&self) -> InstanceState {
        match &self.running {
            None => InstanceState::NotStarted,
            Some(r) if r.paused => InstanceState::Paused,
            Some(_) => InstanceState::Running,
        }
    }

    /// Firecracker's phase rule for `action` ([`VmmAction::allowed`]).
    fn check_phase(&self, action: &VmmAction) -> Result<(), ActionError> {
        match (action.allowed(), self.running.is_some()) {
            (Allowed::PreBoot, true) => Err(ActionError::NotAllowedAfterBoot),
            (Allowed::PostBoot, false) => Err(ActionError::NotAllowedBeforeBoot),
            (Allowed::Always, _) | (Allowed::PreBoot, false) | (Allowed::PostBoot, true) => Ok(()),
        }
    }

    /// The metrics, shared with the periodic writer.
    pub fn metrics(&self) -> &Arc<Mutex<Metrics>> {
        &self.metrics
    }

    fn running(&mut self) -> Result<&mut RunningVm, ActionError> {
        self.running
            .as_mut()
            .ok_or(ActionError::NotAllowedBeforeBoot)
    }

    /// Hands the store's contents to the service the guest reaches.
    fn publish_mmds(&self) {
        self.mmds_service
            .lock()
            .expect("mmds service poisoned")
            .set_data(self.mmds.get());
    }

    /// The running balloon device.
    fn balloon(&mut self) -> Result<Arc<Mutex<devices::virtio::balloon::Balloon>>, ActionError> {
        self.running()?
            .balloon
            .clone()
            .ok_or(ActionError::NoBalloon)
    }

    fn serial_out(&mut self) -> Result<SerialOut, ActionError> {
        let serial = match self.serial.take() {
            Some(s) => s,
            None => match self
                .config
                .serial
                .as_ref()
                .and_then(|s| s.serial_out_path.clone())
            {
                Some(p) => Serial::File(p.into()),
                None => Serial::Stdout,
            },
        };
        let out = serial.into_writer()?;
        Ok(
            match self.config.serial.as_ref().and_then(|s| s.rate_limiter) {
                Some(cfg) => {
                    let dropped = self
                        .metrics
                        .lock()
                        .expect("metrics poisoned")
                        .uart_dropped();
                    crate::console::RateLimitedOut::wrap(out, &cfg, dropped)
                }
                None => out,
            },
        )
    }

    /// Replaces the whole configuration (from `--config-file`).
    pub fn set_config(&mut self, cfg: crate::config::VmConfig) -> Result<(), ActionError> {
        if self.running.is_some() {
            return Err(ActionError::NotAllowedAfterBoot);
        }
        if let Some(b) = &cfg.boot_source {
            b.validate()?;
        }
        cfg.machine_config.validate().map_err(ConfigError::from)?;
        cfg.validate_extras()?;
        if let Some(l) = &cfg.logger {
            crate::logger::configure(l)?;
        }
        if let Some(m) = &cfg.metrics {
            self.metrics
                .lock()
                .expect("metrics poisoned")
                .configure(m)?;
        }
        self.config = cfg;
        Ok(())
    }

    /// Carries out one action.
    pub fn handle(
        &mut self,
        action: VmmAction,
        em: &mut EventManager,
    ) -> Result<VmmData, ActionError> {
        self.check_phase(&action)?;
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
                id: self.id.clone(),
                state: self.state(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                app_name: "ember".into(),
            })),
            VmmAction::GetVersion => Ok(VmmData::Version(env!("CARGO_PKG_VERSION").into())),
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(self.config.clone()))),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(self.config.machine_config.clone()))
            }
            VmmAction::PutBootSource(b) => {
                b.validate()?;
                self.config.boot_source = Some(b);
                Ok(VmmData::Empty)
            }
            VmmAction::PutMachineConfig(m) => {
                m.validate().map_err(ConfigError::from)?;
                self.config.machine_config = m;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMachineConfig(u) => {
                self.config.machine_config = u
                    .apply(&self.config.machine_config)
                    .map_err(ConfigError::from)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutDrive(id, d) => {
                check_path_id(&id, &d.drive_id)?;
                self.config.upsert_drive(d)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchDrive(id, u) => {
                check_path_id(&id, &u.drive_id)?;
                let vm = self
                    .running
                    .as_ref()
                    .ok_or(ActionError::NotAllowedBeforeBoot)?;
                let blk = vm.blocks.get(&id).cloned().ok_or(ConfigError::NotFound {
                    what: "drive",
                    id: id.clone(),
                })?;
                let slot = self
                    .config
                    .drives
                    .iter_mut()
                    .find(|d| d.drive_id == id)
                    .ok_or(ConfigError::NotFound {
                        what: "drive",
                        id: id.clone(),
                    })?;
                let mut updated = slot.clone();
                if let Some(p) = &u.path_on_host {
                    updated.path_on_host = p.clone();
                }
                if let Some(r) = u.rate_limiter {
                    updated.rate_limiter = Some(r);
                }
                updated.validate()?;
                let mut b = blk.lock().expect("block poisoned");
                if let Some(p) = &u.path_on_host {
                    b.update_path(std::path::Path::new(p)).map_err(|e| {
                        ActionError::DriveUpdate {
                            id: id.clone(),
                            msg: e.to_string(),
                        }
                    })?;
                }
                if let Some(r) = &u.rate_limiter {
                    b.update_rate_limiter(r);
                }
                *slot = updated;
                Ok(VmmData::Empty)
            }
            VmmAction::PutNetworkInterface(id, n) => {
                check_path_id(&id, &n.iface_id)?;
                self.config.upsert_net(n)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchNetworkInterface(id, u) => {
                check_path_id(&id, &u.iface_id)?;
                let vm = self
                    .running
                    .as_ref()
                    .ok_or(ActionError::NotAllowedBeforeBoot)?;
                let net = vm.nets.get(&id).cloned().ok_or(ConfigError::NotFound {
                    what: "network interface",
                    id: id.clone(),
                })?;
                net.lock()
                    .expect("net poisoned")
                    .update_rate_limiters(u.rx_rate_limiter.as_ref(), u.tx_rate_limiter.as_ref());
                if let Some(slot) = self
                    .config
                    .network_interfaces
                    .iter_mut()
                    .find(|n| n.iface_id == id)
                {
                    if u.rx_rate_limiter.is_some() {
                        slot.rx_rate_limiter = u.rx_rate_limiter;
                    }
                    if u.tx_rate_limiter.is_some() {
                        slot.tx_rate_limiter = u.tx_rate_limiter;
                    }
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PutVsock(v) => {
                self.config.set_vsock(v)?;
                Ok(VmmData::Empty)
            }
            VmmAction::ConfigureLogger(l) => {
                crate::logger::configure(&l)?;
                self.config.logger = Some(l);
                Ok(VmmData::Empty)
            }
            VmmAction::ConfigureMetrics(m) => {
                self.metrics
                    .lock()
                    .expect("metrics poisoned")
                    .configure(&m)?;
                self.config.metrics = Some(m);
                Ok(VmmData::Empty)
            }
            VmmAction::ConfigureSerial(s) => {
                s.validate()?;
                self.config.serial = Some(s);
                Ok(VmmData::Empty)
            }
            VmmAction::PutMmds(v) => {
                self.mmds.put(v)?;
                self.publish_mmds();
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMmds(v) => {
                self.mmds.patch(&v)?;
                self.publish_mmds();
                Ok(VmmData::Empty)
            }
            VmmAction::GetMmds => Ok(VmmData::Mmds(self.mmds.get())),
            VmmAction::ConfigureMmds(m) => {
                let nets = &self.config.network_interfaces;
                m.validate(|id| nets.iter().any(|n| n.iface_id == id))
                    .map_err(ConfigError::from)?;
                self.config.mmds_config = Some(m);
                Ok(VmmData::Empty)
            }
            VmmAction::PutCpuConfig(c) => {
                c.template().map_err(ConfigError::from)?;
                self.config.cpu_config = Some(c);
                Ok(VmmData::Empty)
            }
            VmmAction::PutEntropy(e) => {
                self.config.entropy = Some(e);
                Ok(VmmData::Empty)
            }
            VmmAction::PutBalloon(b) => {
                b.validate(self.config.machine_config.mem_size_mib)
                    .map_err(ConfigError::from)?;
                self.config.balloon = Some(b);
                Ok(VmmData::Empty)
            }
            VmmAction::GetBalloon => self
                .config
                .balloon
                .clone()
                .map(VmmData::Balloon)
                .ok_or(ActionError::NoBalloon),
            VmmAction::PatchBalloon(u) => {
                let mem = self.config.machine_config.mem_size_mib as u64;
                self.balloon()?
                    .lock()
                    .expect("balloon poisoned")
                    .update_target(u.amount_mib, mem)?;
                if let Some(b) = &mut self.config.balloon {
                    b.amount_mib = u.amount_mib;
                }
                Ok(VmmData::Empty)
            }
            VmmAction::GetBalloonStats => {
                let stats = self.balloon()?.lock().expect("balloon poisoned").stats()?;
                Ok(VmmData::BalloonStats(stats))
            }
            VmmAction::PatchBalloonStats(u) => {
                self.balloon()?
                    .lock()
                    .expect("balloon poisoned")
                    .update_stats_interval(u.stats_polling_interval_s)?;
                if let Some(b) = &mut self.config.balloon {
                    b.stats_polling_interval_s = u.stats_polling_interval_s;
                }
                Ok(VmmData::Empty)
            }
            VmmAction::StartBalloonHinting(s) => {
                self.balloon()?
                    .lock()
                    .expect("balloon poisoned")
                    .start_hinting(s.acknowledge_on_stop)?;
                Ok(VmmData::Empty)
            }
            VmmAction::GetBalloonHinting => {
                let st = self
                    .balloon()?
                    .lock()
                    .expect("balloon poisoned")
                    .hinting_status()?;
                Ok(VmmData::BalloonHinting(st))
            }
            VmmAction::StopBalloonHinting => {
                self.balloon()?
                    .lock()
                    .expect("balloon poisoned")
                    .stop_hinting()?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutPmem(..) | VmmAction::PatchPmem(..) => {
                Err(ActionError::NotImplemented(refusals::PMEM))
            }
            VmmAction::PutMemoryHotplug(_)
            | VmmAction::PatchMemoryHotplug(_)
            | VmmAction::GetMemoryHotplug => Err(ActionError::NotImplemented(refusals::HOTPLUG)),
            VmmAction::CreateSnapshot(p) => self.create_snapshot(&p),
            VmmAction::LoadSnapshot(p) => self.load_snapshot(&p, em),
            VmmAction::InstanceStart => {
                self.config.validate()?;
                let out = self.serial_out()?;
                if let Some(m) = &self.config.mmds_config {
                    let version = match m.version {
                        crate::config::mmds::MmdsVersion::V1 => devices::mmds::MmdsVersion::V1,
                        crate::config::mmds::MmdsVersion::V2 => devices::mmds::MmdsVersion::V2,
                    };
                    let mut s = self.mmds_service.lock().expect("mmds service poisoned");
                    s.configure(version, m.imds_compat);
                    s.set_data(self.mmds.get());
                }
                let vm = build_and_boot(
                    &self.config,
                    out,
                    &self.signals,
                    self.vcpu_start_hook.clone(),
                    &self.mmds_service,
                    self.boot_timer,
                    em,
                )?;
                self.started(vm, em);
                Ok(VmmData::Empty)
            }
            VmmAction::SendCtrlAltDel => {
                let vm = self.running()?;
                vm.i8042
                    .lock()
                    .expect("i8042 poisoned")
                    .trigger_ctrl_alt_del()
                    .map_err(ActionError::CtrlAltDel)?;
                Ok(VmmData::Empty)
            }
            VmmAction::FlushMetrics => {
                self.metrics.lock().expect("metrics poisoned").write()?;
                Ok(VmmData::Empty)
            }
            VmmAction::Pause => {
                let vm = self.running()?;
                if !vm.paused {
                    for v in &vm.vcpus {
                        v.send(VcpuCommand::Pause)?;
                    }
                    for v in &vm.vcpus {
                        v.expect(VcpuResponse::Paused, VCPU_ACK_TIMEOUT)?;
                    }
                    vm.paused = true;
                }
                Ok(VmmData::Empty)
            }
            VmmAction::Resume => {
                let vm = self.running()?;
                if vm.paused {
                    for v in &vm.vcpus {
                        v.send(VcpuCommand::Resume)?;
                    }
                    for v in &vm.vcpus {
                        v.expect(VcpuResponse::Resumed, VCPU_ACK_TIMEOUT)?;
                    }
                    vm.paused = false;
                }
                Ok(VmmData::Empty)
            }
        }
    }

    /// Takes over a started (booted or restored) microVM: stdin, metrics.
    fn started(&mut self, vm: RunningVm, em: &mut EventManager) {
        if self.stdin {
            em.add_subscriber(Arc::new(Mutex::new(SerialStdin::new(vm.serial.clone()))));
        }
        self.running = Some(vm);
        let configured = {
            let mut m = self.metrics.lock().expect("metrics poisoned");
            if let Some(vm) = &self.running {
                for (id, b) in &vm.blocks {
                    m.add_block(id, b.lock().expect("block poisoned").metrics());
                }
                for (id, n) in &vm.nets {
                    m.add_net(id, n.lock().expect("net poisoned").metrics());
                }
                if let Some(r) = &vm.rng {
                    m.set_entropy(r.clone());
                }
            }
            if let Err(e) = m.write() {
                log::warn!("metrics: {e}");
            }
            m.configured()
        };
        if configured {
            match PeriodicMetrics::new(self.metrics.clone()) {
                Ok(p) => {
                    em.add_subscriber(Arc::new(Mutex::new(p)));
                }
                Err(e) => log::warn!("metrics: {e}"),
            }
        }
    }

    /// Whether anything that shapes the machine was configured (Firecracker
    /// refuses a load then: the snapshot brings its own machine).
    fn machine_configured(&self) -> bool {
        let c = &self.config;
        c.boot_source.is_some()
            || c.machine_config != Default::default()
            || !c.drives.is_empty()
            || !c.network_interfaces.is_empty()
            || c.vsock.is_some()
            || c.entropy.is_some()
            || c.balloon.is_some()
            || c.cpu_config.is_some()
            || c.mmds_config.is_some()
    }

    /// `PUT /snapshot/create`: a paused microVM's state file and memory file.
    fn create_snapshot(&mut self, p: &SnapshotCreateParams) -> Result<VmmData, ActionError> {
        let t0 = Instant::now();
        if let Some(v) = &p.version {
            let ours = format::version_string(format::SNAPSHOT_VERSION);
            if v.trim_start_matches('v') != ours.trim_start_matches('v') {
                return Err(SnapshotConfigError::Version(v.clone(), ours).into());
            }
        }
        if p.snapshot_path.is_empty() {
            return Err(SnapshotConfigError::EmptyPath("snapshot_path").into());
        }
        if p.mem_file_path.is_empty() {
            return Err(SnapshotConfigError::EmptyPath("mem_file_path").into());
        }
        if p.mem_file_path == p.snapshot_path {
            return Err(SnapshotConfigError::SamePath.into());
        }
        let config = self.config.clone();
        let boot_timer = self.boot_timer;
        let vm = self.running()?;
        if !vm.paused {
            return Err(ActionError::SnapshotNotPaused);
        }
        let diff = p.snapshot_type == Some(SnapshotType::Diff);
        let tracking = config.machine_config.track_dirty_pages;
        if diff && !tracking {
            return Err(SnapshotError::from(DirtyError::NotTracking).into());
        }
        let mut vcpus = Vec::with_capacity(vm.vcpus.len());
        for v in &vm.vcpus {
            vcpus.push(v.save_state(VCPU_ACK_TIMEOUT)?);
        }
        let vm_state = vm.vm.save_state()?;
        // Devices once the vCPUs are saved (a last KVM_RUN may complete an
        // access) and before memory: an `Async` drive completes its
        // requests in flight, which writes guest memory.
        let devices = save_virtio(vm);
        let serial = vm.serial.lock().expect("serial poisoned").save();
        let i8042 = vm.i8042.lock().expect("i8042 poisoned").save();
        let t_state = t0.elapsed();
        // A Diff holds the pages dirtied since the last snapshot; every
        // snapshot starts a new interval (the dirty state is cleared).
        let (memory, written, taken) = if diff {
            let (layout, written, taken) = dirty::save_diff(vm.vm.fd(), &vm.mem, &p.mem_file_path)?;
            (layout, written, Some(taken))
        } else {
            let (layout, written) = memory::save_full(&vm.mem, &p.mem_file_path)?;
            (layout, written, None)
        };
        let t_mem = t0.elapsed();
        let state = MicroVmState {
            config,
            boot_timer,
            memory,
            vm: vm_state,
            vcpus,
            serial,
            i8042,
            devices,
        };
        let len = match format::write_state(&p.snapshot_path, &state) {
            Ok(len) => len,
            Err(e) => {
                // The next Diff must still hold this one's pages.
                if let Some(t) = &taken {
                    t.give_back(&vm.mem);
                }
                return Err(e.into());
            }
        };
        if !diff {
            // Only a complete Full snapshot becomes the next Diff's base.
            dirty::reset_dirty(vm.vm.fd(), &vm.mem, tracking).map_err(SnapshotError::from)?;
        }
        self.metrics.lock().expect("metrics poisoned").set_gauge(
            "latencies_us",
            if diff {
                "diff_create_snapshot"
            } else {
                "full_create_snapshot"
            },
            t0.elapsed().as_micros() as u64,
        );
        log::info!(
            "{} snapshot created in {} us (vCPU and VM state {} us, memory {} us: {} KiB written of {} MiB; state file {len} bytes)",
            if diff { "Diff" } else { "Full" },
            t0.elapsed().as_micros(),
            t_state.as_micros(),
            (t_mem - t_state).as_micros(),
            written >> 10,
            state.config.machine_config.mem_size_mib
        );
        Ok(VmmData::Empty)
    }

    /// `PUT /snapshot/load`: rebuilds the microVM from a state file and its
    /// memory, on a VMM that has not booted and has no machine configured.
    fn load_snapshot(
        &mut self,
        p: &SnapshotLoadParams,
        em: &mut EventManager,
    ) -> Result<VmmData, ActionError> {
        let t0 = Instant::now();
        if self.machine_configured() {
            return Err(ActionError::LoadAfterConfig);
        }
        let src = p.memory_source()?;
        let mut state = format::read_state(&p.snapshot_path)?;
        if state.config.machine_config.huge_pages == crate::config::HugePages::Hugetlbfs2M
            && matches!(src, MemorySource::File(_))
        {
            return Err(SnapshotError::Unsupported(
                "a snapshot of a hugetlbfs-backed microVM cannot be loaded from a File backend (MAP_PRIVATE file pages are 4 KiB)".into(),
            )
            .into());
        }
        p.apply_overrides(&mut state.config)?;
        let (mem, uffd) = match &src {
            MemorySource::File(mem_path) => {
                let mem_file = std::fs::File::open(mem_path).map_err(|err| SnapshotError::Io {
                    path: mem_path.clone(),
                    err,
                })?;
                (memory::load_file(&mem_file, mem_path, &state.memory)?, None)
            }
            // Anonymous 4 KiB pages, filled by the handler on first touch
            // (a hugetlbfs snapshot loads too, into 4 KiB pages).
            MemorySource::Uffd(sock) => {
                let regions: Vec<(u64, u64, u64)> = state
                    .memory
                    .iter()
                    .map(|r| (r.base_address, r.size, r.offset))
                    .collect();
                let (mem, backend) =
                    uffd::guest_memory_from_uffd(&regions, std::path::Path::new(sock))
                        .map_err(SnapshotError::from)?;
                (mem, Some(backend))
            }
        };
        let t_read = t0.elapsed();
        // The snapshot's machine, with this VMM's own logger, metrics and
        // serial output.
        let mut cfg = state.config.clone();
        cfg.logger = self.config.logger.clone();
        cfg.metrics = self.config.metrics.clone();
        cfg.serial = self.config.serial.clone();
        cfg.machine_config.track_dirty_pages = p.track_dirty_pages || p.enable_diff_snapshots;
        state.config = cfg.clone();
        let out = self.serial_out()?;
        let opts = RestoreOptions {
            track_dirty_pages: cfg.machine_config.track_dirty_pages,
            clock_realtime: p.clock_realtime,
            resume: p.resume_vm,
        };
        let vm = build_from_snapshot(
            &state,
            mem,
            &opts,
            out,
            &self.signals,
            self.vcpu_start_hook.clone(),
            &self.mmds_service,
            em,
        )?;
        let t_build = t0.elapsed();
        self.metrics.lock().expect("metrics poisoned").set_gauge(
            "latencies_us",
            "load_snapshot",
            t_build.as_micros() as u64,
        );
        self.boot_timer = state.boot_timer;
        self.config = cfg;
        self.uffd = uffd;
        self.started(vm, em);
        log::info!(
            "snapshot loaded in {} us (state file and memory mapping {} us, KVM VM, devices and vCPUs {} us), {}",
            t0.elapsed().as_micros(),
            t_read.as_micros(),
            (t_build - t_read).as_micros(),
            if p.resume_vm { "running" } else { "paused" }
        );
        Ok(VmmData::Empty)
    }

    /// After each round of events: has the guest ended?
    pub fn check_exit(&mut self) -> Option<ExitReason> {
        if self.reset_fired.swap(false, Ordering::SeqCst) {
            return Some(ExitReason::I8042Reset);
        }
        if self.vcpu_exit_fired.swap(false, Ordering::SeqCst) {
            if let Ok(ev) = self.vcpu_events.try_recv() {
                return Some(ExitReason::Vcpu {
                    id: ev.id,
                    reason: ev.reason,
                });
            }
        }
        None
    }

    /// Stops the vCPUs, flushes guest output and removes the vsock socket
    /// (the process exits without running destructors).
    pub fn shutdown(&mut self) {
        if let Some(vm) = self.running.as_mut() {
            vm.stop_vcpus();
            vm.serial.lock().expect("serial poisoned").flush();
            if let Some(v) = &self.config.vsock {
                let _ = std::fs::remove_file(&v.uds_path);
            }
        }
    }
}
