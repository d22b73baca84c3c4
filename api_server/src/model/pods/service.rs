//! The pod operations a face calls. Each checks and claims on the loop
//! thread, and what blocks comes back as a job whose `run` a worker thread
//! calls; the face only turns the results into its wire format.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use super::plan::{parse_pod, plan, PodPlan};
use super::{find_vm, BusyGuard, PodError, Pods, Result, POD_ANN, VM_ANN};
use crate::images::registry::{self, Credentials};
use crate::images::store::{hyperd_list_entry, ImageConfigChanges};
use crate::model::jobs::Jobs;
use crate::model::supervisor::Supervisor;
use crate::model::{hyper_id, new_id, InstanceState, PodContainer, PodState};

/// A pod start, checked and claimed; [`StartJob::run`] does it.
pub struct StartJob {
    pods: Arc<Pods>,
    plan: PodPlan,
    vm: Option<String>,
    _claims: (BusyGuard, Option<BusyGuard>),
}

impl StartJob {
    /// The pod's id.
    pub fn pod_id(&self) -> &str {
        &self.plan.pod_id
    }

    /// Worker side: starts the pod (see [`Pods::start_pod`]).
    pub fn run(self, jobs: &Jobs) -> Result<()> {
        let StartJob {
            pods,
            plan,
            vm,
            _claims,
        } = self;
        pods.start_pod(jobs, plan, vm)
    }
}

/// A pod stop, checked and claimed; [`StopJob::run`] does it.
pub struct StopJob {
    pods: Arc<Pods>,
    pod_id: String,
    stop_vm: bool,
    _claim: BusyGuard,
}

impl StopJob {
    /// The pod's id.
    pub fn pod_id(&self) -> &str {
        &self.pod_id
    }

    /// Worker side: stops the pod (see [`Pods::stop_pod`]).
    pub fn run(self, jobs: &Jobs) -> Result<()> {
        self.pods.stop_pod(jobs, &self.pod_id, self.stop_vm)
    }
}

/// An idle VM to boot; [`VmJob::run`] boots it.
pub struct VmJob {
    pods: Arc<Pods>,
}

impl VmJob {
    /// Worker side: boots the VM; returns its hyperd id.
    pub fn run(self, jobs: &Jobs) -> Result<String> {
        self.pods.create_vm(jobs)
    }
}

/// A commit, its pod claimed; [`CommitJob::run`] does it.
pub struct CommitJob {
    pods: Arc<Pods>,
    container: String,
    repo: String,
    changes: ImageConfigChanges,
    _claim: Option<BusyGuard>,
}

impl CommitJob {
    /// Worker side: the new image; returns its short id.
    pub fn run(self, jobs: &Jobs) -> Result<String> {
        self.pods
            .commit(jobs, &self.container, &self.repo, &self.changes)
    }
}

/// Where an imported image comes from.
pub enum ImageSource {
    /// An OCI layout directory or a tarball on the host (as the request
    /// named it; it must lie under the import directory).
    Path(String),
    /// A tarball uploaded with the request (its bytes, shared rather than
    /// copied: a large upload is a map of the HTTP layer's spool file).
    Upload(Upload),
    /// An image reference, pulled from its registry (with the request's
    /// own credentials, if it carried any).
    Registry(String, Option<Credentials>),
}

/// Uploaded bytes as a worker can hold them.
pub type Upload = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A checked [`ImageSource`].
enum Source {
    Path(PathBuf),
    Upload(Upload),
    Registry(String, Option<Credentials>),
}

/// An image import, ready for a worker; [`ImportJob::run`] does it.
pub struct ImportJob {
    pods: Arc<Pods>,
    staging: PathBuf,
    source: Source,
    tag: Option<String>,
}

/// Where a push goes.
enum PushDest {
    /// An OCI layout under the export directory.
    Layout(PathBuf),
    /// A registry reference (`host[:port]/repo[:tag]`), with the
    /// request's credentials.
    Registry(String, Option<Credentials>),
}

/// An image push, its destination checked; [`PushJob::run`] does it.
pub struct PushJob {
    pods: Arc<Pods>,
    name: String,
    dest: PushDest,
}

impl PushJob {
    /// The image pushed.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it goes: the layout's path or the registry reference.
    pub fn dest(&self) -> String {
        match &self.dest {
            PushDest::Layout(p) => p.display().to_string(),
            PushDest::Registry(r, _) => r.clone(),
        }
    }

    /// Worker side: writes the image into the OCI layout or pushes it to
    /// the registry (`progress` gets Docker's JSON lines); returns the
    /// manifest digest.
    pub fn run(&self, progress: &mut dyn FnMut(Value)) -> Result<String> {
        Ok(match &self.dest {
            PushDest::Layout(p) => self.pods.images.push(&self.name, p, None)?,
            PushDest::Registry(r, creds) => {
                self.pods
                    .images
                    .push_to_registry(&self.name, r, creds.as_ref(), progress)?
            }
        })
    }
}

/// An imported image.
pub struct Imported {
    pub short_id: String,
    pub name: String,
}

impl ImportJob {
    /// Worker side: imports (or pulls) the image; `progress` gets Docker's
    /// JSON lines of a pull.
    pub fn run(self, progress: &mut dyn FnMut(Value)) -> Result<Imported> {
        let res = (|| {
            let src = match self.source {
                Source::Registry(r, creds) => {
                    let rec = self.pods.images.pull(&r, creds.as_ref(), progress)?;
                    return Ok(Imported {
                        short_id: rec.short_id().to_string(),
                        name: rec.name(),
                    });
                }
                Source::Path(p) => p,
                Source::Upload(body) => {
                    std::fs::create_dir_all(&self.staging).map_err(super::failed)?;
                    let f = self.staging.join("upload.tar");
                    std::fs::write(&f, (*body).as_ref()).map_err(super::failed)?;
                    f
                }
            };
            let r = self.pods.images.import(&src, None, self.tag.as_deref())?;
            Ok(Imported {
                short_id: r.short_id().to_string(),
                name: r.name(),
            })
        })();
        let _ = std::fs::remove_dir_all(&self.staging);
        res
    }
}

impl Pods {
    /// Records a new pod from hyperd's spec `text` (every image must
    /// exist); returns its id.
    pub fn create_pod(&self, sup: &mut Supervisor, text: &str) -> Result<String> {
        let spec = parse_pod(text)?;
        let name = if spec.id.is_empty() {
            hyper_id("pod")
        } else {
            spec.id.clone()
        };
        for c in &spec.containers {
            self.images.get(&c.image)?;
        }
        let containers = spec
            .containers
            .iter()
            .map(|c| PodContainer {
                id: hyper_id("container"),
                name: c.name.clone(),
                image: c.image.clone(),
                state: "pending".into(),
                ..Default::default()
            })
            .collect();
        Ok(sup.create_pod(&name, text, containers)?.id)
    }

    /// Loop side of a pod start: in a new VM, or in the idle VM `vm` (its
    /// hyperd id). Without a kernel or agent the pod fails at once.
    pub fn prepare_start(
        self: &Arc<Self>,
        sup: &mut Supervisor,
        pod_id: &str,
        vm: Option<&str>,
    ) -> Result<StartJob> {
        let pod = sup.pod(pod_id)?.clone();
        let vm_inst = match vm {
            Some(vm) => Some(find_vm(sup, vm).ok_or_else(|| PodError::NoSuch(format!("vm {vm}")))?),
            None => None,
        };
        if pod.state == PodState::Running {
            return Err(PodError::Conflict(format!(
                "pod {} is already running",
                pod.id
            )));
        }
        if pod.vm.is_some() {
            return Err(PodError::Conflict(format!(
                "pod {} has {} but its VM is still up; stop it first (pod/stop)",
                pod.id,
                pod.state.as_str()
            )));
        }
        if let (Some(vm), Some(inst)) = (vm, &vm_inst) {
            let i = sup.instance(inst)?;
            if let Some(p) = i.annotations.get(POD_ANN) {
                return Err(PodError::Conflict(format!(
                    "vm {vm} is associated with pod {p}"
                )));
            }
            if i.state != InstanceState::Running {
                return Err(PodError::Conflict(format!("vm {vm} is not running")));
            }
        }
        let plan = plan(&pod)?;
        if let Err(e) = self.requirements() {
            let msg = e.to_string();
            let _ = sup.update_pod(&pod.id, |p| {
                p.state = PodState::Failed;
                p.last_error = Some(msg);
            });
            return Err(e);
        }
        let guard = self.claim(&pod.id)?;
        let vm_guard = vm.map(|v| self.claim(v)).transpose()?;
        sup.update_pod(&pod.id, |p| {
            p.state = PodState::Pending;
            p.last_error = None;
        })?;
        Ok(StartJob {
            pods: Arc::clone(self),
            plan,
            vm: vm.map(str::to_string),
            _claims: (guard, vm_guard),
        })
    }

    /// Loop side of a pod stop (`stop_vm`: destroy its VM too).
    pub fn prepare_stop(
        self: &Arc<Self>,
        sup: &Supervisor,
        pod_id: &str,
        stop_vm: bool,
    ) -> Result<StopJob> {
        let pod = sup.pod(pod_id)?;
        // A pod whose containers have all ended still has its VM to stop.
        if pod.vm.is_none() {
            return Err(PodError::Conflict(format!("pod {} is not running", pod.id)));
        }
        if pod.paused {
            // Its agent cannot answer while the vCPUs are paused.
            return Err(PodError::Conflict(format!(
                "pod {} is paused; unpause it first",
                pod.id
            )));
        }
        let pod_id = pod.id.clone();
        Ok(StopJob {
            _claim: self.claim(&pod_id)?,
            pods: Arc::clone(self),
            pod_id,
            stop_vm,
        })
    }

    /// Deletes a pod (its VM killed, its disks removed); returns its id.
    pub fn delete(self: &Arc<Self>, sup: &mut Supervisor, pod_id: &str) -> Result<String> {
        let id = sup.pod(pod_id)?.id.clone();
        let _claim = self.claim(&id)?;
        self.delete_pod(sup, &id)?;
        Ok(id)
    }

    /// Checks that idle VMs can be made; the job boots one.
    pub fn prepare_create_vm(self: &Arc<Self>) -> Result<VmJob> {
        self.requirements()?;
        Ok(VmJob {
            pods: Arc::clone(self),
        })
    }

    /// Kills the pod VM with hyperd id `vm`.
    pub fn kill(self: &Arc<Self>, sup: &mut Supervisor, vm: &str) -> Result<()> {
        let _claim = self.claim(vm)?;
        self.kill_vm(sup, vm)
    }

    /// Loop side of `/container/commit`: a new image `repo` from container
    /// `container`'s root disk, with the Docker container `config` applied.
    pub fn prepare_commit(
        self: &Arc<Self>,
        sup: &Supervisor,
        container: &str,
        repo: &str,
        config: &Value,
    ) -> Result<CommitJob> {
        // One operation per pod at a time: a start must not change the disk
        // while it is read.
        let pod = sup
            .state()
            .pods
            .values()
            .find(|p| {
                p.containers
                    .iter()
                    .any(|c| c.id == container || c.name == container)
            })
            .map(|p| p.id.clone());
        let claim = pod.map(|p| self.claim(&p)).transpose()?;
        Ok(CommitJob {
            pods: Arc::clone(self),
            container: container.to_string(),
            repo: repo.to_string(),
            changes: ImageConfigChanges::from_docker_json(config),
            _claim: claim,
        })
    }

    /// hyperd's lines for the container images (`all`: untagged ones too).
    pub fn image_list(&self, all: bool) -> Vec<String> {
        self.images
            .list()
            .iter()
            .filter(|r| all || r.is_named())
            .map(hyperd_list_entry)
            .collect()
    }

    /// How many container images there are.
    pub fn image_count(&self) -> usize {
        self.images.list().len()
    }

    /// Loop side of an image import; the job runs on a worker.
    pub fn prepare_import(
        self: &Arc<Self>,
        sup: &Supervisor,
        source: ImageSource,
        tag: Option<String>,
    ) -> Result<ImportJob> {
        let source = match source {
            ImageSource::Path(p) => Source::Path(
                sup.host_paths()
                    .import("imageName", &p)
                    .map_err(|e| PodError::Invalid(e.to_string()))?,
            ),
            ImageSource::Upload(b) => Source::Upload(b),
            ImageSource::Registry(r, c) => Source::Registry(r, c),
        };
        Ok(ImportJob {
            pods: Arc::clone(self),
            staging: sup.store().staging_dir().join(new_id("import")),
            source,
            tag,
        })
    }

    /// Loop side of a push. `remote` is an OCI layout path (under the
    /// export directory) that image `tag` is written to, or a registry
    /// repository. For a registry, as hyperctl sends it (`remote` the
    /// repository, `tag` a plain tag or empty for `latest`), the stored
    /// image `remote:tag` goes to `remote:tag`; otherwise `tag` names the
    /// stored image and `remote` the full target reference.
    pub fn prepare_push(
        self: &Arc<Self>,
        sup: &Supervisor,
        tag: Option<&str>,
        remote: &str,
        creds: Option<Credentials>,
    ) -> Result<PushJob> {
        let tag = tag.filter(|t| !t.is_empty());
        if registry::is_reference(remote) {
            registry::parse_reference(remote).map_err(|e| PodError::Invalid(e.to_string()))?;
            let plain_tag = tag.unwrap_or("latest");
            let is_tag = plain_tag.len() <= 128
                && !plain_tag.starts_with(['.', '-'])
                && plain_tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            let bare =
                !remote.contains('@') && !remote.rsplit('/').next().unwrap_or("").contains(':');
            let hyperctl = format!("{remote}:{plain_tag}");
            if bare && is_tag && self.images.get(&hyperctl).is_ok() {
                return Ok(PushJob {
                    pods: Arc::clone(self),
                    name: hyperctl.clone(),
                    dest: PushDest::Registry(hyperctl, creds),
                });
            }
            let name = tag.ok_or_else(|| {
                PodError::Invalid(format!(
                    "no image {hyperctl} to push, and no tag naming the image to push to {remote}"
                ))
            })?;
            return Ok(PushJob {
                pods: Arc::clone(self),
                name: name.to_string(),
                dest: PushDest::Registry(remote.to_string(), creds),
            });
        }
        let dest = PushDest::Layout(
            sup.host_paths()
                .export("remote", remote)
                .map_err(|e| PodError::Invalid(e.to_string()))?,
        );
        let name =
            tag.ok_or_else(|| PodError::Invalid("tag (the image to push) is required".into()))?;
        Ok(PushJob {
            pods: Arc::clone(self),
            name: name.to_string(),
            dest,
        })
    }

    /// Removes a container image, unless a pod uses it (`force`: anyway).
    pub fn remove_image(&self, sup: &Supervisor, id: &str, force: bool) -> Result<()> {
        let rec = self.images.get(id)?;
        let used = sup.state().pods.values().any(|p| {
            p.containers.iter().any(|c| {
                self.images
                    .get(&c.image)
                    .map(|r| r.id == rec.id)
                    .unwrap_or(false)
            })
        });
        if used && !force {
            return Err(PodError::Conflict(format!(
                "image {id} is used by a pod; remove the pod or use force=yes"
            )));
        }
        self.images.remove(id, force)?;
        Ok(())
    }

    /// Worker side: builds an image from a Dockerfile in the tar `context`;
    /// `progress` gets hyperd's JSON progress lines. Returns its short id.
    pub fn build_image(
        &self,
        context: &[u8],
        dockerfile: &str,
        tag: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<String> {
        Ok(self
            .images
            .build(context, dockerfile, tag, progress)?
            .short_id()
            .to_string())
    }
}

/// The hyperd id of the pod VM that is instance `inst`.
pub fn vm_id(sup: &Supervisor, inst: &str) -> Option<String> {
    sup.instance(inst).ok()?.annotations.get(VM_ANN).cloned()
}

/// Every pod VM: its hyperd id and the pod it runs ("" when idle).
pub fn vms(sup: &Supervisor) -> Vec<(String, String)> {
    sup.state()
        .instances
        .values()
        .filter_map(|i| {
            let vm = i.annotations.get(VM_ANN)?;
            Some((
                vm.clone(),
                i.annotations.get(POD_ANN).cloned().unwrap_or_default(),
            ))
        })
        .collect()
}
