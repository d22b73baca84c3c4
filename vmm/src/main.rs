//! `ember-vmm`: runs one microVM, configured by a Firecracker-shaped API on a
//! unix socket and/or a JSON config file. A thin front end over
//! [`vmm::MicroVm`].

use std::process;

use clap::Parser;
use vmm::seccomp::ThreadKind;
use vmm::{ExitCode, MicroVm, SeccompLevel, Serial};

/// Default API socket path.
const DEFAULT_API_SOCK: &str = "/run/ember-vmm.socket";

#[derive(Parser, Debug)]
#[command(
    name = "ember-vmm",
    version,
    about = "ember microVM monitor: one KVM guest per process"
)]
struct Args {
    /// Unix socket for the per-VM API.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_API_SOCK)]
    api_sock: String,
    /// Start the microVM from this JSON file (Firecracker's shape) at once.
    #[arg(long, value_name = "PATH")]
    config_file: Option<String>,
    /// Do not serve the API (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Instance id reported by `GET /`.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Write guest serial output here instead of stdout.
    #[arg(long, value_name = "PATH")]
    serial_out: Option<String>,
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Do not install the per-thread seccomp filters (for debugging only).
    #[arg(long)]
    no_seccomp: bool,
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
    match vmm::logger::parse_level(&args.log_level) {
        Ok(l) => {
            let _ = vmm::logger::init(l);
        }
        Err(e) => die(ExitCode::ArgParsing, e),
    }
    if args.no_api && args.config_file.is_none() {
        die(ExitCode::ArgParsing, "--no-api needs --config-file");
    }

    let mut b = MicroVm::builder()
        .id(args.id)
        .seccomp(if args.no_seccomp {
            SeccompLevel::None
        } else {
            SeccompLevel::Confined
        })
        .seccomp_test_trigger(
            args.seccomp_test_trigger
                .as_deref()
                .and_then(ThreadKind::from_name),
        )
        .handle_sigterm(true)
        .stdin(true);
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
