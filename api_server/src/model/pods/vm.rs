//! Pod VMs: booting them, their agent sessions, and the worker side of
//! starting, stopping and committing pods. Everything here that blocks
//! runs on worker threads and changes the model only through
//! [`Jobs::call`] / [`Jobs::post`].

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::protocol::{OkReply, Request, StopContainer, Wait};
use ember_agent::AgentClient;

use super::plan::{disk_device, resolve, rootfs_volume, PodPlan};
use super::storage::{pod_volume_name, VolumeKind};
use super::{
    container_exited, exited, failed, find_vm, gc_rootfs, loop_gone, post_events, session_ended,
    settle, vm_lost, PodError, Pods, Result, POD_ANN, POD_CMDLINE, POD_IMAGE, VM_ANN,
};
use crate::images::store::{ImageConfigChanges, ImageStoreError};
use crate::model::jobs::Jobs;
use crate::model::supervisor::{RunRequest, Supervisor};
use crate::model::{Disk, Image, InstanceState, NetInterface, PodState, VolumeFormat};
use crate::runtime::agent::Session;
use crate::runtime::netdev;
use crate::runtime::process;

/// Pod volume files to install (volume name, file) and the volume disks.
type VolumeDisks = (Vec<(String, PathBuf)>, Vec<Disk>);

impl Pods {
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
        use crate::build::kmod::{self, KmodError};
        // A Linux kernel must either have the modules ember's devices need
        // installed, or a configuration showing them built in (kmod's docs);
        // anything else is refused here rather than timing out later. An
        // image with no Linux version string (ember's test guest, a
        // unikernel) is not Linux and gets no modules.
        let modules = match kmod::closure(kernel, &kmod::modules_root()) {
            Ok(c) => Some(c),
            Err(e @ KmodError::NoVersion(_)) => {
                log::warn!("pod kernel {}: {e}; packing no modules", kernel.display());
                None
            }
            Err(e) => {
                return Err(failed(format!(
                    "the pod kernel {} cannot be used: {e}",
                    kernel.display()
                )))
            }
        };
        crate::build::pod_initramfs::build_with_modules(
            agent,
            &dir.join("initrd"),
            modules.as_ref(),
        )
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
            snapshot_starts: None,
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

    /// Worker side: the pod's volume disks, after the root disks. Empty pod
    /// volumes that do not exist yet are made (returned as (volume name,
    /// file) to install); ember volumes must exist. A disk is read-only
    /// when every container mounts it read-only.
    fn volume_disks(&self, jobs: &Jobs, staging: &Path, plan: &PodPlan) -> Result<VolumeDisks> {
        let first = plan.containers.len();
        let mut wanted = Vec::new();
        for (i, v) in plan.volumes.iter().enumerate() {
            let dev = disk_device(first + i)?;
            let mounts: Vec<bool> = plan
                .containers
                .iter()
                .flat_map(|c| c.mounts.iter())
                .filter(|m| m.device == dev)
                .map(|m| m.readonly)
                .collect();
            let read_only = !mounts.is_empty() && mounts.iter().all(|r| *r);
            let name = match &v.kind {
                VolumeKind::Empty => pod_volume_name(&plan.pod_id, &v.name),
                VolumeKind::Ember(n) => n.clone(),
            };
            wanted.push((name, v.kind == VolumeKind::Empty, read_only));
        }
        let w = wanted.clone();
        // Which exist (by name), and their canonical names.
        let found: Vec<Option<String>> = jobs
            .call(move |sup, _| {
                w.iter()
                    .map(|(n, _, _)| sup.state().volume(n).map(|v| v.name.clone()))
                    .collect()
            })
            .ok_or_else(loop_gone)?;
        let mut files = Vec::new();
        let mut disks = Vec::new();
        for ((name, empty, read_only), have) in wanted.into_iter().zip(found) {
            let volume = match (have, empty) {
                (Some(n), _) => n,
                (None, true) => {
                    let file = staging.join(format!("{name}.img"));
                    crate::images::volumes::create_empty_ext4(&file, self.cfg.rootfs_mb)
                        .map_err(|e| failed(format!("pod volume {name}: {e}")))?;
                    files.push((name.clone(), file));
                    name
                }
                (None, false) => return Err(PodError::NoSuch(format!("volume {name}"))),
            };
            disks.push(Disk { volume, read_only });
        }
        Ok((files, disks))
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

    /// Starts the session for instance `inst` over `client`; its events
    /// and its end are applied to the model.
    fn open_session(self: &Arc<Self>, jobs: &Jobs, inst: &str, client: AgentClient<UnixStream>) {
        let (session, runner) = Session::new();
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(inst.to_string(), session);
        let events = (jobs.clone(), inst.to_string(), Arc::clone(&self.stdio));
        let jobs = jobs.clone();
        let inst = inst.to_string();
        let me = Arc::clone(self);
        let started = runner.start(
            client,
            move |evs: Vec<ember_agent::Event>| {
                // The model's update is queued before attached clients
                // learn of an exit (a bridge waits for the queue before it
                // closes, so a client's next request sees the exit).
                post_events(&events.0, &events.1, &evs);
                for ev in &evs {
                    events.2.event(ev);
                }
            },
            move |session: Session, why: String| {
                // Only forget the session if it is still ours.
                let mut s = me.sessions.lock().unwrap_or_else(|p| p.into_inner());
                if s.get(&inst).is_some_and(|x| x.same(&session)) {
                    s.remove(&inst);
                }
                drop(s);
                if !session.is_closing() {
                    me.stop_forwarding(&inst);
                    log::warn!("pod VM {inst}: agent session ended: {why}");
                    // The connection closes while the VMM exits: give the
                    // process a moment to be gone before judging the VM.
                    let id = inst.clone();
                    let p = jobs
                        .call(move |sup, _| sup.instance(&id).ok().and_then(|i| i.process.clone()))
                        .flatten();
                    let t = Instant::now();
                    while p.as_ref().is_some_and(process::is_alive)
                        && t.elapsed() < Duration::from_secs(1)
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    jobs.post(move |sup| session_ended(sup, &inst, &why));
                }
            },
        );
        if let Err(e) = started {
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
        // Pod interfaces: TAPs named from the VM id (the supervisor makes
        // them, owned by the VMM's uid); eth0's address as the kernel's ip=.
        let nics = pod.map(|p| p.interfaces.clone()).unwrap_or_default();
        let interfaces: Vec<NetInterface> = nics
            .iter()
            .enumerate()
            .map(|(i, n)| NetInterface {
                host_dev_name: netdev::tap_name(vm_id, i),
                guest_mac: n.mac.clone(),
                macvtap_parent: None,
            })
            .collect();
        if let Some(addr) = nics.first().and_then(|n| n.address.as_ref()) {
            let host = if netdev::validate_hostname(&hostname).is_ok() {
                hostname.as_str()
            } else {
                ""
            };
            let ip = netdev::kernel_ip_param(addr, "eth0", host).map_err(failed)?;
            boot_args = format!("{boot_args} {ip}");
        }
        for (n, tap) in nics.iter().zip(&interfaces) {
            if let Some(b) = &n.bridge {
                if !netdev::tap_exists(b, None) {
                    return Err(PodError::NoSuch(format!(
                        "bridge {b} (for the pod's TAP {})",
                        tap.host_dev_name
                    )));
                }
            }
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
            interfaces: interfaces.clone(),
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
        // The TAPs exist now: they join their bridges, or an unbridged one
        // takes the gateway address (so the host, and port mappings, reach
        // the pod through it), before the guest is asked for anything.
        for (n, tap) in nics.iter().zip(&interfaces) {
            let res = match (&n.bridge, n.host_address()) {
                (Some(b), _) => netdev::add_to_bridge(&tap.host_dev_name, b, None)
                    .map_err(|e| format!("pod interface on bridge {b}: {e}")),
                (None, Some((gw, prefix))) => {
                    netdev::set_ipv4(&tap.host_dev_name, gw, prefix, None).map_err(|e| {
                        format!(
                            "gateway address {gw}/{prefix} on {}: {e}",
                            tap.host_dev_name
                        )
                    })
                }
                (None, None) => Ok(()),
            };
            if let Err(e) = res {
                let id = inst.clone();
                jobs.post(move |sup| {
                    let _ = sup.delete_instance(&id, true);
                });
                return Err(failed(e));
            }
        }
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
        let (vol_files, vol_disks) = self.volume_disks(jobs, staging.path(), plan)?;
        // Install the disks; the pod is pending until its containers run.
        let pod_id = plan.pod_id.clone();
        let ids: Vec<String> = plan.containers.iter().map(|c| c.id.clone()).collect();
        let disks = jobs
            .call(move |sup, _| {
                for (cid, file) in &built {
                    sup.install_volume_file(&rootfs_volume(cid), file, VolumeFormat::Ext4)
                        .map_err(failed)?;
                }
                for (name, file) in &vol_files {
                    sup.install_volume_file(name, file, VolumeFormat::Ext4)
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
                        .chain(vol_disks)
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
        // Host ports listen before the containers start.
        self.forward_ports(&inst, &plan.ports)?;
        for s in starts {
            let name = s.id.clone();
            self.stdio.keep_logs(&name);
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
        if let Some(i) = inst.as_deref() {
            self.stop_forwarding(i);
        }
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
                    Err(e) => return Err(failed(e)),
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
                    s.close();
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
                p.paused = false;
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
                        .is_some_and(|p| process::is_alive(&p))
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
        for c in &p.containers {
            self.stdio.forget(&c.id);
        }
        self.forget_execs(&p.id);
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
            // Its pod's port mappings are forwarded again.
            let ports: Vec<crate::runtime::portfwd::Port> = sup
                .state()
                .pods
                .values()
                .find(|p| p.vm.as_deref() == Some(&inst))
                .and_then(|p| serde_json::from_str(&p.spec).ok())
                .and_then(|v| super::ops::forward_plan(&v).ok())
                .unwrap_or_default();
            let all: Vec<String> = sup
                .state()
                .pods
                .values()
                .filter(|p| p.vm.as_deref() == Some(&inst))
                .flat_map(|p| p.containers.iter().map(|c| c.id.clone()))
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
                let session = me.connect(&jobs2, &inst, &uds).map(|mut c| {
                    me.seed_logs(&jobs2, &inst, &mut c, &all);
                    me.open_session(&jobs2, &inst, c);
                    me.session(&inst)
                });
                me.reconnecting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&inst);
                match session {
                    Ok(Some(s)) => {
                        if let Err(e) = me.forward_ports(&inst, &ports) {
                            log::warn!("pod VM {inst}: port mappings after a restart: {e}");
                        }
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
        changes: &ImageConfigChanges,
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
                ImageStoreError::Invalid(m) => PodError::Invalid(m),
                other => failed(other),
            })?;
        Ok(rec.short_id().to_string())
    }
}
