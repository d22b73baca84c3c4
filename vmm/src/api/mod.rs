//! The per-VM API: Firecracker's routes and JSON shapes, translated to
//! [`VmmAction`]s. The HTTP transport lives in `ember-http`; [`server`]
//! joins the two on the API thread.

pub mod request;
pub mod server;

use serde_json::{json, Value};

use crate::actions::{ActionError, VmmAction, VmmData};
use request::Req;

/// A request the API refuses before it reaches the VMM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    /// No such method and path.
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidRoute {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// A PUT or PATCH without a body (or an empty PATCH).
    #[error("Empty {0} request.")]
    EmptyBody(String),
    /// A GET with a body.
    #[error("GET request cannot have a body.")]
    GetWithBody,
    /// A resource route without its id.
    #[error("The ID cannot be empty.")]
    EmptyId,
    /// The body is not the resource's JSON.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    BadJson(String),
    /// The body is well-formed but its values are invalid.
    #[error("{0}")]
    Invalid(String),
}

/// Maps a request to an action: Firecracker's 38 operations, dispatched on
/// the first path segment to the resource's parser in [`request`].
pub fn parse(method: &str, path: &str, b: &[u8]) -> Result<VmmAction, ApiError> {
    let trimmed = path.trim_end_matches('/');
    let mut segs: Vec<&str> = trimmed.split('/').skip(1).collect();
    if segs.is_empty() {
        segs.push("");
    }
    let (first, rest) = segs.split_first().expect("one segment at least");
    let r = Req {
        method,
        path,
        rest,
        body: b,
    };
    if method == "GET" && !r.body_empty() {
        return Err(ApiError::GetWithBody);
    }
    match *first {
        "" if rest.is_empty() => request::instance::parse_root(&r),
        "version" => request::instance::parse_version(&r),
        "actions" => request::actions::parse(&r),
        "boot-source" => request::boot_source::parse(&r),
        "machine-config" => request::machine_config::parse(&r),
        "cpu-config" => request::cpu_config::parse(&r),
        "drives" => request::drive::parse(&r),
        "network-interfaces" => request::net::parse(&r),
        "vsock" => request::vsock::parse(&r),
        "logger" => request::logger::parse(&r),
        "metrics" => request::metrics::parse(&r),
        "serial" => request::serial::parse(&r),
        "mmds" => request::mmds::parse(&r),
        "entropy" => request::entropy::parse(&r),
        "balloon" => request::balloon::parse(&r),
        "pmem" => request::pmem::parse(&r),
        "hotplug" => request::hotplug::parse(&r),
        "snapshot" => request::snapshot::parse(&r),
        "vm" => request::vm::parse(&r),
        _ => Err(r.invalid()),
    }
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
        Ok(VmmData::Version(v)) => (200, Some(json!({ "firecracker_version": v }))),
        Ok(VmmData::Mmds(Value::Null)) => (200, Some(json!({}))),
        Ok(VmmData::Mmds(v)) => (200, Some(v)),
        Ok(VmmData::Balloon(b)) => (200, Some(json!(b))),
        Ok(VmmData::BalloonStats(s)) => (200, Some(json!(s))),
        Ok(VmmData::BalloonHinting(h)) => (200, Some(json!(h))),
        Err(e) => (e.status(), Some(fault(e))),
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

    /// Every operation of Firecracker's swagger reaches a parser: none is
    /// answered "Invalid request method and/or path".
    #[test]
    fn all_38_operations_are_routed() {
        let ops: &[(&str, &str, &str)] = &[
            ("GET", "/", ""),
            ("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#),
            ("GET", "/balloon", ""),
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib":1,"deflate_on_oom":true}"#,
            ),
            ("PATCH", "/balloon", r#"{"amount_mib":2}"#),
            ("GET", "/balloon/statistics", ""),
            (
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s":1}"#,
            ),
            (
                "PATCH",
                "/balloon/hinting/start",
                r#"{"acknowledge_on_stop":true}"#,
            ),
            ("GET", "/balloon/hinting/status", ""),
            ("PATCH", "/balloon/hinting/stop", ""),
            ("PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#),
            ("PUT", "/cpu-config", r#"{"kvm_capabilities":["171"]}"#),
            (
                "PUT",
                "/drives/d",
                r#"{"drive_id":"d","is_root_device":false,"path_on_host":"/x"}"#,
            ),
            ("PATCH", "/drives/d", r#"{"drive_id":"d"}"#),
            ("PUT", "/pmem/p", r#"{"id":"p","path_on_host":"/x"}"#),
            ("PATCH", "/pmem/p", r#"{"id":"p"}"#),
            ("PUT", "/logger", r#"{"level":"Info"}"#),
            ("GET", "/machine-config", ""),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":64}"#,
            ),
            ("PATCH", "/machine-config", r#"{"smt":true}"#),
            ("PUT", "/metrics", r#"{"metrics_path":"/m"}"#),
            ("PUT", "/mmds", r#"{"a":1}"#),
            ("PATCH", "/mmds", r#"{"a":2}"#),
            ("GET", "/mmds", ""),
            ("PUT", "/mmds/config", r#"{"network_interfaces":["eth0"]}"#),
            ("PUT", "/entropy", "{}"),
            ("PUT", "/serial", r#"{"serial_out_path":"/s"}"#),
            ("PUT", "/hotplug/memory", r#"{"total_size_mib":1024}"#),
            ("PATCH", "/hotplug/memory", r#"{"requested_size_mib":128}"#),
            ("GET", "/hotplug/memory", ""),
            (
                "PUT",
                "/network-interfaces/n",
                r#"{"iface_id":"n","host_dev_name":"tap0"}"#,
            ),
            ("PATCH", "/network-interfaces/n", r#"{"iface_id":"n"}"#),
            (
                "PUT",
                "/snapshot/create",
                r#"{"mem_file_path":"/m","snapshot_path":"/s"}"#,
            ),
            ("PUT", "/snapshot/load", r#"{"snapshot_path":"/s"}"#),
            ("GET", "/version", ""),
            ("PATCH", "/vm", r#"{"state":"Resumed"}"#),
            ("GET", "/vm/config", ""),
            ("PUT", "/vsock", r#"{"guest_cid":3,"uds_path":"/v"}"#),
        ];
        assert_eq!(ops.len(), 38);
        for (m, p, b) in ops {
            assert!(
                parse(m, p, b.as_bytes()).is_ok(),
                "{m} {p}: {:?}",
                parse(m, p, b.as_bytes())
            );
        }
    }

    #[test]
    fn firecracker_refusals_at_parse_time() {
        assert_eq!(
            parse("PATCH", "/machine-config", b"{}"),
            Err(ApiError::EmptyBody("PATCH".into()))
        );
        let e = parse("PUT", "/machine-config", br#"{"vcpu_count":1}"#).unwrap_err();
        assert!(
            e.to_string().contains("missing field `mem_size_mib`"),
            "{e}"
        );
        assert_eq!(parse("GET", "/version", b"{}"), Err(ApiError::GetWithBody));
        assert!(matches!(
            parse(
                "PUT",
                "/cpu-config",
                br#"{"msr_modifiers":[{"addr":"0x10a","bitmap":"0b1"}]}"#
            ),
            Err(ApiError::Invalid(_))
        ));
        assert!(matches!(
            parse("PUT", "/mmds/other", b"{}"),
            Err(ApiError::InvalidRoute { .. })
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
        assert_eq!(parse("PUT", "/drives/", d), Err(ApiError::EmptyId));
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
