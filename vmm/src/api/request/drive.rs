//! `PUT`/`PATCH /drives/{id}`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/drives/{id}`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    match r.method {
        "PUT" => Ok(VmmAction::PutDrive(r.id()?, r.json()?)),
        "PATCH" => Ok(VmmAction::PatchDrive(r.id()?, r.json()?)),
        _ => Err(r.invalid()),
    }
}
