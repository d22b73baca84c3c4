//! `emberd`: the ember supervisor daemon. Serves the UniK, hyperd and
//! Flintlock APIs on a unix socket and runs one jailed ember-vmm per
//! instance (and per hyperd pod).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use api_server::build as compilers;
use api_server::images::{archive, oci};
use api_server::model::store::Store;
use api_server::model::supervisor::Supervisor;
use api_server::runtime::process::{self, Launcher};
use api_server::server::{Daemon, HttpLimits, TcpListen};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "emberd",
    version,
    about = "ember supervisor daemon: UniK, hyperd and Flintlock APIs over a unix socket, one jailed microVM per instance"
)]
struct Args {
    /// Unix socket to serve the APIs on.
    #[arg(long, default_value = "/run/ember/ember.sock")]
    socket: PathBuf,
    /// Also serve the same APIs over TCP on this address: PORT (loopback,
    /// 127.0.0.1:PORT), IP:PORT, [IPv6]:PORT or localhost:PORT. The UniK
    /// CLI speaks only TCP (its daemon listened on port 3000). The APIs
    /// have no authentication: anyone who reaches the address controls
    /// emberd, so keep it on loopback (a warning is printed otherwise).
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Option<String>,
    /// Most simultaneous TCP connections one IP address may hold (0: no
    /// limit); further ones get 503 while other clients are still served.
    #[arg(long, default_value_t = ember_http::default_max_connections_per_peer(ember_http::DEFAULT_MAX_CONNECTIONS))]
    max_connections_per_ip: usize,
    /// Group given access to the socket (mode 0660); without it the socket
    /// is root's alone (0600). A name or a numeric gid.
    #[arg(long)]
    socket_group: Option<String>,
    /// Host paths that requests may read images and sources from
    /// (hyperd imageName, Flintlock kernel/initrd/containerSource); default
    /// <state-dir>/import.
    #[arg(long)]
    import_dir: Option<PathBuf>,
    /// Host paths that requests may write images to (hyperd image/push
    /// remote); default <state-dir>/export.
    #[arg(long)]
    export_dir: Option<PathBuf>,
    /// A registry host (`host` or `host:port`) spoken to over plain HTTP
    /// (repeatable); loopback registries always are, others use HTTPS.
    #[arg(long = "insecure-registry")]
    insecure_registry: Vec<String>,
    /// Where images, volumes, logs and state live.
    #[arg(long, default_value = "/var/lib/ember")]
    state_dir: PathBuf,
    /// Jail base directory (keep it on the state directory's filesystem:
    /// volumes are hard-linked into jails).
    #[arg(long, default_value = "/srv/jailer")]
    chroot_base_dir: PathBuf,
    /// ember-vmm binary (default: next to emberd). Build it static
    /// (`cargo static-vmm --release`) and nothing else of the host's enters
    /// the jails; a dynamic one gets its shared libraries copied in.
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// ember-jailer binary (default: next to emberd).
    #[arg(long)]
    jailer: Option<PathBuf>,
    /// Run VMMs without the jailer (development only).
    #[arg(long)]
    no_jailer: bool,
    /// First uid of the range the jailed VMMs run as: each instance gets
    /// its own uid (and gid, from --gid on) from it, owning only its jail.
    #[arg(long, default_value_t = 10500)]
    uid: u32,
    /// First gid of the VMMs' range (see --uid).
    #[arg(long, default_value_t = 10500)]
    gid: u32,
    /// How many uids (and gids) the VMMs' range holds: at most this many
    /// instances exist at once.
    #[arg(long, default_value_t = 1000)]
    vmm_ids: u32,
    /// Largest accepted request body (uploads), in MiB.
    #[arg(long, default_value_t = 512)]
    max_upload_mb: usize,
    /// Most simultaneous connections one client process may hold (0: no
    /// limit); further ones get 503 while other clients are still served.
    #[arg(long, default_value_t = ember_http::default_max_connections_per_peer(ember_http::DEFAULT_MAX_CONNECTIONS))]
    max_connections_per_peer: usize,
    /// Flintlock: reconcile attempts before a MicroVM is FAILED.
    #[arg(long, default_value_t = 10)]
    flintlock_max_retries: u32,
    /// Flintlock: back-off unit in milliseconds (retry n waits n units).
    #[arg(long, default_value_t = 2000)]
    flintlock_backoff_ms: u64,
    /// Flintlock: the host link MACVTAP interfaces are created on
    /// (flintlockd's flag); without it MACVTAP interfaces are refused.
    #[arg(long, value_name = "NAME")]
    parent_iface: Option<String>,
    /// Flintlock gRPC: serve `microvm.services.api.v1alpha1.MicroVM` on this
    /// `host:port` (flintlockd's flag; off unless given; `:port` binds
    /// 127.0.0.1; port 0 picks one, printed at start).
    #[arg(long)]
    grpc_endpoint: Option<String>,
    /// Flintlock gRPC: every call must carry `authorization: basic
    /// <base64(token)>`, as flintlock's clients send it.
    #[arg(long)]
    basic_auth_token: Option<String>,
    /// Flintlock gRPC: plain text instead of TLS (not recommended).
    #[arg(long)]
    insecure: bool,
    /// Flintlock gRPC: server certificate (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Flintlock gRPC: server key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Flintlock gRPC: require a client certificate signed by --tls-client-ca.
    #[arg(long)]
    tls_client_validate: bool,
    /// Flintlock gRPC: CA (PEM) for client certificates.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// hyperd: kernel for pod VMs (default: the `linux` base's kernel,
    /// $EMBER_LINUX_KERNEL, /var/lib/ember/kernels/vmlinuz or /boot).
    #[arg(long)]
    pod_kernel: Option<PathBuf>,
    /// hyperd: ember-agent binary put in the pod VMs' initramfs (default:
    /// $EMBER_AGENT_BIN, then next to emberd).
    #[arg(long)]
    pod_agent: Option<PathBuf>,
    /// hyperd: more kernel arguments for every pod VM.
    #[arg(long, default_value = "")]
    pod_boot_args: String,
    /// hyperd: seconds a pod VM may take to boot and answer from its agent.
    #[arg(long, default_value_t = 60)]
    pod_agent_timeout: u64,
    /// hyperd: seconds between SIGTERM and SIGKILL when a pod stops.
    #[arg(long, default_value_t = 10)]
    pod_stop_timeout: u64,
    /// hyperd: size in MB of each container's root disk (sparse); an image
    /// that does not fit gets a disk that just fits it.
    #[arg(long, default_value_t = 1024)]
    pod_rootfs_mb: u64,
    /// hyperd: host address that pods' port mappings listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pod_port_bind: std::net::IpAddr,
    /// uids (and gids) for sandboxed tool jobs (gcc, mkfs, debugfs), one
    /// per running job; they must own nothing on the host.
    #[arg(long, default_value = "20000-20999", value_parser = parse_uid_range)]
    job_uid_range: std::ops::RangeInclusive<u32>,
    /// Memory limit of one sandboxed job, in MiB.
    #[arg(long, default_value_t = 1024)]
    job_memory_mb: u64,
    /// Instant starts: instances of images whose runtime supports it (the
    /// `ember` C unikernel base) are restored from a snapshot of the
    /// image's booted guest instead of booting cold, unless the image's
    /// own `snapshot_starts` is false. See README "Instant starts".
    #[arg(long)]
    snapshot_starts: bool,
    /// Instant starts: idle jailed VMMs kept ready to load a snapshot.
    #[arg(long, default_value_t = 2)]
    snapshot_pool: usize,
    /// Wall-clock limit of one sandboxed job, in seconds.
    #[arg(long, default_value_t = 120)]
    job_timeout_secs: u64,
}

fn parse_uid_range(s: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let (a, b) = s.split_once('-').ok_or("expected START-END")?;
    let (a, b): (u32, u32) = (
        a.parse().map_err(|e| format!("{a}: {e}"))?,
        b.parse().map_err(|e| format!("{b}: {e}"))?,
    );
    if a == 0 || b < a {
        return Err("START must be above 0 and END at least START".into());
    }
    Ok(a..=b)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::SeqCst);
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A group's id, from its name or number.
fn group_id(g: &str) -> Option<u32> {
    if let Ok(n) = g.parse() {
        return Some(n);
    }
    let name = std::ffi::CString::new(g).ok()?;
    // SAFETY: getgrnam with a valid C string; the result is read at once,
    // before any other call that could reuse its static buffer.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    // SAFETY: a non-null result points to a valid struct group.
    (!gr.is_null()).then(|| unsafe { (*gr).gr_gid })
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("emberd: {msg}");
    std::process::exit(1)
}

/// `<state>/spool`, mode 0700, for upload bodies in transit. Its files are
/// unlinked while in use; anything left there is from an earlier run.
fn spool_dir(state: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = state.join("spool");
    let err = |e: std::io::Error| format!("spool directory {}: {e}", dir.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(err)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    for entry in std::fs::read_dir(&dir).map_err(err)?.flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    Ok(dir)
}

/// emberd's own binary, for the sandbox jobs that re-execute it: the
/// job's uid must be able to read and run it (it is bound into the job).
fn self_exe() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .unwrap_or_else(|e| die(format!("cannot find emberd's own binary: {e}")));
    let mode = std::fs::metadata(&exe)
        .map(|m| m.permissions().mode())
        .unwrap_or_else(|e| die(format!("{}: {e}", exe.display())));
    if mode & 0o005 != 0o005 {
        die(format!(
            "{} must be readable and executable by others (mode 0755): sandbox jobs run it as their own uid",
            exe.display()
        ));
    }
    exe
}

fn main() {
    // Internal: emberd re-executed inside a sandbox job to extract an
    // archive (images::archive::extract_sandboxed) or to apply an image's
    // layers (images::oci, unpacking); not user commands.
    let mut argv = std::env::args_os();
    let first = argv.nth(1);
    if first.as_deref() == Some(std::ffi::OsStr::new(archive::CHILD_ARG)) {
        std::process::exit(archive::child_main(&argv.collect::<Vec<_>>()));
    }
    if first.as_deref() == Some(std::ffi::OsStr::new(oci::CHILD_ARG)) {
        std::process::exit(oci::child_main(&argv.collect::<Vec<_>>()));
    }
    let args = Args::parse();
    let listen_tcp = args.listen_tcp.as_deref().map(|a| {
        let addr = api_server::server::parse_listen_tcp(a).unwrap_or_else(|e| die(e));
        (a, addr)
    });
    let vmm = args.vmm.clone().unwrap_or_else(|| sibling("ember-vmm"));
    let jailer = (!args.no_jailer).then(|| {
        args.jailer
            .clone()
            .unwrap_or_else(|| sibling("ember-jailer"))
    });
    for (what, p) in [("ember-vmm", Some(&vmm)), ("ember-jailer", jailer.as_ref())] {
        if let Some(p) = p {
            if !p.is_file() {
                die(format!(
                    "{what} not found at {} (use --{})",
                    p.display(),
                    what.trim_start_matches("ember-")
                ));
            }
        }
    }
    let store = Store::open(&args.state_dir).unwrap_or_else(|e| die(e));
    let vmm = std::fs::canonicalize(&vmm).unwrap_or(vmm);
    // A static VMM (`cargo static-vmm`) enters each jail alone; a dynamic
    // one takes the libraries ldd names with it.
    let libs = match process::linkage(&vmm).unwrap_or_else(|e| die(e)) {
        process::Linkage::Static => {
            eprintln!(
                "emberd: {} is statically linked: jails get no host libraries",
                vmm.display()
            );
            Vec::new()
        }
        process::Linkage::Dynamic => {
            let missing = process::missing_libraries(&vmm);
            if !missing.is_empty() {
                die(format!(
                    "{} needs shared libraries that are not installed: {}",
                    vmm.display(),
                    missing.join(", ")
                ));
            }
            let libs = process::shared_libraries(&vmm);
            eprintln!(
                "emberd: {} is dynamically linked: its {} shared libraries are copied into every jail (a static build needs none: cargo static-vmm)",
                vmm.display(),
                libs.len()
            );
            libs
        }
    };
    let launcher = Launcher {
        libs,
        vmm_bin: vmm,
        jailer_bin: jailer,
        chroot_base: args.chroot_base_dir.clone(),
        uid: args.uid,
        gid: args.gid,
        ids: args.vmm_ids.max(1),
    };
    // Tools on user bytes run in sandbox jobs, each with its own uid.
    let vmm_uids = args.uid..args.uid.saturating_add(args.vmm_ids.max(1));
    let vmm_gids = args.gid..args.gid.saturating_add(args.vmm_ids.max(1));
    let overlaps = |r: &std::ops::Range<u32>| {
        *args.job_uid_range.start() < r.end && r.start <= *args.job_uid_range.end()
    };
    if overlaps(&vmm_uids) || overlaps(&vmm_gids) {
        die("--job-uid-range must not overlap the VMMs' uids and gids (--uid/--gid and --vmm-ids)");
    }
    let mut sandbox = api_server::sandbox::SandboxConfig {
        base_dir: Some(args.state_dir.join("jobs")),
        uids: args.job_uid_range.clone(),
        // Archive extraction and OCI layer application run emberd's own
        // code in a job, never here.
        self_exe: Some(self_exe()),
        ..Default::default()
    };
    sandbox.limits.memory_bytes = args.job_memory_mb << 20;
    sandbox.limits.timeout = std::time::Duration::from_secs(args.job_timeout_secs);
    api_server::sandbox::configure(sandbox);
    let mut sup =
        Supervisor::new(store, launcher, compilers::registry()).unwrap_or_else(|e| die(e));
    if args.snapshot_pool > 64 {
        die("--snapshot-pool must be at most 64");
    }
    sup.set_snapshot_starts(api_server::model::supervisor::WarmConfig {
        enabled: args.snapshot_starts,
        pool: args.snapshot_pool,
    })
    .unwrap_or_else(|e| die(format!("--snapshot-starts: {e}")));
    if args.import_dir.is_some() || args.export_dir.is_some() {
        let import = args
            .import_dir
            .clone()
            .unwrap_or_else(|| args.state_dir.join("import"));
        let export = args
            .export_dir
            .clone()
            .unwrap_or_else(|| args.state_dir.join("export"));
        let paths = api_server::model::host_paths::HostPaths::new(&import, &export)
            .unwrap_or_else(|e| die(format!("--import-dir/--export-dir: {e}")));
        sup.set_host_paths(paths);
    }
    if let Some(dir) = args.socket.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            die(format!("cannot create {}: {e}", dir.display()));
        }
    }
    let policy = api_server::model::microvms::RetryPolicy {
        max_retries: args.flintlock_max_retries.max(1),
        backoff: std::time::Duration::from_millis(args.flintlock_backoff_ms),
    };
    let flintlock = api_server::faces::flintlock::Flintlock { policy };
    let mut images =
        api_server::images::store::ImageStore::open(&args.state_dir.join("container-images"))
            .unwrap_or_else(|e| die(format!("container image store: {e}")));
    // One registry client (and blob cache) for hyperd and Flintlock.
    let registry =
        api_server::images::registry::Registry::new(api_server::images::registry::RegistryConfig {
            cache_dir: args.state_dir.join("registry-cache"),
            auth_file: Some(args.state_dir.join("auth.json")),
            insecure: args.insecure_registry.clone(),
            limits: Default::default(),
        });
    registry.clean_tmp();
    images.set_registry(registry.clone());
    sup.set_registry(registry);
    if let Some(p) = &args.parent_iface {
        sup.set_parent_iface(p)
            .unwrap_or_else(|e| die(format!("--parent-iface: {e}")));
        if !api_server::runtime::netdev::tap_exists(p, None) {
            eprintln!("emberd: warning: --parent-iface {p}: no such link in emberd's network namespace (yet): MACVTAP interfaces fail until it exists");
        }
        if !sup.jailed() {
            eprintln!("emberd: warning: --parent-iface is set but MACVTAP interfaces need the jailer (--no-jailer refuses them)");
        }
    }
    if args.pod_boot_args.contains('"') || args.pod_boot_args.chars().any(char::is_control) {
        die("--pod-boot-args may not contain double quotes or control characters");
    }
    if !(1..=1 << 20).contains(&args.pod_rootfs_mb) {
        die("--pod-rootfs-mb must be from 1 to 1048576");
    }
    let pod_vms = api_server::model::pods::PodVmConfig {
        kernel: args.pod_kernel.clone(),
        agent: args.pod_agent.clone(),
        boot_args: args.pod_boot_args.clone(),
        agent_timeout: std::time::Duration::from_secs(args.pod_agent_timeout.max(1)),
        stop_timeout: std::time::Duration::from_secs(args.pod_stop_timeout),
        rootfs_mb: args.pod_rootfs_mb,
        port_bind: args.pod_port_bind,
    };
    let pods = api_server::model::pods::Pods::new(pod_vms, std::sync::Arc::new(images));
    let hyperd = api_server::faces::hyperd::Hyperd::new(pods);
    // Order matters where paths could overlap: see README "Routing".
    let faces: Vec<Box<dyn api_server::server::Face>> = vec![
        Box::new(flintlock),
        Box::new(hyperd),
        Box::new(api_server::faces::unik::Unik),
    ];
    let limits = HttpLimits {
        max_body: args.max_upload_mb << 20,
        max_connections_per_peer: (args.max_connections_per_peer > 0)
            .then_some(args.max_connections_per_peer),
        spool_dir: spool_dir(&args.state_dir).unwrap_or_else(|e| die(e)),
    };
    let socket_group = args.socket_group.as_deref().map(|g| {
        group_id(g).unwrap_or_else(|| die(format!("--socket-group {g:?}: no such group")))
    });
    let tcp = listen_tcp.map(|(a, addr)| {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| die(format!("--listen-tcp {a}: cannot bind {addr}: {e}")));
        TcpListen {
            listener,
            max_connections_per_ip: (args.max_connections_per_ip > 0)
                .then_some(args.max_connections_per_ip),
        }
    });
    let tcp_addr = tcp.as_ref().and_then(|t| t.listener.local_addr().ok());
    let mut daemon = Daemon::new(&args.socket, socket_group, sup, faces, limits, tcp)
        .unwrap_or_else(|e| die(format!("cannot serve {}: {e}", args.socket.display())));
    if let Some(endpoint) = &args.grpc_endpoint {
        use api_server::faces::flintlock::grpc;
        let cfg = grpc::GrpcConfig {
            endpoint: endpoint.clone(),
            basic_auth_token: args.basic_auth_token.clone(),
            insecure: args.insecure,
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            tls_client_validate: args.tls_client_validate,
            tls_client_ca: args.tls_client_ca.clone(),
        };
        let tls = if args.insecure { "plain text" } else { "TLS" };
        match grpc::start(cfg, daemon.jobs(), policy) {
            Ok(addr) => eprintln!("emberd: Flintlock gRPC on {addr} ({tls})"),
            Err(e) => die(e),
        }
    } else if args.basic_auth_token.is_some()
        || args.insecure
        || args.tls_cert.is_some()
        || args.tls_key.is_some()
        || args.tls_client_ca.is_some()
        || args.tls_client_validate
    {
        die("--basic-auth-token, --insecure and --tls-* configure the gRPC endpoint: give --grpc-endpoint too");
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let _ = vmm_sys_util::signal::register_signal_handler(sig, on_signal);
    }
    eprintln!("emberd: serving on {}", args.socket.display());
    if let Some(addr) = tcp_addr {
        eprintln!("emberd: serving on tcp {addr}");
        if !addr.ip().is_loopback() {
            eprintln!(
                "emberd: WARNING: --listen-tcp {addr} is not a loopback address. The UniK, hyperd \
                 and Flintlock APIs have no authentication: anyone who can reach {addr} can build, \
                 run and delete everything emberd manages. Bind 127.0.0.1 (the default for a bare \
                 port) and tunnel, or firewall it."
            );
        }
    }
    if let Err(e) = daemon.run(&STOP) {
        die(e);
    }
    daemon.shutdown();
    drop(daemon);
    let _ = std::fs::remove_file(Path::new(&args.socket));
    eprintln!("emberd: stopped (instances keep running)");
}
