//! The UniK REST API (../shared/seeds/unik-api.md): routes, PascalCase JSON
//! and status codes, translated to and from the supervisor's model.
//!
//! Differences from the original daemon, on purpose: names are matched
//! exactly (by id or name), never by substring; "not found" is 404 (the
//! original answered 500); `remote-delete` deletes (the original pushed).
//! Both `follow` and the seed's spelling `fallow` are accepted for logs.
//!
//! Images emberd keeps for itself (hyperd's pod VM image,
//! [`POD_IMAGE`]) do not exist for UniK: they are not listed, and getting,
//! deleting, pushing or running them answers 404 as for any unknown image;
//! creating or pulling an image under that name is refused (409).

use std::collections::BTreeMap;

use ember_http::{Method, Reply, Request, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::faces::multipart::{parse_form, Form};
use crate::model::artifacts::{HubDelete, HubFault, HubJobError, HubPull, HubPush};
use crate::model::pods::POD_IMAGE;
use crate::model::supervisor::{RunRequest, Supervisor, SupervisorError};
use crate::model::{Image, Instance, Volume, VolumeFormat, PROVIDER};
use crate::server::{status_of, Ctx, Face, Finish};

/// Errors specific to decoding UniK requests.
#[derive(Debug, thiserror::Error)]
pub enum UnikError {
    #[error("invalid form body: {0}")]
    Form(#[from] crate::faces::multipart::FormError),
    #[error("invalid JSON body: {0}")]
    Json(String),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("invalid {what}: {value:?}")]
    BadParam { what: &'static str, value: String },
}

const INFRASTRUCTURE: &str = "EMBER";

/// UniK's Image object.
pub fn image_json(i: &Image) -> Value {
    let mappings: Vec<Value> = i
        .mounts
        .iter()
        .enumerate()
        .map(|(n, m)| json!({"MountPoint": m, "DeviceName": format!("/dev/vd{}", (b'a' + n as u8) as char)}))
        .collect();
    json!({
        "Id": i.id,
        "Name": i.name,
        "SizeMb": i.size_mb,
        "Infrastructure": INFRASTRUCTURE,
        "Created": i.created,
        "StageSpec": {"ImageFormat": i.format, "XenVirtualizationType": ""},
        "RunSpec": {
            "DeviceMappings": mappings,
            "DefaultInstanceMemory": i.default_memory_mb,
            "MinInstanceDiskMB": 0,
            "StorageDriver": "VIRTIO",
            "VsphereNetworkType": "",
            "Compiler": i.compiler(),
        },
        // ember's: the image's instant-start switch (null: emberd's
        // --snapshot-starts decides).
        "SnapshotStarts": i.snapshot_starts,
    })
}

/// UniK's Instance object.
pub fn instance_json(i: &Instance) -> Value {
    json!({
        "Id": i.id,
        "Name": i.name,
        "State": i.state.as_str(),
        "IpAddress": "",
        "ImageId": i.image_id,
        "Infrastructure": INFRASTRUCTURE,
        "Created": i.created,
        // ember's: "snapshot" (restored from its image's snapshot) or "cold".
        "StartedFrom": i.started_from.map(|m| m.as_str()),
    })
}

/// UniK's Volume object.
pub fn volume_json(v: &Volume) -> Value {
    json!({
        "Id": v.id,
        "Name": v.name,
        "SizeMb": v.size_mb,
        "Attachment": v.attachment.clone().unwrap_or_default(),
        "Infrastructure": INFRASTRUCTURE,
        "Created": v.created,
    })
}

/// Whether UniK may see `i` (not one of emberd's internal images).
fn visible(i: &Image) -> bool {
    i.name != POD_IMAGE
}

/// The image `key` names, by id or name, if UniK may see it; else the
/// same 404 as for an image that does not exist.
fn unik_image<'a>(sup: &'a Supervisor, key: &str) -> Result<&'a Image, Response> {
    match sup.image(key) {
        Ok(i) if visible(i) => Ok(i),
        Ok(_) => Err(sup_error(&SupervisorError::NotFound {
            what: "image",
            key: key.to_string(),
        })),
        Err(e) => Err(sup_error(&e)),
    }
}

/// 409 for a create or pull under an internal image's name.
fn reserved(name: &str) -> Option<Response> {
    (name == POD_IMAGE).then(|| {
        error(
            409,
            format!("the image name {name} is reserved for hyperd's pod VMs"),
        )
    })
}

fn error(status: u16, msg: impl std::fmt::Display) -> Response {
    Response::json(status, &json!({"Error": msg.to_string()}))
}

fn sup_error(e: &SupervisorError) -> Response {
    error(status_of(e), e)
}

fn now(r: Response) -> Option<Reply> {
    Some(Reply::Now(r))
}

fn truthy(v: Option<&str>) -> bool {
    matches!(
        v.map(|s| s.trim().to_ascii_lowercase()).as_deref(),
        Some("true" | "1" | "yes" | "on")
    )
}

/// A parameter from the query string, else from the form.
fn param(req: &Request, form: &Form, name: &str) -> Option<String> {
    req.query_param(name)
        .map(|s| s.to_string())
        .or_else(|| form.text(name))
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect()
}

/// `POST /instances/run` body.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunBody {
    instance_name: String,
    image_name: String,
    #[serde(default)]
    mounts: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    memory_mb: i64,
    #[serde(default)]
    no_cleanup: bool,
    #[serde(default)]
    debug_mode: bool,
}

/// The UniK face.
#[derive(Default)]
pub struct Unik;

impl Face for Unik {
    fn handle(&mut self, ctx: &mut Ctx, req: &Request) -> Option<Reply> {
        let seg = segments(&req.path);
        let m = &req.method;
        match (m, seg.as_slice()) {
            (Method::Get, ["available_compilers"]) => {
                now(Response::json(200, &ctx.sup.compilers().names()))
            }
            (Method::Get, ["available_providers"]) => now(Response::json(200, &[PROVIDER])),
            (Method::Get, ["describe_compiler"]) => now(describe(ctx.sup, req)),
            (Method::Get, ["images"]) => {
                let v: Vec<Value> = ctx
                    .sup
                    .state()
                    .images
                    .values()
                    .filter(|i| visible(i))
                    .map(image_json)
                    .collect();
                now(Response::json(200, &v))
            }
            (Method::Get, ["images", name]) => now(match unik_image(ctx.sup, name) {
                Ok(i) => Response::json(200, &image_json(i)),
                Err(r) => r,
            }),
            (Method::Post, ["images", name, "create"]) => Some(create_image(ctx, req, name)),
            (Method::Delete, ["images", name]) => now(
                match unik_image(ctx.sup, name)
                    .map(|i| i.id.clone())
                    .and_then(|id| {
                        ctx.sup
                            .delete_image(&id, truthy(req.query_param("force")))
                            .map_err(|e| sup_error(&e))
                    }) {
                    Ok(()) => Response::empty(204),
                    Err(r) => r,
                },
            ),
            (Method::Post, ["images", "push", name]) => Some(hub_push(ctx, req, name)),
            (Method::Post, ["images", "pull", name]) => Some(hub_pull(ctx, req, name)),
            (Method::Post, ["images", "remote-delete", name]) => Some(hub_delete(ctx, req, name)),
            (Method::Get, ["instances"]) => {
                let v: Vec<Value> = ctx
                    .sup
                    .state()
                    .instances
                    .values()
                    .map(instance_json)
                    .collect();
                now(Response::json(200, &v))
            }
            (Method::Post, ["instances", "run"]) => now(run(ctx.sup, req)),
            (Method::Get, ["instances", id]) => now(match ctx.sup.instance(id) {
                Ok(i) => Response::json(200, &instance_json(i)),
                Err(e) => sup_error(&e),
            }),
            (Method::Delete, ["instances", id]) => now(
                match ctx
                    .sup
                    .delete_instance(id, truthy(req.query_param("force")))
                {
                    Ok(()) => Response::empty(204),
                    Err(e) => sup_error(&e),
                },
            ),
            (Method::Post, ["instances", id, "start"]) => now(match ctx.sup.start_instance(id) {
                Ok(i) => Response::json(200, &instance_json(&i)),
                Err(e) => sup_error(&e),
            }),
            (Method::Post, ["instances", id, "stop"]) => now(match ctx.sup.stop_instance(id) {
                Ok(i) => Response::json(200, &instance_json(&i)),
                Err(e) => sup_error(&e),
            }),
            (Method::Get, ["instances", id, "logs"]) => Some(logs(ctx, req, id)),
            (Method::Get, ["volumes"]) => {
                let v: Vec<Value> = ctx.sup.state().volumes.values().map(volume_json).collect();
                now(Response::json(200, &v))
            }
            (Method::Get, ["volumes", name]) => now(match ctx.sup.volume(name) {
                Ok(v) => Response::json(200, &volume_json(v)),
                Err(e) => sup_error(&e),
            }),
            (Method::Post, ["volumes", name]) => Some(create_volume(ctx, req, name)),
            (Method::Delete, ["volumes", name]) => now(
                match ctx
                    .sup
                    .delete_volume(name, truthy(req.query_param("force")))
                {
                    Ok(()) => Response::empty(204),
                    Err(e) => sup_error(&e),
                },
            ),
            (Method::Post, ["volumes", name, "attach", inst]) => {
                let Some(mount) = req.query_param("mount") else {
                    return now(error(
                        400,
                        "missing mount (query parameter: the mount point)",
                    ));
                };
                now(match ctx.sup.attach_volume(name, inst, mount) {
                    Ok(v) => Response::text(202, v.name),
                    Err(e) => sup_error(&e),
                })
            }
            (Method::Post, ["volumes", name, "detach"]) => now(match ctx.sup.detach_volume(name) {
                Ok(v) => Response::text(202, v.name),
                Err(e) => sup_error(&e),
            }),
            // Known paths with the wrong method.
            (
                _,
                ["available_compilers"
                | "available_providers"
                | "describe_compiler"
                | "images"
                | "instances"
                | "volumes", ..],
            ) => now(error(
                405,
                format!("method {m} is not allowed on {}", req.path),
            )),
            _ => None,
        }
    }
}

fn describe(sup: &Supervisor, req: &Request) -> Response {
    let (Some(p), Some(b), Some(l)) = (
        req.query_param("provider"),
        req.query_param("base"),
        req.query_param("lang"),
    ) else {
        return error(400, "describe_compiler needs provider, base and lang");
    };
    match sup.compilers().find(p, b, l) {
        Ok(c) => Response::text(200, c.description()),
        Err(e) => error(400, e),
    }
}

fn create_image(ctx: &mut Ctx, req: &Request, name: &str) -> Reply {
    if let Some(r) = reserved(name) {
        return Reply::Now(r);
    }
    let form = match parse_form(req.header("content-type"), &req.body) {
        Ok(f) => f,
        Err(e) => return Reply::Now(error(400, UnikError::Form(e))),
    };
    let get = |k: &str| param(req, &form, k);
    let (Some(provider), Some(base), Some(lang)) = (get("provider"), get("base"), get("lang"))
    else {
        return Reply::Now(error(
            400,
            "image create needs provider, base and lang (form fields or query)",
        ));
    };
    let Some(tar) = form.part("tarfile").map(|p| p.data.clone()) else {
        return Reply::Now(error(400, "missing tarfile (multipart file field)"));
    };
    let mounts: Vec<String> = get("mounts")
        .map(|m| {
            m.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let args = get("args").unwrap_or_default();
    let force = truthy(get("force").as_deref());
    // ember's: snapshot_starts=true|false (absent: emberd's default).
    let snapshot_starts = match get("snapshot_starts").as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) if truthy(Some(v)) => Some(true),
        Some(v)
            if matches!(
                v.to_ascii_lowercase().as_str(),
                "false" | "0" | "no" | "off"
            ) =>
        {
            Some(false)
        }
        Some(v) => {
            return Reply::Now(error(
                400,
                UnikError::BadParam {
                    what: "snapshot_starts",
                    value: v.to_string(),
                },
            ))
        }
    };
    let mut job = match ctx
        .sup
        .prepare_image(name, &provider, &base, &lang, force, &args, &mounts)
    {
        Ok(j) => j,
        Err(e) => return Reply::Now(sup_error(&e)),
    };
    job.snapshot_starts = snapshot_starts;
    ctx.spawn("compile", move || {
        let built = job.build(&tar);
        Box::new(
            move |sup: &mut Supervisor| match sup.finish_image(job, built) {
                Ok(img) => Response::json(201, &image_json(&img)),
                Err(e) => sup_error(&e),
            },
        ) as Finish
    })
}

fn run(sup: &mut Supervisor, req: &Request) -> Response {
    let body: RunBody = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => return error(400, UnikError::Json(e.to_string())),
    };
    if let Err(r) = unik_image(sup, &body.image_name) {
        return r;
    }
    let memory_mb = match u32::try_from(body.memory_mb) {
        Ok(m) => m,
        Err(_) => {
            return error(
                400,
                UnikError::BadParam {
                    what: "MemoryMb",
                    value: body.memory_mb.to_string(),
                },
            )
        }
    };
    let r = RunRequest {
        name: body.instance_name,
        image: body.image_name,
        mounts: body.mounts.unwrap_or_default(),
        env: body.env.unwrap_or_default(),
        memory_mb,
        no_cleanup: body.no_cleanup,
        debug_mode: body.debug_mode,
        ..Default::default()
    };
    match sup.run_instance(r) {
        Ok(i) => Response::json(201, &instance_json(&i)),
        Err(e) => sup_error(&e),
    }
}

fn logs(ctx: &mut Ctx, req: &Request, id: &str) -> Reply {
    let inst = match ctx.sup.instance(id) {
        Ok(i) => i.clone(),
        Err(e) => return Reply::Now(sup_error(&e)),
    };
    let path = ctx.sup.store().log_path(&inst.id);
    let follow = truthy(req.query_param("follow")) || truthy(req.query_param("fallow"));
    if follow {
        let delete = truthy(req.query_param("delete")).then(|| inst.id.clone());
        return ctx.follow_log(path, delete);
    }
    match std::fs::read(&path) {
        Ok(b) => Reply::Now(Response::bytes(200, "text/plain; charset=utf-8", b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Reply::Now(Response::bytes(
            200,
            "text/plain; charset=utf-8",
            Vec::new(),
        )),
        Err(e) => Reply::Now(error(500, format!("cannot read the log: {e}"))),
    }
}

fn create_volume(ctx: &mut Ctx, req: &Request, name: &str) -> Reply {
    let form = match parse_form(req.header("content-type"), &req.body) {
        Ok(f) => f,
        Err(e) => return Reply::Now(error(400, UnikError::Form(e))),
    };
    let size_mb = match req
        .query_param("size")
        .or(form.text("size").as_deref().map(|_| ""))
    {
        None => None,
        Some(_) => {
            let raw = param(req, &form, "size").unwrap_or_default();
            match raw.parse::<u64>() {
                Ok(0) => None,
                Ok(s) => Some(s),
                Err(_) => {
                    return Reply::Now(error(
                        400,
                        UnikError::BadParam {
                            what: "size",
                            value: raw,
                        },
                    ))
                }
            }
        }
    };
    if let Some(p) = param(req, &form, "provider") {
        if !p.is_empty() && p != PROVIDER {
            return Reply::Now(error(
                400,
                format!("unknown provider {p:?}; available providers: {PROVIDER}"),
            ));
        }
    }
    // The UniK CLI always sends `type` (default "ext2"). ember builds ext4
    // volumes; ext2 is accepted as a request for a Linux filesystem.
    if let Some(t) = param(req, &form, "type") {
        if !matches!(t.to_ascii_lowercase().as_str(), "" | "ext2" | "ext4") {
            return Reply::Now(error(
                400,
                UnikError::BadParam {
                    what: "type (ember's volumes are ext4; ext2 and ext4 are accepted)",
                    value: t,
                },
            ));
        }
    }
    let raw = truthy(param(req, &form, "raw").as_deref());
    let data = form.part("tarfile").map(|p| p.data.clone());
    let format = if raw {
        VolumeFormat::Raw
    } else {
        VolumeFormat::Ext4
    };
    let job = match ctx
        .sup
        .prepare_volume(name, size_mb, format, data.is_some())
    {
        Ok(j) => j,
        Err(e) => return Reply::Now(sup_error(&e)),
    };
    ctx.spawn("volume", move || {
        let built = job.build(data.as_deref(), raw);
        Box::new(
            move |sup: &mut Supervisor| match sup.finish_volume(job, built) {
                Ok(v) => Response::json(201, &volume_json(&v)),
                Err(e) => sup_error(&e),
            },
        ) as Finish
    })
}

fn hub_error(e: &HubJobError) -> Response {
    let status = match e.fault() {
        HubFault::Invalid => 400,
        HubFault::NotFound => 404,
        HubFault::Denied => 403,
        HubFault::Conflict => 409,
        HubFault::Internal => 500,
        HubFault::Upstream => 502,
    };
    error(status, e)
}

fn hub_push(ctx: &mut Ctx, req: &Request, name: &str) -> Reply {
    if let Err(r) = unik_image(ctx.sup, name) {
        return Reply::Now(r);
    }
    let job = match HubPush::prepare(ctx.sup, name, &req.body) {
        Ok(j) => j,
        Err(e) => return Reply::Now(hub_error(&e)),
    };
    ctx.spawn("push", move || {
        let res = job.run();
        Box::new(move |_: &mut Supervisor| match res {
            Ok(()) => Response::empty(202),
            Err(e) => hub_error(&e),
        }) as Finish
    })
}

fn hub_pull(ctx: &mut Ctx, req: &Request, name: &str) -> Reply {
    if let Some(r) = reserved(name) {
        return Reply::Now(r);
    }
    if let Some(p) = req.query_param("provider") {
        if p != PROVIDER {
            return Reply::Now(error(
                400,
                format!("unknown provider {p:?}; available providers: {PROVIDER}"),
            ));
        }
    }
    let force = truthy(req.query_param("force"));
    let job = match HubPull::prepare(ctx.sup, name, force, &req.body) {
        Ok(j) => j,
        Err(e) => return Reply::Now(hub_error(&e)),
    };
    ctx.spawn("pull", move || {
        let pulled = job.run();
        Box::new(move |sup: &mut Supervisor| match job.install(sup, pulled) {
            Ok(i) => Response::json(202, &image_json(&i)),
            Err(e) => hub_error(&e),
        }) as Finish
    })
}

fn hub_delete(ctx: &mut Ctx, req: &Request, name: &str) -> Reply {
    let job = match HubDelete::prepare(name, &req.body) {
        Ok(j) => j,
        Err(e) => return Reply::Now(hub_error(&e)),
    };
    ctx.spawn("remote-delete", move || {
        let res = job.run();
        Box::new(move |_: &mut Supervisor| match res {
            Ok(()) => Response::empty(202),
            Err(e) => hub_error(&e),
        }) as Finish
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_image() -> Image {
        Image {
            id: "img-1".into(),
            name: "hello".into(),
            provider: "ember".into(),
            base: "ember".into(),
            lang: "c".into(),
            created: "2026-01-01T00:00:00Z".into(),
            size_mb: 1,
            kernel: "kernel.elf".into(),
            initrd: None,
            boot_args: "console=ttyS0".into(),
            args: String::new(),
            mounts: vec!["/data".into(), "/logs".into()],
            default_memory_mb: 64,
            format: "elf-pvh".into(),
            snapshot_starts: None,
        }
    }

    #[test]
    fn json_shapes_are_pascal_case() {
        let img = test_image();
        let j = image_json(&img);
        assert_eq!(j["Infrastructure"], "EMBER");
        assert_eq!(j["RunSpec"]["Compiler"], "ember-c-ember");
        assert_eq!(j["RunSpec"]["DeviceMappings"][1]["DeviceName"], "/dev/vdb");
        assert_eq!(j["RunSpec"]["DefaultInstanceMemory"], 64);
    }

    #[test]
    fn the_pod_image_is_invisible_and_reserved() {
        let mut img = Image {
            name: POD_IMAGE.into(),
            ..test_image()
        };
        assert!(!visible(&img));
        img.name = "hello".into();
        assert!(visible(&img));
        assert_eq!(reserved(POD_IMAGE).map(|r| r.status), Some(409));
        assert!(reserved("hello").is_none());
    }

    #[test]
    fn truthiness_and_segments() {
        assert!(truthy(Some("true")));
        assert!(truthy(Some("1")));
        assert!(!truthy(Some("false")));
        assert!(!truthy(None));
        assert_eq!(segments("/images/a/create/"), vec!["images", "a", "create"]);
    }
}
