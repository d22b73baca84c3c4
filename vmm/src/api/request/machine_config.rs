//! `GET`/`PUT`/`PATCH /machine-config`. An empty PATCH is refused as
//! Firecracker refuses it.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;
use crate::config::MachineConfigUpdate;

/// Parses `/machine-config`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "GET" => Ok(VmmAction::GetMachineConfig),
        "PUT" => Ok(VmmAction::PutMachineConfig(r.json()?)),
        "PATCH" => {
            let u: MachineConfigUpdate = r.json()?;
            if u.is_empty() {
                return Err(ApiError::EmptyBody("PATCH".into()));
            }
            Ok(VmmAction::PatchMachineConfig(u))
        }
        _ => Err(r.invalid()),
    }
}
