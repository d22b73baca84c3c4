//! `PUT`/`PATCH`/`GET /mmds` (any JSON value) and `PUT /mmds/config`.

use serde_json::Value;

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/mmds` and `/mmds/config`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    match (r.method, r.rest) {
        ("GET", []) => Ok(VmmAction::GetMmds),
        ("PUT", []) => Ok(VmmAction::PutMmds(r.json::<Value>()?)),
        ("PATCH", []) => Ok(VmmAction::PatchMmds(r.json::<Value>()?)),
        ("PUT", ["config"]) => Ok(VmmAction::ConfigureMmds(r.json()?)),
        _ => Err(r.invalid()),
    }
}
