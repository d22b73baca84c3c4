//! hyperd's `/version`, `/_ping` and `/service/*` routes, and the dispatch
//! of the routes in `pods.rs`, `containers.rs` and `images.rs` (hyperd
//! v1.1.0's `server/router/*`, except the container stdio routes).

use ember_http::{Method, Reply, Request, Response};
use serde_json::{json, Value};

use super::{answer, hostname, required, Hyperd, HyperdError};
use crate::server::Ctx;

/// Routes this file dispatches, for the 405 of a known path.
const PATHS: &[&str] = &[
    "/version",
    "/_ping",
    "/pod/info",
    "/pod/stats",
    "/pod/labels",
    "/pod/kill",
    "/pod/pause",
    "/pod/unpause",
    "/container/info",
    "/container/create",
    "/container/rename",
    "/container/start",
    "/container/stop",
    "/container/kill",
    "/container/remove",
    "/image/load",
    "/images/save",
    "/service/list",
    "/service/add",
    "/service/update",
    "/service",
];

/// `/pod/{id}/portmappings` and `/pod/{id}/portmappings/{action}`.
fn port_mapping_path(path: &str) -> Option<(&str, Option<&str>)> {
    let rest = path.strip_prefix("/pod/")?;
    let mut parts = rest.split('/');
    let id = parts.next().filter(|i| !i.is_empty())?;
    if parts.next()? != "portmappings" {
        return None;
    }
    match (parts.next(), parts.next()) {
        (None, _) => Some((id, None)),
        (Some(a), None) if !a.is_empty() => Some((id, Some(a))),
        _ => None,
    }
}

impl Hyperd {
    /// `GET /version`: `{"ID", "Version", "ApiVersion"}`. hyperd put its
    /// version in quotes inside the string (`"\"1.1.0\""`); ember does not.
    fn version(&self) -> Response {
        Response::json(
            200,
            &json!({
                "ID": hostname(),
                "Version": env!("CARGO_PKG_VERSION"),
                "ApiVersion": super::API_VERSION,
            }),
        )
    }

    /// `GET /service/list?podId=`: the pod's services (always none: a spec
    /// with services is refused).
    fn service_list(&self, ctx: &mut Ctx, req: &Request) -> Result<Response, HyperdError> {
        let id = required(req, "podId")?;
        let p = ctx
            .sup
            .pod(id)
            .map_err(|_| HyperdError::NoSuch(format!("pod {id}")))?;
        let spec: Value = serde_json::from_str(&p.spec).unwrap_or(Value::Null);
        let list = spec["services"].as_array().cloned().unwrap_or_default();
        Ok(Response::json(200, &list))
    }

    /// The routes of hyperd v1.1.0 that `mod.rs` does not match itself;
    /// `None` for other paths.
    pub(super) fn route_more(&mut self, ctx: &mut Ctx, req: &Request, path: &str) -> Option<Reply> {
        let now = |r: Result<Response, HyperdError>| answer(r, Reply::Now);
        let later = |r: Result<Reply, HyperdError>| answer(r, |r| r);
        if let Some((id, action)) = port_mapping_path(path) {
            return Some(match (&req.method, action) {
                (Method::Get, None) => now(self.port_mappings(ctx, id)),
                (Method::Put, Some(a)) => now(self.change_port_mappings(ctx, req, id, a)),
                _ => super::not_allowed(req),
            });
        }
        let r = match (&req.method, path) {
            (Method::Get, "/version") => Reply::Now(self.version()),
            (Method::Get, "/_ping") => Reply::Now(Response::text(200, "OK")),
            (Method::Get, "/pod/info") => now(self.pod_info(ctx, req)),
            (Method::Get, "/pod/stats") => now(self.pod_stats(ctx, req)),
            (Method::Post, "/pod/labels") => now(self.pod_labels(ctx, req)),
            (Method::Post, "/pod/kill") => later(self.pod_kill(ctx, req)),
            (Method::Post, "/pod/pause") => later(self.pod_pause(ctx, req, true)),
            (Method::Post, "/pod/unpause") => later(self.pod_pause(ctx, req, false)),
            (Method::Get, "/container/info") => now(self.container_info(ctx, req)),
            (Method::Post, "/container/create") => now(self.container_create(ctx, req)),
            (Method::Post, "/container/rename") => now(self.container_rename(ctx, req)),
            (Method::Post, "/container/start") => now(self.container_start(ctx, req)),
            (Method::Post, "/container/stop") => later(self.container_stop(ctx, req)),
            (Method::Post, "/container/kill") => later(self.container_kill(ctx, req)),
            (Method::Post, "/container/remove") => now(self.container_remove(ctx, req)),
            (Method::Post, "/image/load") => later(self.image_load(ctx, req)),
            (Method::Get, "/images/save") => later(self.images_save(ctx, req)),
            (Method::Get, "/service/list") => now(self.service_list(ctx, req)),
            (Method::Post, "/service/add" | "/service/update") | (Method::Delete, "/service") => {
                now(Err(HyperdError::BadParameter(
                    "services are not supported by emberd yet".into(),
                )))
            }
            (_, p) if PATHS.contains(&p) => super::not_allowed(req),
            _ => return None,
        };
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mapping_paths() {
        assert_eq!(
            port_mapping_path("/pod/pod-x/portmappings"),
            Some(("pod-x", None))
        );
        assert_eq!(
            port_mapping_path("/pod/pod-x/portmappings/add"),
            Some(("pod-x", Some("add")))
        );
        assert_eq!(port_mapping_path("/pod/info"), None);
        assert_eq!(port_mapping_path("/pod//portmappings"), None);
        assert_eq!(port_mapping_path("/pod/x/portmappings/add/more"), None);
        assert_eq!(port_mapping_path("/pod/x/other"), None);
    }
}
