//! `PUT /entropy`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/entropy`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "PUT" => Ok(VmmAction::PutEntropy(r.json()?)),
        _ => Err(r.invalid()),
    }
}
