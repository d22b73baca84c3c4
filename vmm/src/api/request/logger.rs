//! `PUT /logger`.

use super::Req;
use crate::actions::VmmAction;
use crate::api::ApiError;
use crate::config::logger::LoggerConfig;

/// Parses `/logger`.
pub fn parse(r: &Req) -> Result<VmmAction, ApiError> {
    r.bare()?;
    match r.method {
        "PUT" => {
            let c: LoggerConfig = r.json()?;
            c.validate().map_err(|e| ApiError::Invalid(e.to_string()))?;
            Ok(VmmAction::ConfigureLogger(c))
        }
        _ => Err(r.invalid()),
    }
}
