//! What the API (or the config file) can ask of the VMM, the phase each
//! request is allowed in, and the answers.

use serde::Serialize;
use serde_json::Value;

use crate::config::balloon::{
    BalloonConfig, BalloonHintingStart, BalloonStatsUpdate, BalloonUpdate,
};
use crate::config::cpu_config::CpuConfig;
use crate::config::entropy::EntropyDeviceConfig;
use crate::config::hotplug::{MemoryHotplugConfig, MemoryHotplugSizeUpdate};
use crate::config::logger::LoggerConfig;
use crate::config::metrics::MetricsConfig;
use crate::config::mmds::MmdsConfig;
use crate::config::pmem::{PmemConfig, PmemUpdate};
use crate::config::snapshot::{SnapshotCreateParams, SnapshotLoadParams};
use crate::config::{
    BootSourceConfig, DriveConfig, DriveUpdate, MachineConfig, MachineConfigUpdate,
    NetworkInterfaceConfig, NetworkInterfaceUpdate, SerialConfig, VmConfig, VsockDeviceConfig,
};

/// One request to the VMM thread. Named for what it does; the comment gives
/// the Firecracker operation it serves.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmAction {
    /// `GET /` (describeInstance).
    GetInstanceInfo,
    /// `GET /version` (getFirecrackerVersion).
    GetVersion,
    /// `GET /vm/config` (getExportVmConfig).
    GetVmConfig,
    /// `GET /machine-config` (getMachineConfiguration).
    GetMachineConfig,
    /// `PUT /boot-source` (putGuestBootSource).
    PutBootSource(BootSourceConfig),
    /// `PUT /machine-config` (putMachineConfiguration).
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config` (patchMachineConfiguration).
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /cpu-config` (putCpuConfiguration).
    PutCpuConfig(CpuConfig),
    /// `PUT /drives/{id}` (putGuestDriveByID).
    PutDrive(String, DriveConfig),
    /// `PATCH /drives/{id}` (patchGuestDriveByID).
    PatchDrive(String, DriveUpdate),
    /// `PUT /network-interfaces/{id}` (putGuestNetworkInterfaceByID).
    PutNetworkInterface(String, NetworkInterfaceConfig),
    /// `PATCH /network-interfaces/{id}` (patchGuestNetworkInterfaceByID).
    PatchNetworkInterface(String, NetworkInterfaceUpdate),
    /// `PUT /vsock` (putGuestVsock).
    PutVsock(VsockDeviceConfig),
    /// `PUT /logger` (putLogger).
    ConfigureLogger(LoggerConfig),
    /// `PUT /metrics` (putMetrics).
    ConfigureMetrics(MetricsConfig),
    /// `PUT /serial` (putSerialDevice).
    ConfigureSerial(SerialConfig),
    /// `PUT /mmds` (putMmds).
    PutMmds(Value),
    /// `PATCH /mmds` (patchMmds).
    PatchMmds(Value),
    /// `GET /mmds` (getMmds).
    GetMmds,
    /// `PUT /mmds/config` (putMmdsConfig).
    ConfigureMmds(MmdsConfig),
    /// `PUT /entropy` (putEntropyDevice).
    PutEntropy(EntropyDeviceConfig),
    /// `PUT /balloon` (putBalloon).
    PutBalloon(BalloonConfig),
    /// `PATCH /balloon` (patchBalloon).
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon` (describeBalloonConfig).
    GetBalloon,
    /// `GET /balloon/statistics` (describeBalloonStats).
    GetBalloonStats,
    /// `PATCH /balloon/statistics` (patchBalloonStatsInterval).
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PATCH /balloon/hinting/start` (startBalloonHinting).
    StartBalloonHinting(BalloonHintingStart),
    /// `GET /balloon/hinting/status` (describeBalloonHinting).
    GetBalloonHinting,
    /// `PATCH /balloon/hinting/stop` (stopBalloonHinting).
    StopBalloonHinting,
    /// `PUT /pmem/{id}` (putGuestPmemByID).
    PutPmem(String, PmemConfig),
    /// `PATCH /pmem/{id}` (patchGuestPmemByID).
    PatchPmem(String, PmemUpdate),
    /// `PUT /hotplug/memory` (putMemoryHotplug).
    PutMemoryHotplug(MemoryHotplugConfig),
    /// `PATCH /hotplug/memory` (patchMemoryHotplug).
    PatchMemoryHotplug(MemoryHotplugSizeUpdate),
    /// `GET /hotplug/memory` (getMemoryHotplug).
    GetMemoryHotplug,
    /// `PUT /snapshot/create` (createSnapshot).
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load` (loadSnapshot).
    LoadSnapshot(SnapshotLoadParams),
    /// `PUT /actions` InstanceStart (createSyncAction).
    InstanceStart,
    /// `PUT /actions` SendCtrlAltDel.
    SendCtrlAltDel,
    /// `PUT /actions` FlushMetrics.
    FlushMetrics,
    /// `PATCH /vm` Paused (patchVm).
    Pause,
    /// `PATCH /vm` Resumed.
    Resume,
}

/// When an action may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// Before and after boot.
    Always,
    /// Only before `InstanceStart`.
    PreBoot,
    /// Only once the guest was started (running or paused).
    PostBoot,
}

impl VmmAction {
    /// The phase rule of each action, as Firecracker's `rpc_interface.rs`
    /// splits them between its pre-boot and runtime controllers. One match
    /// with no catch-all: a new action must be placed here.
    pub fn allowed(&self) -> Allowed {
        use VmmAction::*;
        match self {
            GetInstanceInfo | GetVersion | GetVmConfig | GetMachineConfig | GetMmds
            | PutMmds(_) | PatchMmds(_) | GetBalloon => Allowed::Always,
            PutBootSource(_)
            | PutMachineConfig(_)
            | PatchMachineConfig(_)
            | PutCpuConfig(_)
            | PutDrive(..)
            | PutNetworkInterface(..)
            | PutVsock(_)
            | ConfigureLogger(_)
            | ConfigureMetrics(_)
            | ConfigureSerial(_)
            | ConfigureMmds(_)
            | PutEntropy(_)
            | PutBalloon(_)
            | PutPmem(..)
            | PutMemoryHotplug(_)
            | LoadSnapshot(_)
            | InstanceStart => Allowed::PreBoot,
            PatchDrive(..)
            | PatchNetworkInterface(..)
            | PatchBalloon(_)
            | PatchBalloonStats(_)
            | StartBalloonHinting(_)
            | GetBalloonHinting
            | StopBalloonHinting
            | PatchPmem(..)
            | PatchMemoryHotplug(_)
            | CreateSnapshot(_)
            | FlushMetrics
            | GetBalloonStats
            | GetMemoryHotplug
            | SendCtrlAltDel
            | Pause
            | Resume => Allowed::PostBoot,
        }
    }
}

/// Instance states, worded as Firecracker words them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum InstanceState {
    /// Before `InstanceStart`.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// `--id`.
    pub id: String,
    /// The state.
    pub state: InstanceState,
    /// ember's version.
    pub vmm_version: String,
    /// `ember`.
    pub app_name: String,
}

/// Successful answers.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmData {
    /// 204.
    Empty,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /machine-config`.
    MachineConfig(MachineConfig),
    /// `GET /vm/config`.
    VmConfig(Box<VmConfig>),
    /// `GET /version`.
    Version(String),
    /// `GET /mmds` (`null` is answered `{}`).
    Mmds(Value),
    /// `GET /balloon`.
    Balloon(crate::config::balloon::BalloonConfig),
    /// `GET /balloon/statistics`.
    BalloonStats(devices::virtio::balloon::BalloonStats),
    /// `GET /balloon/hinting/status`.
    BalloonHinting(devices::virtio::balloon::HintingStatus),
}

/// Failed answers; each becomes a 400 (413 for an MMDS store over its
/// limit) with `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Boot failed.
    #[error("Failed to start the microVM: {0}")]
    Start(#[from] crate::builder::BuildError),
    /// A pre-boot action after boot.
    #[error("The requested operation is not supported after starting the microVM.")]
    NotAllowedAfterBoot,
    /// A post-boot action before boot.
    #[error("The requested operation is not supported before starting the microVM.")]
    NotAllowedBeforeBoot,
    /// The serial output file cannot be opened.
    #[error("Cannot open the serial output file {path}: {err}")]
    SerialOut {
        /// The file.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// Ctrl-Alt-Del could not be injected.
    #[error("Failed to send Ctrl-Alt-Del: {0}")]
    CtrlAltDel(devices::legacy::I8042Error),
    /// `PATCH /drives/{id}` failed.
    #[error("Failed to update drive {id}: {msg}")]
    DriveUpdate {
        /// The drive.
        id: String,
        /// Why.
        msg: String,
    },
    /// Pause or resume failed.
    #[error("Failed to change the vCPU state: {0}")]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// The logger could not be configured.
    #[error(transparent)]
    Logger(#[from] crate::logger::LoggerError),
    /// The metrics could not be configured or written.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The MMDS store refused the request.
    #[error(transparent)]
    Mmds(#[from] crate::mmds::MmdsError),
    /// A resource with no implementation behind it.
    #[error("{0}")]
    NotImplemented(&'static str),
    /// A balloon operation without a balloon device.
    #[error("No balloon device found.")]
    NoBalloon,
    /// The balloon device refused the operation.
    #[error(transparent)]
    Balloon(#[from] devices::virtio::balloon::BalloonError),
    /// `PUT /snapshot/create` on a running (not paused) microVM.
    #[error("Cannot create a snapshot: the microVM is not paused.")]
    SnapshotNotPaused,
    /// `PUT /snapshot/load` after the machine was configured.
    #[error("Loading a snapshot is not allowed after configuring the microVM (boot source, machine config or devices): the snapshot brings its own.")]
    LoadAfterConfig,
    /// Invalid snapshot parameters.
    #[error(transparent)]
    SnapshotConfig(#[from] crate::config::snapshot::SnapshotConfigError),
    /// Creating or loading a snapshot failed.
    #[error("Snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

impl ActionError {
    /// The HTTP status Firecracker answers with.
    pub fn status(&self) -> u16 {
        match self {
            ActionError::Mmds(crate::mmds::MmdsError::TooLarge { .. }) => 413,
            _ => 400,
        }
    }
}
