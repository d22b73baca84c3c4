//! The Flintlock API over gRPC, as flintlockd serves it to its real clients
//! (Cluster API's microVM provider, `fl`, hammertime): the service
//! `microvm.services.api.v1alpha1.MicroVM` (CreateMicroVM, DeleteMicroVM,
//! GetMicroVM, ListMicroVMs, ListMicroVMsStream) with the `flintlock.types`
//! messages, compiled from ember's own `.proto` files (`api_server/proto/`,
//! wire-identical to Flintlock's published contract), plus the standard
//! health service and server reflection (v1 and v1alpha), as flintlockd
//! registers them.
//!
//! The server runs on its own thread with a small tokio runtime. Every call
//! goes to the one [`crate::model::microvms`] model on emberd's loop thread
//! through [`Jobs::call`], from a blocking-pool thread, so the HTTP and the
//! gRPC face share one record and one reconcile. A slow gRPC client holds
//! only its own stream.
//!
//! Security, as flintlockd's flags: TLS (rustls; TLS 1.2 and 1.3, where
//! flintlockd requires 1.3: tonic's TLS settings have no minimum version)
//! unless `--insecure`; `--tls-client-validate` requires a client
//! certificate signed by `--tls-client-ca`; `--basic-auth-token` makes every
//! call (health and reflection too, as flintlockd's interceptors do) carry
//! `authorization: basic <base64(token)>`, else UNAUTHENTICATED. The
//! endpoint binds loopback unless an address says otherwise; plain text on
//! a non-loopback address without a token gets a loud warning.
//!
//! Status codes as Flintlock's: INVALID_ARGUMENT (bad spec, missing uid),
//! NOT_FOUND, ALREADY_EXISTS, INTERNAL, UNAUTHENTICATED.

// tonic's interceptors and streams are typed `Result<_, tonic::Status>`.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::pin::Pin;

use serde_json::{json, Value};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::model::jobs::Jobs;
use crate::model::microvms::{self, MicroVmError, RetryPolicy};
use crate::model::supervisor::Supervisor;

/// The messages and service generated from `api_server/proto/` (module
/// paths follow the proto packages).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    pub mod flintlock {
        pub mod types {
            tonic::include_proto!("flintlock.types");
        }
    }
    pub mod microvm {
        pub mod services {
            pub mod api {
                pub mod v1alpha1 {
                    tonic::include_proto!("microvm.services.api.v1alpha1");
                }
            }
        }
    }
    /// The descriptor set server reflection serves.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/flintlock_grpc.bin"));
}

use pb::flintlock::types as t;
use pb::microvm::services::api::v1alpha1 as api;

/// Errors starting the gRPC endpoint.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// `--grpc-endpoint` is not `host:port`, or names nothing.
    #[error("--grpc-endpoint {0:?}: {1}")]
    Endpoint(String, String),
    /// Binding the address failed.
    #[error("--grpc-endpoint {addr}: cannot listen: {err}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        err: std::io::Error,
    },
    /// The flags do not fit together.
    #[error("{0}")]
    Flags(&'static str),
    /// A TLS file cannot be read (its contents are never shown).
    #[error("{what} {path}: {err}")]
    TlsFile {
        /// Which flag.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// rustls refused the certificates or key.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The server thread or runtime cannot start.
    #[error("cannot start the gRPC server: {0}")]
    Start(std::io::Error),
}

/// flintlockd's gRPC flags.
#[derive(Clone, Debug, Default)]
pub struct GrpcConfig {
    /// `host:port` (`:port` or a bare port binds 127.0.0.1).
    pub endpoint: String,
    /// `--basic-auth-token`.
    pub basic_auth_token: Option<String>,
    /// `--insecure`: plain text.
    pub insecure: bool,
    /// `--tls-cert` (PEM).
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key` (PEM).
    pub tls_key: Option<PathBuf>,
    /// `--tls-client-validate`.
    pub tls_client_validate: bool,
    /// `--tls-client-ca` (PEM).
    pub tls_client_ca: Option<PathBuf>,
}

/// The address `endpoint` names. Loopback unless a host is given.
pub fn resolve(endpoint: &str) -> Result<SocketAddr, GrpcError> {
    let bad = |m: &str| GrpcError::Endpoint(endpoint.to_string(), m.to_string());
    let (host, port) = match endpoint.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
        None => ("", endpoint),
    };
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&e.to_string()))?
        .collect();
    // "localhost" may name ::1 and 127.0.0.1: prefer IPv4.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| bad("names no address"))
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, GrpcError> {
    std::fs::read(path).map_err(|err| GrpcError::TlsFile {
        what,
        path: path.clone(),
        err,
    })
}

/// The TLS settings `cfg` asks for (None: plain text).
fn tls_config(cfg: &GrpcConfig) -> Result<Option<ServerTlsConfig>, GrpcError> {
    let any_tls = cfg.tls_cert.is_some()
        || cfg.tls_key.is_some()
        || cfg.tls_client_ca.is_some()
        || cfg.tls_client_validate;
    if cfg.insecure {
        if any_tls {
            return Err(GrpcError::Flags(
                "--insecure turns TLS off: do not combine it with --tls-* flags",
            ));
        }
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Err(GrpcError::Flags(
            "the gRPC endpoint needs --tls-cert and --tls-key, or --insecure for plain text",
        ));
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("--tls-cert", cert)?,
        read("--tls-key", key)?,
    ));
    match (&cfg.tls_client_ca, cfg.tls_client_validate) {
        (Some(ca), validate) => {
            tls = tls
                .client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?))
                .client_auth_optional(!validate);
        }
        (None, true) => return Err(GrpcError::Flags(
            "--tls-client-validate needs --tls-client-ca (the CA that signs client certificates)",
        )),
        (None, false) => {}
    }
    Ok(Some(tls))
}

/// Checks `authorization: basic <base64(token)>` as flintlockd's
/// `grpc_auth` interceptor with `auth.BasicAuthFunc` does.
fn check_token(expected_b64: &str, req: &Request<()>) -> Result<(), Status> {
    let Some(value) = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    else {
        return Err(Status::unauthenticated(
            "Request unauthenticated with basic",
        ));
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return Err(Status::unauthenticated("Bad authorization string"));
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Status::unauthenticated(
            "Request unauthenticated with basic",
        ));
    }
    if token.is_empty() {
        return Err(Status::unauthenticated(
            "invalid auth token: empty auth token",
        ));
    }
    if !constant_time_eq(token.as_bytes(), expected_b64.as_bytes()) {
        return Err(Status::unauthenticated(
            "invalid auth token: failed basic auth",
        ));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// Whether an endpoint is open to anyone who reaches it: plain text, no
/// token, not loopback.
fn needs_warning(addr: &SocketAddr, tls: bool, token: bool) -> bool {
    !tls && !token && !addr.ip().is_loopback()
}

/// Validates `cfg`, binds the endpoint and serves on a new thread. Returns
/// the bound address (port 0 picks a free port).
pub fn start(cfg: GrpcConfig, jobs: Jobs, policy: RetryPolicy) -> Result<SocketAddr, GrpcError> {
    let addr = resolve(&cfg.endpoint)?;
    // rustls is built with both ring (tonic) and aws-lc-rs (the registry
    // client) here, so it has no implied process default: tonic's acceptor
    // needs one. ring, unless something installed one first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = tls_config(&cfg)?;
    let token = cfg
        .basic_auth_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(|t| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, t));
    if needs_warning(&addr, tls.is_some(), token.is_some()) {
        log::warn!(
            "!!! the Flintlock gRPC endpoint {addr} is PLAIN TEXT WITHOUT A TOKEN on a non-loopback \
             address: anyone who reaches it can create and delete MicroVMs. Use --tls-cert/--tls-key \
             and --basic-auth-token !!!"
        );
        eprintln!(
            "emberd: WARNING: gRPC endpoint {addr} is plain text without --basic-auth-token on a \
             non-loopback address; anyone who reaches it controls this host's MicroVMs"
        );
    }
    let listener = TcpListener::bind(addr).map_err(|err| GrpcError::Bind { addr, err })?;
    let bound = listener
        .local_addr()
        .map_err(|err| GrpcError::Bind { addr, err })?;
    listener.set_nonblocking(true).map_err(GrpcError::Start)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("emberd-grpc")
        .enable_all()
        .build()
        .map_err(GrpcError::Start)?;
    // Built here so TLS errors show at start-up, not on the thread.
    // Dead peers are dropped; handshakes run in their own tasks (tonic), so
    // a stalled client delays no other.
    let mut builder = Server::builder()
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| GrpcError::Tls(e.to_string()))?;
    }
    let svc = MicroVmService { jobs, policy };
    std::thread::Builder::new()
        .name("emberd-grpc".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        log::error!("gRPC endpoint {bound}: {e}");
                        return;
                    }
                };
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let (reporter, health) = tonic_health::server::health_reporter();
                reporter
                    .set_serving::<api::micro_vm_server::MicroVmServer<MicroVmService>>()
                    .await;
                let reflect = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                    .build_v1();
                let reflect_alpha = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                    .build_v1alpha();
                let (reflect, reflect_alpha) = match (reflect, reflect_alpha) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(e), _) | (_, Err(e)) => {
                        log::error!("gRPC reflection: {e}");
                        return;
                    }
                };
                let auth = move |req: Request<()>| match &token {
                    Some(t) => check_token(t, &req).map(|()| req),
                    None => Ok(req),
                };
                use tonic::service::interceptor::InterceptedService as I;
                let r = builder
                    .add_service(I::new(
                        api::micro_vm_server::MicroVmServer::new(svc),
                        auth.clone(),
                    ))
                    .add_service(I::new(health, auth.clone()))
                    .add_service(I::new(reflect, auth.clone()))
                    .add_service(I::new(reflect_alpha, auth))
                    .serve_with_incoming(incoming)
                    .await;
                if let Err(e) = r {
                    log::error!("gRPC endpoint {bound} stopped: {e}");
                }
            })
        })
        .map_err(GrpcError::Start)?;
    Ok(bound)
}

fn status(e: MicroVmError) -> Status {
    match e {
        MicroVmError::Invalid(m) => Status::invalid_argument(m),
        MicroVmError::NotFound(m) => Status::not_found(m),
        MicroVmError::Exists(m) => Status::already_exists(m),
        MicroVmError::Internal(m) => Status::internal(m),
    }
}

/// The MicroVM service over the model.
struct MicroVmService {
    jobs: Jobs,
    policy: RetryPolicy,
}

impl MicroVmService {
    /// Runs `f` on emberd's loop thread, from a blocking-pool thread.
    async fn on_loop<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Supervisor, &Jobs) -> T + Send + 'static,
    {
        let jobs = self.jobs.clone();
        tokio::task::spawn_blocking(move || jobs.call(f))
            .await
            .map_err(|e| Status::internal(format!("emberd worker: {e}")))?
            .ok_or_else(|| Status::unavailable("emberd is stopping"))
    }
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<api::ListMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl api::micro_vm_server::MicroVm for MicroVmService {
    async fn create_micro_vm(
        &self,
        req: Request<api::CreateMicroVmRequest>,
    ) -> Result<Response<api::CreateMicroVmResponse>, Status> {
        let Some(spec) = req.into_inner().microvm else {
            return Err(Status::invalid_argument(
                "invalid create microvm request: MicroVMSpec required",
            ));
        };
        let spec = spec_from_proto(spec).map_err(status)?;
        let policy = self.policy;
        let vm = self
            .on_loop(move |sup, jobs| microvms::create(sup, jobs, spec, policy))
            .await?
            .map_err(status)?;
        Ok(Response::new(api::CreateMicroVmResponse {
            microvm: Some(microvm_to_proto(&vm)),
        }))
    }

    async fn delete_micro_vm(
        &self,
        req: Request<api::DeleteMicroVmRequest>,
    ) -> Result<Response<()>, Status> {
        let uid = req.into_inner().uid;
        if uid.is_empty() {
            return Err(Status::invalid_argument("invalid request"));
        }
        self.on_loop(move |sup, _| microvms::delete(sup, &uid))
            .await?
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn get_micro_vm(
        &self,
        req: Request<api::GetMicroVmRequest>,
    ) -> Result<Response<api::GetMicroVmResponse>, Status> {
        let uid = req.into_inner().uid;
        if uid.is_empty() {
            return Err(Status::invalid_argument("invalid request"));
        }
        let u = uid.clone();
        let vm = self
            .on_loop(move |sup, _| microvms::get(sup, &u))
            .await?
            .ok_or_else(|| Status::not_found(format!("microvm {uid} not found")))?;
        Ok(Response::new(api::GetMicroVmResponse {
            microvm: Some(microvm_to_proto(&vm)),
        }))
    }

    async fn list_micro_v_ms(
        &self,
        req: Request<api::ListMicroVMsRequest>,
    ) -> Result<Response<api::ListMicroVMsResponse>, Status> {
        let r = req.into_inner();
        let vms = self
            .on_loop(move |sup, _| microvms::list(sup, &r.namespace, r.name.as_deref()))
            .await?;
        Ok(Response::new(api::ListMicroVMsResponse {
            microvm: vms.iter().map(microvm_to_proto).collect(),
        }))
    }

    type ListMicroVMsStreamStream = ListStream;

    async fn list_micro_v_ms_stream(
        &self,
        req: Request<api::ListMicroVMsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        let r = req.into_inner();
        if r.namespace.is_empty() {
            return Err(Status::invalid_argument("invalid request"));
        }
        // As flintlockd: the namespace's MicroVMs, one message each (the
        // name filter is not applied to the stream).
        let vms = self
            .on_loop(move |sup, _| microvms::list(sup, &r.namespace, None))
            .await?;
        let msgs: Vec<Result<api::ListMessage, Status>> = vms
            .iter()
            .map(|vm| {
                Ok(api::ListMessage {
                    microvm: Some(microvm_to_proto(vm)),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }
}

// ---- translation between the protobuf messages and the model ----------

fn to_i64(v: i32) -> i64 {
    i64::from(v)
}

fn volume_from_proto(v: t::Volume) -> Result<microvms::VolumeSpec, MicroVmError> {
    let size_in_mb = match v.size_in_mb {
        None => None,
        Some(s) => Some(u64::try_from(s).map_err(|_| {
            MicroVmError::Invalid(format!("volume {:?}: sizeInMb {s} is negative", v.id))
        })?),
    };
    Ok(microvms::VolumeSpec {
        id: v.id,
        is_read_only: v.is_read_only,
        mount_point: v.mount_point,
        source: v.source.map(|s| microvms::VolumeSource {
            container_source: s.container_source,
            virtiofs_source: s.virtiofs_source.map(Value::String),
        }),
        partition_id: v.partition_id,
        size_in_mb,
    })
}

/// A `types.MicroVMSpec` as the model's spec (what the HTTP face decodes
/// from protojson). Timestamps and uid are the server's to set.
pub fn spec_from_proto(s: t::MicroVmSpec) -> Result<microvms::MicroVmSpec, MicroVmError> {
    let mut interfaces = Vec::new();
    for (i, n) in s.interfaces.into_iter().enumerate() {
        let kind = match t::network_interface::IfaceType::try_from(n.r#type) {
            Ok(k) => k.as_str_name().to_string(),
            Err(_) => {
                return Err(MicroVmError::Invalid(format!(
                    "interface {i}: unknown type {}",
                    n.r#type
                )))
            }
        };
        interfaces.push(microvms::Interface {
            device_id: n.device_id,
            kind,
            guest_mac: n.guest_mac,
            address: n.address.map(|a| microvms::StaticAddress {
                address: a.address,
                gateway: a.gateway,
                nameservers: a.nameservers,
            }),
            overrides: n.overrides.map(|o| json!({ "bridgeName": o.bridge_name })),
        });
    }
    Ok(microvms::MicroVmSpec {
        id: s.id,
        namespace: s.namespace,
        labels: s.labels.into_iter().collect(),
        vcpu: to_i64(s.vcpu),
        memory_in_mb: to_i64(s.memory_in_mb),
        kernel: s.kernel.map(|k| microvms::Kernel {
            image: k.image,
            cmdline: k.cmdline.into_iter().collect(),
            filename: k.filename,
            add_network_config: k.add_network_config,
        }),
        initrd: s.initrd.map(|i| microvms::Initrd {
            image: i.image,
            filename: i.filename,
        }),
        root_volume: s.root_volume.map(volume_from_proto).transpose()?,
        additional_volumes: s
            .additional_volumes
            .into_iter()
            .map(volume_from_proto)
            .collect::<Result<_, _>>()?,
        interfaces,
        metadata: s.metadata.into_iter().collect(),
        created_at: None,
        updated_at: None,
        deleted_at: None,
        uid: String::new(),
        provider: s.provider,
        allow_guest_agent: s.allow_guest_agent,
    })
}

fn timestamp(s: Option<&str>) -> Option<prost_types::Timestamp> {
    let t = time::OffsetDateTime::parse(s?, &time::format_description::well_known::Rfc3339).ok()?;
    Some(prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    })
}

fn clamp_i32(v: i64) -> i32 {
    v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

fn map<K: Ord + Clone + std::hash::Hash + Eq, V: Clone>(m: &BTreeMap<K, V>) -> HashMap<K, V> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn volume_to_proto(v: &microvms::VolumeSpec) -> t::Volume {
    t::Volume {
        id: v.id.clone(),
        is_read_only: v.is_read_only,
        mount_point: v.mount_point.clone(),
        source: v.source.as_ref().map(|s| t::VolumeSource {
            container_source: s.container_source.clone(),
            virtiofs_source: s
                .virtiofs_source
                .as_ref()
                .and_then(|v| v.as_str().map(str::to_string)),
        }),
        partition_id: v.partition_id.clone(),
        size_in_mb: v.size_in_mb.map(|s| clamp_i32(s as i64)),
    }
}

fn spec_to_proto(s: &microvms::MicroVmSpec) -> t::MicroVmSpec {
    use t::network_interface::IfaceType;
    t::MicroVmSpec {
        id: s.id.clone(),
        namespace: s.namespace.clone(),
        labels: map(&s.labels),
        vcpu: clamp_i32(s.vcpu),
        memory_in_mb: clamp_i32(s.memory_in_mb),
        kernel: s.kernel.as_ref().map(|k| t::Kernel {
            image: k.image.clone(),
            cmdline: map(&k.cmdline),
            filename: k.filename.clone(),
            add_network_config: k.add_network_config,
        }),
        initrd: s.initrd.as_ref().map(|i| t::Initrd {
            image: i.image.clone(),
            filename: i.filename.clone(),
        }),
        root_volume: s.root_volume.as_ref().map(volume_to_proto),
        additional_volumes: s.additional_volumes.iter().map(volume_to_proto).collect(),
        interfaces: s
            .interfaces
            .iter()
            .map(|n| t::NetworkInterface {
                device_id: n.device_id.clone(),
                r#type: IfaceType::from_str_name(&n.kind).unwrap_or(IfaceType::Tap) as i32,
                guest_mac: n.guest_mac.clone(),
                address: n.address.as_ref().map(|a| t::StaticAddress {
                    address: a.address.clone(),
                    gateway: a.gateway.clone(),
                    nameservers: a.nameservers.clone(),
                }),
                overrides: n.overrides.as_ref().map(|o| t::NetworkOverrides {
                    bridge_name: o["bridgeName"].as_str().map(str::to_string),
                }),
            })
            .collect(),
        metadata: map(&s.metadata),
        created_at: timestamp(s.created_at.as_deref()),
        updated_at: timestamp(s.updated_at.as_deref()),
        deleted_at: timestamp(s.deleted_at.as_deref()),
        uid: Some(s.uid.clone()).filter(|u| !u.is_empty()),
        provider: s.provider.clone(),
        allow_guest_agent: s.allow_guest_agent,
    }
}

/// A model MicroVM as a `types.MicroVM`.
pub fn microvm_to_proto(vm: &microvms::MicroVm) -> t::MicroVm {
    use t::micro_vm_status::MicroVmState;
    use t::mount::MountType;
    let spec: Option<microvms::MicroVmSpec> = serde_json::from_value(vm.spec.clone()).ok();
    let st = &vm.status;
    t::MicroVm {
        version: clamp_i32(vm.version as i64),
        spec: spec.as_ref().map(spec_to_proto),
        status: Some(t::MicroVmStatus {
            state: MicroVmState::from_str_name(&st.state).unwrap_or(MicroVmState::Pending) as i32,
            volumes: st
                .volumes
                .iter()
                .map(|(id, v)| {
                    (
                        id.clone(),
                        t::VolumeStatus {
                            mount: Some(t::Mount {
                                r#type: MountType::from_str_name(v.mount.kind)
                                    .unwrap_or(MountType::Dev)
                                    as i32,
                                source: v.mount.source.clone(),
                            }),
                        },
                    )
                })
                .collect(),
            kernel_mount: None,
            initrd_mount: None,
            network_interfaces: st
                .network_interfaces
                .iter()
                .map(|(id, n)| {
                    (
                        id.clone(),
                        t::NetworkInterfaceStatus {
                            host_device_name: n.host_device_name.clone(),
                            index: clamp_i32(n.index as i64),
                            mac_address: n.mac_address.clone(),
                        },
                    )
                })
                .collect(),
            retry: clamp_i32(st.retry as i64),
            vsock_path: String::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn token_is_checked_as_flintlockd_does() {
        // base64("s3cret")
        let want = "czNjcmV0";
        assert!(check_token(want, &req(Some("basic czNjcmV0"))).is_ok());
        assert!(check_token(want, &req(Some("Basic czNjcmV0"))).is_ok());
        for bad in [
            None,
            Some("basic czNjcmV1"),
            Some("bearer czNjcmV0"),
            Some("czNjcmV0"),
        ] {
            let e = check_token(want, &req(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn endpoints_default_to_loopback() {
        assert_eq!(resolve(":0").unwrap().ip().to_string(), "127.0.0.1");
        assert_eq!(resolve("9090").unwrap().to_string(), "127.0.0.1:9090");
        assert!(resolve("localhost:9090").unwrap().ip().is_loopback());
        assert_eq!(resolve("[::1]:9").unwrap().to_string(), "[::1]:9");
        assert!(resolve("localhost:x").is_err());
    }

    #[test]
    fn plain_text_open_to_the_network_is_warned_about() {
        let any: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        assert!(needs_warning(&any, false, false));
        assert!(!needs_warning(&any, true, false));
        assert!(!needs_warning(&any, false, true));
        assert!(!needs_warning(&lo, false, false));
    }

    #[test]
    fn tls_flags_must_fit() {
        let c = GrpcConfig {
            endpoint: ":0".into(),
            ..Default::default()
        };
        assert!(matches!(tls_config(&c), Err(GrpcError::Flags(_))));
        let c = GrpcConfig {
            insecure: true,
            tls_cert: Some("/x".into()),
            ..c
        };
        assert!(matches!(tls_config(&c), Err(GrpcError::Flags(_))));
    }

    #[test]
    fn specs_round_trip_through_proto() {
        let v = json!({
            "id": "vm1", "namespace": "ns", "labels": {"a": "b"}, "vcpu": 2, "memoryInMb": 2048,
            "kernel": {"image": "k", "filename": "vmlinux", "cmdline": {"x": "1"}, "addNetworkConfig": true},
            "rootVolume": {"id": "root", "source": {"containerSource": "r"}},
            "additionalVolumes": [{"id": "data", "mountPoint": "/mnt/d", "source": {"containerSource": "d"}, "sizeInMb": 20}],
            "interfaces": [{"deviceId": "eth0", "type": "TAP", "guestMac": "06:00:00:00:00:01",
                            "address": {"address": "10.0.0.2/24", "gateway": "10.0.0.1", "nameservers": ["1.1.1.1"]}}],
            "metadata": {"user-data": "eA=="},
        });
        let s: microvms::MicroVmSpec = serde_json::from_value(v).unwrap();
        let p = spec_to_proto(&s);
        assert_eq!(p.interfaces[0].r#type, 1);
        let back = spec_from_proto(p).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&s).unwrap()
        );
        let mut p = spec_to_proto(&s);
        p.interfaces[0].r#type = 7;
        assert!(spec_from_proto(p).is_err());
    }
}
