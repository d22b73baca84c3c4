//! `ember-vmm`: runs one microVM, configured by a Firecracker-shaped API on a
//! unix socket and/or a JSON config file.

use std::process;
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;

use clap::Parser;
use vmm::actions::VmmAction;
use vmm::api::server::{ApiRequest, ApiThread};
use vmm::config::VmConfig;
use vmm::controller::Controller;
use vmm::seccomp::ThreadKind;
use vmm::{EventManager, ExitCode};

/// Default API socket path.
const DEFAULT_API_SOCK: &str = "/run/ember-vmm.socket";

#[derive(Parser, Debug)]
#[command(name = "ember-vmm", version, about = "ember microVM monitor: one KVM guest per process")]
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

/// Installs `kind`'s seccomp filters on the calling thread (unless
/// `enabled` is false), then fires the test trigger if it names `kind`.
/// A thread that cannot be confined takes the whole process down.
fn confine(kind: ThreadKind, enabled: bool, trigger: Option<ThreadKind>) {
    if enabled {
        if let Err(e) = vmm::seccomp::install(kind) {
            die(ExitCode::GenericError, format!("{} thread: {e}", kind.name()));
        }
    }
    if trigger == Some(kind) {
        eprintln!(
            "ember-vmm: seccomp test trigger: the {} thread calls socket(AF_INET)",
            kind.name()
        );
        let ok = vmm::seccomp::forbidden_syscall();
        eprintln!(
            "ember-vmm: seccomp test trigger: the {} thread survived (socket {})",
            kind.name(),
            if ok { "created" } else { "refused" }
        );
    }
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

    let seccomp = !args.no_seccomp;
    let trigger = args.seccomp_test_trigger.as_deref().and_then(ThreadKind::from_name);

    let mut em = EventManager::new()
        .unwrap_or_else(|e| die(ExitCode::GenericError, format!("event manager: {e}")));
    // SIGTERM ends the VMM through this thread's event loop (see
    // vmm::term); the other threads block it.
    let terminated = vmm::term::install(&mut em)
        .unwrap_or_else(|e| die(ExitCode::GenericError, format!("SIGTERM handling: {e}")));
    // Each vCPU thread confines itself before it first enters the guest.
    let vcpu_hook: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        vmm::term::block_on_this_thread();
        confine(ThreadKind::Vcpu, seccomp, trigger)
    });
    let mut controller =
        Controller::new(args.id.clone(), args.serial_out.clone(), &mut em, Some(vcpu_hook))
            .unwrap_or_else(|e| die(ExitCode::GenericError, format!("controller: {e}")));

    // The API comes up before the config file is applied, so a client can
    // watch the instance from its first moment.
    let api = if args.no_api {
        None
    } else {
        Some(
            ApiThread::spawn(
                &args.api_sock,
                &mut em,
                Some(Box::new(move || {
                    vmm::term::block_on_this_thread();
                    confine(ThreadKind::Api, seccomp, trigger)
                })),
            )
            .unwrap_or_else(|e| {
                die(
                    ExitCode::GenericError,
                    format!("cannot serve the API on {}: {e}", args.api_sock),
                )
            }),
        )
    };

    // The VMM thread confines itself before it reads the config file or
    // handles any API request or guest event. The filter covers
    // InstanceStart (KVM setup, device backends, spawning the vCPU threads,
    // which inherit it and stack their own).
    confine(ThreadKind::Vmm, seccomp, trigger);

    if let Some(path) = &args.config_file {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
            die(ExitCode::BadConfiguration, format!("cannot read {path}: {e}"))
        });
        let cfg: VmConfig = serde_json::from_str(&text).unwrap_or_else(|e| {
            die(ExitCode::BadConfiguration, format!("invalid config file {path}: {e}"))
        });
        if let Err(e) = controller.set_config(cfg) {
            die(ExitCode::BadConfiguration, format!("{path}: {e}"));
        }
        if let Err(e) = controller.handle(VmmAction::InstanceStart, &mut em) {
            die(ExitCode::BadConfiguration, e);
        }
    }

    let code = loop {
        if let Err(e) = em.run() {
            if e.to_string().contains("Interrupted") {
                continue;
            }
            break (ExitCode::GenericError, format!("event loop: {e}"));
        }
        if let Some(api) = &api {
            loop {
                match api.requests.try_recv() {
                    Ok(ApiRequest { action, conn }) => {
                        let (status, body) = vmm::api::reply(controller.handle(action, &mut em));
                        api.answer(conn, status, body);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
        }
        if let Some(done) = controller.check_exit() {
            break done;
        }
        if terminated.load(std::sync::atomic::Ordering::SeqCst) {
            break (ExitCode::Terminated, "SIGTERM".to_string());
        }
    };
    controller.shutdown();
    if let Some(api) = api {
        api.cleanup();
    }
    let (code, msg) = code;
    if code == ExitCode::Ok {
        eprintln!("ember-vmm: {msg}; exiting");
    } else {
        eprintln!("ember-vmm: {msg}; exiting with status {}", code as i32);
    }
    process::exit(code as i32);
}
