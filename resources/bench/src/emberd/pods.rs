//! The pod phase of the emberd benchmark: hyperd pods in pod VMs.
//!
//! emberd is started with a pod kernel, boot args and agent (on machines
//! where Linux cannot boot, ember's test guest in its `pod-agent` mode, which
//! answers the agent protocol over vsock). One small container image is
//! imported once from an OCI layout the benchmark writes; then each round
//! times `POST /pod/create`, `POST /pod/start` (answered once the container
//! runs in its pod VM), `POST /pod/stop?stopVM=yes` and `DELETE /pod`, and
//! separately `POST /vm/create` (an idle VM booted to its agent's READY)
//! and `DELETE /vm`. Every pod and VM is recorded in the [`Guard`] while it
//! exists, so an error or SIGINT removes it through emberd before the guard
//! kills emberd and the VMMs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{io_err, Client, EmberdBenchError, Guard, Result};
use crate::throughput::vmrun::interrupted;

/// Name (OCI `ref.name`) of the container image the pods run.
pub const POD_IMAGE_REF: &str = "emberd-bench-app:1";
/// The container's command.
pub const POD_COMMAND: &str = "/bin/app";
/// Bound on `POST /pod/start` and `POST /vm/create` (they build disks and
/// wait for the agent; emberd's own agent timeout is 60 s).
const POD_TIMEOUT: Duration = Duration::from_secs(120);

/// One pod round trip.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodRound {
    /// `POST /pod/create` sent -> answered.
    pub create: Duration,
    /// `POST /pod/start` sent -> answered (the container runs).
    pub start: Duration,
    /// `POST /pod/stop?stopVM=yes` sent -> answered (the VM is gone).
    pub stop: Duration,
    /// `DELETE /pod` sent -> answered.
    pub delete: Duration,
    /// The whole round: create, start, state check, stop, delete.
    pub total: Duration,
}

/// One idle VM: create and delete.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmRound {
    /// `POST /vm/create` sent -> answered (the agent said READY).
    pub create: Duration,
    /// `DELETE /vm` sent -> answered.
    pub delete: Duration,
    /// Both, with the listing check between.
    pub total: Duration,
}

/// The hyperd answer envelope `{"ID", "Code", "Cause"}`: the `ID` of a
/// success (HTTP 200, `Code` 0), else `None`.
pub fn envelope_id(status: u16, body: &Value) -> Option<String> {
    let id = body["ID"].as_str()?;
    (status == 200 && body["Code"].as_i64() == Some(0) && !id.is_empty()).then(|| id.to_string())
}

/// Whether hyperd's JSON-lines progress answer reports an error.
pub fn progress_failed(body: &str) -> bool {
    body.lines()
        .any(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v.get("error").is_some()))
}

/// The pod spec of every round.
pub fn pod_spec(image: &str) -> Value {
    json!({"containers": [{"image": image, "command": [POD_COMMAND]}]})
}

/// `podId:podName:vmId:status` entries of `GET /list?item=pod` (or
/// `vmId:podId:status` of `item=vm`), split at `:`.
pub fn list_entries(body: &Value, key: &str) -> Vec<Vec<String>> {
    body[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|e| e.split(':').map(str::to_string).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// The instance id of pod VM `vm` in emberd's state file (so the guard can
/// find its VMM by id even if the state file loses it); `None` if absent.
pub fn vm_instance_id(state_json: &str, vm: &str) -> Option<String> {
    let v: Value = serde_json::from_str(state_json).ok()?;
    v["instances"]
        .as_object()?
        .values()
        .find(|i| i["annotations"]["hyperd.vm"] == vm || i["name"] == vm)?["id"]
        .as_str()
        .map(str::to_string)
}

impl Client {
    /// A hyperd request that must succeed; returns the envelope's `ID`. A
    /// failure carries the whole body.
    fn hyperd(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<String> {
        let r = self.call(method, path, &[], body, timeout)?;
        envelope_id(r.status, &r.json()).ok_or_else(|| EmberdBenchError::Status {
            what: format!("{method} {path}"),
            status: r.status,
            body: r.text(),
        })
    }

    fn list(&mut self, item: &str, key: &str) -> Result<Vec<Vec<String>>> {
        let v = self
            .expect("GET", &format!("/list?item={item}"), None, 200)?
            .json();
        Ok(list_entries(&v, key))
    }

    /// `POST /image/create?imageName=<layout>`; returns the time it took.
    pub(super) fn import_image(&mut self, layout: &Path) -> Result<Duration> {
        let path = format!(
            "/image/create?imageName={}",
            urlencode(&layout.to_string_lossy())
        );
        let t0 = Instant::now();
        let r = self.call("POST", &path, &[], None, POD_TIMEOUT)?;
        let took = t0.elapsed();
        let text = r.text();
        if r.status != 200 || progress_failed(&text) {
            return Err(EmberdBenchError::Status {
                what: format!("POST {path}"),
                status: r.status,
                body: text,
            });
        }
        Ok(took)
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Remembers the instance id of `vm`'s VMM in the guard.
fn track_vm_instance(g: &mut Guard, vm: &str) {
    if let Ok(s) = std::fs::read_to_string(g.state_dir().join("state.json")) {
        if let Some(id) = vm_instance_id(&s, vm) {
            g.track(&id);
        }
    }
}

/// One pod round trip: create, start, check it runs, stop with its VM,
/// delete, check the VM is gone.
pub(super) fn pod_round(c: &mut Client, g: &mut Guard, image: &str) -> Result<PodRound> {
    if interrupted() {
        return Err(EmberdBenchError::Interrupted);
    }
    let spec = pod_spec(image).to_string();
    let t0 = Instant::now();
    let pod = c.hyperd(
        "POST",
        "/pod/create",
        Some(spec.as_bytes()),
        super::REQUEST_TIMEOUT,
    )?;
    g.track_pod(&pod);
    let create = t0.elapsed();

    let t1 = Instant::now();
    c.hyperd(
        "POST",
        &format!("/pod/start?podId={pod}"),
        None,
        POD_TIMEOUT,
    )?;
    let start = t1.elapsed();
    let entry = c
        .list("pod", "podData")?
        .into_iter()
        .find(|e| e.first() == Some(&pod))
        .unwrap_or_default();
    let vm = entry.get(2).cloned().unwrap_or_default();
    if entry.get(3).map(String::as_str) != Some("running") || vm.is_empty() {
        return Err(EmberdBenchError::Unexpected {
            what: format!("pod {pod} after POST /pod/start"),
            detail: format!("list entry {:?} (want running, in a VM)", entry.join(":")),
        });
    }
    g.track_vm(&vm);
    track_vm_instance(g, &vm);
    // A SIGINT here leaves a running pod for the guard to remove.
    if interrupted() {
        return Err(EmberdBenchError::Interrupted);
    }

    let t2 = Instant::now();
    c.hyperd(
        "POST",
        &format!("/pod/stop?podId={pod}&stopVM=yes"),
        None,
        POD_TIMEOUT,
    )?;
    let stop = t2.elapsed();
    g.forget_vm(&vm);

    let t3 = Instant::now();
    c.hyperd(
        "DELETE",
        &format!("/pod?podId={pod}"),
        None,
        super::REQUEST_TIMEOUT,
    )?;
    let delete = t3.elapsed();
    g.forget_pod(&pod);
    let total = t0.elapsed();

    let vms = c.list("vm", "vmData")?;
    if vms.iter().any(|e| e.first() == Some(&vm)) {
        return Err(EmberdBenchError::Unexpected {
            what: format!("GET /list?item=vm after stopping pod {pod} with stopVM=yes"),
            detail: format!("{vm} still listed: {vms:?}"),
        });
    }
    Ok(PodRound {
        create,
        start,
        stop,
        delete,
        total,
    })
}

/// One idle VM: `POST /vm/create` (answered once the agent is READY), check
/// it is listed idle, `DELETE /vm`.
pub(super) fn vm_round(c: &mut Client, g: &mut Guard) -> Result<VmRound> {
    if interrupted() {
        return Err(EmberdBenchError::Interrupted);
    }
    let t0 = Instant::now();
    let vm = c.hyperd("POST", "/vm/create", None, POD_TIMEOUT)?;
    let create = t0.elapsed();
    g.track_vm(&vm);
    track_vm_instance(g, &vm);
    let vms = c.list("vm", "vmData")?;
    if !vms
        .iter()
        .any(|e| e.first() == Some(&vm) && e.last().map(String::as_str) == Some("idle"))
    {
        return Err(EmberdBenchError::Unexpected {
            what: format!("GET /list?item=vm after POST /vm/create ({vm})"),
            detail: format!("{vms:?} (want {vm} idle)"),
        });
    }
    let t1 = Instant::now();
    c.hyperd(
        "DELETE",
        &format!("/vm?vm={vm}"),
        None,
        super::REQUEST_TIMEOUT,
    )?;
    let delete = t1.elapsed();
    g.forget_vm(&vm);
    Ok(VmRound {
        create,
        delete,
        total: t0.elapsed(),
    })
}

/// Hex SHA-256 of a file, from `sha256sum`.
fn sha256_file(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(io_err("run sha256sum"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or_default();
    if !out.status.success() || hex.len() != 64 {
        return Err(EmberdBenchError::BadRun {
            what: format!("sha256sum {}", path.display()),
            detail: format!(
                "{}: {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(hex.to_string())
}

/// Moves `file` into `layout`'s blob store; returns its digest and size.
fn add_blob(layout: &Path, file: &Path) -> Result<(String, u64)> {
    let hex = sha256_file(file)?;
    let size = std::fs::metadata(file)
        .map_err(io_err(format!("stat {}", file.display())))?
        .len();
    let dst = layout.join("blobs/sha256").join(&hex);
    std::fs::rename(file, &dst).map_err(io_err(format!("move a blob to {}", dst.display())))?;
    Ok((format!("sha256:{hex}"), size))
}

fn add_json_blob(layout: &Path, tmp: &Path, v: &Value) -> Result<(String, u64)> {
    std::fs::write(tmp, v.to_string()).map_err(io_err(format!("write {}", tmp.display())))?;
    add_blob(layout, tmp)
}

/// Writes an OCI image layout under `dir`: one uncompressed layer with an
/// executable `/bin/app` (a shell-script stub; the test guest only checks
/// the disk), config `Cmd ["/bin/app"]`, tagged `reference`. Returns the
/// layout's path.
pub fn write_oci_layout(dir: &Path, reference: &str) -> Result<PathBuf> {
    let src = dir.join("oci-src");
    let layout = dir.join("oci-layout");
    let bin = src.join("bin");
    std::fs::create_dir_all(&bin).map_err(io_err(format!("create {}", bin.display())))?;
    std::fs::create_dir_all(layout.join("blobs/sha256"))
        .map_err(io_err(format!("create {}", layout.display())))?;
    let app = bin.join("app");
    std::fs::write(&app, "#!/bin/sh\necho app\n").map_err(io_err("write bin/app"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod bin/app"))?;
    }
    let layer = dir.join("layer.tar");
    let st = Command::new("tar")
        .arg("cf")
        .arg(&layer)
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&src)
        .arg("bin")
        .status()
        .map_err(io_err("run tar"))?;
    if !st.success() {
        return Err(EmberdBenchError::BadRun {
            what: "tar cf layer.tar".into(),
            detail: st.to_string(),
        });
    }
    let (layer_digest, layer_size) = add_blob(&layout, &layer)?;
    let tmp = dir.join("blob.json");
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": [POD_COMMAND]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = add_json_blob(&layout, &tmp, &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = add_json_blob(&layout, &tmp, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": reference}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string())
        .map_err(io_err("write index.json"))?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(io_err("write oci-layout"))?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope() {
        let ok = json!({"ID": "pod-abc", "Code": 0, "Cause": ""});
        assert_eq!(envelope_id(200, &ok).as_deref(), Some("pod-abc"));
        assert_eq!(envelope_id(500, &ok), None);
        let bad = json!({"ID": "", "Code": 1, "Cause": "no such pod"});
        assert_eq!(envelope_id(200, &bad), None);
        assert_eq!(envelope_id(200, &Value::Null), None);
    }

    #[test]
    fn progress_errors() {
        assert!(!progress_failed(
            "{\"status\":\"Importing\"}\n{\"status\":\"Imported a as b\"}\n"
        ));
        assert!(progress_failed(
            "{\"status\":\"Importing\"}\n{\"error\":\"bad layout\"}\n"
        ));
    }

    #[test]
    fn spec_and_lists() {
        assert_eq!(
            pod_spec("x:1").to_string(),
            r#"{"containers":[{"command":["/bin/app"],"image":"x:1"}]}"#
        );
        let v = json!({"item": "pod", "podData": ["pod-1:n:vm-2:running"]});
        assert_eq!(
            list_entries(&v, "podData"),
            vec![vec!["pod-1", "n", "vm-2", "running"]]
        );
        assert!(list_entries(&v, "vmData").is_empty());
    }

    #[test]
    fn vm_ids_from_state() {
        let s = r#"{"instances":{"inst-1":{"id":"inst-1","name":"vm-aaaa","annotations":{"hyperd.vm":"vm-aaaa"}},
                                  "inst-2":{"id":"inst-2","name":"hello"}}}"#;
        assert_eq!(vm_instance_id(s, "vm-aaaa").as_deref(), Some("inst-1"));
        assert_eq!(vm_instance_id(s, "vm-bbbb"), None);
        assert_eq!(vm_instance_id("nope", "vm-aaaa"), None);
    }

    #[test]
    fn url_encoding() {
        assert_eq!(urlencode("/tmp/a b:c"), "/tmp/a%20b%3Ac");
    }

    #[test]
    fn layout_is_content_addressed() {
        let dir = std::env::temp_dir().join(format!("ember-bench-oci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let layout = write_oci_layout(&dir, "t:1").unwrap();
        let index: Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "t:1");
        let blob = |d: &Value| layout.join("blobs/sha256").join(&d.as_str().unwrap()[7..]);
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(blob(&m["digest"])).unwrap()).unwrap();
        let layer = blob(&manifest["layers"][0]["digest"]);
        assert_eq!(
            std::fs::metadata(&layer).unwrap().len(),
            manifest["layers"][0]["size"].as_u64().unwrap()
        );
        assert_eq!(
            format!("sha256:{}", sha256_file(&layer).unwrap()),
            manifest["layers"][0]["digest"]
        );
        let config: Value =
            serde_json::from_slice(&std::fs::read(blob(&manifest["config"]["digest"])).unwrap())
                .unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["/bin/app"]));
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
