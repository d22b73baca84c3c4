//! `ember-vmm`: runs one microVM, configured by a Firecracker-shaped API on a
//! unix socket and/or a JSON config file. A thin front end over
//! [`vmm::MicroVm`].
//!
//! The command line is Firecracker's (`firecracker --help`), with the same
//! meanings, plus a few ember flags (`--serial-out`, `--log-level`, the
//! hidden `--seccomp-test-trigger`). Differences: `--enable-pci` is refused
//! (ember is virtio-mmio only); `--snapshot-version` and
//! `--describe-snapshot` print ember's own state file format version.

use std::process;
use std::sync::Arc;

use clap::Parser;
use vmm::config::logger::LoggerConfig;
use vmm::config::metrics::MetricsConfig;
use vmm::seccomp::{FilterMap, ThreadKind};
use vmm::{ExitCode, MicroVm, SeccompLevel, Serial, StartTimes};

/// Default API socket path (Firecracker's).
const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

#[derive(Parser, Debug)]
#[command(
    name = "ember-vmm",
    about = "ember microVM monitor: one KVM guest per process, Firecracker's API and command line",
    disable_version_flag = true,
    // A later occurrence wins: ember-jailer (like Firecracker's jailer)
    // passes --id first, and callers may repeat it after `--`.
    args_override_self = true
)]
struct Args {
    /// Path to unix domain socket used by the API.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_API_SOCK)]
    api_sock: String,
    /// MicroVM unique identifier (1 to 64 of [A-Za-z0-9-]).
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// A compiled seccomp filter file (Firecracker's format) used instead of
    /// the built-in filters. For advanced users.
    #[arg(long, value_name = "FILE", conflicts_with = "no_seccomp")]
    seccomp_filter: Option<String>,
    /// Start without seccomp filtering. Not recommended.
    #[arg(long)]
    no_seccomp: bool,
    /// Process start time (CLOCK_MONOTONIC, microseconds).
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,
    /// Process start CPU time (microseconds).
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    /// Parent process CPU time (microseconds).
    #[arg(long, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
    /// Path to a file that contains the microVM configuration in JSON format.
    #[arg(long, value_name = "PATH")]
    config_file: Option<String>,
    /// Path to a file that contains metadata in JSON format to add to the MMDS.
    #[arg(long, value_name = "PATH")]
    metadata: Option<String>,
    /// Optional parameter which allows starting and using a microVM without an
    /// active API socket (needs --config-file).
    #[arg(long, requires = "config_file")]
    no_api: bool,
    /// Path to a fifo or a file used for configuring the logger on startup.
    #[arg(long, value_name = "PATH")]
    log_path: Option<String>,
    /// Set the logger level (Error, Warning, Info, Debug, Trace, Off).
    #[arg(long, value_name = "LEVEL")]
    level: Option<String>,
    /// Set the logger module filter.
    #[arg(long, value_name = "MODULE")]
    module: Option<String>,
    /// Whether or not to output the level in the logs.
    #[arg(long)]
    show_level: bool,
    /// Whether or not to include the file path and line number of the log's origin.
    #[arg(long)]
    show_log_origin: bool,
    /// Path to a fifo or a file used for configuring the metrics on startup.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<String>,
    /// Whether or not to load boot timer device for logging elapsed time since
    /// InstanceStart command.
    #[arg(long)]
    boot_timer: bool,
    /// Print the binary version number.
    #[arg(long)]
    version: bool,
    /// Print the supported data format version.
    #[arg(long)]
    snapshot_version: bool,
    /// Print the data format version of the provided snapshot state file.
    #[arg(long, value_name = "PATH")]
    describe_snapshot: Option<String>,
    /// Http API request payload max size, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 51_200)]
    http_api_max_payload_size: usize,
    /// Mmds data store limit, in bytes (default: the API payload limit).
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,
    /// Enables PCIe support (refused: ember is virtio-mmio only).
    #[arg(long)]
    enable_pci: bool,
    /// ember: write guest serial output here instead of stdout.
    #[arg(long, value_name = "PATH")]
    serial_out: Option<String>,
    /// ember: log level on stderr (same as --level; default warn).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Test-only: right after installing its filter, the named thread
    /// (vmm, api or vcpu) makes a syscall outside it, socket(AF_INET), so
    /// the process dies by SIGSYS. With --no-seccomp the call succeeds.
    #[arg(long, value_name = "THREAD", hide = true, value_parser = ["vmm", "api", "vcpu"])]
    seccomp_test_trigger: Option<String>,
}

fn die(code: ExitCode, msg: impl std::fmt::Display) -> ! {
    eprintln!("ember-vmm: {msg}");
    process::exit(code as i32)
}

/// Firecracker's instance id rule.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn main() {
    // Before anything else, while this is the only thread: every thread
    // allocates from one brk heap with a fixed mmap threshold, the syscalls
    // all filters allow (see vmm::seccomp's "Allocation under the filters").
    if let Err(e) = vmm::seccomp::configure_allocator() {
        die(ExitCode::GenericError, e);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => ExitCode::ArgParsing as i32,
            };
            let _ = e.print();
            process::exit(code);
        }
    };
    if args.version {
        println!("ember-vmm v{}\n", env!("CARGO_PKG_VERSION"));
        return;
    }
    if args.snapshot_version {
        println!("{}", vmm::snapshot_version());
        return;
    }
    if let Some(p) = &args.describe_snapshot {
        match vmm::describe_snapshot(p) {
            Ok(v) => {
                println!("{v}");
                return;
            }
            Err(e) => die(ExitCode::GenericError, e),
        }
    }
    if args.enable_pci {
        die(
            ExitCode::ArgParsing,
            "--enable-pci: ember-vmm has no PCI transport; its devices are virtio-mmio",
        );
    }
    if !valid_id(&args.id) {
        die(
            ExitCode::ArgParsing,
            format!(
                "invalid instance id {:?}: use 1 to 64 of ASCII letters, digits and '-'",
                args.id
            ),
        );
    }

    // Logger: stderr at --level/--log-level (default warn), then
    // Firecracker's --log-path family on top.
    let level = args
        .level
        .as_deref()
        .or(args.log_level.as_deref())
        .unwrap_or("warn");
    match vmm::logger::parse_level(level) {
        Ok(l) => {
            let _ = vmm::logger::init(l);
        }
        Err(e) => die(ExitCode::ArgParsing, e),
    }
    vmm::logger::set_instance_id(&args.id);
    let log_cfg = LoggerConfig {
        log_path: args.log_path.clone(),
        level: None,
        show_level: args.show_level.then_some(true),
        show_log_origin: args.show_log_origin.then_some(true),
        module: args.module.clone(),
    };
    if let Err(e) = vmm::logger::configure(&log_cfg) {
        die(ExitCode::BadConfiguration, e);
    }
    log::info!("Running ember-vmm v{}", env!("CARGO_PKG_VERSION"));

    let seccomp = if args.no_seccomp {
        SeccompLevel::None
    } else if let Some(f) = &args.seccomp_filter {
        match FilterMap::read(std::path::Path::new(f)) {
            Ok(m) => SeccompLevel::Custom(Arc::new(m)),
            Err(e) => die(ExitCode::BadConfiguration, e),
        }
    } else {
        SeccompLevel::Confined
    };

    let mut b = MicroVm::builder()
        .id(args.id)
        .seccomp(seccomp)
        .seccomp_test_trigger(
            args.seccomp_test_trigger
                .as_deref()
                .and_then(ThreadKind::from_name),
        )
        .handle_sigterm(true)
        .stdin(true)
        .boot_timer(args.boot_timer)
        .api_max_payload(args.http_api_max_payload_size)
        .mmds_size_limit(
            args.mmds_size_limit
                .unwrap_or(args.http_api_max_payload_size),
        )
        .start_times(StartTimes {
            start_us: args.start_time_us,
            start_cpu_us: args.start_time_cpu_us,
            parent_cpu_us: args.parent_cpu_time_us,
        });
    if let Some(p) = args.metrics_path {
        b = b.metrics(MetricsConfig {
            metrics_path: p,
            ..Default::default()
        });
    }
    if let Some(p) = &args.metadata {
        let v = std::fs::read(p)
            .map_err(|e| format!("cannot read the MMDS content file {p}: {e}"))
            .and_then(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(|e| format!("the MMDS content file {p} is not JSON: {e}"))
            });
        match v {
            Ok(v) => b = b.mmds_content(v),
            Err(e) => die(ExitCode::BadConfiguration, e),
        }
    }
    if let Some(p) = args.serial_out {
        b = b.serial(Serial::File(p.into()));
    }
    if !args.no_api {
        b = b.api_socket(args.api_sock);
    }
    if let Some(p) = args.config_file {
        b = b.config_file(p);
    }
    let result = b.build().and_then(MicroVm::run);
    match result {
        Ok(reason) => {
            let code = reason.exit_code();
            if code == ExitCode::Ok {
                eprintln!("ember-vmm: {reason}; exiting");
            } else {
                eprintln!("ember-vmm: {reason}; exiting with status {}", code as i32);
            }
            process::exit(code as i32);
        }
        Err(e) => die(e.exit_code(), e),
    }
}
