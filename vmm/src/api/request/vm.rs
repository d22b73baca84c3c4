//! `PATCH /vm` (pause, resume) and `GET /vm/config`.

use serde::Deserialize;

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmState,
}

#[derive(Deserialize)]
enum VmState {
    Paused,
    Resumed,
}

/// Parses `/vm` and `/vm/config`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    match (r.method, r.rest) {
        ("GET", ["config"]) => Ok(VmmAction::GetVmConfig),
        ("PATCH", []) => Ok(match r.json::<VmStateBody>()?.state {
            VmState::Paused => VmmAction::Pause,
            VmState::Resumed => VmmAction::Resume,
        }),
        _ => Err(r.invalid()),
    }
}
