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
//! The VM records are ordinary instances (named by their hyperd `vm-` id,
//! annotated with it and with the pod they serve); the pod records are
//! [`crate::model::Pod`]s; each container's root filesystem is a volume
//! named `<container id>-rootfs`, kept after the pod stops (for
//! `/container/commit`, and so a restarted pod keeps its files) and removed
//! with the pod.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_agent::protocol::{OkReply, Request, Rootfs, StartContainer, StopContainer, Wait};
use ember_agent::{AgentClient, ClientError};

use crate::images::store::ImageStore;
use crate::model::{Disk, Image, InstanceState, PodState, VolumeFormat};
use crate::model::jobs::Jobs;
use crate::model::supervisor::{RunRequest, Supervisor};

/// Name of the image (pod kernel + agent initramfs) every pod VM boots.
pub const POD_IMAGE: &str = "hyperd-podvm";
/// Annotation of a pod VM instance: its hyperd `vm-` id.
pub const VM_ANN: &str = "hyperd.vm";
/// Annotation of a pod VM instance: the pod it runs (absent when idle).
pub const POD_ANN: &str = "hyperd.pod";
/// Kernel arguments every pod VM gets, before the configured ones.
pub const POD_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off rdinit=/init";
/// `PATH` for containers whose image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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
}

type Result<T> = std::result::Result<T, PodError>;

fn failed(e: impl std::fmt::Display) -> PodError {
    PodError::Failed(e.to_string())
}

/// What emberd daemon thread answered: the loop went away (shutdown).
fn loop_gone() -> PodError {
    PodError::Failed("emberd is shutting down".into())
}

/// One container to start, as the face resolved it from the pod spec.
#[derive(Clone, Debug, Default)]
pub struct ContainerPlan {
    /// Container id (the model's).
    pub id: String,
    pub name: String,
    /// Image name or id in the container image store.
    pub image: String,
    /// Replaces the image's `Cmd` when not empty.
    pub command: Vec<String>,
    /// Replaces the image's `Entrypoint` (and drops its `Cmd`) when not empty.
    pub entrypoint: Vec<String>,
    /// Replaces the image's `WorkingDir` when not empty.
    pub workdir: String,
    /// Added to (and overriding) the image's `Env`.
    pub env: Vec<(String, String)>,
}

/// A pod to start.
#[derive(Clone, Debug, Default)]
pub struct PodPlan {
    pub pod_id: String,
    pub hostname: String,
    pub vcpus: u8,
    pub memory_mb: u32,
    pub containers: Vec<ContainerPlan>,
}

/// The agent's view of a container: argv, environment, working directory
/// and user from the image config and the plan (Docker's rules: a given
/// entrypoint drops the image's `Cmd`).
pub fn resolve(
    plan: &ContainerPlan,
    cfg: &crate::images::oci::ImageConfig,
    dev: &str,
) -> Result<StartContainer> {
    let entrypoint = if plan.entrypoint.is_empty() {
        cfg.entrypoint.clone()
    } else {
        plan.entrypoint.clone()
    };
    let cmd = if !plan.command.is_empty() {
        plan.command.clone()
    } else if plan.entrypoint.is_empty() {
        cfg.cmd.clone()
    } else {
        Vec::new()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(PodError::Invalid(format!(
            "container {} has no command: image {} has no Entrypoint or Cmd and the pod gives none",
            plan.name, plan.image
        )));
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match env.iter_mut().find(|(n, _)| n == k) {
        Some(e) => e.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    };
    for kv in &cfg.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v);
    }
    for (k, v) in &plan.env {
        if k.is_empty() || k.contains('=') {
            return Err(PodError::Invalid(format!(
                "container {}: bad environment variable name {k:?}",
                plan.name
            )));
        }
        set(k, v);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    let workdir = if plan.workdir.is_empty() {
        cfg.working_dir.clone()
    } else {
        plan.workdir.clone()
    };
    let user = match cfg.user.as_str() {
        "" | "root" | "0" => None,
        u if u.split(':').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) => {
            Some(u.to_string())
        }
        u => {
            return Err(PodError::Invalid(format!(
                "container {}: image user {u:?} is not numeric (uid or uid:gid); user names need the container's /etc/passwd, which emberd does not read",
                plan.name
            )))
        }
    };
    Ok(StartContainer {
        id: plan.id.clone(),
        rootfs: Rootfs::BlockDevice {
            path: dev.to_string(),
            fstype: "ext4".into(),
            readonly: false,
        },
        cmd: argv,
        env,
        workdir: (!workdir.is_empty()).then_some(workdir),
        user,
    })
}

/// `/dev/vda`, `/dev/vdb`, ... for the `i`-th disk.
pub fn disk_device(i: usize) -> Result<String> {
    if i >= 26 {
        return Err(PodError::Invalid("a pod has at most 26 containers".into()));
    }
    Ok(format!("/dev/vd{}", (b'a' + i as u8) as char))
}

/// Volume name of a container's root filesystem.
pub fn rootfs_volume(container_id: &str) -> String {
    format!("{container_id}-rootfs")
}

/// A request to the session thread and where its answer goes.
struct Call {
    req: Request,
    reply: Sender<std::result::Result<OkReply, String>>,
}

/// The handle of one pod VM's agent session.
#[derive(Clone)]
struct Session {
    tx: Sender<Call>,
    /// Set before an intended shutdown, so the connection's end is not
    /// reported as a failure.
    closing: Arc<AtomicBool>,
}

impl Session {
    /// Sends `req` and waits up to `timeout` for the agent's answer.
    fn request(&self, req: Request, timeout: Duration) -> Result<OkReply> {
        let (tx, rx) = channel();
        let what = format!("{req:?}");
        self.tx
            .send(Call { req, reply: tx })
            .map_err(|_| failed("the pod VM's agent connection is closed"))?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r.map_err(PodError::Failed),
            Err(RecvTimeoutError::Timeout) => Err(failed(format!(
                "the agent did not answer {} in {} s",
                what.split(['(', ' ']).next().unwrap_or("the request"),
                timeout.as_secs()
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                Err(failed("the pod VM's agent connection closed"))
            }
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

    /// Forgets an instance's session; it closes once its thread notices.
    fn drop_session(&self, inst: &str) {
        if let Some(s) = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(inst)
        {
            s.closing.store(true, Ordering::SeqCst);
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

    /// Worker side: makes sure the pod VM image exists.
    fn ensure_image(&self, jobs: &Jobs, staging: &Path, kernel: &Path, agent: &Path) -> Result<()> {
        let exists = jobs
            .call(|sup, _| sup.state().image(POD_IMAGE).is_some())
            .ok_or_else(loop_gone)?;
        if exists {
            return Ok(());
        }
        let dir = staging.join("podvm");
        std::fs::create_dir_all(&dir).map_err(failed)?;
        std::fs::copy(kernel, dir.join("kernel")).map_err(|e| {
            failed(format!(
                "cannot copy the pod kernel {}: {e}",
                kernel.display()
            ))
        })?;
        crate::build::pod_initramfs::build(agent, &dir.join("initrd"))
            .map_err(|e| failed(format!("cannot build the pod initramfs: {e}")))?;
        let size = ["kernel", "initrd"]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum::<u64>();
        let img = Image {
            id: String::new(),
            name: POD_IMAGE.into(),
            provider: "ember".into(),
            base: "hyperd".into(),
            lang: "pod".into(),
            created: crate::model::now_rfc3339(),
            size_mb: size.div_ceil(1 << 20).max(1),
            kernel: "kernel".into(),
            initrd: Some("initrd".into()),
            boot_args: POD_CMDLINE.into(),
            args: String::new(),
            mounts: vec![],
            default_memory_mb: 128,
            format: "pod-vm".into(),
        };
        jobs.call(move |sup, _| {
            if sup.state().image(POD_IMAGE).is_some() {
                return Ok(()); // another start made it meanwhile
            }
            sup.install_image(img, &dir, false)
                .map(|_| ())
                .map_err(failed)
        })
        .ok_or_else(loop_gone)?
    }

    /// Worker side: builds the root disks of the containers that have none
    /// yet; returns (container id, file) for the loop to install.
    fn build_rootfs(
        &self,
        jobs: &Jobs,
        staging: &Path,
        plan: &PodPlan,
    ) -> Result<Vec<(String, PathBuf)>> {
        let names: Vec<String> = plan
            .containers
            .iter()
            .map(|c| rootfs_volume(&c.id))
            .collect();
        let have: Vec<bool> = jobs
            .call(move |sup, _| {
                names
                    .iter()
                    .map(|n| sup.state().volume(n).is_some())
                    .collect()
            })
            .ok_or_else(loop_gone)?;
        let mut out = Vec::new();
        for (c, have) in plan.containers.iter().zip(have) {
            if have {
                continue;
            }
            let file = staging.join(format!("{}.img", c.id));
            let sized = self
                .images
                .rootfs_ext4(&c.image, &file, Some(self.cfg.rootfs_mb));
            if sized.is_err() {
                // Too large for the default size: one that fits.
                let _ = std::fs::remove_file(&file);
                self.images
                    .rootfs_ext4(&c.image, &file, None)
                    .map_err(|e| {
                        failed(format!(
                            "container {}: root disk from image {}: {e}",
                            c.name, c.image
                        ))
                    })?;
            }
            out.push((c.id.clone(), file));
        }
        Ok(out)
    }

    /// Worker side: connects to a new VM's agent, waiting for it to boot;
    /// gives up when the VMM dies or the timeout passes.
    fn connect(&self, jobs: &Jobs, inst: &str, uds: &Path) -> Result<AgentClient<UnixStream>> {
        let deadline = Instant::now() + self.cfg.agent_timeout;
        let mut last = String::from("no attempt");
        loop {
            if uds.exists() {
                match AgentClient::connect_vsock_uds(uds, Some(Duration::from_secs(5))) {
                    Ok(c) => {
                        // Requests are bounded by the session's callers.
                        let _ = c.stream().set_read_timeout(None);
                        return Ok(c);
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            let inst_id = inst.to_string();
            let alive = jobs
                .call(move |sup, _| {
                    sup.instance(&inst_id).ok().map(|i| {
                        (
                            i.state == InstanceState::Running,
                            i.last_error.clone().unwrap_or_default(),
                        )
                    })
                })
                .ok_or_else(loop_gone)?;
            match alive {
                Some((true, _)) => {}
                Some((false, err)) => {
                    return Err(failed(format!(
                        "the pod VM stopped before its agent answered: {err}"
                    )))
                }
                None => return Err(failed("the pod VM was deleted while it booted")),
            }
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "the pod VM's agent did not answer within {} s ({last})",
                    self.cfg.agent_timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the session thread for instance `inst` over `client`.
    fn open_session(self: &Arc<Self>, jobs: &Jobs, inst: &str, client: AgentClient<UnixStream>) {
        let (tx, rx) = channel::<Call>();
        let closing = Arc::new(AtomicBool::new(false));
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                inst.to_string(),
                Session {
                    tx,
                    closing: closing.clone(),
                },
            );
        let jobs = jobs.clone();
        let inst = inst.to_string();
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("emberd-agent".into())
            .spawn(move || {
                let why = run_session(client, &rx, &jobs, &inst);
                // Only forget the session if it is still ours.
                let mut s = me.sessions.lock().unwrap_or_else(|p| p.into_inner());
                if s.get(&inst)
                    .is_some_and(|x| Arc::ptr_eq(&x.closing, &closing))
                {
                    s.remove(&inst);
                }
                drop(s);
                if !closing.load(Ordering::SeqCst) {
                    log::warn!("pod VM {inst}: agent session ended: {why}");
                    // The connection closes while the VMM exits: give the
                    // process a moment to be gone before judging the VM.
                    let id = inst.clone();
                    let p = jobs
                        .call(move |sup, _| sup.instance(&id).ok().and_then(|i| i.process.clone()))
                        .flatten();
                    let t = Instant::now();
                    while p.as_ref().is_some_and(crate::runtime::process::is_alive)
                        && t.elapsed() < Duration::from_secs(1)
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    jobs.post(move |sup| session_ended(sup, &inst, &why));
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start an agent session thread: {e}");
        }
    }

    /// Worker side: boots a VM named `vm_id` (a new one, or the idle VM
    /// restarted with the pod's disks), waits for its agent and opens its
    /// session. Returns the instance id.
    fn boot_vm(
        self: &Arc<Self>,
        jobs: &Jobs,
        vm_id: &str,
        pod: Option<&PodPlan>,
        disks: Vec<Disk>,
    ) -> Result<String> {
        let hostname = pod
            .map(|p| p.hostname.clone())
            .unwrap_or_else(|| vm_id.to_string());
        let mut boot_args = format!("ember.hostname={hostname}");
        if !self.cfg.boot_args.is_empty() {
            boot_args = format!("{} {boot_args}", self.cfg.boot_args);
        }
        let mut annotations = BTreeMap::new();
        annotations.insert(VM_ANN.to_string(), vm_id.to_string());
        if let Some(p) = pod {
            annotations.insert(POD_ANN.to_string(), p.pod_id.clone());
        }
        let req = RunRequest {
            name: vm_id.to_string(),
            image: POD_IMAGE.into(),
            memory_mb: pod.map(|p| p.memory_mb).unwrap_or(128),
            vcpus: pod.map(|p| p.vcpus).unwrap_or(1),
            disks,
            annotations,
            boot_args,
            vsock: true,
            ..Default::default()
        };
        let me = Arc::clone(self);
        let vm = vm_id.to_string();
        let (inst, uds) = jobs
            .call(move |sup, _| {
                // The idle VM being reused: it is restarted with the pod's
                // disks (block devices cannot be hot-plugged yet).
                if let Some(old) = sup.state().instance(&vm).map(|i| i.id.clone()) {
                    me.drop_session(&old);
                    sup.delete_instance(&old, true).map_err(failed)?;
                    gc_rootfs(sup);
                }
                let inst = sup.run_instance(req).map_err(failed)?;
                Ok::<_, PodError>((inst.id.clone(), sup.launcher().vsock_uds(&inst.id)))
            })
            .ok_or_else(loop_gone)??;
        match self.connect(jobs, &inst, &uds) {
            Ok(c) => {
                self.open_session(jobs, &inst, c);
                Ok(inst)
            }
            Err(e) => {
                let id = inst.clone();
                jobs.post(move |sup| {
                    let _ = sup.delete_instance(&id, true);
                });
                Err(e)
            }
        }
    }

    /// Worker side: starts `plan` in a new VM, or in the idle VM `vm`
    /// (its hyperd id). The caller has claimed the pod.
    pub fn start_pod(
        self: &Arc<Self>,
        jobs: &Jobs,
        plan: PodPlan,
        vm: Option<String>,
    ) -> Result<()> {
        let res = self.try_start_pod(jobs, &plan, vm);
        if let Err(e) = &res {
            let msg = e.to_string();
            let pod = plan.pod_id.clone();
            let me = Arc::clone(self);
            jobs.call(move |sup, _| {
                // A VM this start made is not left behind.
                if let Some(inst) = sup.pod(&pod).ok().and_then(|p| p.vm.clone()) {
                    me.drop_session(&inst);
                    let _ = sup.delete_instance(&inst, true);
                }
                let _ = sup.update_pod(&pod, |p| {
                    p.state = PodState::Failed;
                    p.vm = None;
                    p.last_error = Some(msg);
                    for c in &mut p.containers {
                        if c.state == "running" || c.state == "pending" {
                            c.state = "failed".into();
                        }
                    }
                });
            });
        }
        res
    }

    fn try_start_pod(
        self: &Arc<Self>,
        jobs: &Jobs,
        plan: &PodPlan,
        vm: Option<String>,
    ) -> Result<()> {
        let (kernel, agent) = self.requirements()?;
        // Every container resolves before anything is built.
        let mut starts = Vec::new();
        for (i, c) in plan.containers.iter().enumerate() {
            let cfg = self
                .images
                .open_image(&c.image)
                .map_err(|e| PodError::NoSuch(format!("image {}: {e}", c.image)))?
                .config;
            starts.push(resolve(c, &cfg, &disk_device(i)?)?);
        }
        let staging_dir = jobs
            .call(|sup, _| sup.store().staging_dir().join(crate::model::new_id("pod")))
            .ok_or_else(loop_gone)?;
        let staging = crate::model::store::Scratch::create(staging_dir).map_err(failed)?;
        self.ensure_image(jobs, staging.path(), &kernel, &agent)?;
        let built = self.build_rootfs(jobs, staging.path(), plan)?;
        // Install the disks; the pod is pending until its containers run.
        let pod_id = plan.pod_id.clone();
        let ids: Vec<String> = plan.containers.iter().map(|c| c.id.clone()).collect();
        let disks = jobs
            .call(move |sup, _| {
                for (cid, file) in &built {
                    sup.install_volume_file(&rootfs_volume(cid), file, VolumeFormat::Ext4)
                        .map_err(failed)?;
                }
                sup.update_pod(&pod_id, |p| {
                    p.state = PodState::Pending;
                    p.last_error = None;
                    for c in &mut p.containers {
                        c.rootfs = Some(rootfs_volume(&c.id));
                        c.state = "pending".into();
                        c.exit_code = None;
                    }
                })
                .map_err(failed)?;
                Ok::<_, PodError>(
                    ids.iter()
                        .map(|id| Disk {
                            volume: rootfs_volume(id),
                            read_only: false,
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .ok_or_else(loop_gone)??;
        let vm_id = vm.unwrap_or_else(|| crate::model::hyper_id("vm"));
        let inst = self.boot_vm(jobs, &vm_id, Some(plan), disks)?;
        let pod_id = plan.pod_id.clone();
        let inst2 = inst.clone();
        jobs.call(move |sup, _| sup.update_pod(&pod_id, |p| p.vm = Some(inst2)))
            .ok_or_else(loop_gone)?
            .map_err(failed)?;
        let session = self
            .session(&inst)
            .ok_or_else(|| failed("the agent session closed"))?;
        for s in starts {
            let name = s.id.clone();
            session
                .request(Request::StartContainer(s), Duration::from_secs(30))
                .map_err(|e| failed(format!("container {name}: {e}")))?;
            let (pod, cid) = (plan.pod_id.clone(), name.clone());
            jobs.post(move |sup| {
                let _ = sup.update_pod(&pod, |p| {
                    if let Some(c) = p
                        .containers
                        .iter_mut()
                        .find(|c| c.id == cid && c.state == "pending")
                    {
                        c.state = "running".into();
                    }
                });
            });
        }
        let pod = plan.pod_id.clone();
        jobs.call(move |sup, _| {
            sup.update_pod(&pod, |p| {
                if p.state == PodState::Pending {
                    p.state = PodState::Running;
                }
                settle(p);
            })
        })
        .ok_or_else(loop_gone)?
        .map_err(failed)?;
        Ok(())
    }

    /// Worker side: stops a pod's containers (SIGTERM, then SIGKILL after
    /// the grace period) and, with `stop_vm`, destroys its VM; otherwise the
    /// VM stays up, idle. The caller has claimed the pod.
    pub fn stop_pod(self: &Arc<Self>, jobs: &Jobs, pod_id: &str, stop_vm: bool) -> Result<()> {
        let pid = pod_id.to_string();
        let (inst, running, all, before) = jobs
            .call(move |sup, _| {
                sup.pod(&pid).map(|p| {
                    let running: Vec<String> = p
                        .containers
                        .iter()
                        .filter(|c| c.state == "running")
                        .map(|c| c.id.clone())
                        .collect();
                    let all: Vec<String> = p.containers.iter().map(|c| c.id.clone()).collect();
                    (p.vm.clone(), running, all, p.state)
                })
            })
            .ok_or_else(loop_gone)?
            .map_err(|e| PodError::NoSuch(e.to_string().replace(" not found", "")))?;
        let session = inst
            .as_deref()
            .and_then(|i| self.session_when_ready(i, Duration::from_secs(15)));
        let mut codes = Vec::new();
        if let Some(s) = &session {
            let grace = self.cfg.stop_timeout;
            for cid in &running {
                let r = s.request(
                    Request::StopContainer(StopContainer {
                        id: cid.clone(),
                        signal: libc::SIGTERM,
                        timeout_ms: grace.as_millis() as u64,
                    }),
                    grace + Duration::from_secs(10),
                );
                match r {
                    Ok(ok) => codes.push((cid.clone(), ok.code.unwrap_or(137))),
                    Err(e) if stop_vm => log::warn!("pod {pod_id}: stopping {cid}: {e}"),
                    Err(e) => return Err(e),
                }
            }
        } else if !stop_vm {
            return Err(failed(format!(
                "cannot reach the agent of pod {pod_id}'s VM to stop its containers; stop it with stopVM=yes"
            )));
        }
        let me = Arc::clone(self);
        match (stop_vm, inst) {
            (true, Some(inst)) => {
                if let Some(s) = &session {
                    // The agent unmounts, syncs and powers off; the VMM then
                    // exits. The VM is deleted either way.
                    s.closing.store(true, Ordering::SeqCst);
                    let _ = s.request(Request::DestroyPod, Duration::from_secs(5));
                    self.wait_vmm_exit(jobs, &inst, Duration::from_secs(10));
                }
                jobs.call(move |sup, _| {
                    me.drop_session(&inst);
                    if sup.instance(&inst).is_ok() {
                        sup.delete_instance(&inst, true).map_err(failed)?;
                    }
                    Ok::<_, PodError>(())
                })
                .ok_or_else(loop_gone)??;
            }
            (false, Some(inst)) => {
                if let Some(s) = &session {
                    // Exited ones too: this unmounts each root disk inside
                    // the VM, which stays up.
                    for cid in &all {
                        let _ = s.request(
                            Request::RemoveContainer(ember_agent::protocol::RemoveContainer {
                                id: cid.clone(),
                            }),
                            Duration::from_secs(10),
                        );
                    }
                }
                jobs.call(move |sup, _| {
                    sup.set_annotations(&inst, |a| {
                        a.remove(POD_ANN);
                    })
                    .map(|_| ())
                    .map_err(failed)
                })
                .ok_or_else(loop_gone)??;
            }
            (_, None) => {}
        }
        let pid = pod_id.to_string();
        jobs.call(move |sup, _| {
            sup.update_pod(&pid, |p| {
                for (cid, code) in &codes {
                    if let Some(c) = p.containers.iter_mut().find(|c| &c.id == cid) {
                        exited(c, *code);
                    }
                }
                for c in &mut p.containers {
                    if c.state == "running" || c.state == "pending" {
                        c.state = "failed".into();
                    }
                }
                // Stopped by request: succeeded, unless it had failed
                // before the stop (the stop's own SIGTERM exits do not
                // count).
                p.state = if before == PodState::Failed {
                    PodState::Failed
                } else {
                    PodState::Succeeded
                };
                p.vm = None;
            })
        })
        .ok_or_else(loop_gone)?
        .map_err(failed)?;
        Ok(())
    }

    fn wait_vmm_exit(&self, jobs: &Jobs, inst: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let id = inst.to_string();
            let running = jobs
                .call(move |sup, _| {
                    sup.instance(&id)
                        .ok()
                        .and_then(|i| i.process.clone())
                        .is_some_and(|p| crate::runtime::process::is_alive(&p))
                })
                .unwrap_or(false);
            if !running {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Worker side: boots an idle pod VM (no containers) and waits for its
    /// agent. Returns its hyperd id.
    pub fn create_vm(self: &Arc<Self>, jobs: &Jobs) -> Result<String> {
        let (kernel, agent) = self.requirements()?;
        let staging_dir = jobs
            .call(|sup, _| sup.store().staging_dir().join(crate::model::new_id("vm")))
            .ok_or_else(loop_gone)?;
        let staging = crate::model::store::Scratch::create(staging_dir).map_err(failed)?;
        self.ensure_image(jobs, staging.path(), &kernel, &agent)?;
        let vm_id = crate::model::hyper_id("vm");
        self.boot_vm(jobs, &vm_id, None, Vec::new())?;
        Ok(vm_id)
    }

    /// Loop side: kills a pod VM (by hyperd id). A pod running in it fails.
    pub fn kill_vm(&self, sup: &mut Supervisor, vm: &str) -> Result<()> {
        let inst = find_vm(sup, vm).ok_or_else(|| PodError::NoSuch(format!("vm {vm}")))?;
        self.drop_session(&inst);
        sup.delete_instance(&inst, true).map_err(failed)?;
        vm_lost(sup, &inst, "its VM was killed");
        gc_rootfs(sup);
        Ok(())
    }

    /// Loop side: deletes a pod; its VM (if any) is killed, its root disks
    /// removed.
    pub fn delete_pod(&self, sup: &mut Supervisor, pod: &str) -> Result<()> {
        let p = sup
            .pod(pod)
            .map_err(|_| PodError::NoSuch(format!("pod {pod}")))?
            .clone();
        if let Some(inst) = &p.vm {
            self.drop_session(inst);
            if sup.instance(inst).is_ok() {
                sup.delete_instance(inst, true).map_err(failed)?;
            }
        }
        sup.remove_pod(&p.id).map_err(failed)?;
        gc_rootfs(sup);
        Ok(())
    }

    /// After a restart: pods whose start was cut short fail (their VM is
    /// removed), pods whose VM died meanwhile fail, and the sessions of
    /// running pod VMs are re-opened in the background, learning which
    /// containers exited meanwhile.
    pub fn resume(self: &Arc<Self>, sup: &mut Supervisor, jobs: &Jobs) {
        let pods: Vec<(String, PodState, Option<String>)> = sup
            .state()
            .pods
            .values()
            .map(|p| (p.id.clone(), p.state, p.vm.clone()))
            .collect();
        for (pod, state, vm) in pods {
            let vm_running = vm
                .as_deref()
                .and_then(|v| sup.instance(v).ok())
                .is_some_and(|i| i.state == InstanceState::Running);
            if state == PodState::Pending {
                // Its VM, if the start got that far (the pod names it only
                // once the agent answered; the VM names the pod at launch).
                let made: Vec<String> = sup
                    .state()
                    .instances
                    .values()
                    .filter(|i| {
                        vm.as_deref() == Some(i.id.as_str())
                            || i.annotations.get(POD_ANN) == Some(&pod)
                    })
                    .map(|i| i.id.clone())
                    .collect();
                for inst in made {
                    let _ = sup.delete_instance(&inst, true);
                }
                let _ = sup.update_pod(&pod, |p| {
                    p.state = PodState::Failed;
                    p.vm = None;
                    p.last_error =
                        Some("emberd restarted while the pod was starting; start it again".into());
                    for c in &mut p.containers {
                        if c.state == "running" || c.state == "pending" {
                            c.state = "failed".into();
                        }
                    }
                });
            } else if let (Some(inst), false) = (vm, vm_running) {
                session_ended(sup, &inst, "the VM ended while emberd was not running");
            }
        }
        gc_rootfs(sup);
        for i in sup.state().instances.values() {
            if !i.annotations.contains_key(VM_ANN) || i.state != InstanceState::Running {
                continue;
            }
            let (inst, uds) = (i.id.clone(), sup.launcher().vsock_uds(&i.id));
            let running: Vec<String> = sup
                .state()
                .pods
                .values()
                .filter(|p| p.vm.as_deref() == Some(&inst))
                .flat_map(|p| {
                    p.containers
                        .iter()
                        .filter(|c| c.state == "running")
                        .map(|c| c.id.clone())
                })
                .collect();
            let me = Arc::clone(self);
            let jobs2 = jobs.clone();
            self.reconnecting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(inst.clone());
            jobs.spawn_background("agent-resume", Duration::ZERO, move || {
                // Retried like a fresh boot's: the agent may still be
                // closing the old emberd's connection.
                let session = me.connect(&jobs2, &inst, &uds).map(|c| {
                    me.open_session(&jobs2, &inst, c);
                    me.session(&inst)
                });
                me.reconnecting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&inst);
                match session {
                    Ok(Some(s)) => {
                        // Which containers exited while nobody listened
                        // (events sent meanwhile reach the loop by
                        // themselves).
                        let mut done = Vec::new();
                        for cid in running {
                            let req = Request::Wait(Wait {
                                id: cid.clone(),
                                timeout_ms: Some(0),
                            });
                            if let Ok(OkReply {
                                code: Some(code), ..
                            }) = s.request(req, Duration::from_secs(10))
                            {
                                done.push((cid, code));
                            }
                        }
                        Box::new(move |sup: &mut Supervisor, _: &Jobs| {
                            for (cid, code) in done {
                                container_exited(sup, &inst, &cid, code);
                            }
                        }) as crate::model::jobs::BgFinish
                    }
                    Ok(None) => Box::new(|_: &mut Supervisor, _: &Jobs| {}),
                    Err(e) => {
                        let why = format!("cannot reconnect to its agent after a restart: {e}");
                        Box::new(move |sup: &mut Supervisor, _: &Jobs| vm_lost(sup, &inst, &why))
                    }
                }
            });
        }
    }

    /// The session of `inst`, waiting (up to `timeout`) while it is being
    /// re-established after a restart.
    fn session_when_ready(&self, inst: &str, timeout: Duration) -> Option<Session> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.session(inst) {
                return Some(s);
            }
            let pending = self
                .reconnecting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(inst);
            if !pending || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Worker side: a new image from a stopped container's root disk.
    /// Returns the new image's short id.
    pub fn commit(
        &self,
        jobs: &Jobs,
        container: &str,
        repo: &str,
        changes: &crate::images::store::ImageConfigChanges,
    ) -> Result<String> {
        let key = container.to_string();
        let (image, rootfs) = jobs
            .call(move |sup, _| {
                let (pod, c) = sup
                    .state()
                    .pods
                    .values()
                    .find_map(|p| p.containers.iter().find(|c| c.id == key || c.name == key).map(|c| (p.clone(), c.clone())))
                    .ok_or_else(|| PodError::NoSuch(format!("container {key}")))?;
                if c.state == "running" || (pod.state == PodState::Pending && pod.vm.is_some()) {
                    return Err(PodError::Conflict(format!(
                        "container {} of pod {} is running: its root disk is mounted inside the pod VM; stop the pod first",
                        c.name, pod.id
                    )));
                }
                let vol = c
                    .rootfs
                    .as_deref()
                    .and_then(|v| sup.volume(v).ok())
                    .ok_or_else(|| {
                        PodError::Conflict(format!(
                            "container {} has no root filesystem yet: its pod has never started",
                            c.name
                        ))
                    })?;
                Ok((c.image.clone(), sup.store().volume_path(&vol.id)))
            })
            .ok_or_else(loop_gone)??;
        let base = self.images.get(&image).ok().map(|r| r.id);
        let rec = self
            .images
            .commit_ext4(base.as_deref(), &rootfs, repo, "", changes)
            .map_err(|e| match e {
                crate::images::store::ImageStoreError::Invalid(m) => PodError::Invalid(m),
                other => failed(other),
            })?;
        Ok(rec.short_id().to_string())
    }
}

/// The session thread: requests from the channel, events to the loop.
/// Returns why it ended.
fn run_session(
    mut client: AgentClient<UnixStream>,
    rx: &std::sync::mpsc::Receiver<Call>,
    jobs: &Jobs,
    inst: &str,
) -> String {
    let fd = client.stream().as_raw_fd();
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(call) => {
                let r = client.request(&call.req);
                let broken = matches!(&r, Err(e) if !matches!(e, ClientError::Agent(_)));
                let why = r.as_ref().err().map(|e| e.to_string());
                let _ = call.reply.send(r.map_err(|e| e.to_string()));
                post_events(jobs, inst, client.take_events());
                if broken {
                    return why.unwrap_or_default();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return "closed by emberd".into(),
        }
        // Frames the agent pushed on its own: exit events, or the end.
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            if n <= 0 {
                break;
            }
            match client.next_event() {
                Ok(ev) => post_events(jobs, inst, vec![ev]),
                Err(e) => return e.to_string(),
            }
        }
    }
}

fn post_events(jobs: &Jobs, inst: &str, events: Vec<ember_agent::Event>) {
    for ev in events {
        let ember_agent::Event::Exited { id, code } = ev;
        let inst = inst.to_string();
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
        });
    }
}

/// Loop side: a session ended without being asked to. The pod in the VM
/// fails, and a VM whose VMM is gone is removed (its record would
/// otherwise be listed as an idle VM).
fn session_ended(sup: &mut Supervisor, inst: &str, why: &str) {
    vm_lost(sup, inst, why);
    let dead = sup
        .instance(inst)
        .ok()
        .map(|i| !i.process.as_ref().is_some_and(crate::runtime::process::is_alive));
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

/// Removes root disks whose container no longer exists and that no VM
/// holds.
pub fn gc_rootfs(sup: &mut Supervisor) {
    let live: HashSet<String> = sup
        .state()
        .pods
        .values()
        .flat_map(|p| p.containers.iter().map(|c| rootfs_volume(&c.id)))
        .collect();
    let dead: Vec<String> = sup
        .state()
        .volumes
        .values()
        .filter(|v| v.name.starts_with("container-") && v.name.ends_with("-rootfs"))
        .filter(|v| v.attachment.is_none() && !live.contains(&v.name))
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
    use crate::images::oci::ImageConfig;

    fn plan() -> ContainerPlan {
        ContainerPlan {
            id: "container-abc".into(),
            name: "web".into(),
            image: "nginx:1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn commands_follow_docker_rules() {
        let cfg = ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
            env: vec!["A=1".into(), "PATH=/bin".into(), "EMPTY".into()],
            working_dir: "/srv".into(),
            ..Default::default()
        };
        let s = resolve(&plan(), &cfg, "/dev/vda").unwrap();
        assert_eq!(s.cmd, ["/entry", "serve"]);
        assert_eq!(s.workdir.as_deref(), Some("/srv"));
        assert_eq!(
            s.env,
            [
                ("A".into(), "1".into()),
                ("PATH".into(), "/bin".into()),
                ("EMPTY".into(), "".into())
            ]
        );
        assert_eq!(
            s.rootfs,
            Rootfs::BlockDevice {
                path: "/dev/vda".into(),
                fstype: "ext4".into(),
                readonly: false
            }
        );
        // A command replaces Cmd only.
        let mut p = plan();
        p.command = vec!["other".into()];
        assert_eq!(
            resolve(&p, &cfg, "/dev/vda").unwrap().cmd,
            ["/entry", "other"]
        );
        // An entrypoint drops the image's Cmd.
        p.command.clear();
        p.entrypoint = vec!["/bin/sh".into(), "-c".into()];
        assert_eq!(
            resolve(&p, &cfg, "/dev/vda").unwrap().cmd,
            ["/bin/sh", "-c"]
        );
        // Env from the pod overrides; PATH is supplied when missing.
        let mut p = plan();
        p.env = vec![("A".into(), "2".into()), ("B".into(), "3".into())];
        p.workdir = "/w".into();
        let s = resolve(
            &p,
            &ImageConfig {
                cmd: vec!["x".into()],
                ..Default::default()
            },
            "/dev/vdb",
        )
        .unwrap();
        assert_eq!(s.workdir.as_deref(), Some("/w"));
        assert_eq!(
            s.env,
            [
                ("A".into(), "2".into()),
                ("B".into(), "3".into()),
                ("PATH".into(), DEFAULT_PATH.into())
            ]
        );
    }

    #[test]
    fn bad_containers_are_refused() {
        let e = resolve(&plan(), &ImageConfig::default(), "/dev/vda").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("bad parameter: container web has no command"),
            "{e}"
        );
        let cfg = ImageConfig {
            cmd: vec!["x".into()],
            user: "nginx".into(),
            ..Default::default()
        };
        let e = resolve(&plan(), &cfg, "/dev/vda").unwrap_err();
        assert!(e.to_string().contains("not numeric"), "{e}");
        let cfg = ImageConfig {
            cmd: vec!["x".into()],
            user: "101:102".into(),
            ..Default::default()
        };
        assert_eq!(
            resolve(&plan(), &cfg, "/dev/vda").unwrap().user.as_deref(),
            Some("101:102")
        );
        let mut p = plan();
        p.env = vec![("A=B".into(), "1".into())];
        let cfg = ImageConfig {
            cmd: vec!["x".into()],
            ..Default::default()
        };
        assert!(resolve(&p, &cfg, "/dev/vda").is_err());
    }

    #[test]
    fn devices_and_names() {
        assert_eq!(disk_device(0).unwrap(), "/dev/vda");
        assert_eq!(disk_device(25).unwrap(), "/dev/vdz");
        assert!(disk_device(26).is_err());
        assert_eq!(rootfs_volume("container-x"), "container-x-rootfs");
    }

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
