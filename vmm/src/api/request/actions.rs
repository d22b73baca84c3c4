//! `PUT /actions`: InstanceStart, SendCtrlAltDel, FlushMetrics.

use serde::Deserialize;

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

#[derive(Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// Parses `/actions`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "PUT" => Ok(match r.json::<ActionBody>()?.action_type {
            ActionType::InstanceStart => VmmAction::InstanceStart,
            ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
            ActionType::FlushMetrics => VmmAction::FlushMetrics,
        }),
        _ => Err(r.invalid()),
    }
}
