//! `GET /` and `GET /version`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/`.
pub fn parse_root(r: &Req) -> Result<VmmAction, ApiError> {
    match r.method {
        "GET" => Ok(VmmAction::GetInstanceInfo),
        _ => Err(r.invalid()),
    }
}

/// Parses `/version`.
pub fn parse_version(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "GET" => Ok(VmmAction::GetVersion),
        _ => Err(r.invalid()),
    }
}
