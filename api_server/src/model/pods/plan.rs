//! Pod planning: hyperd's pod spec as emberd reads it (and refuses what
//! it cannot do yet), the start plan of a pod record, and each container's
//! argv, environment and disk as the agent gets them.

use std::collections::BTreeMap;

use ember_agent::protocol::{Rootfs, StartContainer};
use serde::Deserialize;
use serde_json::{json, Value};

use super::network::{pod_interfaces, InterfaceSpec, PodInterface};
use super::storage::{
    container_files, container_mounts, pod_volumes, FileRef, FileSpec, PodVolume, VolumeRef,
    VolumeSpec,
};
use super::{PodError, Result};
use crate::model::Pod;

/// `null` reads as the default (Go clients send `null` for nil slices).
fn nullable<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `PATH` for containers whose image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub volumes: Vec<VolumeSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub files: Vec<FileSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub interfaces: Vec<InterfaceSpec>,
    /// Every container gets a terminal.
    #[serde(default)]
    pub tty: bool,
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
    #[serde(default, deserialize_with = "nullable")]
    pub envs: Vec<EnvSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub volumes: Vec<VolumeRef>,
    #[serde(default, deserialize_with = "nullable")]
    pub files: Vec<FileRef>,
    /// The container's process runs on a terminal.
    #[serde(default)]
    pub tty: bool,
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
pub fn parse_pod(text: &str) -> Result<PodSpec> {
    let mut spec: PodSpec = serde_json::from_str(text)
        .map_err(|e| PodError::Invalid(format!("pod spec is not valid JSON: {e}")))?;
    // Known parts of hyperd's spec that ember does not do yet are refused
    // rather than silently dropped (empty lists are fine).
    let raw: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let used = |v: &Value, key: &str| {
        v.get(key)
            .is_some_and(|x| !x.is_null() && x != &json!([]) && x != &json!({}))
    };
    for key in ["services"] {
        if used(&raw, key) {
            return Err(PodError::Invalid(format!(
                "pod {key} are not supported by emberd yet"
            )));
        }
    }
    // Port mappings need the pod's address (its first interface's ip).
    super::ops::forward_plan(&raw)?;
    for (i, c) in raw["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if used(c, "ports") {
            return Err(PodError::Invalid(format!(
                "container {i}: ports are not supported; map ports with the pod's portmappings"
            )));
        }
    }
    if spec.containers.is_empty() {
        return Err(PodError::Invalid(
            "a pod needs at least one container".into(),
        ));
    }
    for (i, c) in spec.containers.iter_mut().enumerate() {
        if c.image.is_empty() {
            return Err(PodError::Invalid(format!("container {i} has no image")));
        }
        if c.name.is_empty() {
            c.name = format!(
                "{}-{i}",
                c.image.split([':', '/']).next_back().unwrap_or("c")
            );
        }
        // Names appear in /list's colon-joined lines and name containers
        // in /container/commit.
        crate::model::validate_name("container", &c.name)
            .map_err(|e| PodError::Invalid(e.to_string()))?;
    }
    let mut names = std::collections::BTreeSet::new();
    for c in &spec.containers {
        if !names.insert(c.name.as_str()) {
            return Err(PodError::Invalid(format!(
                "two containers are named {}",
                c.name
            )));
        }
    }
    if spec.containers.len() > 26 {
        return Err(PodError::Invalid(format!(
            "a pod has at most 26 containers (one disk each), not {}",
            spec.containers.len()
        )));
    }
    if let Some(r) = &spec.resource {
        if r.vcpu > 32 {
            return Err(PodError::Invalid(format!(
                "resource.vcpu {} is more than 32",
                r.vcpu
            )));
        }
        if r.memory > 1 << 20 {
            return Err(PodError::Invalid(format!(
                "resource.memory {} MB is more than 1048576",
                r.memory
            )));
        }
    }
    let host_ok = |h: &str| {
        h.len() <= 63
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !host_ok(&spec.hostname) {
        return Err(PodError::Invalid(format!(
            "hostname {:?} is not a host name (letters, digits, '-' and '.', at most 63)",
            spec.hostname
        )));
    }
    // Volumes, files and interfaces resolve now, so a bad one is refused
    // at create.
    storage_plan(&spec)?;
    pod_interfaces(&spec.interfaces)?;
    for c in &spec.containers {
        for e in &c.envs {
            if e.env.is_empty() || e.env.contains('=') || e.env.chars().any(char::is_control) {
                return Err(PodError::Invalid(format!(
                    "container {}: bad environment variable name {:?}",
                    c.name, e.env
                )));
            }
        }
    }
    Ok(spec)
}

/// Each container's volume mounts and files.
type ContainerStorage = (
    Vec<ember_agent::protocol::VolumeMount>,
    Vec<ember_agent::protocol::ContainerFile>,
);

/// The pod's volumes and each container's mounts and files (volume disks
/// follow the containers' root disks; at most 26 disks in all).
fn storage_plan(spec: &PodSpec) -> Result<(Vec<PodVolume>, Vec<ContainerStorage>)> {
    let refs: Vec<&[VolumeRef]> = spec.containers.iter().map(|c| &c.volumes[..]).collect();
    let vols = pod_volumes(&spec.volumes, &refs)?;
    let disks = spec.containers.len() + vols.len();
    if disks > 26 {
        return Err(PodError::Invalid(format!(
            "a pod VM has at most 26 disks (one per container and one per volume), not {disks}"
        )));
    }
    let per = spec
        .containers
        .iter()
        .map(|c| {
            Ok((
                container_mounts(&c.name, &c.volumes, &vols, spec.containers.len())?,
                container_files(&c.name, &c.files, &spec.files)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((vols, per))
}

/// The start plan of a pod: its stored spec with the model's container
/// ids.
pub fn plan(pod: &Pod) -> Result<PodPlan> {
    let spec = parse_pod(&pod.spec)?;
    if spec.containers.len() != pod.containers.len() {
        return Err(PodError::Failed(format!(
            "pod {} does not match its spec",
            pod.id
        )));
    }
    let (volumes, storage) = storage_plan(&spec)?;
    let interfaces = pod_interfaces(&spec.interfaces)?;
    let ports = super::ops::forward_plan(&serde_json::from_str(&pod.spec).unwrap_or(Value::Null))?;
    let (vcpu, memory) = spec
        .resource
        .as_ref()
        .map(|r| (r.vcpu, r.memory))
        .unwrap_or((0, 0));
    Ok(PodPlan {
        pod_id: pod.id.clone(),
        hostname: if spec.hostname.is_empty() {
            pod.name.clone()
        } else {
            spec.hostname.clone()
        },
        vcpus: if vcpu == 0 { 1 } else { vcpu as u8 },
        memory_mb: if memory == 0 { 128 } else { memory },
        volumes,
        interfaces,
        ports,
        containers: spec
            .containers
            .iter()
            .zip(&pod.containers)
            .zip(storage)
            .map(|((s, c), (mounts, files))| ContainerPlan {
                id: c.id.clone(),
                name: c.name.clone(),
                image: c.image.clone(),
                command: s.command.clone(),
                entrypoint: s.entrypoint.clone(),
                workdir: s.workdir.clone(),
                env: s
                    .envs
                    .iter()
                    .map(|e| (e.env.clone(), e.value.clone()))
                    .collect(),
                mounts,
                files,
                tty: s.tty || spec.tty,
            })
            .collect(),
    })
}

/// One container to start, as [`plan`] resolved it from the pod spec.
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
    /// Pod volumes mounted in it (devices already assigned).
    pub mounts: Vec<ember_agent::protocol::VolumeMount>,
    /// Files written into it.
    pub files: Vec<ember_agent::protocol::ContainerFile>,
    /// Runs on a terminal (the container's or the pod's `tty`).
    pub tty: bool,
}

/// A pod to start.
#[derive(Clone, Debug, Default)]
pub struct PodPlan {
    pub pod_id: String,
    pub hostname: String,
    pub vcpus: u8,
    pub memory_mb: u32,
    pub containers: Vec<ContainerPlan>,
    /// Its volumes: disks after the containers' root disks, in order.
    pub volumes: Vec<PodVolume>,
    /// Its network interfaces (TAPs), eth0 first.
    pub interfaces: Vec<PodInterface>,
    /// Host ports forwarded to it.
    pub ports: Vec<crate::runtime::portfwd::Port>,
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
        mounts: plan.mounts.clone(),
        files: plan.files.clone(),
        // hyperd's containers always have their stdio attached (hyperctl
        // `run` and `attach` stream them).
        stdio: true,
        tty: plan.tty,
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
    fn pod_specs() {
        let p =
            parse_pod(r#"{"id":"web","containers":[{"image":"busybox:latest"}],"x":1}"#).unwrap();
        assert_eq!(p.containers[0].name, "latest-0");
        assert!(parse_pod("{}").is_err());
        assert!(parse_pod(r#"{"containers":[{"name":"a"}]}"#).is_err());
        assert!(parse_pod("nope").is_err());
        assert!(parse_pod(r#"{"containers":[{"image":"a"}],"resource":{"vcpu":99}}"#).is_err());
        // Parts ember does not do are refused unless empty.
        let e = parse_pod(r#"{"containers":[{"image":"a"}],"services":[{"serviceIP":"b"}]}"#)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad parameter: pod services are not supported by emberd yet"
        );
        let e = parse_pod(r#"{"containers":[{"image":"a"}],"interfaces":[{"ifname":"x"}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("interface 0: ifname"), "{e}");
        let e = parse_pod(
            r#"{"containers":[{"image":"a"}],"volumes":[{"name":"v","source":"/srv","format":"vfs"}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("shares no host directory"), "{e}");
        let p = parse_pod(
            r#"{"containers":[{"image":"a","volumes":[{"volume":"v","path":"/v"}]}],"volumes":[{"name":"v"}]}"#,
        )
        .unwrap();
        assert_eq!(p.volumes[0].name, "v");
        let e = parse_pod(r#"{"containers":[{"image":"a","ports":[{"containerPort":80}]}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("container 0: ports"), "{e}");
        assert!(parse_pod(r#"{"containers":[{"image":"a","volumes":[],"files":null}],"volumes":[],"portmappings":[],"dns":["1.1.1.1"]}"#).is_ok());
        assert!(parse_pod(r#"{"hostname":"a b","containers":[{"image":"a"}]}"#).is_err());
        let e = parse_pod(r#"{"containers":[{"image":"a","name":"x:y"}]}"#).unwrap_err();
        assert!(e.to_string().starts_with("bad parameter"), "{e}");
        let e = parse_pod(r#"{"containers":[{"image":"a","name":"x"},{"image":"b","name":"x"}]}"#)
            .unwrap_err();
        assert_eq!(e.to_string(), "bad parameter: two containers are named x");
        assert!(parse_pod(r#"{"containers":[{"image":"a"},{"image":"a"}]}"#).is_ok());
        assert!(
            parse_pod(r#"{"containers":[{"image":"a","envs":[{"env":"","value":"x"}]}]}"#).is_err()
        );
    }
}
