//! hyperd's container routes (not their stdio): `/container/info`,
//! `/container/create`, `/container/rename`, `/container/start`,
//! `/container/stop`, `/container/kill` and `/container/remove`, with the
//! original server's statuses (create and kill 201, remove 204).

use ember_http::{Reply, Request, Response};
use serde_json::{json, Value};

use super::pod_routes::{container_json, container_status, signal_param, unix_time};
use super::{answer_later_now, ok, required, Hyperd, HyperdError};
use crate::model::pods::find_container;
use crate::server::Ctx;

impl Hyperd {
    /// `GET /container/info?container=` (hyperctl `GetContainerInfo`):
    /// `types.ContainerInfo`.
    pub(super) fn container_info(
        &self,
        ctx: &mut Ctx,
        req: &Request,
    ) -> Result<Response, HyperdError> {
        let key = required(req, "container")?;
        let (p, i) = find_container(ctx.sup, key)
            .ok_or_else(|| HyperdError::NoSuch(format!("container {key}")))?;
        let c = &p.containers[i];
        let spec: Value = serde_json::from_str(&p.spec).unwrap_or(Value::Null);
        let cfg = self.pods.image_config(&c.image);
        Ok(Response::json(
            200,
            &json!({
                "container": container_json(
                    &self.pods,
                    c,
                    &spec["containers"][i],
                    spec["tty"].as_bool().unwrap_or(false),
                    cfg.as_ref(),
                ),
                "createdAt": unix_time(&p.created),
                "podID": p.id,
                "status": container_status(c),
            }),
        ))
    }

    /// `POST /container/create?podId=` with the container JSON as body
    /// (hyperctl `CreateContainer`): 201 `{"ID": <container id>}`.
    pub(super) fn container_create(
        &self,
        ctx: &mut Ctx,
        req: &Request,
    ) -> Result<Response, HyperdError> {
        let pod = req
            .query_param("podId")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                HyperdError::BadParameter("podId is required to create a new container".into())
            })?;
        let text = String::from_utf8_lossy(&req.body).to_string();
        let id = self.pods.add_container(ctx.sup, pod, &text)?;
        Ok(Response::json(201, &json!({ "ID": id })))
    }

    /// `POST /container/rename?oldName=&newName=`: the envelope with the new
    /// name as ID.
    pub(super) fn container_rename(
        &self,
        ctx: &mut Ctx,
        req: &Request,
    ) -> Result<Response, HyperdError> {
        let old = required(req, "oldName")?;
        let new = required(req, "newName")?;
        self.pods.rename_container(ctx.sup, old, new)?;
        Ok(ok(new))
    }

    /// `POST /container/start?container=`: refused with the way to do it.
    pub(super) fn container_start(
        &self,
        ctx: &mut Ctx,
        req: &Request,
    ) -> Result<Response, HyperdError> {
        let key = required(req, "container")?;
        self.pods.start_container(ctx.sup, key)?;
        Ok(ok(key))
    }

    /// `POST /container/stop?container=` (hyperctl `StopContainer`).
    pub(super) fn container_stop(
        &self,
        ctx: &mut Ctx,
        req: &Request,
    ) -> Result<Reply, HyperdError> {
        let key = required(req, "container")?;
        let job = self.pods.prepare_stop_container(ctx.sup, key)?;
        let jobs = ctx.jobs.clone();
        Ok(answer_later_now(ctx, "container-stop", 200, move || {
            job.run(&jobs)
        }))
    }

    /// `POST /container/kill?container=&signal=` (hyperctl `KillContainer`,
    /// what `hyperctl kill` sends without `-p`): 201.
    pub(super) fn container_kill(
        &self,
        ctx: &mut Ctx,
        req: &Request,
    ) -> Result<Reply, HyperdError> {
        let key = required(req, "container")?;
        let signal = signal_param(req)?;
        let job = self.pods.prepare_kill_container(ctx.sup, key, signal)?;
        Ok(answer_later_now(ctx, "container-kill", 201, move || {
            job.run()
        }))
    }

    /// `POST /container/remove?container=` (hyperctl `RemoveContainer`):
    /// 204.
    pub(super) fn container_remove(
        &self,
        ctx: &mut Ctx,
        req: &Request,
    ) -> Result<Response, HyperdError> {
        let key = required(req, "container")?;
        self.pods.remove_container(ctx.sup, key)?;
        Ok(Response::empty(204))
    }
}
