//! The loop's work queue. One thread (the event loop) owns the
//! [`Supervisor`]; long work runs on worker threads, and what a worker
//! produces is a closure applied to the supervisor back on the loop thread.
//! Nothing here knows HTTP: a face that answers a client when its job ends
//! wraps the answer into the closure ([`crate::server::Ctx::spawn`]).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::supervisor::Supervisor;

/// The supervisor as shared by the loop's subscribers (one thread uses it).
pub type Shared = Arc<Mutex<Supervisor>>;

/// Work finished on a worker thread, applied on the loop thread; it may
/// schedule more work.
pub type BgFinish = Box<dyn FnOnce(&mut Supervisor, &Jobs) + Send>;

/// Runs long work off the event loop.
#[derive(Clone)]
pub struct Jobs {
    tx: Sender<BgFinish>,
    wake: Arc<EventFd>,
}

impl Jobs {
    /// A queue and the loop subscriber that applies its results to `sup`.
    pub fn new(sup: Shared) -> std::io::Result<(Jobs, JobQueue)> {
        let (tx, rx) = channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let jobs = Jobs {
            tx,
            wake: wake.clone(),
        };
        let queue = JobQueue {
            rx,
            wake,
            sup,
            jobs: jobs.clone(),
        };
        Ok((jobs, queue))
    }

    fn send(&self, f: BgFinish) -> bool {
        let sent = self.tx.send(f).is_ok();
        let _ = self.wake.write(1);
        sent
    }

    /// Runs `work` on a new thread after `delay`; the closure it returns is
    /// applied on the loop thread. Fails only if no thread can be started.
    pub fn spawn<F>(&self, what: &str, delay: Duration, work: F) -> std::io::Result<()>
    where
        F: FnOnce() -> BgFinish + Send + 'static,
    {
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("emberd-{what}"))
            .spawn(move || {
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                let fin = work();
                me.send(fin);
            })
            .map(|_| ())
    }

    /// [`Jobs::spawn`] for work no client waits for (reconcile loops): a
    /// failure to start is logged.
    pub fn spawn_background<F>(&self, what: &str, delay: Duration, work: F)
    where
        F: FnOnce() -> BgFinish + Send + 'static,
    {
        if let Err(e) = self.spawn(what, delay, work) {
            log::error!("cannot start a background worker for {what}: {e}");
        }
    }

    /// Runs `f` on the loop thread, with no reply awaited (from any thread).
    pub fn post<F>(&self, f: F)
    where
        F: FnOnce(&mut Supervisor) + Send + 'static,
    {
        self.send(Box::new(move |sup: &mut Supervisor, _: &Jobs| f(sup)));
    }

    /// From a worker thread: runs `f` on the loop thread and waits for its
    /// result, so a worker can interleave blocking work with changes to the
    /// model. `None` if the loop has gone away. Never call it on the loop
    /// thread itself (it would wait for itself).
    pub fn call<T, F>(&self, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Supervisor, &Jobs) -> T + Send + 'static,
    {
        let (tx, rx) = channel();
        let sent = self.send(Box::new(move |sup: &mut Supervisor, jobs: &Jobs| {
            let _ = tx.send(f(sup, jobs));
        }));
        if !sent {
            return None;
        }
        rx.recv().ok()
    }
}

/// The loop side of [`Jobs`]: applies finished work to the supervisor.
pub struct JobQueue {
    rx: Receiver<BgFinish>,
    wake: Arc<EventFd>,
    sup: Shared,
    jobs: Jobs,
}

impl MutEventSubscriber for JobQueue {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.wake.read();
        while let Ok(fin) = self.rx.try_recv() {
            let mut sup = self.sup.lock().unwrap_or_else(|p| p.into_inner());
            fin(&mut sup, &self.jobs);
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.wake.as_ref(), EventSet::IN));
    }
}
