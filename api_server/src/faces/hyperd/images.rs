//! hyperd's image archive routes: `POST /image/load` (a `docker save` or
//! OCI archive tarball as the body, hyperctl `Load`) and `GET /images/save`
//! (the images as an OCI image layout tarball, hyperctl `Save`).

use std::collections::BTreeMap;
use std::sync::Arc;

use ember_http::{Reply, Request, Response};
use serde_json::json;

use super::{fail, fail_lines, lines, Hyperd, HyperdError};
use crate::model::pods::ImageSource;
use crate::model::supervisor::Supervisor;
use crate::server::{Ctx, Finish};

/// A `refs` parameter: a JSON object of strings; empty, `null` and `{}`
/// mean none.
fn refs_param(req: &Request) -> Result<BTreeMap<String, String>, HyperdError> {
    match req.query_param("refs").map(str::trim) {
        None | Some("") | Some("null") => Ok(BTreeMap::new()),
        Some(r) => serde_json::from_str(r).map_err(|e| {
            HyperdError::BadParameter(format!("refs must be a JSON object of strings: {e}"))
        }),
    }
}

impl Hyperd {
    /// `POST /image/load?name=&refs=` with the archive as the body
    /// (chunked, `Content-Type: application/x-tar`): hyperd's JSON progress
    /// lines.
    pub(super) fn image_load(&self, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
        if !refs_param(req)?.is_empty() {
            return Err(HyperdError::BadParameter(
                "refs (references inside an OCI archive) are not supported: load the archive with name=repo:tag instead".into(),
            ));
        }
        if req.body.is_empty() {
            return Err(HyperdError::BadParameter(
                "the image archive (a docker save or OCI archive tarball) is required as the request body".into(),
            ));
        }
        let tag = req
            .query_param("name")
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        let job = self.pods.prepare_import(
            ctx.sup,
            ImageSource::Upload(Arc::new(req.body.clone())),
            tag,
        )?;
        Ok(ctx.spawn("image-load", move || {
            // A local archive has no progress to report.
            let res = job.run(&mut |_| {});
            Box::new(move |_: &mut Supervisor| match res {
                Ok(r) => lines(
                    200,
                    &[json!({"stream": format!("Loaded image: {} ({})\n", r.name, r.short_id)})],
                ),
                Err(e) => fail_lines(&e.into(), vec![]),
            }) as Finish
        }))
    }

    /// `GET /images/save?names=...&names=...&format=&refs=`: an
    /// `application/x-tar` body holding one OCI image layout.
    pub(super) fn images_save(&self, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
        let names: Vec<String> = req
            .query
            .iter()
            .filter(|(k, v)| k == "names" && !v.is_empty())
            .map(|(_, v)| v.clone())
            .collect();
        if names.is_empty() {
            return Err(HyperdError::BadParameter(
                "names (the images to save) is required".into(),
            ));
        }
        let refs = refs_param(req)?;
        let format = req.query_param("format").unwrap_or("").to_string();
        let pods = self.pods.clone();
        let scratch = ctx
            .sup
            .store()
            .staging_dir()
            .join(crate::model::new_id("save"));
        Ok(ctx.spawn("images-save", move || {
            let res = crate::model::store::Scratch::create(scratch)
                .map_err(|e| crate::model::pods::PodError::Failed(e.to_string()))
                .and_then(|s| pods.save_images(s.path(), &names, &format, &refs));
            Box::new(move |_: &mut Supervisor| match res {
                Ok(tar) => Response::bytes(200, "application/x-tar", tar),
                Err(e) => fail(&e.into()),
            }) as Finish
        }))
    }
}
