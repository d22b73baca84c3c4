//! `PUT /vsock`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/vsock`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "PUT" => Ok(VmmAction::PutVsock(r.json()?)),
        _ => Err(r.invalid()),
    }
}
