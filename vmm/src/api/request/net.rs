//! `PUT`/`PATCH /network-interfaces/{id}`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/network-interfaces/{id}`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    match r.method {
        "PUT" => Ok(VmmAction::PutNetworkInterface(r.id()?, r.json()?)),
        "PATCH" => Ok(VmmAction::PatchNetworkInterface(r.id()?, r.json()?)),
        _ => Err(r.invalid()),
    }
}
