//! The hyperd API (../shared/seeds/hyperd-api.md): pods, VMs, containers,
//! images, `/info`, `/auth`. Command replies use hyperd's envelope
//! `{"ID", "Code", "Cause"}`; like the original, the HTTP status of an error
//! follows its message: "no such" 404, "bad parameter" 400, "conflict" 409,
//! anything else 500.
//!
//! This face only translates: pods are model records, and their VMs are run
//! by [`crate::model::pods`] (a Linux kernel with `ember-agent` as init, one ext4
//! disk per container, the agent over vsock). Without a kernel for pod VMs,
//! starting a pod or creating a VM answers a clear error.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ember_http::{Method, Reply, Request, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use std::sync::Arc;

use crate::images::store::{ImageConfigChanges, ImageStore, ImageStoreError};
use crate::model::{PodContainer, PodState};
use crate::model::pods::{ContainerPlan, PodError, PodPlan, PodVmConfig, Pods, POD_ANN, VM_ANN};
use crate::model::jobs::Jobs;
use crate::server::{Ctx, Face, Finish};
use crate::model::supervisor::{ErrorKind, Supervisor, SupervisorError};

/// Errors from hyperd requests; the message decides the status.
#[derive(Debug, thiserror::Error)]
pub enum HyperdError {
    #[error("bad parameter: {0}")]
    BadParameter(String),
    #[error("no such {0}")]
    NoSuch(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("{0}")]
    Other(String),
}

impl From<PodError> for HyperdError {
    fn from(e: PodError) -> Self {
        match e {
            PodError::NoSuch(m) => HyperdError::NoSuch(m),
            PodError::Invalid(m) => HyperdError::BadParameter(m),
            PodError::Conflict(m) => HyperdError::Conflict(m),
            other => HyperdError::Other(other.to_string()),
        }
    }
}

impl From<SupervisorError> for HyperdError {
    fn from(e: SupervisorError) -> Self {
        match e.kind() {
            ErrorKind::NotFound => HyperdError::NoSuch(e.to_string().replace(" not found", "")),
            ErrorKind::Invalid => HyperdError::BadParameter(e.to_string()),
            ErrorKind::Conflict => HyperdError::Conflict(e.to_string()),
            ErrorKind::Internal => HyperdError::Other(e.to_string()),
        }
    }
}

/// The HTTP status hyperd gave an error message.
pub fn status_for(msg: &str) -> u16 {
    let m = msg.to_ascii_lowercase();
    if m.contains("no such") {
        404
    } else if m.contains("bad parameter") {
        400
    } else if m.contains("conflict") {
        409
    } else {
        500
    }
}

/// `{"ID", "Code", "Cause"}` for success.
pub fn ok(id: &str) -> Response {
    Response::json(200, &json!({"ID": id, "Code": 0, "Cause": ""}))
}

/// The envelope for an error.
pub fn fail(e: &HyperdError) -> Response {
    let msg = e.to_string();
    Response::json(status_for(&msg), &json!({"ID": "", "Code": 1, "Cause": msg}))
}

/// A pod spec (only what ember reads; unknown fields are ignored, as the
/// seed's open schema asks).
#[derive(Debug, Default, Deserialize)]
pub struct PodSpec {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub containers: Vec<ContainerSpec>,
    #[serde(default)]
    pub resource: Option<Resource>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A container in a pod spec.
#[derive(Debug, Default, Deserialize)]
pub struct ContainerSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub workdir: String,
    #[serde(default)]
    pub envs: Vec<EnvSpec>,
}

/// One `{"env": NAME, "value": VALUE}` of a container.
#[derive(Debug, Default, Deserialize)]
pub struct EnvSpec {
    #[serde(default)]
    pub env: String,
    #[serde(default)]
    pub value: String,
}

/// Pod resources (defaults: 1 vCPU, 128 MB).
#[derive(Debug, Default, Deserialize)]
pub struct Resource {
    #[serde(default)]
    pub vcpu: u32,
    #[serde(default)]
    pub memory: u32,
}

/// Parses and checks a pod spec.
pub fn parse_pod(text: &str) -> Result<PodSpec, HyperdError> {
    let mut spec: PodSpec = serde_json::from_str(text)
        .map_err(|e| HyperdError::BadParameter(format!("pod spec is not valid JSON: {e}")))?;
    // Known parts of hyperd's spec that ember does not do yet are refused
    // rather than silently dropped (empty lists are fine).
    let raw: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let used = |v: &Value, key: &str| v.get(key).is_some_and(|x| !x.is_null() && x != &json!([]) && x != &json!({}));
    for key in ["volumes", "files", "interfaces", "portmappings", "services"] {
        if used(&raw, key) {
            return Err(HyperdError::BadParameter(format!(
                "pod {key} are not supported by emberd yet"
            )));
        }
    }
    for (i, c) in raw["containers"].as_array().into_iter().flatten().enumerate() {
        for key in ["volumes", "files", "ports"] {
            if used(c, key) {
                return Err(HyperdError::BadParameter(format!(
                    "container {i}: {key} are not supported by emberd yet"
                )));
            }
        }
    }
    if spec.containers.is_empty() {
        return Err(HyperdError::BadParameter("a pod needs at least one container".into()));
    }
    for (i, c) in spec.containers.iter_mut().enumerate() {
        if c.image.is_empty() {
            return Err(HyperdError::BadParameter(format!("container {i} has no image")));
        }
        if c.name.is_empty() {
            c.name = format!("{}-{i}", c.image.split([':', '/']).next_back().unwrap_or("c"));
        }
        // Names appear in /list's colon-joined lines and name containers
        // in /container/commit.
        crate::model::validate_name("container", &c.name)
            .map_err(|e| HyperdError::BadParameter(e.to_string()))?;
    }
    let mut names = std::collections::BTreeSet::new();
    for c in &spec.containers {
        if !names.insert(c.name.as_str()) {
            return Err(HyperdError::BadParameter(format!(
                "two containers are named {}",
                c.name
            )));
        }
    }
    if spec.containers.len() > 26 {
        return Err(HyperdError::BadParameter(format!(
            "a pod has at most 26 containers (one disk each), not {}",
            spec.containers.len()
        )));
    }
    if let Some(r) = &spec.resource {
        if r.vcpu > 32 {
            return Err(HyperdError::BadParameter(format!("resource.vcpu {} is more than 32", r.vcpu)));
        }
        if r.memory > 1 << 20 {
            return Err(HyperdError::BadParameter(format!("resource.memory {} MB is more than 1048576", r.memory)));
        }
    }
    let host_ok = |h: &str| {
        h.len() <= 63 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !host_ok(&spec.hostname) {
        return Err(HyperdError::BadParameter(format!(
            "hostname {:?} is not a host name (letters, digits, '-' and '.', at most 63)",
            spec.hostname
        )));
    }
    for c in &spec.containers {
        for e in &c.envs {
            if e.env.is_empty() || e.env.contains('=') || e.env.chars().any(char::is_control) {
                return Err(HyperdError::BadParameter(format!(
                    "container {}: bad environment variable name {:?}",
                    c.name, e.env
                )));
            }
        }
    }
    Ok(spec)
}

fn memtotal() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
        })
        .unwrap_or_else(|| "Linux".into())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Where registry credentials are kept (mode 0600).
fn auth_path(sup: &Supervisor) -> PathBuf {
    sup.store().root().join("auth.json")
}

impl From<ImageStoreError> for HyperdError {
    fn from(e: ImageStoreError) -> Self {
        // The store's messages already carry hyperd's words.
        match e {
            ImageStoreError::NotFound(m) => HyperdError::NoSuch(format!("image: {m}")),
            ImageStoreError::Invalid(m) => HyperdError::BadParameter(m),
            ImageStoreError::Conflict(m) => HyperdError::Conflict(m),
            // RUN, URLs, zstd...: what the user asked for, not a server fault.
            ImageStoreError::Unsupported(m) => HyperdError::BadParameter(m),
            other => HyperdError::Other(other.to_string()),
        }
    }
}

/// JSON lines, hyperd's progress format, with the status an error implies.
fn lines(status: u16, items: &[Value]) -> Response {
    let mut body = Vec::new();
    for v in items {
        body.extend_from_slice(v.to_string().as_bytes());
        body.push(b'\n');
    }
    Response::bytes(status, "application/json", body)
}

fn fail_lines(e: &HyperdError, mut progress: Vec<Value>) -> Response {
    let msg = e.to_string();
    progress.push(json!({"error": msg, "errorDetail": {"message": msg}}));
    lines(status_for(&msg), &progress)
}

/// The hyperd face.
pub struct Hyperd {
    images: Arc<ImageStore>,
    pods: Arc<Pods>,
}

impl Hyperd {
    /// A face whose container images live in `images` and whose pod VMs are
    /// made as `pod_vms` says.
    pub fn new(images: ImageStore, pod_vms: PodVmConfig) -> Self {
        let images = Arc::new(images);
        Hyperd {
            pods: Pods::new(pod_vms, images.clone()),
            images,
        }
    }

    /// The start plan of a pod: its stored spec with the model's container
    /// ids.
    fn plan(&self, pod: &crate::model::Pod) -> Result<PodPlan, HyperdError> {
        let spec = parse_pod(&pod.spec)?;
        if spec.containers.len() != pod.containers.len() {
            return Err(HyperdError::Other(format!("pod {} does not match its spec", pod.id)));
        }
        let (vcpu, memory) = spec.resource.as_ref().map(|r| (r.vcpu, r.memory)).unwrap_or((0, 0));
        Ok(PodPlan {
            pod_id: pod.id.clone(),
            hostname: if spec.hostname.is_empty() { pod.name.clone() } else { spec.hostname.clone() },
            vcpus: if vcpu == 0 { 1 } else { vcpu as u8 },
            memory_mb: if memory == 0 { 128 } else { memory },
            containers: spec
                .containers
                .iter()
                .zip(&pod.containers)
                .map(|(s, c)| ContainerPlan {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    image: c.image.clone(),
                    command: s.command.clone(),
                    entrypoint: s.entrypoint.clone(),
                    workdir: s.workdir.clone(),
                    env: s.envs.iter().map(|e| (e.env.clone(), e.value.clone())).collect(),
                })
                .collect(),
        })
    }

    fn images_get(&self, req: &Request) -> Response {
        let all = req.query_param("all") == Some("yes");
        let list: Vec<String> = self
            .images
            .list()
            .iter()
            .filter(|r| all || r.is_named())
            .map(crate::images::store::hyperd_list_entry)
            .collect();
        Response::json(200, &json!({"imagesList": list}))
    }

    fn image_create(&self, ctx: &mut Ctx, req: &Request) -> Reply {
        let name = req.query_param("imageName").unwrap_or("").to_string();
        let store = self.images.clone();
        let body = req.body.clone();
        let source = std::path::Path::new(&name);
        let (path, tag): (Option<PathBuf>, Option<String>) = if !body.is_empty() {
            // An uploaded tarball, named by imageName.
            (None, (!name.is_empty()).then(|| name.clone()))
        } else if source.is_absolute() && source.exists() {
            (Some(source.to_path_buf()), None)
        } else if name.is_empty() {
            return Reply::Now(fail(&HyperdError::BadParameter(
                "imageName (a path to an OCI layout or docker save tarball) or an uploaded tarball is required".into(),
            )));
        } else {
            return Reply::Now(fail_lines(
                &HyperdError::Other(format!(
                    "cannot pull {name}: emberd has no registry access; import an OCI image layout or a docker save tarball instead (imageName=/absolute/path, or upload the tarball as the request body)"
                )),
                vec![json!({"status": format!("Pulling {name}")})],
            ));
        };
        let staging = ctx
            .sup
            .store()
            .staging_dir()
            .join(crate::model::new_id("import"));
        ctx.spawn("image-import", move || {
            let res = (|| -> Result<crate::images::store::ImageRecord, HyperdError> {
                let src = match path {
                    Some(p) => p,
                    None => {
                        std::fs::create_dir_all(&staging).map_err(|e| HyperdError::Other(e.to_string()))?;
                        let f = staging.join("upload.tar");
                        std::fs::write(&f, &body).map_err(|e| HyperdError::Other(e.to_string()))?;
                        f
                    }
                };
                Ok(store.import(&src, None, tag.as_deref())?)
            })();
            let _ = std::fs::remove_dir_all(&staging);
            Box::new(move |_: &mut Supervisor| match res {
                Ok(r) => lines(
                    200,
                    &[
                        json!({"status": "Importing"}),
                        json!({"status": format!("Imported {} as {}", r.short_id(), r.name())}),
                    ],
                ),
                Err(e) => fail_lines(&e, vec![json!({"status": "Importing"})]),
            }) as Finish
        })
    }

    fn image_remove(&self, ctx: &mut Ctx, req: &Request) -> Response {
        let Some(id) = req.query_param("imageId") else {
            return fail(&HyperdError::BadParameter("imageId is required".into()));
        };
        let force = req.query_param("force") == Some("yes");
        let rec = match self.images.get(id) {
            Ok(r) => r,
            Err(e) => return fail(&e.into()),
        };
        let used = ctx.sup.state().pods.values().any(|p| {
            p.containers
                .iter()
                .any(|c| self.images.get(&c.image).map(|r| r.id == rec.id).unwrap_or(false))
        });
        if used && !force {
            return fail(&HyperdError::Conflict(format!(
                "image {id} is used by a pod; remove the pod or use force=yes"
            )));
        }
        match self.images.remove(id, force) {
            Ok(_) => ok(id),
            Err(e) => fail(&e.into()),
        }
    }

    fn image_build(&self, ctx: &mut Ctx, req: &Request) -> Reply {
        let tag = req.query_param("t").unwrap_or("").to_string();
        let dockerfile = req.query_param("dockerfile").unwrap_or("Dockerfile").to_string();
        if req.query_param("remote").is_some_and(|r| !r.is_empty()) {
            return Reply::Now(fail(&HyperdError::BadParameter(
                "remote build sources are not supported: send the build context as a tar body".into(),
            )));
        }
        if req.body.is_empty() {
            return Reply::Now(fail(&HyperdError::BadParameter(
                "the build context (a tar archive) is required as the request body".into(),
            )));
        }
        let store = self.images.clone();
        let body = req.body.clone();
        ctx.spawn("image-build", move || {
            let mut progress = Vec::new();
            let res = store.build(&body, &dockerfile, &tag, &mut |line: &str| {
                progress.push(serde_json::from_str(line).unwrap_or_else(|_| json!({"stream": line})));
            });
            Box::new(move |_: &mut Supervisor| match res {
                Ok(r) => {
                    progress.push(json!({"stream": format!("Successfully built {}\n", r.short_id())}));
                    lines(200, &progress)
                }
                Err(e) => fail_lines(&e.into(), progress),
            }) as Finish
        })
    }

    fn image_push(&self, ctx: &mut Ctx, req: &Request) -> Reply {
        let Some(remote) = req.query_param("remote").map(str::to_string) else {
            return Reply::Now(fail(&HyperdError::BadParameter("remote is required".into())));
        };
        let dest = PathBuf::from(&remote);
        if !dest.is_absolute() {
            return Reply::Now(fail(&HyperdError::BadParameter(format!(
                "remote {remote:?} must be an absolute path to a local OCI layout directory (emberd has no registry access)"
            ))));
        }
        let tag = req.query_param("tag").map(str::to_string);
        let store = self.images.clone();
        ctx.spawn("image-push", move || {
            // The image is the layout's last path component unless a tag names it.
            let name = tag.clone().unwrap_or_default();
            let res = if name.is_empty() {
                Err(HyperdError::BadParameter("tag (the image to push) is required".into()))
            } else {
                store.push(&name, &dest, None).map_err(HyperdError::from)
            };
            Box::new(move |_: &mut Supervisor| match res {
                Ok(d) => lines(
                    200,
                    &[
                        json!({"status": format!("Pushing {name} to {}", dest.display())}),
                        json!({"status": format!("Pushed {d}")}),
                    ],
                ),
                Err(e) => fail_lines(&e, vec![]),
            }) as Finish
        })
    }

    fn commit(&self, ctx: &mut Ctx, req: &Request) -> Reply {
        let Some(cid) = req.query_param("container").map(str::to_string) else {
            return Reply::Now(fail(&HyperdError::BadParameter("container is required".into())));
        };
        let Some(repo) = req.query_param("repo").filter(|r| !r.is_empty()).map(str::to_string) else {
            return Reply::Now(fail(&HyperdError::BadParameter(
                "repo (the new image's name) is required".into(),
            )));
        };
        let repo = match req.query_param("tag").filter(|t| !t.is_empty()) {
            Some(t) => format!("{repo}:{t}"),
            None => repo,
        };
        let config: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => {
                    return Reply::Now(fail(&HyperdError::BadParameter(format!(
                        "the container config body is not valid JSON: {e}"
                    ))))
                }
            }
        };
        let changes = ImageConfigChanges::from_docker_json(&config);
        // One operation per pod at a time: a start must not change the disk
        // while it is read.
        let pod = ctx
            .sup
            .state()
            .pods
            .values()
            .find(|p| p.containers.iter().any(|c| c.id == cid || c.name == cid))
            .map(|p| p.id.clone());
        let guard = match pod.map(|p| self.pods.claim(&p)).transpose() {
            Ok(g) => g,
            Err(e) => return Reply::Now(fail(&e.into())),
        };
        let pods = self.pods.clone();
        let jobs = ctx.jobs.clone();
        ctx.spawn("commit", move || {
            let res = pods.commit(&jobs, &cid, &repo, &changes);
            drop(guard);
            Box::new(move |_: &mut Supervisor| match res {
                Ok(id) => ok(&id),
                Err(e) => fail(&e.into()),
            }) as Finish
        })
    }

    fn pod_create(&mut self, ctx: &mut Ctx, req: &Request) -> Response {
        let text = match req.query_param("podArgs") {
            Some(a) => a.to_string(),
            None => String::from_utf8_lossy(&req.body).to_string(),
        };
        if text.trim().is_empty() {
            return fail(&HyperdError::BadParameter("podArgs (the pod JSON) is required".into()));
        }
        let spec = match parse_pod(&text) {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        let name = if spec.id.is_empty() {
            crate::model::hyper_id("pod")
        } else {
            spec.id.clone()
        };
        for c in &spec.containers {
            if let Err(e) = self.images.get(&c.image) {
                return fail(&e.into());
            }
        }
        let containers = spec
            .containers
            .iter()
            .map(|c| PodContainer {
                id: crate::model::hyper_id("container"),
                name: c.name.clone(),
                image: c.image.clone(),
                state: "pending".into(),
                ..Default::default()
            })
            .collect();
        match ctx.sup.create_pod(&name, &text, containers) {
            Ok(p) => ok(&p.id),
            Err(e) => fail(&e.into()),
        }
    }

    fn pod_start(&mut self, ctx: &mut Ctx, req: &Request) -> Reply {
        match self.try_pod_start(ctx, req) {
            Ok(r) => r,
            Err(e) => Reply::Now(fail(&e)),
        }
    }

    fn try_pod_start(&mut self, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
        let id = req
            .query_param("podId")
            .ok_or_else(|| HyperdError::BadParameter("podId is required".into()))?;
        let pod = ctx.sup.pod(id)?.clone();
        let vm = req.query_param("vmId").filter(|v| !v.is_empty()).map(str::to_string);
        let vm_inst = match &vm {
            Some(vm) => Some(
                crate::model::pods::find_vm(ctx.sup, vm).ok_or_else(|| HyperdError::NoSuch(format!("vm {vm}")))?,
            ),
            None => None,
        };
        if pod.state == PodState::Running {
            return Err(HyperdError::Conflict(format!("pod {} is already running", pod.id)));
        }
        if pod.vm.is_some() {
            return Err(HyperdError::Conflict(format!(
                "pod {} has {} but its VM is still up; stop it first (pod/stop)",
                pod.id,
                pod.state.as_str()
            )));
        }
        if let (Some(vm), Some(inst)) = (&vm, &vm_inst) {
            let i = ctx.sup.instance(inst)?;
            if let Some(p) = i.annotations.get(POD_ANN) {
                return Err(HyperdError::Conflict(format!("vm {vm} is associated with pod {p}")));
            }
            if i.state != crate::model::InstanceState::Running {
                return Err(HyperdError::Conflict(format!("vm {vm} is not running")));
            }
        }
        let plan = self.plan(&pod)?;
        if let Err(e) = self.pods.requirements() {
            let msg = e.to_string();
            let _ = ctx.sup.update_pod(&pod.id, |p| {
                p.state = PodState::Failed;
                p.last_error = Some(msg);
            });
            return Err(e.into());
        }
        let guard = self.pods.claim(&pod.id)?;
        let vm_guard = match &vm {
            Some(v) => Some(self.pods.claim(v)?),
            None => None,
        };
        ctx.sup.update_pod(&pod.id, |p| {
            p.state = PodState::Pending;
            p.last_error = None;
        })?;
        let pods = self.pods.clone();
        let jobs = ctx.jobs.clone();
        let pod_id = pod.id.clone();
        Ok(ctx.spawn("pod-start", move || {
            let res = pods.start_pod(&jobs, plan, vm);
            drop((guard, vm_guard));
            Box::new(move |_: &mut Supervisor| match res {
                Ok(()) => ok(&pod_id),
                Err(e) => fail(&e.into()),
            }) as Finish
        }))
    }

    fn pod_stop(&mut self, ctx: &mut Ctx, req: &Request) -> Reply {
        let Some(id) = req.query_param("podId") else {
            return Reply::Now(fail(&HyperdError::BadParameter("podId is required".into())));
        };
        let stop_vm = match req.query_param("stopVM").unwrap_or("yes") {
            "yes" => true,
            "no" => false,
            other => {
                return Reply::Now(fail(&HyperdError::BadParameter(format!(
                    "stopVM must be yes or no, not {other:?}"
                ))))
            }
        };
        let pod = match ctx.sup.pod(id) {
            Ok(p) => p.clone(),
            Err(e) => return Reply::Now(fail(&e.into())),
        };
        // A pod whose containers have all ended still has its VM to stop.
        if pod.vm.is_none() {
            return Reply::Now(fail(&HyperdError::Conflict(format!("pod {} is not running", pod.id))));
        }
        let guard = match self.pods.claim(&pod.id) {
            Ok(g) => g,
            Err(e) => return Reply::Now(fail(&e.into())),
        };
        let pods = self.pods.clone();
        let jobs = ctx.jobs.clone();
        ctx.spawn("pod-stop", move || {
            let res = pods.stop_pod(&jobs, &pod.id, stop_vm);
            drop(guard);
            Box::new(move |_: &mut Supervisor| match res {
                Ok(()) => ok(&pod.id),
                Err(e) => fail(&e.into()),
            }) as Finish
        })
    }

    fn pod_delete(&mut self, ctx: &mut Ctx, req: &Request) -> Response {
        let Some(id) = req.query_param("podId") else {
            return fail(&HyperdError::BadParameter("podId is required".into()));
        };
        let pod = match ctx.sup.pod(id) {
            Ok(p) => p.clone(),
            Err(e) => return fail(&e.into()),
        };
        let _guard = match self.pods.claim(&pod.id) {
            Ok(g) => g,
            Err(e) => return fail(&e.into()),
        };
        match self.pods.delete_pod(ctx.sup, &pod.id) {
            Ok(()) => ok(&pod.id),
            Err(e) => fail(&e.into()),
        }
    }

    fn vm_create(&mut self, ctx: &mut Ctx) -> Reply {
        if let Err(e) = self.pods.requirements() {
            return Reply::Now(fail(&e.into()));
        }
        let pods = self.pods.clone();
        let jobs = ctx.jobs.clone();
        ctx.spawn("vm-create", move || {
            let res = pods.create_vm(&jobs);
            Box::new(move |_: &mut Supervisor| match res {
                Ok(vm) => ok(&vm),
                Err(e) => fail(&e.into()),
            }) as Finish
        })
    }

    fn vm_kill(&mut self, ctx: &mut Ctx, req: &Request) -> Response {
        let Some(vm) = req.query_param("vm") else {
            return fail(&HyperdError::BadParameter("vm is required".into()));
        };
        let _guard = match self.pods.claim(vm) {
            Ok(g) => g,
            Err(e) => return fail(&e.into()),
        };
        match self.pods.kill_vm(ctx.sup, vm) {
            Ok(()) => ok(vm),
            Err(e) => fail(&e.into()),
        }
    }

    fn list(&mut self, ctx: &mut Ctx, req: &Request) -> Response {
        let item = req.query_param("item").unwrap_or("");
        let sup = &ctx.sup;
        match item {
            "pod" => {
                let data: Vec<String> = sup
                    .state()
                    .pods
                    .values()
                    .map(|p| {
                        let vm = p.vm.as_ref().and_then(|v| vm_id_of(sup, v)).unwrap_or_default();
                        format!("{}:{}:{}:{}", p.id, p.name, vm, p.state.as_str())
                    })
                    .collect();
                Response::json(200, &json!({"item": "pod", "podData": data}))
            }
            "container" => {
                let data: Vec<String> = sup
                    .state()
                    .pods
                    .values()
                    .flat_map(|p| {
                        p.containers
                            .iter()
                            .map(move |c| format!("{}:{}:{}:{}", c.id, c.name, p.id, c.state))
                    })
                    .collect();
                Response::json(200, &json!({"item": "container", "cData": data}))
            }
            "vm" => {
                let data: Vec<String> = sup
                    .state()
                    .instances
                    .values()
                    .filter_map(|i| {
                        let vm = i.annotations.get(VM_ANN)?;
                        let pod = i.annotations.get(POD_ANN).cloned().unwrap_or_default();
                        let status = if pod.is_empty() { "idle" } else { "associated" };
                        Some(format!("{vm}:{pod}:{status}"))
                    })
                    .collect();
                Response::json(200, &json!({"item": "vm", "vmData": data}))
            }
            other => Response::json(
                400,
                &json!({"ID": "", "Code": 1, "Cause": format!("bad parameter: Can not support {other} list!")}),
            ),
        }
    }

    fn info(&mut self, ctx: &mut Ctx) -> Response {
        let s = ctx.sup.state();
        let containers: usize = s.pods.values().map(|p| p.containers.len()).sum();
        let root = ctx.sup.store().root().display().to_string();
        Response::json(
            200,
            &json!({
                "ID": hostname(),
                "Containers": containers,
                "Images": self.images.list().len(),
                "Driver": "ember",
                "DriverStatus": [["Root Dir", root]],
                "DockerRootDir": root,
                "IndexServerAddress": "",
                "ExecutionDriver": "ember-vmm",
                "MemTotal": memtotal(),
                "Pods": s.pods.len(),
                "Operating System": os_name(),
                "Name": hostname(),
            }),
        )
    }

    fn auth(&mut self, ctx: &mut Ctx, req: &Request) -> Response {
        #[derive(Deserialize)]
        struct Auth {
            #[serde(default)]
            username: String,
            #[serde(default)]
            password: String,
            #[serde(default)]
            email: String,
            #[serde(default)]
            serveraddress: String,
        }
        let a: Auth = match serde_json::from_slice(&req.body) {
            Ok(a) => a,
            Err(e) => return fail(&HyperdError::BadParameter(format!("auth body is not valid JSON: {e}"))),
        };
        if a.username.is_empty() {
            return fail(&HyperdError::BadParameter("username is required".into()));
        }
        let server = if a.serveraddress.is_empty() {
            "https://index.docker.io/v1/".to_string()
        } else {
            a.serveraddress.clone()
        };
        let path = auth_path(ctx.sup);
        let mut all: serde_json::Map<String, Value> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        all.insert(
            server,
            json!({"username": a.username, "password": a.password, "email": a.email}),
        );
        let data = serde_json::to_vec(&Value::Object(all)).unwrap_or_default();
        if let Err(e) = write_private(&path, &data) {
            return fail(&HyperdError::Other(format!("cannot store credentials: {e}")));
        }
        Response::json(200, &json!({"Status": "Login Succeeded", "IdentityToken": ""}))
    }
}

/// Writes `data` atomically to a file only root can read (0600).
fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn vm_id_of(sup: &Supervisor, inst: &str) -> Option<String> {
    sup.instance(inst).ok()?.annotations.get(VM_ANN).cloned()
}

impl Face for Hyperd {
    fn handle(&mut self, ctx: &mut Ctx, req: &Request) -> Option<Reply> {
        let path = req.path.trim_end_matches('/');
        let r = match (&req.method, path) {
            (Method::Get, "/info") => self.info(ctx),
            (Method::Get, "/list") => self.list(ctx, req),
            (Method::Post, "/pod/create") => self.pod_create(ctx, req),
            (Method::Post, "/pod/start") => return Some(self.pod_start(ctx, req)),
            (Method::Post, "/pod/stop") => return Some(self.pod_stop(ctx, req)),
            (Method::Delete, "/pod") => self.pod_delete(ctx, req),
            (Method::Post, "/vm/create") => return Some(self.vm_create(ctx)),
            (Method::Delete, "/vm") => self.vm_kill(ctx, req),
            (Method::Post, "/auth") => self.auth(ctx, req),
            (Method::Get, "/images/get") => self.images_get(req),
            (Method::Post, "/image/create") => return Some(self.image_create(ctx, req)),
            (Method::Delete, "/image") => self.image_remove(ctx, req),
            (Method::Post, "/image/build") => return Some(self.image_build(ctx, req)),
            (Method::Post, "/image/push" | "/images/push") => return Some(self.image_push(ctx, req)),
            (Method::Post, "/container/commit") => return Some(self.commit(ctx, req)),
            (_, "/info" | "/list" | "/pod/create" | "/pod/start" | "/pod/stop" | "/pod" | "/vm/create"
                | "/vm" | "/auth" | "/images/get" | "/image/create" | "/image" | "/image/build"
                | "/image/push" | "/container/commit") => Response::json(
                405,
                &json!({"ID": "", "Code": 1, "Cause": format!("method {} is not allowed on {}", req.method, req.path)}),
            ),
            _ => return None,
        };
        Some(Reply::Now(r))
    }

    fn resume(&mut self, sup: &mut Supervisor, jobs: &Jobs) {
        self.pods.resume(sup, jobs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_message() {
        assert_eq!(status_for(&HyperdError::NoSuch("pod x".into()).to_string()), 404);
        assert_eq!(status_for(&HyperdError::BadParameter("x".into()).to_string()), 400);
        assert_eq!(status_for(&HyperdError::Conflict("x".into()).to_string()), 409);
        assert_eq!(status_for("boom"), 500);
    }

    #[test]
    fn pod_specs() {
        let p = parse_pod(r#"{"id":"web","containers":[{"image":"busybox:latest"}],"x":1}"#).unwrap();
        assert_eq!(p.containers[0].name, "latest-0");
        assert!(parse_pod("{}").is_err());
        assert!(parse_pod(r#"{"containers":[{"name":"a"}]}"#).is_err());
        assert!(parse_pod("nope").is_err());
        assert!(parse_pod(r#"{"containers":[{"image":"a"}],"resource":{"vcpu":99}}"#).is_err());
        // Parts ember does not do are refused unless empty.
        let e = parse_pod(r#"{"containers":[{"image":"a"}],"volumes":[{"name":"v"}]}"#).unwrap_err();
        assert_eq!(e.to_string(), "bad parameter: pod volumes are not supported by emberd yet");
        let e = parse_pod(r#"{"containers":[{"image":"a","ports":[{"containerPort":80}]}]}"#).unwrap_err();
        assert!(e.to_string().contains("container 0: ports"), "{e}");
        assert!(parse_pod(r#"{"containers":[{"image":"a","volumes":[],"files":null}],"volumes":[],"portmappings":[],"dns":["1.1.1.1"]}"#).is_ok());
        assert!(parse_pod(r#"{"hostname":"a b","containers":[{"image":"a"}]}"#).is_err());
        let e = parse_pod(r#"{"containers":[{"image":"a","name":"x:y"}]}"#).unwrap_err();
        assert!(e.to_string().starts_with("bad parameter"), "{e}");
        let e = parse_pod(r#"{"containers":[{"image":"a","name":"x"},{"image":"b","name":"x"}]}"#).unwrap_err();
        assert_eq!(e.to_string(), "bad parameter: two containers are named x");
        assert!(parse_pod(r#"{"containers":[{"image":"a"},{"image":"a"}]}"#).is_ok());
        assert!(parse_pod(r#"{"containers":[{"image":"a","envs":[{"env":"","value":"x"}]}]}"#).is_err());
    }
}
