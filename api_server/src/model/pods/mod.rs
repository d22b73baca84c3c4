//! Pod VMs: the runtime behind hyperd's pods.
//!
//! A pod runs in one microVM: an ember instance that boots the pod kernel
//! with an initramfs whose `/init` is `ember-agent`, has one ext4 disk per
//! container (built from the container image, `/dev/vda`, `/dev/vdb`, ...
//! in container order) and a vsock device. emberd keeps one agent session
//! per pod VM: a thread that owns the single connection to the agent (vsock
//! port 2718 through the VMM's hybrid-vsock socket), sends it requests that
//! come over a channel and turns the agent's exit events into model
//! updates.
//!
//! Everything that blocks (building disks and the initramfs, waiting for
//! the guest, talking to the agent) runs on worker threads; they change the
//! model only through [`Jobs::call`] / [`Jobs::post`], on the loop thread.
//!
//! Files: `plan.rs` reads the pod spec and plans a start; `storage.rs` its
//! volumes (more disks after the root disks) and files; `network.rs` its
//! interfaces (TAPs); `vm.rs` boots VMs and starts and stops pods;
//! `service.rs` and `ops.rs` are the operations the hyperd face calls
//! (`ops.rs`: labels, signals, pause, port mappings forwarded by
//! [`crate::runtime::portfwd`], containers added, renamed or removed, image
//! save).
//!
//! The VM records are ordinary instances (named by their hyperd `vm-` id,
//! annotated with it and with the pod they serve); the pod records are
//! [`crate::model::Pod`]s; each container's root filesystem is a volume
//! named `<container id>-rootfs`, kept after the pod stops (for
//! `/container/commit`, and so a restarted pod keeps its files) and removed
//! with the pod.

mod network;
mod ops;
mod plan;
mod service;
pub mod stdio;
mod storage;
mod vm;

pub use network::PodInterface;
pub use ops::{
    find_container, ContainerStopJob, Kill, PauseJob, PortMapping, SignalJob, NO_POD_NETWORK,
};
pub use plan::{
    disk_device, parse_pod, resolve, rootfs_volume, ContainerPlan, ContainerSpec, EnvSpec, PodPlan,
    PodSpec, Resource,
};
pub use service::{
    vm_id, vms, CommitJob, ImageSource, ImportJob, Imported, PushJob, StartJob, StopJob, VmJob,
};
pub use storage::{pod_volume_name, PodVolume, VolumeKind};

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::images::store::{ImageStore, ImageStoreError};
use crate::model::jobs::Jobs;
use crate::model::supervisor::{ErrorKind, Supervisor, SupervisorError};
use crate::model::PodState;
use crate::runtime::agent::Session;

/// Name of the image (pod kernel + agent initramfs) every pod VM boots.
pub const POD_IMAGE: &str = "hyperd-podvm";
/// Annotation of a pod VM instance: its hyperd `vm-` id.
pub const VM_ANN: &str = "hyperd.vm";
/// Annotation of a pod VM instance: the pod it runs (absent when idle).
pub const POD_ANN: &str = "hyperd.pod";
/// Kernel arguments every pod VM gets, before the configured ones.
pub const POD_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off rdinit=/init";

/// How pod VMs are made.
#[derive(Clone, Debug)]
pub struct PodVmConfig {
    /// Kernel to boot; `None`: the `linux` base's kernel
    /// ([`crate::build::linux::find_kernel`]).
    pub kernel: Option<PathBuf>,
    /// `ember-agent` binary for the initramfs; `None`:
    /// [`crate::build::pod_initramfs::find_agent`].
    pub agent: Option<PathBuf>,
    /// More kernel arguments for every pod VM.
    pub boot_args: String,
    /// How long a new VM may take to boot and answer READY.
    pub agent_timeout: Duration,
    /// Grace period between SIGTERM and SIGKILL when a pod stops.
    pub stop_timeout: Duration,
    /// Size of a container's root disk in MB (sparse); an image that does
    /// not fit gets a disk sized to fit it.
    pub rootfs_mb: u64,
    /// Host address port mappings listen on (`--pod-port-bind`).
    pub port_bind: std::net::IpAddr,
}

impl Default for PodVmConfig {
    fn default() -> Self {
        PodVmConfig {
            kernel: None,
            agent: None,
            boot_args: String::new(),
            agent_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(10),
            rootfs_mb: 1024,
            port_bind: std::net::IpAddr::from([0, 0, 0, 0]),
        }
    }
}

/// Why a pod operation failed; the words follow hyperd's status rules
/// ("no such" 404, "bad parameter" 400, "conflict" 409, else 500).
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("no such {0}")]
    NoSuch(String),
    #[error("bad parameter: {0}")]
    Invalid(String),
    #[error("conflict: {0}")]
    Conflict(String),
    /// No kernel or agent to make pod VMs with.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
    /// A registry refused access ("unauthorized: ..."), failed or sent
    /// bad bytes.
    #[error("{0}")]
    Registry(String),
}

type Result<T> = std::result::Result<T, PodError>;

fn failed(e: impl std::fmt::Display) -> PodError {
    PodError::Failed(e.to_string())
}

/// What emberd daemon thread answered: the loop went away (shutdown).
fn loop_gone() -> PodError {
    PodError::Failed("emberd is shutting down".into())
}

impl From<SupervisorError> for PodError {
    fn from(e: SupervisorError) -> Self {
        match e.kind() {
            ErrorKind::NotFound => PodError::NoSuch(e.to_string().replace(" not found", "")),
            ErrorKind::Invalid => PodError::Invalid(e.to_string()),
            ErrorKind::Conflict => PodError::Conflict(e.to_string()),
            ErrorKind::Internal => PodError::Failed(e.to_string()),
        }
    }
}

impl From<ImageStoreError> for PodError {
    fn from(e: ImageStoreError) -> Self {
        // The store's messages already carry hyperd's words.
        match e {
            ImageStoreError::NotFound(m) => PodError::NoSuch(format!("image: {m}")),
            ImageStoreError::Invalid(m) => PodError::Invalid(m),
            ImageStoreError::Conflict(m) => PodError::Conflict(m),
            // RUN, URLs, zstd...: what the user asked for, not a server fault.
            ImageStoreError::Unsupported(m) => PodError::Invalid(m),
            ImageStoreError::Registry(e) => PodError::Registry(e.to_string()),
            other => PodError::Failed(other.to_string()),
        }
    }
}

/// Pod VMs: their sessions and configuration. Shared by the face and its
/// worker threads.
pub struct Pods {
    cfg: PodVmConfig,
    images: Arc<ImageStore>,
    /// Instance id -> agent session.
    sessions: Mutex<HashMap<String, Session>>,
    /// Pods and VMs with an operation under way.
    busy: Mutex<HashSet<String>>,
    /// Instances whose session is being re-established after a restart.
    reconnecting: Mutex<HashSet<String>>,
    /// Instance id -> the port mappings forwarded to its pod.
    forwarders: Mutex<HashMap<String, crate::runtime::portfwd::Forwarder>>,
    /// Where the agents' output goes (attach, exec, logs).
    stdio: Arc<crate::runtime::stdio::StdioHub>,
    /// hyperd's execs.
    execs: stdio::Execs,
    /// Hijacked connections being served.
    bridges: stdio::BridgeCount,
}

/// Marks a pod or VM busy until dropped.
pub struct BusyGuard {
    pods: Arc<Pods>,
    key: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.pods
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl Pods {
    /// Pod VMs made as `cfg` says, with container images from `images`.
    pub fn new(cfg: PodVmConfig, images: Arc<ImageStore>) -> Arc<Pods> {
        Arc::new(Pods {
            cfg,
            images,
            sessions: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            reconnecting: Mutex::new(HashSet::new()),
            forwarders: Mutex::new(HashMap::new()),
            stdio: Arc::default(),
            execs: Mutex::default(),
            bridges: Default::default(),
        })
    }

    /// Claims `key` (a pod or VM id) for one operation at a time.
    pub fn claim(self: &Arc<Self>, key: &str) -> Result<BusyGuard> {
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !b.insert(key.to_string()) {
            return Err(PodError::Conflict(format!(
                "{key} is busy with another operation; try again when it has finished"
            )));
        }
        Ok(BusyGuard {
            pods: Arc::clone(self),
            key: key.to_string(),
        })
    }

    fn session(&self, inst: &str) -> Option<Session> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(inst)
            .cloned()
    }

    /// Forgets an instance's session (it closes once its thread notices)
    /// and stops forwarding ports to it.
    fn drop_session(&self, inst: &str) {
        self.stop_forwarding(inst);
        if let Some(s) = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(inst)
        {
            s.close();
        }
    }

    /// The kernel and agent pod VMs are made from, or why there are none.
    pub fn requirements(&self) -> Result<(PathBuf, PathBuf)> {
        let kernel = match &self.cfg.kernel {
            Some(k) if k.is_file() => k.clone(),
            Some(k) => {
                return Err(PodError::Unavailable(format!(
                    "the pod kernel {} does not exist (emberd --pod-kernel)",
                    k.display()
                )))
            }
            None => crate::build::linux::find_kernel().ok_or_else(|| {
                PodError::Unavailable(format!(
                    "pod VMs boot Linux with ember-agent as init, and no Linux kernel was found (give emberd --pod-kernel, set {}, or install one at {})",
                    crate::build::linux::KERNEL_ENV,
                    crate::build::linux::KERNEL_PATH
                ))
            })?,
        };
        let agent = match &self.cfg.agent {
            Some(a) if a.is_file() => a.clone(),
            Some(a) => {
                return Err(PodError::Unavailable(format!(
                    "the agent binary {} does not exist (emberd --pod-agent)",
                    a.display()
                )))
            }
            None => crate::build::pod_initramfs::find_agent().ok_or_else(|| {
                PodError::Unavailable(format!(
                    "no ember-agent binary was found for pod VMs (give emberd --pod-agent or set {})",
                    crate::build::pod_initramfs::AGENT_ENV
                ))
            })?,
        };
        Ok((kernel, agent))
    }
}

/// What the agent pushed: container exits, applied on the loop.
fn post_events(jobs: &Jobs, inst: &str, events: &[ember_agent::Event]) {
    for ev in events {
        // Output is the stdio hub's alone.
        let ember_agent::Event::Exited { id, code } = ev else {
            continue;
        };
        let (inst, id, code) = (inst.to_string(), id.clone(), *code);
        jobs.post(move |sup| container_exited(sup, &inst, &id, code));
    }
}

fn exited(c: &mut crate::model::PodContainer, code: i32) {
    c.exit_code = Some(code);
    c.state = if code == 0 { "succeeded" } else { "failed" }.into();
}

/// A running pod whose containers have all ended has ended too.
fn settle(p: &mut crate::model::Pod) {
    if p.state == PodState::Running
        && !p.containers.is_empty()
        && p.containers.iter().all(|c| c.exit_code.is_some())
    {
        p.state = if p.containers.iter().all(|c| c.exit_code == Some(0)) {
            PodState::Succeeded
        } else {
            PodState::Failed
        };
    }
}

/// Loop side: container `cid` of the pod in VM `inst` has exited.
fn container_exited(sup: &mut Supervisor, inst: &str, cid: &str, code: i32) {
    let pod = sup
        .state()
        .pods
        .values()
        .find(|p| p.vm.as_deref() == Some(inst) && p.containers.iter().any(|c| c.id == cid))
        .map(|p| p.id.clone());
    if let Some(pod) = pod {
        let _ = sup.update_pod(&pod, |p| {
            if let Some(c) = p.containers.iter_mut().find(|c| c.id == cid) {
                exited(c, code);
            }
            settle(p);
        });
    }
}

/// Loop side: the VM `inst` (or its agent) is gone; a pod in it fails.
fn vm_lost(sup: &mut Supervisor, inst: &str, why: &str) {
    let pod = sup
        .state()
        .pods
        .values()
        .find(|p| p.vm.as_deref() == Some(inst))
        .map(|p| p.id.clone());
    if let Some(pod) = pod {
        let _ = sup.update_pod(&pod, |p| {
            if matches!(p.state, PodState::Running | PodState::Pending) {
                p.state = PodState::Failed;
                p.last_error = Some(format!("pod VM: {why}"));
            }
            for c in &mut p.containers {
                if c.state == "running" || c.state == "pending" {
                    c.state = "failed".into();
                }
            }
            p.vm = None;
            p.paused = false;
        });
    }
}

/// Loop side: a session ended without being asked to. The pod in the VM
/// fails, and a VM whose VMM is gone is removed (its record would
/// otherwise be listed as an idle VM).
fn session_ended(sup: &mut Supervisor, inst: &str, why: &str) {
    vm_lost(sup, inst, why);
    let dead = sup.instance(inst).ok().map(|i| {
        !i.process
            .as_ref()
            .is_some_and(crate::runtime::process::is_alive)
    });
    if dead == Some(true) {
        if let Err(e) = sup.delete_instance(inst, true) {
            log::warn!("removing the ended pod VM {inst}: {e}");
        }
        gc_rootfs(sup);
    }
}

/// Instance id of the pod VM with hyperd id `vm`.
pub fn find_vm(sup: &Supervisor, vm: &str) -> Option<String> {
    sup.state()
        .instances
        .values()
        .find(|i| i.annotations.get(VM_ANN).map(String::as_str) == Some(vm))
        .map(|i| i.id.clone())
}

/// Removes root disks whose container no longer exists, and pod volumes
/// whose pod no longer exists, that no VM holds.
pub fn gc_rootfs(sup: &mut Supervisor) {
    let live: HashSet<String> = sup
        .state()
        .pods
        .values()
        .flat_map(|p| p.containers.iter().map(|c| rootfs_volume(&c.id)))
        .collect();
    // A pod's own (empty) volumes, `<pod id>-vol-<name>`, go with the pod.
    let pod_of_volume = |name: &str| -> Option<String> {
        let (pod, _) = name.split_once("-vol-")?;
        pod.starts_with("pod-").then(|| pod.to_string())
    };
    let dead: Vec<String> = sup
        .state()
        .volumes
        .values()
        .filter(|v| {
            (v.name.starts_with("container-")
                && v.name.ends_with("-rootfs")
                && !live.contains(&v.name))
                || pod_of_volume(&v.name).is_some_and(|p| !sup.state().pods.contains_key(&p))
        })
        .filter(|v| v.attachment.is_none())
        .map(|v| v.id.clone())
        .collect();
    for v in dead {
        if let Err(e) = sup.delete_volume(&v, false) {
            log::warn!("removing root disk {v}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_settle_when_every_container_has_exited() {
        let mut p = crate::model::Pod {
            state: PodState::Running,
            containers: vec![
                crate::model::PodContainer {
                    id: "a".into(),
                    state: "running".into(),
                    ..Default::default()
                },
                crate::model::PodContainer {
                    id: "b".into(),
                    state: "running".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        exited(&mut p.containers[0], 0);
        settle(&mut p);
        assert_eq!(p.state, PodState::Running);
        exited(&mut p.containers[1], 3);
        settle(&mut p);
        assert_eq!(p.state, PodState::Failed);
        assert_eq!(p.containers[1].state, "failed");
        p.state = PodState::Running;
        exited(&mut p.containers[1], 0);
        settle(&mut p);
        assert_eq!(p.state, PodState::Succeeded);
    }
}
