//! SIGTERM stops the VMM through its event loop: the handler only writes
//! an eventfd the loop watches, and the loop then stops the vCPUs, flushes
//! guest output, removes its sockets and exits with status 143
//! ([`crate::ExitCode::Terminated`]). So SIGTERM works only while the loop
//! turns, which is what the VMM thread must always do (nothing on it
//! blocks); and it works when the VMM is PID 1 of a PID namespace
//! (`ember-jailer --new-pid-ns`), where a signal without a handler is
//! ignored. SIGKILL remains the last resort.
//!
//! The signal is blocked on every thread but the VMM thread
//! ([`block_on_this_thread`] from the API and vCPU threads' start hooks),
//! so the handler runs there, under the VMM filter, and interrupts its
//! `epoll_wait`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::SubscriberOps;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::controller::Waker;
use crate::EventManager;

/// Errors setting up SIGTERM handling.
#[derive(Debug, thiserror::Error)]
pub enum TermError {
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("sigaction(SIGTERM): {0}")]
    Sigaction(std::io::Error),
}

/// The eventfd the handler writes (-1 before [`install`]).
static TERM_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigterm(_sig: libc::c_int) {
    let fd = TERM_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; 8 bytes from a valid u64
        // to the eventfd that install() leaked (open for the process's life).
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Installs the SIGTERM handler and watches its eventfd on `em`; the flag
/// returned is set once SIGTERM arrived. Call on the VMM thread before any
/// other thread exists.
pub fn install(em: &mut EventManager) -> Result<Arc<AtomicBool>, TermError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(TermError::EventFd)?;
    let watched = evt.try_clone().map_err(TermError::EventFd)?;
    // The handler's copy stays open for the life of the process.
    TERM_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    std::mem::forget(evt);
    let fired = Arc::new(AtomicBool::new(false));
    em.add_subscriber(Arc::new(Mutex::new(Waker::new(watched, fired.clone()))));
    // SAFETY: a zeroed sigaction is valid; we set the handler and an empty
    // mask. The handler only does async-signal-safe work.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigterm as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(TermError::Sigaction(std::io::Error::last_os_error()));
    }
    Ok(fired)
}

/// Blocks SIGTERM on the calling thread (every thread but the VMM thread).
pub fn block_on_this_thread() {
    // SAFETY: a sigset built with the libc helpers; pthread_sigmask only
    // changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
