//! `PUT`/`PATCH /pmem/{id}`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/pmem/{id}`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    match r.method {
        "PUT" => Ok(VmmAction::PutPmem(r.id()?, r.json()?)),
        "PATCH" => Ok(VmmAction::PatchPmem(r.id()?, r.json()?)),
        _ => Err(r.invalid()),
    }
}
