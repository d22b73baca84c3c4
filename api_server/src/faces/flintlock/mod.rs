//! The Flintlock API (../shared/seeds/flintlock-swagger.json) over HTTP:
//! protojson (lowerCamelCase, enums as strings), errors as `{code,
//! message, details}` with gRPC codes and matching HTTP statuses. The
//! MicroVMs and their reconcile live in [`crate::model::microvms`]; this
//! face only translates.
//!
//! Routing: `GET /v1alpha1/microvm/{x}` is a Get when `x` has the shape of
//! a uid (a ULID, any case, or the UniK instance name `fl-<uid>`), answering
//! 404 with code 5 when no MicroVM has it; anything else is a List of
//! namespace `x` (the original's two routes shared one template and List
//! shadowed Get).
//!
//! Bodies are read as grpc-gateway reads protojson: lowerCamelCase or proto
//! field names, enums by name or number, 64/32-bit integers as numbers or
//! strings ([`MicroVmSpec`]'s serde attributes).
//!
//! The gRPC face ([`grpc`]) serves the same MicroVMs through the same model.

pub mod grpc;

use ember_http::{Method, Reply, Request, Response};
use serde_json::{json, Value};

use crate::model::jobs::Jobs;
use crate::model::microvms::{self, MicroVm, MicroVmError, MicroVmSpec, RetryPolicy};
use crate::model::supervisor::Supervisor;
use crate::server::{Ctx, Face};

/// Errors from Flintlock requests, as the wire shows them.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FlintlockError(#[from] MicroVmError);

impl FlintlockError {
    fn code(&self) -> (u16, i32) {
        match self.0 {
            MicroVmError::Invalid(_) => (400, 3),
            MicroVmError::NotFound(_) => (404, 5),
            MicroVmError::Exists(_) => (409, 6),
            MicroVmError::Internal(_) => (500, 13),
        }
    }
    fn response(&self) -> Response {
        let (status, code) = self.code();
        Response::json(
            status,
            &json!({"code": code, "message": self.to_string(), "details": []}),
        )
    }
}

fn invalid(m: impl Into<String>) -> FlintlockError {
    FlintlockError(MicroVmError::Invalid(m.into()))
}

/// The protojson of a MicroVM.
fn microvm_json(vm: &MicroVm) -> Value {
    serde_json::to_value(vm).unwrap_or(Value::Null)
}

/// The Flintlock face.
#[derive(Default)]
pub struct Flintlock {
    pub policy: RetryPolicy,
}

impl Flintlock {
    fn create(&mut self, ctx: &mut Ctx, req: &Request) -> Response {
        let body: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(e) => return invalid(format!("invalid JSON body: {e}")).response(),
        };
        // The body is the spec; accept the gRPC request shape {"microvm": spec} too.
        let raw = if body.get("microvm").is_some() && body.get("kernel").is_none() {
            body["microvm"].clone()
        } else {
            body
        };
        let spec: MicroVmSpec = match serde_json::from_value(raw) {
            Ok(s) => s,
            Err(e) => return invalid(format!("invalid MicroVMSpec: {e}")).response(),
        };
        match microvms::create(ctx.sup, ctx.jobs, spec, self.policy) {
            Ok(vm) => Response::json(200, &json!({"microvm": microvm_json(&vm)})),
            Err(e) => FlintlockError(e).response(),
        }
    }
}

impl Face for Flintlock {
    fn handle(&mut self, ctx: &mut Ctx, req: &Request) -> Option<Reply> {
        let path = req.path.trim_end_matches('/');
        let rest = path.strip_prefix("/v1alpha1/microvm")?;
        let seg: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let r = match (&req.method, seg.as_slice()) {
            (Method::Post, []) => self.create(ctx, req),
            (Method::Get, [x]) if microvms::is_uid(x) => match microvms::get(ctx.sup, x) {
                Some(vm) => Response::json(200, &json!({"microvm": microvm_json(&vm)})),
                None => FlintlockError(MicroVmError::NotFound(format!("microvm {x} not found")))
                    .response(),
            },
            (Method::Get, [x]) => {
                let list: Vec<Value> = microvms::list(ctx.sup, x, req.query_param("name"))
                    .iter()
                    .map(microvm_json)
                    .collect();
                Response::json(200, &json!({"microvm": list}))
            }
            (Method::Delete, [uid]) => match microvms::delete(ctx.sup, uid) {
                Ok(()) => Response::json(200, &json!({})),
                Err(e) => FlintlockError(e).response(),
            },
            _ => Response::json(
                405,
                &json!({"code": 12, "message": format!("{} {} is not a Flintlock route", req.method, req.path), "details": []}),
            ),
        };
        Some(Reply::Now(r))
    }

    fn resume(&mut self, sup: &mut Supervisor, jobs: &Jobs) {
        microvms::resume(sup, jobs, self.policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_grpc_codes() {
        assert_eq!(
            FlintlockError(MicroVmError::NotFound("x".into())).code(),
            (404, 5)
        );
        assert_eq!(
            FlintlockError(MicroVmError::Invalid("x".into())).code(),
            (400, 3)
        );
    }
}
