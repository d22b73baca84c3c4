//! `PUT`/`PATCH`/`GET /hotplug/memory`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses `/hotplug/memory`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    match (r.method, r.rest) {
        ("GET", ["memory"]) => Ok(VmmAction::GetMemoryHotplug),
        ("PUT", ["memory"]) => Ok(VmmAction::PutMemoryHotplug(r.json()?)),
        ("PATCH", ["memory"]) => Ok(VmmAction::PatchMemoryHotplug(r.json()?)),
        _ => Err(r.invalid()),
    }
}
