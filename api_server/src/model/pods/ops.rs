//! hyperd's smaller pod and container operations: labels, signals (pod and
//! container kill), pausing and resuming a pod's VM, port mappings,
//! containers added to, renamed in, stopped in or removed from a pod, and
//! saving images. Loop-side checks here; what blocks comes back as a job
//! for a worker thread, like the operations in `service.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ember_agent::protocol::{Request, Signal, StopContainer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::plan::parse_pod;
use super::{failed, loop_gone, BusyGuard, PodError, Pods, Result};
use crate::model::jobs::Jobs;
use crate::model::supervisor::Supervisor;
use crate::model::{hyper_id, Pod, PodContainer, PodState};
use crate::runtime::agent::Session;
use crate::runtime::portfwd::{Forwarder, Port, Proto};
use crate::runtime::vmm_api::{self, VmState};

/// One of hyperd's port mappings: ports are strings, a single port or a
/// range `"8000-8010"`; the protocol is `tcp` or `udp`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    #[serde(default, deserialize_with = "port_string")]
    pub container_port: String,
    #[serde(default, deserialize_with = "port_string")]
    pub host_port: String,
    #[serde(default)]
    pub protocol: String,
}

/// Ports arrive as strings (hyperctl) or numbers (the seed's examples).
fn port_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => {
            return Err(serde::de::Error::custom(format!(
                "a port is a number or a string, not {other}"
            )))
        }
    })
}

/// A port or a range of ports, as hyperd's `Formalize` read them.
fn port_range(what: &str, s: &str) -> Result<(u16, u16)> {
    let bad = || {
        PodError::Invalid(format!(
            "{what} {s:?} is not a port (1-65535) or a range of ports"
        ))
    };
    let one = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (one(a).ok_or_else(bad)?, one(b).ok_or_else(bad)?);
            if a > b {
                return Err(bad());
            }
            Ok((a, b))
        }
        None => one(s).map(|p| (p, p)).ok_or_else(bad),
    }
}

impl PortMapping {
    /// Checks the ports and protocol (`tcp` when empty) and returns the
    /// mapping in hyperd's normal form.
    pub fn formalize(&self) -> Result<PortMapping> {
        let protocol = match self.protocol.to_ascii_lowercase().as_str() {
            "" | "tcp" => "tcp",
            "udp" => "udp",
            other => {
                return Err(PodError::Invalid(format!(
                    "port mapping protocol {other:?} is neither tcp nor udp"
                )))
            }
        };
        let c = port_range("containerPort", &self.container_port)?;
        let h = port_range("hostPort", &self.host_port)?;
        let show = |(a, b): (u16, u16)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        };
        if c.0 != c.1 && c.1 - c.0 != h.1 - h.0 {
            return Err(PodError::Invalid(format!(
                "port range {} cannot map to {}: the ranges differ in length",
                show(h),
                show(c)
            )));
        }
        Ok(PortMapping {
            container_port: show(c),
            host_port: show(h),
            protocol: protocol.into(),
        })
    }
}

/// Why port mappings are refused without a pod address.
pub const NO_POD_NETWORK: &str = "port mappings need the pod's address: give the pod an interface with an ip (e.g. \"interfaces\": [{\"ip\": \"10.0.0.2/24\"}])";

/// The ports to forward for a pod spec's `portmappings`, to its first
/// interface's address. Host and container ranges must have the same
/// length; two mappings may not share a host port and protocol.
pub fn forward_plan(spec: &Value) -> Result<Vec<Port>> {
    let maps: Vec<PortMapping> = serde_json::from_value(spec["portmappings"].clone())
        .map_err(|e| PodError::Invalid(format!("portmappings: {e}")))
        .or_else(|e| {
            if spec["portmappings"].is_null() {
                Ok(Vec::new())
            } else {
                Err(e)
            }
        })?;
    if maps.is_empty() {
        return Ok(Vec::new());
    }
    let ip: std::net::IpAddr = spec["interfaces"][0]["ip"]
        .as_str()
        .and_then(|ip| ip.split('/').next())
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| PodError::Invalid(NO_POD_NETWORK.into()))?;
    let mut out: Vec<Port> = Vec::new();
    for m in &maps {
        let m = m.formalize()?;
        let (h, c) = (
            port_range("hostPort", &m.host_port)?,
            port_range("containerPort", &m.container_port)?,
        );
        if h.1 - h.0 != c.1 - c.0 {
            return Err(PodError::Invalid(format!(
                "port mapping {} -> {}: give one host port per container port",
                m.host_port, m.container_port
            )));
        }
        let proto = if m.protocol == "udp" {
            Proto::Udp
        } else {
            Proto::Tcp
        };
        for k in 0..=(h.1 - h.0) {
            let port = Port {
                proto,
                host: h.0 + k,
                target: std::net::SocketAddr::new(ip, c.0 + k),
            };
            if out
                .iter()
                .any(|p| p.proto == port.proto && p.host == port.host)
            {
                return Err(PodError::Conflict(format!(
                    "host port {} ({}) is mapped twice",
                    port.host, m.protocol
                )));
            }
            out.push(port);
        }
    }
    Ok(out)
}

/// A signal for containers of a running pod; [`SignalJob::run`] sends it.
pub struct SignalJob {
    session: Session,
    targets: Vec<String>,
    signal: i32,
    id: String,
}

impl SignalJob {
    /// Worker side: signals every target through the agent; returns the
    /// pod (or container) id the request named.
    pub fn run(self) -> Result<String> {
        for t in &self.targets {
            self.session
                .request(
                    Request::Signal(Signal {
                        id: t.clone(),
                        signal: self.signal,
                    }),
                    Duration::from_secs(10),
                )
                .map_err(|e| failed(format!("container {t}: {e}")))?;
        }
        Ok(self.id)
    }
}

/// What a kill request became.
pub enum Kill {
    /// Done on the loop (SIGKILL to a whole pod: its VM was killed).
    Done(String),
    /// Signals to send from a worker.
    Signal(SignalJob),
}

/// A pause or resume of a pod's VM; [`PauseJob::run`] does it.
pub struct PauseJob {
    pod_id: String,
    sock: PathBuf,
    pause: bool,
    _claim: BusyGuard,
}

impl PauseJob {
    /// Worker side: asks the VMM to pause (or resume) the vCPUs, then
    /// records it.
    pub fn run(self, jobs: &Jobs) -> Result<()> {
        let state = if self.pause {
            VmState::Paused
        } else {
            VmState::Resumed
        };
        vmm_api::set_vm_state(&self.sock, state).map_err(failed)?;
        let (pod, pause) = (self.pod_id.clone(), self.pause);
        jobs.call(move |sup, _| sup.update_pod(&pod, |p| p.paused = pause))
            .ok_or_else(loop_gone)?
            .map_err(failed)?;
        Ok(())
    }
}

/// One container stop; [`ContainerStopJob::run`] does it.
pub struct ContainerStopJob {
    session: Session,
    pod_id: String,
    container: String,
    grace: Duration,
    _claim: BusyGuard,
}

impl ContainerStopJob {
    /// Worker side: SIGTERM, then SIGKILL after the grace period; the exit
    /// is recorded. Returns the container id.
    pub fn run(self, jobs: &Jobs) -> Result<String> {
        let reply = self
            .session
            .request(
                Request::StopContainer(StopContainer {
                    id: self.container.clone(),
                    signal: libc::SIGTERM,
                    timeout_ms: self.grace.as_millis() as u64,
                }),
                self.grace + Duration::from_secs(10),
            )
            .map_err(|e| failed(format!("container {}: {e}", self.container)))?;
        let code = reply.code.unwrap_or(137);
        let (pod, cid) = (self.pod_id.clone(), self.container.clone());
        jobs.call(move |sup, _| {
            sup.update_pod(&pod, |p| {
                if let Some(c) = p.containers.iter_mut().find(|c| c.id == cid) {
                    super::exited(c, code);
                }
                super::settle(p);
            })
        })
        .ok_or_else(loop_gone)?
        .map_err(failed)?;
        Ok(self.container)
    }
}

/// The pod holding container `key` (id or name) and its index there.
pub fn find_container<'a>(sup: &'a Supervisor, key: &str) -> Option<(&'a Pod, usize)> {
    // Ids first: a name may repeat across pods, ids never do.
    let pods = &sup.state().pods;
    pods.values()
        .find_map(|p| {
            p.containers
                .iter()
                .position(|c| c.id == key)
                .map(|i| (p, i))
        })
        .or_else(|| {
            pods.values().find_map(|p| {
                p.containers
                    .iter()
                    .position(|c| c.name == key)
                    .map(|i| (p, i))
            })
        })
}

fn no_container(key: &str) -> PodError {
    PodError::NoSuch(format!("container {key}"))
}

/// A signal number hyperd's clients send (1-64).
fn check_signal(signal: i64) -> Result<i32> {
    if (1..=64).contains(&signal) {
        Ok(signal as i32)
    } else {
        Err(PodError::Invalid(format!(
            "signal {signal} is not a signal number (1-64)"
        )))
    }
}

/// The stored spec as JSON, to edit.
fn spec_value(pod: &Pod) -> Result<Value> {
    serde_json::from_str(&pod.spec)
        .map_err(|e| failed(format!("pod {}: its stored spec is not JSON: {e}", pod.id)))
}

impl Pods {
    /// The id (`sha256:...`) of container image `name`, if it exists.
    pub fn image_id(&self, name: &str) -> Option<String> {
        self.images.get(name).ok().map(|r| r.digest())
    }

    /// The config of container image `name`, if it can be read.
    pub fn image_config(&self, name: &str) -> Option<crate::images::oci::ImageConfig> {
        self.images.open_image(name).ok().map(|i| i.config)
    }

    /// The session of a pod's running VM, or why there is none.
    fn running_session(&self, pod: &Pod) -> Result<Session> {
        if pod.paused {
            return Err(PodError::Conflict(format!(
                "pod {} is paused; unpause it first",
                pod.id
            )));
        }
        let inst = pod
            .vm
            .as_deref()
            .filter(|_| {
                matches!(
                    pod.state,
                    PodState::Running | PodState::Succeeded | PodState::Failed
                )
            })
            .ok_or_else(|| PodError::Conflict(format!("pod {} is not running", pod.id)))?;
        self.session(inst).ok_or_else(|| {
            failed(format!(
                "the agent of pod {}'s VM is not connected (yet); try again",
                pod.id
            ))
        })
    }

    /// `/pod/labels`: adds `labels` to a pod; an existing key is replaced
    /// only with `overwrite` (hyperd's "override"). Returns the pod id.
    pub fn set_labels(
        &self,
        sup: &mut Supervisor,
        pod: &str,
        labels: &BTreeMap<String, String>,
        overwrite: bool,
    ) -> Result<String> {
        let p = sup.pod(pod)?.clone();
        let mut spec = spec_value(&p)?;
        let mut current: BTreeMap<String, String> =
            serde_json::from_value(spec["labels"].clone()).unwrap_or_default();
        if !overwrite {
            if let Some(k) = labels.keys().find(|k| current.contains_key(*k)) {
                return Err(PodError::Conflict(format!(
                    "Can't update label {k} without override flag"
                )));
            }
        }
        for (k, v) in labels {
            if k.is_empty() || k.chars().any(char::is_control) || v.chars().any(char::is_control) {
                return Err(PodError::Invalid(format!("label {k:?} is not a label")));
            }
            current.insert(k.clone(), v.clone());
        }
        spec["labels"] = serde_json::to_value(&current).map_err(failed)?;
        let text = spec.to_string();
        sup.update_pod(&p.id, |p| p.spec = text)?;
        Ok(p.id)
    }

    /// A pod's labels.
    pub fn labels(pod: &Pod) -> BTreeMap<String, String> {
        serde_json::from_str::<Value>(&pod.spec)
            .ok()
            .and_then(|v| serde_json::from_value(v["labels"].clone()).ok())
            .unwrap_or_default()
    }

    /// `/pod/kill`: `signal` to every container of a running pod, or to
    /// the one named `container`. SIGKILL to the whole pod kills its VM
    /// (hyperd's "force quit of the sandbox"), and the pod fails.
    pub fn prepare_kill_pod(
        self: &Arc<Self>,
        sup: &mut Supervisor,
        pod: &str,
        container: Option<&str>,
        signal: i64,
    ) -> Result<Kill> {
        let signal = check_signal(signal)?;
        let p = sup.pod(pod)?.clone();
        let targets: Vec<String> = match container {
            Some(c) => vec![p
                .containers
                .iter()
                .find(|x| x.id == c || x.name == c)
                .map(|x| x.id.clone())
                .ok_or_else(|| PodError::NoSuch(format!("container {c} in pod {}", p.id)))?],
            None if signal == libc::SIGKILL => {
                let inst = p
                    .vm
                    .clone()
                    .ok_or_else(|| PodError::Conflict(format!("pod {} is not running", p.id)))?;
                let _claim = self.claim(&p.id)?;
                self.drop_session(&inst);
                sup.delete_instance(&inst, true).map_err(failed)?;
                super::vm_lost(sup, &inst, "killed (SIGKILL)");
                super::gc_rootfs(sup);
                return Ok(Kill::Done(p.id));
            }
            None => p
                .containers
                .iter()
                .filter(|c| c.state == "running")
                .map(|c| c.id.clone())
                .collect(),
        };
        let session = self.running_session(&p)?;
        Ok(Kill::Signal(SignalJob {
            session,
            targets,
            signal,
            id: p.id,
        }))
    }

    /// `/container/kill`: `signal` to one container of a running pod.
    pub fn prepare_kill_container(
        self: &Arc<Self>,
        sup: &Supervisor,
        container: &str,
        signal: i64,
    ) -> Result<SignalJob> {
        let signal = check_signal(signal)?;
        let (p, i) = find_container(sup, container).ok_or_else(|| no_container(container))?;
        let c = &p.containers[i];
        if c.state != "running" {
            return Err(PodError::Conflict(format!(
                "container {} is not running",
                c.name
            )));
        }
        Ok(SignalJob {
            session: self.running_session(p)?,
            targets: vec![c.id.clone()],
            signal,
            id: c.id.clone(),
        })
    }

    /// `/container/stop`: stops one running container; the pod and its VM
    /// stay up.
    pub fn prepare_stop_container(
        self: &Arc<Self>,
        sup: &Supervisor,
        container: &str,
    ) -> Result<ContainerStopJob> {
        let (p, i) = find_container(sup, container).ok_or_else(|| no_container(container))?;
        let c = &p.containers[i];
        if c.state != "running" {
            return Err(PodError::Conflict(format!(
                "container {} is not running",
                c.name
            )));
        }
        Ok(ContainerStopJob {
            session: self.running_session(p)?,
            pod_id: p.id.clone(),
            container: c.id.clone(),
            grace: self.cfg.stop_timeout,
            _claim: self.claim(&p.id)?,
        })
    }

    /// `/pod/pause` (`pause`) and `/pod/unpause`: the pod's VM stops (or
    /// resumes) running its vCPUs.
    pub fn prepare_pause(
        self: &Arc<Self>,
        sup: &Supervisor,
        pod: &str,
        pause: bool,
    ) -> Result<PauseJob> {
        let p = sup.pod(pod)?;
        let inst =
            p.vm.clone()
                .filter(|_| p.state == PodState::Running)
                .ok_or_else(|| PodError::Conflict(format!("pod {} is not running", p.id)))?;
        if p.paused == pause {
            return Err(PodError::Conflict(format!(
                "pod {} is {}paused",
                p.id,
                if pause { "already " } else { "not " }
            )));
        }
        Ok(PauseJob {
            pod_id: p.id.clone(),
            sock: sup.launcher().api_sock(&inst),
            pause,
            _claim: self.claim(&p.id)?,
        })
    }

    /// A pod's port mappings.
    pub fn port_mappings(sup: &Supervisor, pod: &str) -> Result<Vec<PortMapping>> {
        let p = sup.pod(pod)?;
        let spec = spec_value(p)?;
        Ok(serde_json::from_value(spec["portmappings"].clone()).unwrap_or_default())
    }

    /// Starts forwarding `ports` to the pod in VM `inst` (replacing what was
    /// forwarded to it); nothing when there are none.
    pub(super) fn forward_ports(&self, inst: &str, ports: &[Port]) -> Result<()> {
        self.stop_forwarding(inst);
        if ports.is_empty() {
            return Ok(());
        }
        let f = Forwarder::start(self.cfg.port_bind, ports)
            .map_err(|e| PodError::Conflict(format!("port mappings: {e}")))?;
        self.forwarders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(inst.to_string(), f);
        Ok(())
    }

    /// Stops forwarding ports to VM `inst`.
    pub(super) fn stop_forwarding(&self, inst: &str) {
        let f = self
            .forwarders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(inst);
        if let Some(f) = f {
            f.stop();
        }
    }

    /// Replaces a pod's mappings with `next` (checked): in its spec, and
    /// live when its VM runs (a failure to listen restores the old ones).
    fn set_port_mappings(
        &self,
        sup: &mut Supervisor,
        p: &Pod,
        next: Vec<PortMapping>,
    ) -> Result<()> {
        let mut spec = spec_value(p)?;
        let old_ports = forward_plan(&spec)?;
        spec["portmappings"] = serde_json::to_value(&next).map_err(failed)?;
        let ports = forward_plan(&spec)?;
        if let Some(inst) = p.vm.as_deref() {
            if let Err(e) = self.forward_ports(inst, &ports) {
                let _ = self.forward_ports(inst, &old_ports);
                return Err(e);
            }
        }
        let text = spec.to_string();
        sup.update_pod(&p.id, |p| p.spec = text)?;
        Ok(())
    }

    /// `PUT /pod/{id}/portmappings/add`: more mappings, forwarded at once
    /// when the pod runs.
    pub fn add_port_mappings(&self, sup: &mut Supervisor, pod: &str, body: &[u8]) -> Result<()> {
        let p = sup.pod(pod)?.clone();
        let mut all: Vec<PortMapping> =
            serde_json::from_value(spec_value(&p)?["portmappings"].clone()).unwrap_or_default();
        for pm in parse_mappings(body)? {
            all.push(pm.formalize()?);
        }
        self.set_port_mappings(sup, &p, all)
    }

    /// `PUT /pod/{id}/portmappings/delete`: removes the mappings with the
    /// same container port and protocol (hyperd's `SameDestWith`); ones the
    /// pod does not have are ignored, as in hyperd.
    pub fn delete_port_mappings(&self, sup: &mut Supervisor, pod: &str, body: &[u8]) -> Result<()> {
        let p = sup.pod(pod)?.clone();
        let gone: Vec<PortMapping> = parse_mappings(body)?
            .iter()
            .map(PortMapping::formalize)
            .collect::<Result<_>>()?;
        let have: Vec<PortMapping> =
            serde_json::from_value(spec_value(&p)?["portmappings"].clone()).unwrap_or_default();
        let keep: Vec<PortMapping> = have
            .into_iter()
            .filter(|m| {
                let m = m.formalize().unwrap_or_else(|_| m.clone());
                !gone
                    .iter()
                    .any(|g| g.container_port == m.container_port && g.protocol == m.protocol)
            })
            .collect();
        self.set_port_mappings(sup, &p, keep)
    }

    /// `/container/create?podId=`: adds the container `text` (hyperd's
    /// container JSON) to a pod that is not running; it starts with the
    /// pod. Returns the new container's id.
    pub fn add_container(&self, sup: &mut Supervisor, pod: &str, text: &str) -> Result<String> {
        let p = sup.pod(pod)?.clone();
        if p.vm.is_some() {
            return Err(PodError::Conflict(format!(
                "pod {} is running: emberd cannot add a disk to a running pod VM; stop the pod, create the container, start the pod",
                p.id
            )));
        }
        let c: Value = serde_json::from_str(text)
            .map_err(|e| PodError::Invalid(format!("container spec is not valid JSON: {e}")))?;
        if !c.is_object() {
            return Err(PodError::Invalid(
                "container spec is not a JSON object".into(),
            ));
        }
        let mut spec = spec_value(&p)?;
        match spec["containers"].as_array_mut() {
            Some(list) => list.push(c),
            None => spec["containers"] = Value::Array(vec![c]),
        }
        let text = spec.to_string();
        // The whole pod, with its new container, must still be a valid pod.
        let parsed = parse_pod(&text)?;
        let new = parsed
            .containers
            .last()
            .ok_or_else(|| failed("the container was not added"))?;
        self.images.get(&new.image)?;
        // parse_pod names unnamed containers; store that name.
        let mut spec: Value = serde_json::from_str(&text).map_err(failed)?;
        if let Some(last) = spec["containers"].as_array_mut().and_then(|l| l.last_mut()) {
            last["name"] = Value::String(new.name.clone());
        }
        let rec = PodContainer {
            id: hyper_id("container"),
            name: new.name.clone(),
            image: new.image.clone(),
            state: "pending".into(),
            ..Default::default()
        };
        let id = rec.id.clone();
        let text = spec.to_string();
        sup.update_pod(&p.id, |p| {
            p.spec = text;
            p.containers.push(rec);
        })?;
        Ok(id)
    }

    /// `/container/rename`: a container's new name (unique in its pod).
    pub fn rename_container(&self, sup: &mut Supervisor, old: &str, new: &str) -> Result<()> {
        crate::model::validate_name("container", new)
            .map_err(|e| PodError::Invalid(e.to_string()))?;
        let (p, i) = find_container(sup, old).ok_or_else(|| no_container(old))?;
        if p.containers.iter().any(|c| c.name == new) {
            return Err(PodError::Conflict(format!(
                "pod {} already has a container named {new}",
                p.id
            )));
        }
        let p = p.clone();
        let mut spec = spec_value(&p)?;
        if let Some(c) = spec["containers"].get_mut(i) {
            c["name"] = Value::String(new.to_string());
        }
        let text = spec.to_string();
        let new = new.to_string();
        sup.update_pod(&p.id, |p| {
            p.spec = text;
            p.containers[i].name = new;
        })?;
        Ok(())
    }

    /// `/container/remove`: removes a container from a pod that is not
    /// running (with its root disk). The last container goes with its pod.
    pub fn remove_container(self: &Arc<Self>, sup: &mut Supervisor, key: &str) -> Result<String> {
        let (p, i) = find_container(sup, key).ok_or_else(|| no_container(key))?;
        if p.vm.is_some() {
            return Err(PodError::Conflict(format!(
                "pod {} is running; stop it before removing its container {}",
                p.id, p.containers[i].name
            )));
        }
        let p = p.clone();
        let cid = p.containers[i].id.clone();
        let _claim = self.claim(&p.id)?;
        if p.containers.len() == 1 {
            self.delete_pod(sup, &p.id)?;
            return Ok(cid);
        }
        let mut spec = spec_value(&p)?;
        if let Some(list) = spec["containers"].as_array_mut() {
            if i < list.len() {
                list.remove(i);
            }
        }
        let text = spec.to_string();
        sup.update_pod(&p.id, |p| {
            p.spec = text;
            p.containers.remove(i);
        })?;
        super::gc_rootfs(sup);
        Ok(cid)
    }

    /// `/container/start`: containers start with their pod (a running pod
    /// VM cannot get the container's disk); refused with the way to do it.
    pub fn start_container(&self, sup: &Supervisor, key: &str) -> Result<()> {
        let (p, i) = find_container(sup, key).ok_or_else(|| no_container(key))?;
        Err(PodError::Conflict(format!(
            "container {} starts with its pod: emberd cannot add a disk to a running pod VM; use pod/start?podId={}",
            p.containers[i].name, p.id
        )))
    }

    /// Worker side of `/images/save`: the images `names` as one tar stream
    /// of an OCI image layout (each image under its `repo:tag`, or under
    /// `refs[name]`). `format` may be empty or `oci`.
    pub fn save_images(
        &self,
        scratch: &std::path::Path,
        names: &[String],
        format: &str,
        refs: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>> {
        if !format.is_empty() && format != "oci" {
            return Err(PodError::Invalid(format!(
                "save format {format:?} is not supported: emberd writes OCI image layouts (format=oci)"
            )));
        }
        if names.is_empty() {
            return Err(PodError::Invalid(
                "names (the images to save) is required".into(),
            ));
        }
        let layout = scratch.join("layout");
        for n in names {
            let rec = self.images.get(n)?;
            // An untagged image is saved under the name it was asked by.
            let ref_name = refs
                .get(n)
                .cloned()
                .or_else(|| (!rec.is_named()).then(|| n.clone()));
            self.images.push(n, &layout, ref_name.as_deref())?;
        }
        let mut out = Vec::new();
        {
            let mut b = tar::Builder::new(&mut out);
            b.mode(tar::HeaderMode::Deterministic);
            b.follow_symlinks(false);
            b.append_dir_all(".", &layout).map_err(failed)?;
            b.finish().map_err(failed)?;
        }
        Ok(out)
    }
}

/// A port mapping list body (`[{containerPort, hostPort, protocol}]`).
fn parse_mappings(body: &[u8]) -> Result<Vec<PortMapping>> {
    serde_json::from_slice(body).map_err(|e| {
        PodError::Invalid(format!(
            "port mappings are not a JSON list of mappings: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings_are_formalized_like_hyperd() {
        let pm = |c: &str, h: &str, p: &str| PortMapping {
            container_port: c.into(),
            host_port: h.into(),
            protocol: p.into(),
        };
        assert_eq!(
            pm("80", "8080", "").formalize().unwrap(),
            pm("80", "8080", "tcp")
        );
        assert_eq!(
            pm("80-81", "8080-8081", "UDP").formalize().unwrap(),
            pm("80-81", "8080-8081", "udp")
        );
        // A single container port takes any host port of a range.
        assert!(pm("80", "8000-8010", "tcp").formalize().is_ok());
        assert!(pm("80-82", "8080-8081", "tcp").formalize().is_err());
        assert!(pm("0", "1", "tcp").formalize().is_err());
        assert!(pm("70000", "1", "tcp").formalize().is_err());
        assert!(pm("9-1", "1", "tcp").formalize().is_err());
        assert!(pm("80", "80", "sctp").formalize().is_err());
        // Numbers are read as well as strings.
        let v: Vec<PortMapping> =
            serde_json::from_str(r#"[{"containerPort":80,"hostPort":"8080","protocol":"tcp"}]"#)
                .unwrap();
        assert_eq!(v[0], pm("80", "8080", "tcp"));
        assert!(parse_mappings(b"{}").is_err());
        assert!(check_signal(0).is_err() && check_signal(65).is_err());
        assert_eq!(check_signal(9).unwrap(), 9);
    }
}
