//! `PUT /cpu-config`: the custom template's syntax (numbers, bitmaps,
//! registers) is checked here, so a malformed template is refused before
//! it reaches the VMM.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;
use crate::config::cpu_config::CpuConfig;

/// Parses `/cpu-config`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "PUT" => {
            let c: CpuConfig = r.json()?;
            c.template().map_err(|e| ApiError::Invalid(e.to_string()))?;
            Ok(VmmAction::PutCpuConfig(c))
        }
        _ => Err(r.invalid()),
    }
}
