//! `ember-agent` binary: PID 1 of a pod VM, or a plain process on a host.
//!
//! As PID 1 it mounts /proc, /sys, /dev (devtmpfs), /dev/pts and /run,
//! sets the hostname from the kernel command line (`ember.hostname=NAME`, or
//! `hostname=NAME`), loads the kernel modules `/etc/ember-modules` lists
//! (see `ember_agent::modules`), serves on vsock port 2718 and reaps every orphan. When
//! the pod is destroyed it syncs and reboots, which ember-vmm (i8042 reset)
//! turns into a VMM exit. Otherwise it just serves on the given transport
//! and exits on DESTROYPOD or SIGTERM after killing its containers.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_agent::container::Paths;
use ember_agent::modules;
use ember_agent::protocol::CONTROL_PORT;
use ember_agent::server::{self, Server, VERSION};
use ember_agent::transport::Listener;

const USAGE: &str = "\
usage: ember-agent [--unix PATH | --vsock-port PORT] [--state-dir DIR] [--run-dir DIR]
                   [--log-level error|warn|info|debug|trace]

  --unix PATH        serve on a unix socket (host tests) instead of vsock
  --vsock-port PORT  vsock port (default 2718)
  --state-dir DIR    logs and state (default /run/ember-agent)
  --run-dir DIR      block-device rootfs mount points (default /run/containers)
";

struct Args {
    unix: Option<PathBuf>,
    vsock_port: u32,
    state_dir: PathBuf,
    run_dir: PathBuf,
    level: log::LevelFilter,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        unix: None,
        vsock_port: CONTROL_PORT,
        state_dir: PathBuf::from("/run/ember-agent"),
        run_dir: PathBuf::from("/run/containers"),
        level: log::LevelFilter::Info,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--unix" => a.unix = Some(PathBuf::from(value("--unix")?)),
            "--vsock-port" => {
                a.vsock_port = value("--vsock-port")?
                    .parse()
                    .map_err(|_| "--vsock-port: not a port number".to_string())?
            }
            "--state-dir" => a.state_dir = PathBuf::from(value("--state-dir")?),
            "--run-dir" => a.run_dir = PathBuf::from(value("--run-dir")?),
            "--log-level" => {
                a.level = value("--log-level")?
                    .parse()
                    .map_err(|_| "--log-level: unknown level".to_string())?
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--version" => {
                println!("ember-agent {VERSION}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("ember-agent: {} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Makes sure fds 0-2 are open, so no later descriptor lands on them.
fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: fcntl(F_GETFD) only queries.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: open with a valid C string; the result stays open on purpose.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    let (Ok(s), Ok(t), Ok(f)) = (
        CString::new(source),
        CString::new(target),
        CString::new(fstype),
    ) else {
        return;
    };
    let data = data.and_then(|d| CString::new(d).ok());
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: mount(2) with valid C strings.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, data_ptr) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            log::warn!("mounting {fstype} at {target}: {e}");
        }
    }
}

/// The hostname on a kernel command line.
fn cmdline_hostname(cmdline: &str) -> Option<&str> {
    let mut found = None;
    for word in cmdline.split_whitespace() {
        if let Some(h) = word.strip_prefix("ember.hostname=") {
            return Some(h);
        }
        if let Some(h) = word.strip_prefix("hostname=") {
            found = Some(h);
        }
    }
    found
}

/// PID 1 duties before serving.
fn init_system() {
    let hardened = libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV;
    mount_fs("proc", "/proc", "proc", hardened, None);
    mount_fs("sysfs", "/sys", "sysfs", hardened, None);
    mount_fs("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, None);
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    );
    // Not noexec: directory rootfs may live under /run.
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    );
    ensure_stdio();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(h) = cmdline_hostname(&cmdline) {
        // SAFETY: sethostname with a valid buffer and length.
        if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } < 0 {
            log::warn!("sethostname {h}: {}", std::io::Error::last_os_error());
        }
    }
    // Before anything touches a device (the vsock listener comes later).
    let list = Path::new(modules::LIST_FILE);
    let (loaded, errors) = modules::load_listed(list, &mut modules::FinitModule);
    if loaded > 0 {
        log::info!("loaded {loaded} kernel modules from {}", list.display());
    }
    for e in errors {
        log::error!("{e}");
    }
}

/// As PID 1: never exit (the kernel would panic); reset the VM instead.
fn reboot_vm() -> ! {
    // SAFETY: sync and reboot(2) take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        // SAFETY: pause(2) just sleeps.
        unsafe { libc::pause() };
    }
}

fn main() {
    let pid1 = std::process::id() == 1;
    // Before any thread exists, so all threads inherit the mask.
    server::block_signals();
    ensure_stdio();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ember-agent: {e}");
            if pid1 {
                reboot_vm();
            }
            std::process::exit(2);
        }
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(args.level);
    if pid1 {
        init_system();
    }

    let socket = args.unix.clone();
    let shutdown = move || -> ! {
        if pid1 {
            reboot_vm();
        }
        if let Some(p) = &socket {
            let _ = std::fs::remove_file(p);
        }
        std::process::exit(0)
    };
    let paths = Paths {
        state_dir: args.state_dir.clone(),
        run_dir: args.run_dir.clone(),
    };
    let server: Arc<Server> = match Server::new(paths, pid1, Box::new(move || shutdown())) {
        Ok(s) => s,
        Err(e) => fatal(pid1, &e.to_string()),
    };
    let listener = match &args.unix {
        Some(p) => Listener::unix(p),
        None => Listener::vsock(args.vsock_port),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => fatal(pid1, &e.to_string()),
    };
    let srv = Arc::clone(&server);
    let serving = std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            if let Err(e) = srv.serve(&listener) {
                log::error!("serving: {e}");
            }
        });
    if let Err(e) = serving {
        fatal(pid1, &format!("starting the accept thread: {e}"));
    }
    let socket = args.unix.clone();
    let srv = Arc::clone(&server);
    server::signal_loop(server.containers(), move |sig| {
        if pid1 {
            log::info!("ignoring signal {sig} as PID 1");
            return;
        }
        log::info!("signal {sig}: removing containers and exiting");
        // On another thread: this one must keep reaping the killed processes.
        let srv = Arc::clone(&srv);
        let socket = socket.clone();
        let _ = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                for e in srv.containers().remove_all() {
                    log::warn!("{e}");
                }
                if let Some(p) = &socket {
                    remove_socket(p);
                }
                std::process::exit(0);
            });
    })
}

fn remove_socket(p: &Path) {
    let _ = std::fs::remove_file(p);
}

fn fatal(pid1: bool, msg: &str) -> ! {
    log::error!("{msg}");
    eprintln!("ember-agent: {msg}");
    if pid1 {
        reboot_vm();
    }
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::cmdline_hostname;

    #[test]
    fn hostname_from_cmdline() {
        assert_eq!(cmdline_hostname("console=ttyS0 hostname=a"), Some("a"));
        assert_eq!(
            cmdline_hostname("ember.hostname=pod-1 hostname=b quiet"),
            Some("pod-1")
        );
        assert_eq!(cmdline_hostname("hostname=b ember.hostname=c"), Some("c"));
        assert_eq!(cmdline_hostname("console=ttyS0"), None);
    }
}
