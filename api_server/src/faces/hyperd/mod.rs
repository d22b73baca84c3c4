//! The hyperd API (../shared/seeds/hyperd-api.md): pods, VMs, containers,
//! images, `/info`, `/auth`. Command replies use hyperd's envelope
//! `{"ID", "Code", "Cause"}`; like the original, the HTTP status of an error
//! follows its message: "no such" 404, "bad parameter" 400, "conflict" 409,
//! anything else 500.
//!
//! Routes live by resource: this file has pods' create/start/stop/delete,
//! `/list`, `/info`, `/auth`, VMs and the image import/build/push/remove and
//! commit routes; `pod_routes.rs` pod info, stats, labels, kill, pause and
//! port mappings; `containers.rs` the container routes (not their stdio);
//! `images.rs` image load and save; `system.rs` `/version`, `/_ping`,
//! services and the dispatch of those files.
//!
//! This face only translates: pods are model records, and their VMs are run
//! by [`crate::model::pods`] (a Linux kernel with `ember-agent` as init, one
//! ext4 disk per container, the agent over vsock). Without a kernel for pod VMs,
//! starting a pod or creating a VM answers a clear error.

mod containers;
mod images;
mod pod_routes;
mod system;

use std::sync::Arc;

use ember_http::{Method, Reply, Request, Response};
use serde::Deserialize;
use serde_json::{json, Value};

mod stdio;

use crate::images::registry::Credentials;
use crate::model::jobs::Jobs;
use crate::model::pods::{self, ImageSource, PodError, Pods};
use crate::model::supervisor::Supervisor;
use crate::server::{Ctx, Face, Finish};

/// The API version hyperd 1.1.0 reported (`utils.APIVERSION`, PodInfo's
/// `apiVersion`).
pub const API_VERSION: &str = "1.17";

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

/// Where an image create takes its image from.
enum SourceKind {
    Registry,
    Local,
}

/// The HTTP status hyperd gave an error message. Registry failures
/// (ember's addition): "unauthorized:" 401, "manifest unknown" 404, a
/// registry that is down or sent bad bytes 502.
pub fn status_for(msg: &str) -> u16 {
    let m = msg.to_ascii_lowercase();
    if m.starts_with("unauthorized:") {
        401
    } else if m.contains("no such") || m.starts_with("manifest unknown") {
        404
    } else if m.starts_with("registry ")
        || m.starts_with("digest mismatch")
        || m.starts_with("invalid image from the registry")
    {
        502
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
    ok_with(200, id)
}

/// The success envelope with another status (hyperd answered some
/// commands 201).
pub fn ok_with(status: u16, id: &str) -> Response {
    Response::json(status, &json!({"ID": id, "Code": 0, "Cause": ""}))
}

/// 405 for a known path with another method.
fn not_allowed(req: &Request) -> Reply {
    Reply::Now(Response::json(
        405,
        &json!({"ID": "", "Code": 1, "Cause": format!("method {} is not allowed on {}", req.method, req.path)}),
    ))
}

/// The envelope for an error.
pub fn fail(e: &HyperdError) -> Response {
    let msg = e.to_string();
    Response::json(
        status_for(&msg),
        &json!({"ID": "", "Code": 1, "Cause": msg}),
    )
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
            s.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "Linux".into())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
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
    pods: Arc<Pods>,
}

/// The credentials hyperctl sends with a pull or push (`X-Registry-Auth`,
/// base64url JSON); none when absent, empty or unreadable, as hyperd did.
fn registry_auth(req: &Request) -> Option<Credentials> {
    req.header("X-Registry-Auth")
        .and_then(Credentials::from_header)
}

/// A required query parameter.
fn required<'a>(req: &'a Request, name: &str) -> Result<&'a str, HyperdError> {
    req.query_param(name)
        .ok_or_else(|| HyperdError::BadParameter(format!("{name} is required")))
}

impl Hyperd {
    /// A face over `pods` (its pod VMs and container images).
    pub fn new(pods: Arc<Pods>) -> Self {
        Hyperd { pods }
    }

    fn images_get(&self, req: &Request) -> Response {
        let list = self.pods.image_list(req.query_param("all") == Some("yes"));
        Response::json(200, &json!({"imagesList": list}))
    }

    fn image_create(&self, ctx: &mut Ctx, req: &Request) -> Reply {
        let name = req.query_param("imageName").unwrap_or("").to_string();
        let (source, tag) = if !req.body.is_empty() {
            // An uploaded tarball, named by imageName.
            (
                ImageSource::Upload(Arc::new(req.body.clone())),
                (!name.is_empty()).then(|| name.clone()),
            )
        } else if name.starts_with('/') {
            (ImageSource::Path(name.clone()), None)
        } else if name.is_empty() {
            return Reply::Now(fail(&HyperdError::BadParameter(
                "imageName (an image reference, a path to an OCI layout or docker save tarball) or an uploaded tarball is required".into(),
            )));
        } else {
            // A registry reference (hyperd's `pull`); a tag given apart
            // (Docker's `fromImage` + `tag`) is appended.
            let reference = match req.query_param("tag").filter(|t| !t.is_empty()) {
                Some(t) if !name.contains('@') => format!("{name}:{t}"),
                _ => name.clone(),
            };
            (ImageSource::Registry(reference, registry_auth(req)), None)
        };
        let source_kind = match &source {
            ImageSource::Registry(..) => SourceKind::Registry,
            _ => SourceKind::Local,
        };
        let job = match self.pods.prepare_import(ctx.sup, source, tag) {
            Ok(j) => j,
            Err(e) => return Reply::Now(fail(&e.into())),
        };
        let pulling = matches!(source_kind, SourceKind::Registry);
        ctx.spawn("image-import", move || {
            let mut progress =
                vec![json!({"status": if pulling { "Pulling" } else { "Importing" }})];
            let res = job.run(&mut |v| progress.push(v));
            Box::new(move |_: &mut Supervisor| match res {
                Ok(r) => {
                    progress.push(json!({"status": if pulling {
                        format!("Pulled {} as {}", r.short_id, r.name)
                    } else {
                        format!("Imported {} as {}", r.short_id, r.name)
                    }}));
                    lines(200, &progress)
                }
                Err(e) => fail_lines(&e.into(), progress),
            }) as Finish
        })
    }

    fn image_remove(&self, ctx: &mut Ctx, req: &Request) -> Result<Response, HyperdError> {
        let id = required(req, "imageId")?;
        // hyperctl sends force=true|false (strconv.FormatBool).
        let force = matches!(req.query_param("force"), Some("yes" | "true" | "1"));
        self.pods.remove_image(ctx.sup, id, force)?;
        Ok(ok(id))
    }

    fn image_build(&self, ctx: &mut Ctx, req: &Request) -> Reply {
        // hyperctl 1.1.0 sends the tag as `name`; Docker's clients as `t`.
        let tag = req
            .query_param("name")
            .filter(|n| !n.is_empty())
            .or_else(|| req.query_param("t"))
            .unwrap_or("")
            .to_string();
        let dockerfile = req
            .query_param("dockerfile")
            .unwrap_or("Dockerfile")
            .to_string();
        if req.query_param("remote").is_some_and(|r| !r.is_empty()) {
            return Reply::Now(fail(&HyperdError::BadParameter(
                "remote build sources are not supported: send the build context as a tar body"
                    .into(),
            )));
        }
        if req.body.is_empty() {
            return Reply::Now(fail(&HyperdError::BadParameter(
                "the build context (a tar archive) is required as the request body".into(),
            )));
        }
        let pods = self.pods.clone();
        let body = req.body.clone();
        ctx.spawn("image-build", move || {
            let mut progress = Vec::new();
            let res = pods.build_image(&body, &dockerfile, &tag, &mut |line: &str| {
                progress
                    .push(serde_json::from_str(line).unwrap_or_else(|_| json!({"stream": line})));
            });
            Box::new(move |_: &mut Supervisor| match res {
                Ok(short_id) => {
                    progress.push(json!({"stream": format!("Successfully built {short_id}\n")}));
                    lines(200, &progress)
                }
                Err(e) => fail_lines(&e.into(), progress),
            }) as Finish
        })
    }

    fn image_push(&self, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
        let remote = required(req, "remote")?;
        let job =
            self.pods
                .prepare_push(ctx.sup, req.query_param("tag"), remote, registry_auth(req))?;
        Ok(ctx.spawn("image-push", move || {
            let mut progress =
                vec![json!({"status": format!("Pushing {} to {}", job.name(), job.dest())})];
            let res = job.run(&mut |v| progress.push(v));
            Box::new(move |_: &mut Supervisor| match res {
                Ok(d) => {
                    progress.push(json!({"status": format!("Pushed {d}")}));
                    lines(200, &progress)
                }
                Err(e) => fail_lines(&e.into(), progress),
            }) as Finish
        }))
    }

    fn commit(&self, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
        let cid = required(req, "container")?;
        let Some(repo) = req.query_param("repo").filter(|r| !r.is_empty()) else {
            return Err(HyperdError::BadParameter(
                "repo (the new image's name) is required".into(),
            ));
        };
        let repo = match req.query_param("tag").filter(|t| !t.is_empty()) {
            Some(t) => format!("{repo}:{t}"),
            None => repo.to_string(),
        };
        let config: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&req.body).map_err(|e| {
                HyperdError::BadParameter(format!(
                    "the container config body is not valid JSON: {e}"
                ))
            })?
        };
        let job = self.pods.prepare_commit(ctx.sup, cid, &repo, &config)?;
        let jobs = ctx.jobs.clone();
        Ok(answer_later(ctx, "commit", move || job.run(&jobs)))
    }

    fn pod_create(&mut self, ctx: &mut Ctx, req: &Request) -> Result<Response, HyperdError> {
        let text = match req.query_param("podArgs") {
            Some(a) => a.to_string(),
            None => String::from_utf8_lossy(&req.body).to_string(),
        };
        if text.trim().is_empty() {
            return Err(HyperdError::BadParameter(
                "podArgs (the pod JSON) is required".into(),
            ));
        }
        // hyperd answered 201 Created.
        Ok(ok_with(201, &self.pods.create_pod(ctx.sup, &text)?))
    }

    fn pod_start(&mut self, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
        let id = required(req, "podId")?;
        let vm = req.query_param("vmId").filter(|v| !v.is_empty());
        let job = self.pods.prepare_start(ctx.sup, id, vm)?;
        let jobs = ctx.jobs.clone();
        Ok(answer_later(ctx, "pod-start", move || {
            let pod_id = job.pod_id().to_string();
            job.run(&jobs).map(|()| pod_id)
        }))
    }

    fn pod_stop(&mut self, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
        let id = required(req, "podId")?;
        // hyperctl 1.1.0 sends `stopVm`; `stopVM` is accepted too.
        let stop_vm = match req
            .query_param("stopVm")
            .or_else(|| req.query_param("stopVM"))
            .unwrap_or("yes")
        {
            "yes" | "true" | "" => true,
            "no" | "false" => false,
            other => {
                return Err(HyperdError::BadParameter(format!(
                    "stopVm must be yes or no, not {other:?}"
                )))
            }
        };
        let job = self.pods.prepare_stop(ctx.sup, id, stop_vm)?;
        let jobs = ctx.jobs.clone();
        Ok(answer_later(ctx, "pod-stop", move || {
            let pod_id = job.pod_id().to_string();
            job.run(&jobs).map(|()| pod_id)
        }))
    }

    fn pod_delete(&mut self, ctx: &mut Ctx, req: &Request) -> Result<Response, HyperdError> {
        let id = required(req, "podId")?;
        Ok(ok(&self.pods.delete(ctx.sup, id)?))
    }

    fn vm_create(&mut self, ctx: &mut Ctx) -> Result<Reply, HyperdError> {
        let job = self.pods.prepare_create_vm()?;
        let jobs = ctx.jobs.clone();
        Ok(answer_later(ctx, "vm-create", move || job.run(&jobs)))
    }

    fn vm_kill(&mut self, ctx: &mut Ctx, req: &Request) -> Result<Response, HyperdError> {
        let vm = required(req, "vm")?;
        self.pods.kill(ctx.sup, vm)?;
        Ok(ok(vm))
    }

    /// `GET /list?item=pod|container|vm[&pod=][&vm=]`. As in hyperd, `pod`
    /// keeps only that pod (by id or name) and `vm` only what runs in that
    /// VM; both must agree. hyperd answered 201.
    fn list(&mut self, ctx: &mut Ctx, req: &Request) -> Response {
        let item = req.query_param("item").unwrap_or("");
        let pod_filter = req.query_param("pod").filter(|p| !p.is_empty());
        let vm_filter = req.query_param("vm").filter(|v| !v.is_empty());
        let sup = &ctx.sup;
        let vm_of = |p: &crate::model::Pod| {
            p.vm.as_ref()
                .and_then(|v| pods::vm_id(sup, v))
                .unwrap_or_default()
        };
        let selected: Vec<&crate::model::Pod> = sup
            .state()
            .pods
            .values()
            .filter(|p| pod_filter.is_none_or(|f| p.id == f || p.name == f))
            .filter(|p| vm_filter.is_none_or(|v| vm_of(p) == v))
            .collect();
        match item {
            "pod" => {
                let data: Vec<String> = selected
                    .iter()
                    .map(|p| {
                        let status = if p.paused { "paused" } else { p.state.as_str() };
                        format!("{}:{}:{}:{}", p.id, p.name, vm_of(p), status)
                    })
                    .collect();
                Response::json(201, &json!({"item": "pod", "podData": data}))
            }
            "container" => {
                let data: Vec<String> = selected
                    .iter()
                    .flat_map(|p| {
                        p.containers
                            .iter()
                            .map(move |c| format!("{}:{}:{}:{}", c.id, c.name, p.id, c.state))
                    })
                    .collect();
                Response::json(201, &json!({"item": "container", "cData": data}))
            }
            "vm" => {
                let paused: Vec<&str> = selected
                    .iter()
                    .filter(|p| p.paused)
                    .map(|p| p.id.as_str())
                    .collect();
                let data: Vec<String> = pods::vms(sup)
                    .into_iter()
                    .filter(|(vm, pod)| {
                        vm_filter.is_none_or(|f| vm == f)
                            && pod_filter.is_none_or(|_| selected.iter().any(|p| &p.id == pod))
                    })
                    .map(|(vm, pod)| {
                        let status = if pod.is_empty() {
                            "idle"
                        } else if paused.contains(&pod.as_str()) {
                            "paused"
                        } else {
                            "associated"
                        };
                        format!("{vm}:{pod}:{status}")
                    })
                    .collect();
                Response::json(201, &json!({"item": "vm", "vmData": data}))
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
                "Images": self.pods.image_count(),
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
            Err(e) => {
                return fail(&HyperdError::BadParameter(format!(
                    "auth body is not valid JSON: {e}"
                )))
            }
        };
        if a.username.is_empty() {
            return fail(&HyperdError::BadParameter("username is required".into()));
        }
        let server = if a.serveraddress.is_empty() {
            "https://index.docker.io/v1/".to_string()
        } else {
            a.serveraddress.clone()
        };
        let entry = json!({"username": a.username, "password": a.password, "email": a.email});
        if let Err(e) = ctx.sup.store().save_credentials(&server, entry) {
            return fail(&HyperdError::Other(format!(
                "cannot store credentials: {e}"
            )));
        }
        Response::json(
            200,
            &json!({"Status": "Login Succeeded", "IdentityToken": ""}),
        )
    }
}

/// Runs `work` on a worker thread; the id it gives (or its error) answers
/// in hyperd's envelope.
fn answer_later<F>(ctx: &Ctx, what: &str, work: F) -> Reply
where
    F: FnOnce() -> Result<String, PodError> + Send + 'static,
{
    ctx.spawn(what, move || {
        let res = work();
        Box::new(move |_: &mut Supervisor| match res {
            Ok(id) => ok(&id),
            Err(e) => fail(&e.into()),
        }) as Finish
    })
}

/// Like [`answer_later`], with the success envelope's status chosen (hyperd
/// answered some commands 201).
fn answer_later_now<F>(ctx: &Ctx, what: &str, status: u16, work: F) -> Reply
where
    F: FnOnce() -> Result<String, PodError> + Send + 'static,
{
    ctx.spawn(what, move || {
        let res = work();
        Box::new(move |_: &mut Supervisor| match res {
            Ok(id) => ok_with(status, &id),
            Err(e) => fail(&e.into()),
        }) as Finish
    })
}

/// The answer of a route whose errors use the envelope.
fn answer<T>(r: Result<T, HyperdError>, f: impl FnOnce(T) -> Reply) -> Reply {
    match r {
        Ok(v) => f(v),
        Err(e) => Reply::Now(fail(&e)),
    }
}

/// The route part of a hyperd path: hyperd's router serves every route both
/// bare and under an API version prefix (`/v1.1.0/info` is `/info`; hyperctl
/// 1.1.0 sends every request that way). A version is digits and dots, so
/// Flintlock's `/v1alpha1/...` is never taken for one.
fn route_path(path: &str) -> &str {
    let path = path.trim_end_matches('/');
    if let Some(rest) = path.strip_prefix("/v") {
        let end = rest.find('/').unwrap_or(rest.len());
        let version = &rest[..end];
        if !version.is_empty()
            && version.starts_with(|c: char| c.is_ascii_digit())
            && version.chars().all(|c| c.is_ascii_digit() || c == '.')
            && end < rest.len()
        {
            return &rest[end..];
        }
    }
    path
}

impl Face for Hyperd {
    fn handle(&mut self, ctx: &mut Ctx, req: &Request) -> Option<Reply> {
        let path = route_path(&req.path);
        if let Some(r) = self.route_more(ctx, req, path) {
            return Some(r);
        }
        let now = |r: Result<Response, HyperdError>| answer(r, Reply::Now);
        let later = |r: Result<Reply, HyperdError>| answer(r, |r| r);
        if let Some(r) = stdio::route(self, ctx, req, path) {
            return Some(r);
        }
        let r = match (&req.method, path) {
            (Method::Get, "/info") => Reply::Now(self.info(ctx)),
            (Method::Get, "/list") => Reply::Now(self.list(ctx, req)),
            (Method::Post, "/pod/create") => now(self.pod_create(ctx, req)),
            (Method::Post, "/pod/start") => later(self.pod_start(ctx, req)),
            (Method::Post, "/pod/stop") => later(self.pod_stop(ctx, req)),
            (Method::Delete, "/pod") => now(self.pod_delete(ctx, req)),
            (Method::Post, "/vm/create") => later(self.vm_create(ctx)),
            (Method::Delete, "/vm") => now(self.vm_kill(ctx, req)),
            (Method::Post, "/auth") => Reply::Now(self.auth(ctx, req)),
            (Method::Get, "/images/get") => Reply::Now(self.images_get(req)),
            (Method::Post, "/image/create") => self.image_create(ctx, req),
            (Method::Delete, "/image") => now(self.image_remove(ctx, req)),
            (Method::Post, "/image/build") => self.image_build(ctx, req),
            (Method::Post, "/image/push" | "/images/push") => later(self.image_push(ctx, req)),
            (Method::Post, "/container/commit") => later(self.commit(ctx, req)),
            (
                _,
                "/info" | "/list" | "/pod/create" | "/pod/start" | "/pod/stop" | "/pod"
                | "/vm/create" | "/vm" | "/auth" | "/images/get" | "/image/create" | "/image"
                | "/image/build" | "/image/push" | "/container/commit",
            ) => not_allowed(req),
            _ => return None,
        };
        Some(r)
    }

    fn resume(&mut self, sup: &mut Supervisor, jobs: &Jobs) {
        self.pods.resume(sup, jobs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_prefix_is_stripped() {
        assert_eq!(route_path("/v1.1.0/info"), "/info");
        assert_eq!(route_path("/v1.2/pod/create/"), "/pod/create");
        assert_eq!(route_path("/info"), "/info");
        assert_eq!(route_path("/v1alpha1/microvm"), "/v1alpha1/microvm");
        assert_eq!(route_path("/v1.1.0"), "/v1.1.0");
        assert_eq!(route_path("/vm"), "/vm");
        assert_eq!(route_path("/volumes/x"), "/volumes/x");
    }

    #[test]
    fn statuses_follow_the_message() {
        assert_eq!(
            status_for(&HyperdError::NoSuch("pod x".into()).to_string()),
            404
        );
        assert_eq!(
            status_for(&HyperdError::BadParameter("x".into()).to_string()),
            400
        );
        assert_eq!(
            status_for(&HyperdError::Conflict("x".into()).to_string()),
            409
        );
        assert_eq!(status_for("boom"), 500);
    }
}
