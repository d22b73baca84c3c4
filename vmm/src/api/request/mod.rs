//! One parser per API resource (style P3): each turns a method, the path
//! segments after the resource name and the body into a [`VmmAction`], and
//! touches no VMM state. [`super::parse`] only dispatches on the first
//! segment.

pub mod actions;
pub mod balloon;
pub mod boot_source;
pub mod cpu_config;
pub mod drive;
pub mod entropy;
pub mod hotplug;
pub mod instance;
pub mod logger;
pub mod machine_config;
pub mod metrics;
pub mod mmds;
pub mod net;
pub mod pmem;
pub mod serial;
pub mod snapshot;
pub mod vm;
pub mod vsock;

use serde::de::DeserializeOwned;

use super::ApiError;

/// A request as the parsers see it.
pub struct Req<'a> {
    /// `GET`, `PUT`, `PATCH`, ...
    pub method: &'a str,
    /// The full path (for error messages).
    pub path: &'a str,
    /// Segments after the resource name.
    pub rest: &'a [&'a str],
    /// The body.
    pub body: &'a [u8],
}

impl Req<'_> {
    /// The "no such route" error for this request.
    pub fn invalid(&self) -> ApiError {
        ApiError::InvalidRoute {
            method: self.method.into(),
            path: self.path.into(),
        }
    }

    /// Whether the body is empty (or only whitespace).
    pub fn body_empty(&self) -> bool {
        self.body.iter().all(|c| c.is_ascii_whitespace())
    }

    /// Decodes the JSON body; an empty one is `Empty <METHOD> request.`
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.body_empty() {
            return Err(ApiError::EmptyBody(self.method.to_string()));
        }
        serde_json::from_slice(self.body).map_err(|e| ApiError::BadJson(e.to_string()))
    }

    /// No further segments allowed.
    pub fn bare(&self) -> Result<(), ApiError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.invalid())
        }
    }

    /// Exactly one further segment: the resource id.
    pub fn id(&self) -> Result<String, ApiError> {
        match self.rest {
            [] | [""] => Err(ApiError::EmptyId),
            [id] => Ok(id.to_string()),
            _ => Err(self.invalid()),
        }
    }
}
