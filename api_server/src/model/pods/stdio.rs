//! Container stdio for hyperd's exec, attach, logs, tty resize and exit
//! codes: the work behind `faces/hyperd/stdio.rs`.
//!
//! Containers' processes are started by the agent with their stdio
//! streamed ([`ember_agent::protocol::Exec::stdio`]); their output reaches
//! the [`StdioHub`] through the pod VM's one agent session. A hijacked
//! client connection (attach, exec start) is served by a [`Bridge`]: a
//! thread that writes the process's output to the client (Docker's
//! multiplexed frames without a terminal, raw bytes with one) and a second
//! one that sends what the client writes as the process's stdin, in
//! chunks of [`STDIN_CHUNK`], retrying while the agent says its stdin
//! queue is full (so a process that does not read stalls its client, not
//! emberd). Blocking socket writes make a slow client slow down only its
//! own bridge until the hub cuts it off.
//!
//! Exec records (`exec-` ids) live in emberd's memory only, like hyperd's.
//! An attach that arrives before its pod runs (hyperctl `run` attaches,
//! then starts the pod) subscribes at once and sends stdin once the
//! container runs; output the container wrote before the attach arrived
//! is not replayed (it is in `logs`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::protocol::{Exec, Request, Resize, Stdin, STDIN_CHUNK};

use super::{disk_device, resolve, ContainerPlan, PodError, PodSpec, Pods, Result};
use crate::model::jobs::Jobs;
use crate::model::supervisor::Supervisor;
use crate::runtime::agent::Session;
use crate::runtime::stdio::{stdcopy_frame, Chunk, StdioHub};

/// Hijacked connections served at once.
pub const MAX_BRIDGES: usize = 64;
/// Exec records kept (the oldest finished ones are forgotten first).
const MAX_EXECS: usize = 1024;
/// How long `/exitcode` waits for a process that still runs (hyperd: 10 s).
pub const EXIT_WAIT: Duration = Duration::from_secs(10);
/// Exit code of an exec the agent refused to start (Docker's "cannot run").
const EXEC_FAILED: i32 = 126;

/// An exec created by `/exec/create`.
#[derive(Clone, Debug)]
pub struct ExecRecord {
    /// Container id.
    pub container: String,
    /// Its pod.
    pub pod: String,
    /// argv.
    pub cmd: Vec<String>,
    /// On a terminal.
    pub tty: bool,
    /// `/exec/start` has been called.
    pub started: bool,
}

/// A container as hyperd's stdio routes see it.
#[derive(Clone, Debug)]
pub struct ContainerRef {
    pub pod: String,
    pub id: String,
    pub name: String,
    /// The pod VM's instance id, while it has one.
    pub vm: Option<String>,
    /// pending, running, succeeded or failed.
    pub state: String,
    pub exit_code: Option<i32>,
    pub tty: bool,
}

/// The container with this id, or else this name (the pod lookup every
/// hyperd container route uses, [`super::find_container`]), as the stdio
/// routes see it.
pub fn find_container(sup: &Supervisor, name_or_id: &str) -> Result<ContainerRef> {
    let (p, i) = super::find_container(sup, name_or_id)
        .ok_or_else(|| PodError::NoSuch(format!("container {name_or_id}")))?;
    let c = &p.containers[i];
    let spec: PodSpec = serde_json::from_str(&p.spec).unwrap_or_default();
    let tty = spec.tty
        || spec
            .containers
            .iter()
            .find(|s| s.name == c.name)
            .is_some_and(|s| s.tty);
    Ok(ContainerRef {
        pod: p.id.clone(),
        id: c.id.clone(),
        name: c.name.clone(),
        vm: p.vm.clone(),
        state: c.state.clone(),
        exit_code: c.exit_code,
        tty,
    })
}

/// What a bridge serves.
enum Target {
    /// Run this exec, then stream it (with the environment, working
    /// directory and user of the container, resolved from its plan and
    /// image on the bridge's thread, as hyperd gave them).
    Exec {
        req: Exec,
        session: Session,
        plan: Option<(ContainerPlan, usize)>,
    },
    /// Stream a container's main process.
    Attach,
}

/// A hijacked connection's work, prepared on the loop thread; run it with
/// [`Bridge::run`] on a thread of its own.
pub struct Bridge {
    pods: Arc<Pods>,
    jobs: Jobs,
    proc_id: String,
    tty: bool,
    target: Target,
    /// Subscribed when prepared, so nothing is missed from then on.
    sub: std::sync::mpsc::Receiver<Chunk>,
}

/// Decrements the bridge count when a bridge ends.
struct BridgeSlot(Arc<Pods>);

impl Drop for BridgeSlot {
    fn drop(&mut self) {
        self.0.bridges.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pods {
    /// The hub every agent session feeds.
    pub fn stdio(&self) -> &Arc<StdioHub> {
        &self.stdio
    }

    fn take_bridge_slot(&self) -> Result<()> {
        let n = self.bridges.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_BRIDGES {
            self.bridges.fetch_sub(1, Ordering::SeqCst);
            return Err(PodError::Failed(format!(
                "too many attached clients ({MAX_BRIDGES}); try again later"
            )));
        }
        Ok(())
    }

    /// After an emberd restart, before the session starts: the containers'
    /// recent output from the agent's log ring (an agent that keeps none
    /// answers an error, and the log starts empty); events that arrived
    /// meanwhile are then applied in order.
    pub(super) fn seed_logs(
        &self,
        jobs: &Jobs,
        inst: &str,
        client: &mut ember_agent::AgentClient<UnixStream>,
        containers: &[String],
    ) {
        for cid in containers {
            let req = Request::Logs(ember_agent::protocol::Logs { id: cid.clone() });
            match client.request(&req) {
                Ok(ok) => self.stdio.seed(cid, ok.records.as_deref().unwrap_or(&[])),
                Err(e) => log::info!("pod VM {inst}: no kept output for {cid}: {e}"),
            }
        }
        let events = client.take_events();
        super::post_events(jobs, inst, &events);
        for ev in &events {
            self.stdio.event(ev);
        }
    }

    /// Forgets the execs of a deleted pod.
    pub(super) fn forget_execs(&self, pod: &str) {
        let mut execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        execs.retain(|id, e| {
            let keep = e.pod != pod;
            if !keep {
                self.stdio.forget(id);
            }
            keep
        });
    }

    /// `/exec/create`: records an exec of `command` (a JSON array, as
    /// hyperctl sends it) in a running container; returns its id.
    pub fn exec_create(
        &self,
        sup: &Supervisor,
        container: &str,
        command: &str,
        tty: bool,
    ) -> Result<String> {
        let c = find_container(sup, container)?;
        let cmd: Vec<String> = serde_json::from_str(command).map_err(|e| {
            PodError::Invalid(format!(
                "command must be a JSON array of strings, as hyperctl sends it: {e}"
            ))
        })?;
        if cmd.is_empty() || cmd.iter().any(|a| a.contains('\0')) {
            return Err(PodError::Invalid(
                "command must be a non-empty array of strings without NUL bytes".into(),
            ));
        }
        if c.state != "running" {
            return Err(PodError::Conflict(format!(
                "container {} is not running ({})",
                c.id, c.state
            )));
        }
        let mut execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        if execs.len() >= MAX_EXECS {
            let hub = &self.stdio;
            execs.retain(|id, e| !e.started || hub.exit_code(id).is_none());
            if execs.len() >= MAX_EXECS {
                return Err(PodError::Failed(format!(
                    "too many execs ({MAX_EXECS}) are pending or running"
                )));
            }
        }
        let id = crate::model::hyper_id("exec");
        execs.insert(
            id.clone(),
            ExecRecord {
                container: c.id,
                pod: c.pod,
                cmd,
                tty,
                started: false,
            },
        );
        Ok(id)
    }

    /// `/exec/start`: checks the exec and claims it; the bridge runs it.
    pub fn prepare_exec_start(
        self: &Arc<Self>,
        sup: &Supervisor,
        jobs: &Jobs,
        container: &str,
        exec_id: &str,
    ) -> Result<Bridge> {
        let c = find_container(sup, container)?;
        let mut execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        let e = execs
            .get_mut(exec_id)
            .filter(|e| e.container == c.id)
            .ok_or_else(|| PodError::NoSuch(format!("exec {exec_id} in container {container}")))?;
        if e.started {
            return Err(PodError::Conflict(format!(
                "exec {exec_id} has already been started"
            )));
        }
        let session =
            c.vm.as_deref()
                .and_then(|vm| self.session(vm))
                .filter(|_| c.state == "running")
                .ok_or_else(|| {
                    PodError::Conflict(format!("container {} is not running ({})", c.id, c.state))
                })?;
        let plan = sup
            .pod(&c.pod)
            .ok()
            .and_then(|p| super::plan::plan(p).ok())
            .and_then(|p| {
                p.containers
                    .into_iter()
                    .enumerate()
                    .find(|(_, x)| x.id == c.id)
                    .map(|(i, x)| (x, i))
            });
        self.take_bridge_slot()?;
        e.started = true;
        let req = Exec {
            container: c.id.clone(),
            id: exec_id.to_string(),
            cmd: e.cmd.clone(),
            env: vec![],
            workdir: None,
            user: None,
            stdio: true,
            tty: e.tty,
        };
        Ok(Bridge {
            pods: Arc::clone(self),
            jobs: jobs.clone(),
            proc_id: exec_id.to_string(),
            tty: e.tty,
            target: Target::Exec { req, session, plan },
            sub: self.stdio.subscribe(exec_id),
        })
    }

    /// `/attach`: a bridge to a container's main process (which may not
    /// run yet).
    pub fn prepare_attach(
        self: &Arc<Self>,
        sup: &Supervisor,
        jobs: &Jobs,
        container: &str,
    ) -> Result<Bridge> {
        let c = find_container(sup, container)?;
        self.take_bridge_slot()?;
        Ok(Bridge {
            pods: Arc::clone(self),
            jobs: jobs.clone(),
            proc_id: c.id.clone(),
            tty: c.tty,
            target: Target::Attach,
            sub: self.stdio.subscribe(&c.id),
        })
    }

    /// The process `/tty/resize` means and the session to send it through.
    pub fn prepare_resize(
        &self,
        sup: &Supervisor,
        container: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<ResizeJob> {
        let c = find_container(sup, container)?;
        let id = if exec_id.is_empty() {
            c.id.clone()
        } else {
            let execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
            execs
                .get(exec_id)
                .filter(|e| e.container == c.id)
                .ok_or_else(|| {
                    PodError::NoSuch(format!("exec {exec_id} in container {container}"))
                })?;
            exec_id.to_string()
        };
        let session =
            c.vm.as_deref()
                .and_then(|vm| self.session(vm))
                .ok_or_else(|| PodError::Conflict(format!("container {} is not running", c.id)))?;
        Ok(ResizeJob {
            session,
            req: Resize { id, rows, cols },
        })
    }

    /// `/exitcode`: the exit code now, or what to wait for.
    pub fn exit_code(
        self: &Arc<Self>,
        sup: &Supervisor,
        container: &str,
        exec_id: &str,
    ) -> Result<ExitCode> {
        let c = find_container(sup, container)?;
        let id = if exec_id.is_empty() {
            if let Some(code) = c.exit_code {
                return Ok(ExitCode::Now(code));
            }
            c.id.clone()
        } else {
            let execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
            let e = execs
                .get(exec_id)
                .filter(|e| e.container == c.id)
                .ok_or_else(|| {
                    PodError::NoSuch(format!("exec {exec_id} in container {container}"))
                })?;
            if !e.started {
                return Err(PodError::Conflict(format!(
                    "exec {exec_id} has not been started"
                )));
            }
            exec_id.to_string()
        };
        Ok(match self.stdio.exit_code(&id) {
            Some(code) => ExitCode::Now(code),
            None => ExitCode::Wait(ExitWait {
                hub: Arc::clone(&self.stdio),
                id,
            }),
        })
    }
}

/// `/tty/resize` for a worker thread.
pub struct ResizeJob {
    session: Session,
    req: Resize,
}

impl ResizeJob {
    /// Sends the new size to the agent.
    pub fn run(self) -> Result<()> {
        self.session
            .request(Request::Resize(self.req), Duration::from_secs(10))
            .map(|_| ())
            .map_err(|e| agent_error(&e.to_string()))
    }
}

/// The agent's words keep hyperd's status rules.
fn agent_error(msg: &str) -> PodError {
    let m = msg.trim_start_matches("agent error: ");
    if m.starts_with("bad parameter") {
        PodError::Invalid(m.trim_start_matches("bad parameter: ").to_string())
    } else if m.starts_with("no such ") {
        PodError::NoSuch(m.trim_start_matches("no such ").to_string())
    } else {
        PodError::Failed(m.to_string())
    }
}

/// An exit code known now, or to wait for.
pub enum ExitCode {
    Now(i32),
    Wait(ExitWait),
}

/// Waits (on a worker thread) for a process's exit code.
pub struct ExitWait {
    hub: Arc<StdioHub>,
    id: String,
}

impl ExitWait {
    /// The code, once the process has exited (at most [`EXIT_WAIT`]).
    pub fn run(self) -> Result<i32> {
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            if let Some(code) = self.hub.exit_code(&self.id) {
                return Ok(code);
            }
            if Instant::now() >= deadline {
                return Err(PodError::Failed(format!(
                    "wait exit code timeout: {} still runs",
                    self.id
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Bridge {
    /// Whether the stream has a terminal (raw bytes, no stdcopy frames).
    pub fn tty(&self) -> bool {
        self.tty
    }

    /// Serves the hijacked connection until the process exits, the pod
    /// goes away or the client leaves. `early` is what the client sent
    /// right after its request (stdin).
    pub fn run(self, stream: UnixStream, early: Vec<u8>) {
        let _slot = BridgeSlot(Arc::clone(&self.pods));
        let done = Arc::new(AtomicBool::new(false));
        let mut out = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("stdio bridge for {}: {e}", self.proc_id);
                return;
            }
        };
        let write = |out: &mut UnixStream, stream_no: u8, data: &[u8]| -> bool {
            let r = if self.tty {
                out.write_all(data)
            } else {
                out.write_all(&stdcopy_frame(stream_no, data))
            };
            r.is_ok()
        };
        // Start the exec (a failure is told on the stream, as stderr).
        let session = match &self.target {
            Target::Exec { req, session, plan } => {
                let mut req = req.clone();
                if let Some((cp, i)) = plan {
                    let start = self
                        .pods
                        .images
                        .open_image(&cp.image)
                        .ok()
                        .zip(disk_device(*i).ok())
                        .and_then(|(img, dev)| resolve(cp, &img.config, &dev).ok());
                    if let Some(start) = start {
                        req.env = start.env;
                        req.workdir = start.workdir;
                        req.user = start.user;
                    }
                }
                match session.request(Request::Exec(req), Duration::from_secs(30)) {
                    Ok(_) => Some(session.clone()),
                    Err(e) => {
                        // The exec never ran: its exit code says so.
                        self.pods.stdio.event(&ember_agent::Event::Exited {
                            id: self.proc_id.clone(),
                            code: EXEC_FAILED,
                        });
                        write(&mut out, 2, format!("{e}\n").as_bytes());
                        let _ = out.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            }
            Target::Attach => None,
        };
        let stdin = {
            let (pods, jobs, id, done) = (
                Arc::clone(&self.pods),
                self.jobs.clone(),
                self.proc_id.clone(),
                done.clone(),
            );
            let session = session.clone();
            std::thread::Builder::new()
                .name("emberd-stdin".into())
                .spawn(move || {
                    let session = match session {
                        Some(s) => Some(s),
                        None => wait_running(&pods, &jobs, &id, &done),
                    };
                    if let Some(s) = session {
                        feed_stdin(&s, &id, stream, early, &done);
                    }
                })
        };
        if stdin.is_err() {
            log::warn!(
                "stdio bridge for {}: cannot start its stdin thread",
                self.proc_id
            );
        }
        loop {
            match self.sub.recv_timeout(Duration::from_millis(500)) {
                Ok(Chunk::Out(rec)) => {
                    if !write(&mut out, rec.stream, &rec.data) {
                        break;
                    }
                }
                Ok(Chunk::Exit(_)) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    if self.gone() {
                        break;
                    }
                }
            }
        }
        done.store(true, Ordering::SeqCst);
        // The exit's model update was queued before the hub heard of it:
        // once the loop has run this, the client's next request (hyperctl
        // reads the exit code right after the stream ends) sees it.
        let _ = self.jobs.call(|_, _| ());
        // Ends the client's read (EOF) and our stdin thread's.
        let _ = out.shutdown(std::net::Shutdown::Both);
    }

    /// Whether the process can no longer produce output though no exit
    /// came: it had exited before the subscription, or its pod is gone.
    fn gone(&self) -> bool {
        if self.pods.stdio.exit_code(&self.proc_id).is_some() {
            return true;
        }
        match &self.target {
            Target::Exec { session, .. } => session.has_ended(),
            Target::Attach => {
                let id = self.proc_id.clone();
                self.jobs
                    .call(move |sup, _| match find_container(sup, &id) {
                        Ok(c) => c.exit_code.is_some(),
                        Err(_) => true,
                    })
                    .unwrap_or(true)
            }
        }
    }
}

/// Waits until container `id` runs and returns its pod VM's session;
/// None if the bridge ended first or the container ended.
fn wait_running(pods: &Arc<Pods>, jobs: &Jobs, id: &str, done: &AtomicBool) -> Option<Session> {
    while !done.load(Ordering::SeqCst) {
        let cid = id.to_string();
        let c = jobs.call(move |sup, _| find_container(sup, &cid).ok())??;
        if c.exit_code.is_some() {
            return None;
        }
        if c.state == "running" {
            if let Some(s) = c.vm.as_deref().and_then(|vm| pods.session(vm)) {
                return Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Sends what the client writes as stdin of `id`, then end-of-file.
fn feed_stdin(
    session: &Session,
    id: &str,
    mut stream: UnixStream,
    early: Vec<u8>,
    done: &AtomicBool,
) {
    let send = |data: &[u8], eof: bool| -> bool {
        let req = Request::Stdin(Stdin {
            id: id.to_string(),
            data: ember_agent::b64::encode(data),
            eof,
        });
        loop {
            if done.load(Ordering::SeqCst) {
                return false;
            }
            match session.request(req.clone(), Duration::from_secs(30)) {
                Ok(_) => return true,
                // The agent's queue is full: the process reads slowly.
                Err(e) if e.to_string().contains("busy:") => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    log::debug!("stdin of {id}: {e}");
                    return false;
                }
            }
        }
    };
    for chunk in early.chunks(STDIN_CHUNK) {
        if !send(chunk, false) {
            return;
        }
    }
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                // The client half-closed (hyperctl's CloseWrite after its
                // stdin ended): pass the end on, unless we are done.
                if !done.load(Ordering::SeqCst) {
                    send(&[], true);
                }
                return;
            }
            Ok(n) => {
                if !send(&buf[..n], false) {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The exec records (for the face's listing needs and tests).
pub(super) type Execs = std::sync::Mutex<HashMap<String, ExecRecord>>;

/// Counter type for bridges.
pub(super) type BridgeCount = AtomicUsize;
