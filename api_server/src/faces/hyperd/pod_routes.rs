//! hyperd's pod routes beyond create/start/stop/delete: `/pod/info`,
//! `/pod/stats`, `/pod/labels`, `/pod/kill`, `/pod/pause`, `/pod/unpause`
//! and `/pod/{id}/portmappings[/{action}]`, with the JSON shapes hyperctl
//! 1.1.0 decodes (`types.PodInfo`, `{"portMappings": [...]}`) and the
//! original server's statuses (labels 201, pause 204, port mapping changes
//! 204).

use std::collections::BTreeMap;

use ember_http::{Reply, Request, Response};
use serde_json::{json, Value};

use super::{answer_later_now, fail, ok_with, required, Hyperd, HyperdError};
use crate::images::oci::ImageConfig;
use crate::model::pods::{self, Kill, Pods};
use crate::model::supervisor::Supervisor;
use crate::model::{Pod, PodContainer, PodState};
use crate::server::{Ctx, Finish};

/// Seconds since the epoch of an RFC 3339 time (0 if unreadable).
pub(super) fn unix_time(rfc3339: &str) -> i64 {
    chrono_like_parse(rfc3339).unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS...Z` to seconds since the epoch (UTC only, as
/// emberd writes its times).
fn chrono_like_parse(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se)
}

/// hyperd's container phase and status objects of a container record.
pub(super) fn container_status(c: &PodContainer) -> Value {
    let phase = c.state.as_str();
    let mut s = json!({
        "name": c.name,
        "containerID": c.id,
        "phase": phase,
        "waiting": {},
        "running": {},
        "terminated": {},
    });
    match (phase, c.exit_code) {
        ("pending", _) => s["waiting"] = json!({"reason": "Pending"}),
        ("running", _) => {}
        (_, Some(code)) => {
            s["terminated"] = json!({
                "exitCode": code,
                "reason": if code == 0 { "Succeeded" } else { "Failed" },
            })
        }
        (_, None) => s["terminated"] = json!({"reason": "Failed"}),
    }
    s
}

/// hyperd's `types.Container` of a container record and its spec entry;
/// `pod_tty` is the pod spec's own `tty` (every container gets a terminal).
pub(super) fn container_json(
    pods: &Pods,
    c: &PodContainer,
    spec: &Value,
    pod_tty: bool,
    config: Option<&ImageConfig>,
) -> Value {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect()
    };
    let command = strings(&spec["command"]);
    let entrypoint = strings(&spec["entrypoint"]);
    let workdir = spec["workdir"]
        .as_str()
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .or_else(|| config.map(|c| c.working_dir.clone()))
        .unwrap_or_default();
    let mut env: Vec<Value> = config
        .map(|c| {
            c.env
                .iter()
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    json!({"env": k, "value": v})
                })
                .collect()
        })
        .unwrap_or_default();
    env.extend(spec["envs"].as_array().into_iter().flatten().cloned());
    let mounts: Vec<Value> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            json!({"name": v["volume"], "mountPath": v["path"],
                   "readOnly": v["readOnly"].as_bool().unwrap_or(false)})
        })
        .collect();
    json!({
        "name": c.name,
        "containerID": c.id,
        "image": c.image,
        "imageID": pods.image_id(&c.image).unwrap_or_default(),
        "workingDir": workdir,
        "tty": pod_tty || spec["tty"].as_bool().unwrap_or(false),
        // hyperd: commands are the pod's command; args what the image adds.
        "commands": if entrypoint.is_empty() { command.clone() } else { entrypoint.into_iter().chain(command.clone()).collect() },
        "args": if command.is_empty() { config.map(|c| c.cmd.clone()).unwrap_or_default() } else { Vec::new() },
        "env": env,
        "volumeMounts": mounts,
        "labels": spec["labels"].as_object().cloned().unwrap_or_default(),
    })
}

/// hyperd's pod phase (`Pending`, `Running`, `Paused`, `Succeeded`,
/// `Failed`).
pub(super) fn pod_phase(p: &Pod) -> &'static str {
    match p.state {
        PodState::Running if p.paused => "Paused",
        PodState::Pending => "Pending",
        PodState::Running => "Running",
        PodState::Succeeded => "Succeeded",
        PodState::Failed => "Failed",
    }
}

/// `types.PodInfo` of a pod.
fn pod_info(pods: &Pods, sup: &Supervisor, p: &Pod) -> Value {
    let spec: Value = serde_json::from_str(&p.spec).unwrap_or(Value::Null);
    let containers: Vec<Value> = p
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let cfg = pods.image_config(&c.image);
            container_json(
                pods,
                c,
                &spec["containers"][i],
                spec["tty"].as_bool().unwrap_or(false),
                cfg.as_ref(),
            )
        })
        .collect();
    let statuses: Vec<Value> = p.containers.iter().map(container_status).collect();
    let vm =
        p.vm.as_ref()
            .and_then(|v| pods::vm_id(sup, v))
            .unwrap_or_default();
    let volumes: Vec<Value> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| json!({"name": v["name"], "source": v["source"], "driver": v["format"]}))
        .collect();
    // The pod's address: eth0's static IPv4, while its VM runs.
    let pod_ip: Vec<String> = spec["interfaces"][0]["ip"]
        .as_str()
        .filter(|_| p.vm.is_some())
        .and_then(|ip| ip.split('/').next())
        .filter(|ip| !ip.is_empty())
        .map(|ip| vec![ip.to_string()])
        .unwrap_or_default();
    let mut status = json!({
        "phase": pod_phase(p),
        "hostIP": "",
        "podIP": pod_ip,
        "containerStatus": statuses,
    });
    if let Some(e) = &p.last_error {
        status["message"] = e.clone().into();
        status["reason"] = "Failed".into();
    }
    json!({
        "podID": p.id,
        "podName": p.name,
        "kind": "Pod",
        "apiVersion": super::API_VERSION,
        "vm": vm,
        "createdAt": unix_time(&p.created),
        "spec": {
            "volumes": volumes,
            "containers": containers,
            "labels": Pods::labels(p),
            "vcpu": spec["resource"]["vcpu"].as_i64().filter(|v| *v > 0).unwrap_or(1),
            "memory": spec["resource"]["memory"].as_i64().filter(|v| *v > 0).unwrap_or(128),
        },
        "status": status,
    })
}

/// A signal parameter: hyperd's default is SIGTERM (15).
pub(super) fn signal_param(req: &Request) -> Result<i64, HyperdError> {
    match req.query_param("signal").filter(|s| !s.is_empty()) {
        None => Ok(15),
        Some(s) => s
            .parse::<i64>()
            .map_err(|_| HyperdError::BadParameter(format!("signal {s:?} is not a signal number"))),
    }
}

impl Hyperd {
    /// `GET /pod/info?podName=` (hyperctl `GetPodInfo`).
    pub(super) fn pod_info(&self, ctx: &mut Ctx, req: &Request) -> Result<Response, HyperdError> {
        let name = required(req, "podName")?;
        let p = ctx
            .sup
            .pod(name)
            .map_err(|_| HyperdError::NoSuch(format!("pod {name}")))?;
        Ok(Response::json(200, &pod_info(&self.pods, ctx.sup, p)))
    }

    /// `GET /pod/stats?podId=`: refused, emberd collects no in-guest stats.
    pub(super) fn pod_stats(&self, ctx: &mut Ctx, req: &Request) -> Result<Response, HyperdError> {
        let id = required(req, "podId")?;
        let p = ctx
            .sup
            .pod(id)
            .map_err(|_| HyperdError::NoSuch(format!("pod {id}")))?;
        Err(HyperdError::Other(format!(
            "pod stats are not collected by emberd: pod {} runs in a microVM whose agent reports no cgroup statistics",
            p.id
        )))
    }

    /// `POST /pod/labels?podId=&labels=<JSON>&override=true|yes` (201).
    pub(super) fn pod_labels(&self, ctx: &mut Ctx, req: &Request) -> Result<Response, HyperdError> {
        let id = required(req, "podId")?;
        let labels: BTreeMap<String, String> =
            serde_json::from_str(req.query_param("labels").unwrap_or("")).map_err(|e| {
                HyperdError::BadParameter(format!("labels must be a JSON object of strings: {e}"))
            })?;
        let overwrite = matches!(req.query_param("override"), Some("true" | "yes"));
        let id = self.pods.set_labels(ctx.sup, id, &labels, overwrite)?;
        Ok(ok_with(201, &id))
    }

    /// `POST /pod/kill?podName=&container=&signal=` (hyperctl `KillPod`).
    pub(super) fn pod_kill(&self, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
        let pod = required(req, "podName")?;
        let container = req.query_param("container").filter(|c| !c.is_empty());
        let signal = signal_param(req)?;
        match self
            .pods
            .prepare_kill_pod(ctx.sup, pod, container, signal)?
        {
            Kill::Done(id) => Ok(Reply::Now(ok_with(200, &id))),
            Kill::Signal(job) => Ok(answer_later_now(ctx, "pod-kill", 200, move || job.run())),
        }
    }

    /// `POST /pod/pause?podId=` and `/pod/unpause?podId=` (204, no body).
    pub(super) fn pod_pause(
        &self,
        ctx: &mut Ctx,
        req: &Request,
        pause: bool,
    ) -> Result<Reply, HyperdError> {
        let id = required(req, "podId")?;
        let job = self.pods.prepare_pause(ctx.sup, id, pause)?;
        let jobs = ctx.jobs.clone();
        Ok(ctx.spawn("pod-pause", move || {
            let res = job.run(&jobs);
            Box::new(move |_: &mut Supervisor| match res {
                Ok(()) => Response::empty(204),
                Err(e) => fail(&e.into()),
            }) as Finish
        }))
    }

    /// `GET /pod/{id}/portmappings` (hyperctl `ListPortMappings`).
    pub(super) fn port_mappings(&self, ctx: &mut Ctx, id: &str) -> Result<Response, HyperdError> {
        let list = Pods::port_mappings(ctx.sup, id)
            .map_err(|_| HyperdError::NoSuch(format!("pod {id}")))?;
        Ok(Response::json(200, &json!({ "portMappings": list })))
    }

    /// `PUT /pod/{id}/portmappings/{add|delete}` with a JSON list body (204).
    pub(super) fn change_port_mappings(
        &self,
        ctx: &mut Ctx,
        req: &Request,
        id: &str,
        action: &str,
    ) -> Result<Response, HyperdError> {
        ctx.sup
            .pod(id)
            .map_err(|_| HyperdError::NoSuch(format!("pod {id}")))?;
        match action {
            "add" => self.pods.add_port_mappings(ctx.sup, id, &req.body)?,
            "delete" => self.pods.delete_port_mappings(ctx.sup, id, &req.body)?,
            _ => {
                return Err(HyperdError::BadParameter(
                    "Only add or delete operation are permitted".into(),
                ))
            }
        }
        Ok(Response::empty(204))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_phases() {
        assert_eq!(unix_time("1970-01-01T00:00:00Z"), 0);
        assert_eq!(unix_time("2026-12-05T14:30:50Z"), 1796481050);
        assert_eq!(unix_time("nonsense"), 0);
        let mut c = PodContainer {
            id: "container-a".into(),
            name: "a".into(),
            state: "failed".into(),
            exit_code: Some(3),
            ..Default::default()
        };
        let s = container_status(&c);
        assert_eq!(s["phase"], "failed");
        assert_eq!(s["terminated"]["exitCode"], 3);
        assert_eq!(s["terminated"]["reason"], "Failed");
        c.state = "pending".into();
        assert_eq!(container_status(&c)["waiting"]["reason"], "Pending");
        let mut p = Pod {
            state: PodState::Running,
            paused: true,
            ..Default::default()
        };
        assert_eq!(pod_phase(&p), "Paused");
        p.paused = false;
        assert_eq!(pod_phase(&p), "Running");
    }
}
