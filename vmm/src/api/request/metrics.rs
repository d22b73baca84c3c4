//! `PUT /metrics`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/metrics`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "PUT" => Ok(VmmAction::ConfigureMetrics(r.json()?)),
        _ => Err(r.invalid()),
    }
}
