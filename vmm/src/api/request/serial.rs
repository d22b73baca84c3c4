//! `PUT /serial`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/serial`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "PUT" => Ok(VmmAction::ConfigureSerial(r.json()?)),
        _ => Err(r.invalid()),
    }
}
