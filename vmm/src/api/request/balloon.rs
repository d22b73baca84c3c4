//! `/balloon`, `/balloon/statistics`, `/balloon/hinting/{start,status,stop}`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

/// Parses the balloon routes.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    match (r.method, r.rest) {
        ("GET", []) => Ok(VmmAction::GetBalloon),
        ("PUT", []) => Ok(VmmAction::PutBalloon(r.json()?)),
        ("PATCH", []) => Ok(VmmAction::PatchBalloon(r.json()?)),
        ("GET", ["statistics"]) => Ok(VmmAction::GetBalloonStats),
        ("PATCH", ["statistics"]) => Ok(VmmAction::PatchBalloonStats(r.json()?)),
        ("PATCH", ["hinting", "start"]) => Ok(VmmAction::StartBalloonHinting(if r.body_empty() {
            Default::default()
        } else {
            r.json()?
        })),
        ("GET", ["hinting", "status"]) => Ok(VmmAction::GetBalloonHinting),
        ("PATCH", ["hinting", "stop"]) => Ok(VmmAction::StopBalloonHinting),
        _ => Err(r.invalid()),
    }
}
