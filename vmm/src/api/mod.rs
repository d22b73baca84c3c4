//! The per-VM API: Firecracker's routes and JSON shapes, translated to
//! [`VmmAction`]s. The HTTP transport lives in `ember-http`; [`server`]
//! joins the two on the API thread.

pub mod server;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::actions::{ActionError, VmmAction, VmmData};

/// A request the API refuses before it reaches the VMM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidRoute { method: String, path: String },
    #[error("Empty {0} request.")]
    EmptyBody(String),
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    BadJson(String),
}

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

fn body<T: DeserializeOwned>(method: &str, b: &[u8]) -> Result<T, ApiError> {
    if b.iter().all(|c| c.is_ascii_whitespace()) {
        return Err(ApiError::EmptyBody(method.to_string()));
    }
    serde_json::from_slice(b).map_err(|e| ApiError::BadJson(e.to_string()))
}

/// The `{id}` of `<prefix>{id}`: one non-empty path segment.
fn resource_id(path: &str, prefix: &str) -> Option<String> {
    let id = path.strip_prefix(prefix)?;
    (!id.is_empty() && !id.contains('/')).then(|| id.to_string())
}

/// Maps a request to an action.
pub fn parse(method: &str, path: &str, b: &[u8]) -> Result<VmmAction, ApiError> {
    let path_trim = path.trim_end_matches('/');
    let action = match (method, path_trim) {
        ("GET", "") => VmmAction::GetInstanceInfo,
        ("GET", "/vm/config") => VmmAction::GetVmConfig,
        ("GET", "/machine-config") => VmmAction::GetMachineConfig,
        ("PUT", "/boot-source") => VmmAction::PutBootSource(body(method, b)?),
        ("PUT", "/machine-config") => VmmAction::PutMachineConfig(body(method, b)?),
        ("PATCH", "/machine-config") => VmmAction::PatchMachineConfig(body(method, b)?),
        ("PUT", "/actions") => match body::<ActionBody>(method, b)?.action_type {
            ActionType::InstanceStart => VmmAction::InstanceStart,
            ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
            ActionType::FlushMetrics => VmmAction::FlushMetrics,
        },
        ("PATCH", "/vm") => match body::<VmStateBody>(method, b)?.state {
            VmState::Paused => VmmAction::Pause,
            VmState::Resumed => VmmAction::Resume,
        },
        ("PUT", "/vsock") => VmmAction::PutVsock(body(method, b)?),
        ("PUT", p) if resource_id(p, "/drives/").is_some() => VmmAction::PutDrive(
            resource_id(p, "/drives/").unwrap_or_default(),
            body(method, b)?,
        ),
        ("PATCH", p) if resource_id(p, "/drives/").is_some() => VmmAction::PatchDrive(
            resource_id(p, "/drives/").unwrap_or_default(),
            body(method, b)?,
        ),
        ("PUT", p) if resource_id(p, "/network-interfaces/").is_some() => {
            VmmAction::PutNetworkInterface(
                resource_id(p, "/network-interfaces/").unwrap_or_default(),
                body(method, b)?,
            )
        }
        ("PATCH", p) if resource_id(p, "/network-interfaces/").is_some() => {
            VmmAction::PatchNetworkInterface(
                resource_id(p, "/network-interfaces/").unwrap_or_default(),
                body(method, b)?,
            )
        }
        _ => {
            return Err(ApiError::InvalidRoute {
                method: method.into(),
                path: path.into(),
            })
        }
    };
    Ok(action)
}

/// Firecracker's error body.
pub fn fault(msg: impl std::fmt::Display) -> Value {
    json!({ "fault_message": msg.to_string() })
}

/// Status code and optional JSON body for an action's outcome.
pub fn reply(result: Result<VmmData, ActionError>) -> (u16, Option<Value>) {
    match result {
        Ok(VmmData::Empty) => (204, None),
        Ok(VmmData::InstanceInfo(i)) => (200, Some(json!(i))),
        Ok(VmmData::MachineConfig(m)) => (200, Some(json!(m))),
        Ok(VmmData::VmConfig(c)) => (200, Some(json!(c))),
        Err(e) => (400, Some(fault(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse("GET", "/", b""), Ok(VmmAction::GetInstanceInfo));
        assert_eq!(parse("GET", "/vm/config", b""), Ok(VmmAction::GetVmConfig));
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type":"InstanceStart"}"#),
            Ok(VmmAction::InstanceStart)
        );
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type":"SendCtrlAltDel"}"#),
            Ok(VmmAction::SendCtrlAltDel)
        );
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state":"Paused"}"#),
            Ok(VmmAction::Pause)
        );
        assert!(matches!(
            parse(
                "PUT",
                "/machine-config",
                br#"{"vcpu_count":2,"mem_size_mib":64}"#
            ),
            Ok(VmmAction::PutMachineConfig(_))
        ));
    }

    #[test]
    fn device_routes() {
        let d = br#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true}"#;
        assert!(matches!(
            parse("PUT", "/drives/rootfs", d),
            Ok(VmmAction::PutDrive(id, _)) if id == "rootfs"
        ));
        assert!(matches!(
            parse(
                "PATCH",
                "/drives/rootfs",
                br#"{"drive_id":"rootfs","path_on_host":"/y"}"#
            ),
            Ok(VmmAction::PatchDrive(..))
        ));
        let n = br#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:01"}"#;
        assert!(matches!(
            parse("PUT", "/network-interfaces/eth0", n),
            Ok(VmmAction::PutNetworkInterface(..))
        ));
        assert!(matches!(
            parse(
                "PUT",
                "/vsock",
                br#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#
            ),
            Ok(VmmAction::PutVsock(_))
        ));
        assert!(matches!(
            parse("PUT", "/drives/", d),
            Err(ApiError::InvalidRoute { .. })
        ));
        assert!(matches!(
            parse("PUT", "/drives/a/b", d),
            Err(ApiError::InvalidRoute { .. })
        ));
        assert!(matches!(
            parse("PUT", "/drives/x", br#"{"drive_id":"x"}"#),
            Err(ApiError::BadJson(_))
        ));
    }

    #[test]
    fn bad_requests() {
        assert!(matches!(
            parse("GET", "/nope", b""),
            Err(ApiError::InvalidRoute { .. })
        ));
        assert!(matches!(
            parse("DELETE", "/boot-source", b""),
            Err(ApiError::InvalidRoute { .. })
        ));
        assert_eq!(
            parse("PUT", "/boot-source", b"  "),
            Err(ApiError::EmptyBody("PUT".into()))
        );
        assert!(matches!(
            parse("PUT", "/boot-source", b"{not json"),
            Err(ApiError::BadJson(_))
        ));
        assert!(matches!(
            parse("PUT", "/actions", br#"{"action_type":"Explode"}"#),
            Err(ApiError::BadJson(_))
        ));
        assert!(matches!(
            parse("PATCH", "/vm", br#"{"state":"Paused","x":1}"#),
            Err(ApiError::BadJson(_))
        ));
    }

    #[test]
    fn replies() {
        assert_eq!(reply(Ok(VmmData::Empty)), (204, None));
        let (s, b) = reply(Err(ActionError::NotAllowedAfterBoot));
        assert_eq!(s, 400);
        assert!(b.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .contains("after starting"));
    }
}
