//! `ember-uffd-handler`: a page-fault handler for ember-vmm's (and
//! Firecracker's) `Uffd` snapshot memory backend.
//!
//! ```text
//! ember-uffd-handler --socket PATH --mem-file MEMORY [--accept-timeout-secs 60]
//! ```
//!
//! Creates the unix socket `PATH` (mode 0600; an existing path is refused),
//! waits for one VMM to connect (`PUT /snapshot/load` with
//! `mem_backend: {"backend_type": "Uffd", "backend_path": PATH}`), receives
//! its memory layout and userfaultfd, and serves every page fault with that
//! page of `MEMORY` (a Full memory file, or a base with diffs rebased onto
//! it). It exits when the VMM exits, and removes the socket. Run it inside
//! the VMM's jail when the VMM is jailed. See `vmm/src/snapshot/uffd.rs`.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[path = "../snapshot/uffd.rs"]
mod uffd;

#[derive(Parser)]
#[command(
    name = "ember-uffd-handler",
    version,
    about = "Serves a restored VM's page faults from a snapshot memory file"
)]
struct Cli {
    /// The unix socket to create and listen on (the load's backend_path).
    #[arg(long)]
    socket: PathBuf,
    /// The snapshot's memory file.
    #[arg(long)]
    mem_file: PathBuf,
    /// Give up when no VMM connected and sent its handshake in this time.
    #[arg(long, default_value_t = 60)]
    accept_timeout_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = run(&cli);
    let _ = std::fs::remove_file(&cli.socket);
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-uffd-handler: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let mem = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&cli.mem_file)
        .map_err(|e| {
            format!(
                "cannot open the memory file {}: {e}",
                cli.mem_file.display()
            )
        })?;
    if !mem.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(format!(
            "the memory file {} is not a regular file",
            cli.mem_file.display()
        ));
    }
    // The socket is created 0600 whatever the umask (bind applies the
    // umask; chmod makes the mode explicit).
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&cli.socket);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener =
        bound.map_err(|e| format!("cannot create the socket {}: {e}", cli.socket.display()))?;
    std::fs::set_permissions(&cli.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot chmod the socket {}: {e}", cli.socket.display()))?;
    println!("ember-uffd-handler: listening on {}", cli.socket.display());

    let timeout = Duration::from_secs(cli.accept_timeout_secs.max(1));
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one live descriptor.
    let r = unsafe {
        libc::poll(
            &mut pfd,
            1,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    if r <= 0 {
        return Err(format!("no VMM connected within {} s", timeout.as_secs()));
    }
    let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    drop(listener);
    let peer = peer_pid(&conn);
    let (mappings, fd) = uffd::recv_handshake(&conn, timeout).map_err(|e| e.to_string())?;
    let regions = mappings.len();
    let mut h = uffd::Handler::new(fd, mappings, &mem).map_err(|e| e.to_string())?;
    eprintln!("ember-uffd-handler: serving {regions} regions for pid {peer}");
    let r = h.run(&conn).map_err(|e| e.to_string());
    eprintln!(
        "ember-uffd-handler: VMM {peer} ended; served {} pages from the file, {} zero pages",
        h.copied, h.zeroed
    );
    r
}

/// The connected VMM's pid (SO_PEERCRED), for the log.
fn peer_pid(s: &std::os::unix::net::UnixStream) -> i32 {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 {
        cred.pid
    } else {
        -1
    }
}
