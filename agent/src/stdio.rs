//! Streamed stdio of processes started with `stdio` (see
//! [`crate::protocol::Exec::stdio`]): pipes or a pseudo-terminal, the
//! threads that pump output into [`Event::Output`] events, the bounded
//! stdin queue, and the rule that a process's `exited` event comes only
//! after its last output.
//!
//! Limits and behaviour:
//! - output is read in chunks of at most [`OUTPUT_CHUNK`] bytes; each chunk
//!   is appended to the process's log file and pushed as one event. Pushing
//!   blocks while the connections' send queues are full, so a host that
//!   reads slowly slows the process's writes down (as a full pipe would);
//! - stdin is a queue of at most [`STDIN_QUEUE`] chunks per process, written
//!   by a thread of its own; a full queue refuses more with a `busy:` error
//!   rather than blocking the connection (the host retries);
//! - the last [`LOG_RING_BYTES`] of each process's output are kept, with
//!   their `seq` and the time they were read, for LOGS (an emberd that
//!   reconnects after a restart gets the containers' recent output back);
//! - a process's output ends at end-of-file on its pipes (EIO on a pty
//!   master once the slave is closed), or, once the process has exited,
//!   after [`DRAIN_IDLE`] without output: a background child that keeps the
//!   pipe open does not hold the `exited` event back for ever.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::collections::VecDeque;

use crate::b64;
use crate::protocol::{Event, LogRecord, LOG_RING_BYTES};

/// Largest chunk of output in one event.
pub const OUTPUT_CHUNK: usize = 16 * 1024;
/// Stdin chunks queued per process before `busy:`.
pub const STDIN_QUEUE: usize = 16;
/// How long output may stay silent after the process exited before its
/// streams are considered finished.
pub const DRAIN_IDLE: Duration = Duration::from_millis(200);

/// Where events go (shared with the reaper).
pub type Notify = Arc<dyn Fn(Event) + Send + Sync>;

/// The child's ends, dup'ed onto 0, 1 and 2 after fork.
pub struct ChildSide {
    /// stdin, stdout, stderr.
    pub fds: [OwnedFd; 3],
    /// Whether fd 0 is a terminal to make the controlling one.
    pub tty: bool,
}

/// The agent's ends.
pub struct HostSide {
    /// Writes the process's stdin.
    stdin: File,
    /// (stream number, reader) per output.
    outputs: Vec<(u8, File)>,
    /// The pty master, for resizing.
    master: Option<Arc<File>>,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Pipes (stdin, stdout, stderr) or, with `tty`, a pseudo-terminal.
pub fn open(tty: bool) -> io::Result<(ChildSide, HostSide)> {
    if tty {
        let (mut master, mut slave) = (0 as RawFd, 0 as RawFd);
        // SAFETY: openpty writes two descriptors; no name, termios or size.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors we own.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
            // SAFETY: F_SETFD on our own descriptor.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        let child = ChildSide {
            fds: [slave.try_clone()?, slave.try_clone()?, slave],
            tty: true,
        };
        let host = HostSide {
            stdin: master.try_clone()?,
            outputs: vec![(1, master.try_clone()?)],
            master: Some(Arc::new(master)),
        };
        return Ok((child, host));
    }
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok((
        ChildSide {
            fds: [in_r, out_w, err_w],
            tty: false,
        },
        HostSide {
            stdin: File::from(in_w),
            outputs: vec![(1, File::from(out_r)), (2, File::from(err_r))],
            master: None,
        },
    ))
}

/// A process's recent output, numbered.
#[derive(Default)]
struct Ring {
    records: VecDeque<(u64, u8, u64, Vec<u8>)>,
    bytes: usize,
    next_seq: u64,
}

impl Ring {
    /// Keeps a chunk; returns its seq.
    fn push(&mut self, stream: u8, data: &[u8]) -> u64 {
        self.next_seq += 1;
        let time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        self.bytes += data.len();
        self.records
            .push_back((self.next_seq, stream, time_ns, data.to_vec()));
        while self.bytes > LOG_RING_BYTES {
            match self.records.pop_front() {
                Some(old) => self.bytes -= old.3.len(),
                None => break,
            }
        }
        self.next_seq
    }
}

/// Holds a process's `exited` event until its output has been pushed.
struct ExitGate {
    /// Output pumps still running.
    open: usize,
    /// The exit code, once reaped and not yet reported.
    code: Option<i32>,
}

/// The agent's handle on one process's streams.
pub struct Streams {
    id: String,
    stdin: Mutex<Option<SyncSender<Option<Vec<u8>>>>>,
    master: Option<Arc<File>>,
    exited: Arc<AtomicBool>,
    gate: Arc<Mutex<ExitGate>>,
    notify: Notify,
    ring: Arc<Mutex<Ring>>,
}

impl Streams {
    /// Starts the stdin writer and the output pumps of process `id`.
    /// `log` receives a copy of all output.
    pub fn start(id: &str, host: HostSide, log: &File, notify: Notify) -> io::Result<Streams> {
        let exited = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Mutex::new(ExitGate {
            open: host.outputs.len(),
            code: None,
        }));
        let ring = Arc::new(Mutex::new(Ring::default()));
        let (tx, rx) = sync_channel::<Option<Vec<u8>>>(STDIN_QUEUE);
        let tty = host.master.is_some();
        let mut stdin = host.stdin;
        std::thread::Builder::new()
            .name(format!("stdin-{id}"))
            .spawn(move || {
                for chunk in rx {
                    let data = match chunk {
                        Some(d) => d,
                        // A terminal has no half-close: end-of-file is ^D.
                        None if tty => vec![4],
                        None => break,
                    };
                    if stdin.write_all(&data).is_err() {
                        break;
                    }
                }
            })?;
        for (stream, file) in host.outputs {
            let (id, log) = (id.to_string(), log.try_clone()?);
            let (exited, gate, notify) = (exited.clone(), gate.clone(), notify.clone());
            let ring = ring.clone();
            std::thread::Builder::new()
                .name(format!("out{stream}-{id}"))
                .spawn(move || {
                    pump(&id, stream, file, log, &exited, &notify, &ring);
                    let done = {
                        let mut g = gate.lock().unwrap_or_else(|p| p.into_inner());
                        g.open -= 1;
                        if g.open == 0 {
                            g.code.take()
                        } else {
                            None
                        }
                    };
                    if let Some(code) = done {
                        notify(Event::Exited { id, code });
                    }
                })?;
        }
        Ok(Streams {
            id: id.to_string(),
            stdin: Mutex::new(Some(tx)),
            master: host.master,
            exited,
            gate,
            notify,
            ring,
        })
    }

    /// The kept output, oldest first.
    pub fn logs(&self) -> Vec<LogRecord> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.records
            .iter()
            .map(|(seq, stream, time_ns, data)| LogRecord {
                seq: *seq,
                stream: *stream,
                time_ns: *time_ns,
                data: b64::encode(data),
            })
            .collect()
    }

    /// The process was reaped with `code`: report it now if its output is
    /// done, else when the last pump finishes.
    pub fn exited(&self, code: i32) {
        self.exited.store(true, Ordering::SeqCst);
        let now = {
            let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            if g.open == 0 {
                true
            } else {
                g.code = Some(code);
                false
            }
        };
        if now {
            (self.notify)(Event::Exited {
                id: self.id.clone(),
                code,
            });
        }
    }

    /// Queues stdin bytes (and then end-of-file). Err(true): the queue is
    /// full; Err(false): stdin is closed.
    pub fn feed(&self, data: Vec<u8>, eof: bool) -> Result<(), bool> {
        let mut guard = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        let tx = guard.as_ref().ok_or(false)?;
        if !data.is_empty() {
            match tx.try_send(Some(data)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => return Err(true),
                Err(TrySendError::Disconnected(_)) => return Err(false),
            }
        }
        if eof {
            match tx.try_send(None) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => *guard = None,
                Err(TrySendError::Full(_)) => return Err(true),
            }
        }
        Ok(())
    }

    /// Sets the terminal size; false if the process has no terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<bool> {
        let Some(m) = &self.master else {
            return Ok(false);
        };
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        if unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }
}

/// Reads one output until it ends (see the module docs), pushing events.
fn pump(
    id: &str,
    stream: u8,
    mut file: File,
    mut log: File,
    exited: &AtomicBool,
    notify: &Notify,
    ring: &Mutex<Ring>,
) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let tick = 50;
    let mut idle_after_exit = 0u32;
    loop {
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, tick) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            if exited.load(Ordering::SeqCst) {
                idle_after_exit += 1;
                if idle_after_exit * tick as u32 >= DRAIN_IDLE.as_millis() as u32 {
                    return;
                }
            }
            continue;
        }
        idle_after_exit = 0;
        match file.read(&mut buf) {
            // EOF, or EIO from a pty master whose slave is closed.
            Ok(0) | Err(_) => return,
            Ok(k) => {
                let _ = log.write_all(&buf[..k]);
                // Kept before it is sent: a LOGS reply never misses what an
                // earlier event carried (the seq tells duplicates apart).
                let seq = ring
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(stream, &buf[..k]);
                notify(Event::Output {
                    id: id.to_string(),
                    stream,
                    data: b64::encode(&buf[..k]),
                    seq,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn output_then_exit_in_order_and_stdin_eof() {
        let (child, host) = open(false).unwrap();
        let [cin, cout, cerr] = child.fds;
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let notify: Notify = Arc::new(move |e| {
            let _ = tx.lock().unwrap().send(e);
        });
        let log = tempfile_log();
        let s = Streams::start("p1", host, &log, notify).unwrap();
        // Play the process: echo stdin to stdout until EOF, then a word on stderr.
        let t = std::thread::spawn(move || {
            let mut input = File::from(cin);
            let mut out = File::from(cout);
            let mut err = File::from(cerr);
            let mut all = Vec::new();
            input.read_to_end(&mut all).unwrap();
            out.write_all(&all).unwrap();
            err.write_all(b"bye").unwrap();
        });
        s.feed(b"hello ".to_vec(), false).unwrap();
        s.feed(b"world".to_vec(), true).unwrap();
        assert_eq!(s.feed(b"late".to_vec(), false), Err(false));
        t.join().unwrap();
        s.exited(3);
        let mut out = (Vec::new(), Vec::new());
        loop {
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                Event::Output { stream, data, .. } => {
                    let d = b64::decode(&data).unwrap();
                    if stream == 1 {
                        out.0.extend(d)
                    } else {
                        out.1.extend(d)
                    }
                }
                Event::Exited { id, code } => {
                    assert_eq!((id.as_str(), code), ("p1", 3));
                    break;
                }
            }
        }
        assert_eq!(out, (b"hello world".to_vec(), b"bye".to_vec()));
        let kept = s.logs();
        let mut seqs: Vec<u64> = kept.iter().map(|r| r.seq).collect();
        seqs.sort();
        assert_eq!(seqs, (1..=kept.len() as u64).collect::<Vec<_>>());
        let stdout: Vec<u8> = kept
            .iter()
            .filter(|r| r.stream == 1)
            .flat_map(|r| b64::decode(&r.data).unwrap())
            .collect();
        assert_eq!(stdout, b"hello world");
        assert!(!s.resize(10, 10).unwrap(), "no terminal");
    }

    #[test]
    fn a_full_stdin_queue_is_busy_not_blocking() {
        let (child, host) = open(false).unwrap();
        let notify: Notify = Arc::new(|_| {});
        let s = Streams::start("p2", host, &tempfile_log(), notify).unwrap();
        // Nobody reads the pipe: the writer blocks once it is full, the
        // queue fills, and then feeding says busy.
        let chunk = vec![b'x'; 64 * 1024];
        let mut busy = false;
        for _ in 0..(STDIN_QUEUE + 64) {
            if s.feed(chunk.clone(), false) == Err(true) {
                busy = true;
                break;
            }
        }
        assert!(busy);
        drop(child);
    }

    #[test]
    fn the_ring_keeps_the_newest_output() {
        let mut r = Ring::default();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..10 {
            r.push(1, &chunk);
        }
        assert!(r.bytes <= LOG_RING_BYTES);
        assert_eq!(r.records.len(), LOG_RING_BYTES / chunk.len());
        assert_eq!(r.records.back().unwrap().0, 10);
    }

    fn tempfile_log() -> File {
        let p = std::env::temp_dir().join(format!(
            "ember-agent-stdio-{}-{:?}.log",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = File::options().create(true).append(true).open(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }
}
