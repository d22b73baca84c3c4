//! What the API (or the config file) can ask of the VMM, and the answers.

use serde::Serialize;

use crate::config::{
    BootSourceConfig, DriveConfig, DriveUpdate, MachineConfig, MachineConfigUpdate,
    NetworkInterfaceConfig, NetworkInterfaceUpdate, VmConfig, VsockDeviceConfig,
};

/// One request to the VMM thread.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmAction {
    GetInstanceInfo,
    GetVmConfig,
    GetMachineConfig,
    PutBootSource(BootSourceConfig),
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutDrive(String, DriveConfig),
    PatchDrive(String, DriveUpdate),
    PutNetworkInterface(String, NetworkInterfaceConfig),
    PatchNetworkInterface(String, NetworkInterfaceUpdate),
    PutVsock(VsockDeviceConfig),
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
}

/// Instance states, worded as Firecracker words them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

/// Successful answers.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmData {
    Empty,
    InstanceInfo(InstanceInfo),
    MachineConfig(MachineConfig),
    VmConfig(VmConfig),
}

/// Failed answers; each becomes a 400 with `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("Failed to start the microVM: {0}")]
    Start(#[from] crate::builder::BuildError),
    #[error("The requested operation is not supported after starting the microVM.")]
    NotAllowedAfterBoot,
    #[error("The requested operation is not supported before starting the microVM.")]
    NotAllowedBeforeBoot,
    #[error("Cannot open the serial output file {path}: {err}")]
    SerialOut { path: String, err: std::io::Error },
    #[error("Failed to send Ctrl-Alt-Del: {0}")]
    CtrlAltDel(devices::legacy::I8042Error),
    #[error("Failed to update drive {id}: {msg}")]
    DriveUpdate { id: String, msg: String },
    #[error("Failed to change the vCPU state: {0}")]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
}
