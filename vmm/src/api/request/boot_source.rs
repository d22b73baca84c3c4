//! `PUT /boot-source`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/boot-source`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "PUT" => Ok(VmmAction::PutBootSource(r.json()?)),
        _ => Err(r.invalid()),
    }
}
