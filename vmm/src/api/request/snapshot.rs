//! `PUT /snapshot/create` and `PUT /snapshot/load`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/snapshot/{create,load}`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    match (r.method, r.rest) {
        ("PUT", ["create"]) => Ok(VmmAction::CreateSnapshot(r.json()?)),
        ("PUT", ["load"]) => Ok(VmmAction::LoadSnapshot(r.json()?)),
        _ => Err(r.invalid()),
    }
}
