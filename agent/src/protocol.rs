//! The ember-agent wire protocol.
//!
//! Every message is one frame:
//!
//! ```text
//! | cmd: u32 big-endian | length: u32 big-endian | payload: `length` bytes of JSON |
//! ```
//!
//! `length` counts the payload only (hyperstart counted the 8-byte header
//! too; ember does not). A payload larger than [`MAX_PAYLOAD`] is refused
//! without being read, and since the stream cannot be resynchronised after
//! that, the reader closes the connection.
//!
//! Command numbers reuse hyperstart's (`src/api.h`) where the meaning is the
//! same; ember's additions start at 64. See [`cmd`].
//!
//! The host sends a [`Request`]; the agent answers each request, in order,
//! with [`cmd::ACK`] ([`OkReply`]) or [`cmd::ERROR`] ([`ErrorReply`]). The
//! agent sends [`cmd::READY`] ([`Ready`]) once when a connection opens, and
//! pushes [`cmd::PROCESSASYNCEVENT`] ([`Event`]) frames whenever a process
//! exits, and whenever a process started with `stdio` writes output (all of
//! a process's output events come before its exit event); events may
//! arrive between a request and its reply.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest accepted payload: 1 MiB.
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Size of the frame header.
pub const HEADER_LEN: usize = 8;
/// The vsock port of the control channel (hyperstart's).
pub const CONTROL_PORT: u32 = 2718;

/// Command numbers.
pub mod cmd {
    /// host→agent: kill every container, unmount, shut the VM down.
    pub const DESTROYPOD: u32 = 4;
    /// host→agent: [`super::Exec`].
    pub const EXECCMD: u32 = 6;
    /// agent→host: [`super::Ready`], first frame on every connection.
    pub const READY: u32 = 8;
    /// agent→host: [`super::OkReply`].
    pub const ACK: u32 = 9;
    /// agent→host: [`super::ErrorReply`].
    pub const ERROR: u32 = 10;
    /// host→agent: liveness check, answered with ACK (`version` set).
    pub const PING: u32 = 12;
    /// host→agent: [`super::WriteFile`].
    pub const WRITEFILE: u32 = 15;
    /// host→agent: [`super::ReadFile`].
    pub const READFILE: u32 = 16;
    /// host→agent: [`super::StartContainer`] (hyperstart's NEWCONTAINER).
    pub const NEWCONTAINER: u32 = 17;
    /// host→agent: [`super::StopContainer`] (hyperstart's KILLCONTAINER).
    pub const KILLCONTAINER: u32 = 18;
    /// host→agent: [`super::RemoveContainer`].
    pub const REMOVECONTAINER: u32 = 22;
    /// agent→host: [`super::Event`].
    pub const PROCESSASYNCEVENT: u32 = 23;
    /// host→agent: [`super::Signal`].
    pub const SIGNALPROCESS: u32 = 24;
    /// host→agent: [`super::Wait`] (ember).
    pub const WAITPROCESS: u32 = 64;
    /// host→agent: [`super::ReadLog`] (ember).
    pub const READLOG: u32 = 65;
    /// host→agent: [`super::Stdin`] (ember).
    pub const STDIN: u32 = 66;
    /// host→agent: [`super::Resize`] (ember; hyperstart's WINSIZE).
    pub const RESIZE: u32 = 67;
    /// host→agent: [`super::Logs`] (ember).
    pub const LOGS: u32 = 68;
}

/// Largest stdin chunk a host should put in one [`Stdin`] frame (its
/// base64 fits the test guest's 8 KiB frames, too).
pub const STDIN_CHUNK: usize = 4096;

/// A framing or decoding failure.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection at a frame boundary.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("truncated frame: connection closed after {got} of {want} bytes of the {part}")]
    Truncated {
        /// "header" or "payload".
        part: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The length field exceeds [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    /// A command number this side does not know.
    #[error("unknown command {0}")]
    UnknownCommand(u32),
    /// The payload is not the JSON the command expects.
    #[error("bad payload for command {cmd}: {source}")]
    BadJson {
        /// The frame's command.
        cmd: u32,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// One raw frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Command number.
    pub cmd: u32,
    /// JSON payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame whose payload is `body` serialised as JSON.
    pub fn json<T: Serialize>(cmd: u32, body: &T) -> Result<Frame, ProtocolError> {
        let payload =
            serde_json::to_vec(body).map_err(|source| ProtocolError::BadJson { cmd, source })?;
        if payload.len() as u64 > u64::from(MAX_PAYLOAD) {
            return Err(ProtocolError::TooLarge(payload.len() as u64));
        }
        Ok(Frame { cmd, payload })
    }

    /// The header and payload as one buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(HEADER_LEN + self.payload.len());
        buf.extend_from_slice(&self.cmd.to_be_bytes());
        buf.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&self.payload);
        buf
    }

    /// Decodes the payload; an empty payload reads as `{}`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        let payload: &[u8] = if self.payload.is_empty() {
            b"{}"
        } else {
            &self.payload
        };
        serde_json::from_slice(payload).map_err(|source| ProtocolError::BadJson {
            cmd: self.cmd,
            source,
        })
    }
}

/// Reads until `buf` is full; returns how many bytes were read before EOF.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame. EOF before the first header byte is [`ProtocolError::Closed`].
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Err(ProtocolError::Closed);
    }
    if got < HEADER_LEN {
        return Err(ProtocolError::Truncated {
            part: "header",
            got,
            want: HEADER_LEN,
        });
    }
    let cmd = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(u64::from(len)));
    }
    let mut payload = vec![0u8; len as usize];
    let got = read_full(r, &mut payload)?;
    if got < payload.len() {
        return Err(ProtocolError::Truncated {
            part: "payload",
            got,
            want: payload.len(),
        });
    }
    Ok(Frame { cmd, payload })
}

/// Writes one frame (header and payload in one write call where possible).
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> Result<(), ProtocolError> {
    if frame.payload.len() as u64 > u64::from(MAX_PAYLOAD) {
        return Err(ProtocolError::TooLarge(frame.payload.len() as u64));
    }
    w.write_all(&frame.to_bytes())?;
    w.flush()?;
    Ok(())
}

fn default_fstype() -> String {
    "ext4".to_string()
}

/// Where a container's root filesystem comes from.
///
/// JSON: `{"type": "block_device", "path": "/dev/vdb", "fstype": "ext4", "readonly": false}`
/// or `{"type": "dir", "path": "/some/dir"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Rootfs {
    /// A block device the agent mounts at `<run dir>/<id>/root`.
    BlockDevice {
        /// Device node, e.g. `/dev/vdb`.
        path: String,
        /// Filesystem type; `ext4` if absent.
        #[serde(default = "default_fstype")]
        fstype: String,
        /// Mount read-only.
        #[serde(default)]
        readonly: bool,
    },
    /// A directory that already holds the root filesystem.
    Dir {
        /// The directory.
        path: String,
    },
}

/// NEWCONTAINER: start a container's main process.
///
/// `env` is a list of `[name, value]` pairs and is the whole environment.
/// `user` is numeric: `"uid"` or `"uid:gid"` (gid defaults to uid).
/// `workdir` is inside the container and defaults to `/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartContainer {
    /// Container id (`[A-Za-z0-9_.-]`, 1-64 chars); also the process id of its main process.
    pub id: String,
    /// Root filesystem.
    pub rootfs: Rootfs,
    /// argv; `cmd[0]` without a `/` is searched in the container's `PATH`.
    pub cmd: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Numeric `uid[:gid]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Volumes mounted inside the root before the process starts, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<VolumeMount>,
    /// Files written into the root (after the mounts) before the process
    /// starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ContainerFile>,
    /// Stream the process's stdio (see [`Exec::stdio`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdio: bool,
    /// With `stdio`, run the process on a pseudo-terminal.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A block device mounted inside a container (a pod volume).
///
/// JSON: `{"device": "/dev/vdc", "path": "/data", "fstype": "ext4", "readonly": false}`.
/// `path` is resolved inside the container's root (symlinks included) and
/// created, with its parents, when missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// Device node, e.g. `/dev/vdc`.
    pub device: String,
    /// Mount point inside the container.
    pub path: String,
    /// Filesystem type; `ext4` if absent.
    #[serde(default = "default_fstype")]
    pub fstype: String,
    /// Mount read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// A file written into a container's root before it starts (hyperd's pod
/// `files`). `path` is resolved inside the root; missing parents are
/// created (0755). Its `Debug` shows the size of `data`, never the bytes
/// (requests are logged).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerFile {
    /// Path inside the container.
    pub path: String,
    /// Contents, base64 (at most [`MAX_FILE`] bytes decoded).
    pub data: String,
    /// Permission bits; 0644 if absent.
    #[serde(default = "default_file_mode")]
    pub mode: u32,
    /// Owner uid; unchanged (0) if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Owner gid; unchanged (0) if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl std::fmt::Debug for ContainerFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerFile")
            .field("path", &self.path)
            .field(
                "data",
                &format_args!("<{} base64 characters>", self.data.len()),
            )
            .field("mode", &format_args!("{:o}", self.mode))
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .finish()
    }
}

fn default_stop_signal() -> i32 {
    libc::SIGTERM
}

fn default_stop_timeout() -> u64 {
    10_000
}

/// KILLCONTAINER: send `signal` to the container's processes, then SIGKILL
/// after `timeout_ms`; the reply carries the main process's exit code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopContainer {
    /// Container id.
    pub id: String,
    /// First signal; SIGTERM (15) if absent.
    #[serde(default = "default_stop_signal")]
    pub signal: i32,
    /// Grace period before SIGKILL; 10 s if absent.
    #[serde(default = "default_stop_timeout")]
    pub timeout_ms: u64,
}

/// EXECCMD: start another process inside a container's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// The container to join.
    pub container: String,
    /// Process id, unique among all processes of the agent.
    pub id: String,
    /// argv.
    pub cmd: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Numeric `uid[:gid]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Stream the process's stdio: its stdin is a pipe fed by [`Stdin`]
    /// requests, and what it writes to stdout and stderr is pushed to every
    /// connection as [`Event::Output`] (and still appended to its log).
    /// Without it stdin is `/dev/null` and output goes to the log only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdio: bool,
    /// With `stdio`, run the process on a pseudo-terminal (stdin, stdout
    /// and stderr are its slave; all output is stream 1, `\n` becomes
    /// `\r\n`); [`Resize`] sets its size.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
}

/// WAITPROCESS: block until a process (container or exec id) has exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    /// Process id.
    pub id: String,
    /// Give up with an error after this long; wait forever if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

fn default_file_mode() -> u32 {
    0o644
}

/// WRITEFILE: create or replace a small file inside a container
/// (`path` is resolved inside the container's root; parents must exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    /// Container id.
    pub container: String,
    /// Path inside the container.
    pub path: String,
    /// Contents, base64.
    pub data: String,
    /// Permission bits; 0644 if absent.
    #[serde(default = "default_file_mode")]
    pub mode: u32,
}

/// READFILE: read a small file (at most [`MAX_FILE`] bytes) from a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFile {
    /// Container id.
    pub container: String,
    /// Path inside the container.
    pub path: String,
}

/// Largest file READFILE returns, and largest READLOG chunk (base64 of it
/// fits in [`MAX_PAYLOAD`]).
pub const MAX_FILE: usize = 512 * 1024;

/// READLOG: read a process's combined stdout+stderr from `offset`; the reply
/// has `data` (base64, at most [`MAX_FILE`] bytes) and `next_offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadLog {
    /// Process id.
    pub id: String,
    /// Byte offset into the log.
    #[serde(default)]
    pub offset: u64,
}

/// SIGNALPROCESS: send a signal to a process (and its process group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Process id.
    pub id: String,
    /// Signal number.
    pub signal: i32,
}

/// REMOVECONTAINER: SIGKILL whatever still runs in a container, unmount its
/// rootfs, forget it and its processes and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveContainer {
    /// Container id.
    pub id: String,
}

/// STDIN: bytes for the stdin of a process started with `stdio`.
///
/// The agent queues at most a bounded amount per process; when that queue
/// is full the request fails with a message starting `busy:` and the host
/// sends it again later (so a process that does not read its stdin slows
/// its writer down instead of growing the agent's memory). `eof` (after
/// `data`) closes the process's stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stdin {
    /// Process id.
    pub id: String,
    /// Bytes, base64 (at most [`STDIN_CHUNK`] bytes decoded are expected).
    #[serde(default)]
    pub data: String,
    /// Close stdin after `data`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub eof: bool,
}

/// RESIZE: the terminal size of a process started with `tty`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    /// Process id.
    pub id: String,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// LOGS: the recent output a `stdio` process wrote (the agent keeps the
/// last [`LOG_RING_BYTES`] of it), as [`LogRecord`]s in the reply's
/// `records`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logs {
    /// Process id.
    pub id: String,
}

/// Output bytes the agent keeps per `stdio` process for [`Logs`].
pub const LOG_RING_BYTES: usize = 256 * 1024;

/// One piece of output, as [`Event::Output`] carried it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The output event's `seq`.
    pub seq: u64,
    /// 1 stdout, 2 stderr.
    pub stream: u8,
    /// When the agent read it: nanoseconds since the Unix epoch (the
    /// guest's clock); 0 if the agent has no clock.
    pub time_ns: u64,
    /// Bytes, base64.
    pub data: String,
}

/// A request from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// PING.
    Ping,
    /// NEWCONTAINER.
    StartContainer(StartContainer),
    /// KILLCONTAINER.
    StopContainer(StopContainer),
    /// EXECCMD.
    Exec(Exec),
    /// WAITPROCESS.
    Wait(Wait),
    /// WRITEFILE.
    WriteFile(WriteFile),
    /// READFILE.
    ReadFile(ReadFile),
    /// READLOG.
    ReadLog(ReadLog),
    /// SIGNALPROCESS.
    Signal(Signal),
    /// REMOVECONTAINER.
    RemoveContainer(RemoveContainer),
    /// DESTROYPOD.
    DestroyPod,
    /// STDIN.
    Stdin(Stdin),
    /// RESIZE.
    Resize(Resize),
    /// LOGS.
    Logs(Logs),
}

#[derive(Serialize, Deserialize)]
struct Empty {}

impl Request {
    /// The command number.
    pub fn cmd(&self) -> u32 {
        match self {
            Request::Ping => cmd::PING,
            Request::StartContainer(_) => cmd::NEWCONTAINER,
            Request::StopContainer(_) => cmd::KILLCONTAINER,
            Request::Exec(_) => cmd::EXECCMD,
            Request::Wait(_) => cmd::WAITPROCESS,
            Request::WriteFile(_) => cmd::WRITEFILE,
            Request::ReadFile(_) => cmd::READFILE,
            Request::ReadLog(_) => cmd::READLOG,
            Request::Signal(_) => cmd::SIGNALPROCESS,
            Request::RemoveContainer(_) => cmd::REMOVECONTAINER,
            Request::DestroyPod => cmd::DESTROYPOD,
            Request::Stdin(_) => cmd::STDIN,
            Request::Resize(_) => cmd::RESIZE,
            Request::Logs(_) => cmd::LOGS,
        }
    }

    /// Encodes the request as a frame.
    pub fn encode(&self) -> Result<Frame, ProtocolError> {
        let c = self.cmd();
        match self {
            Request::Ping | Request::DestroyPod => Frame::json(c, &Empty {}),
            Request::StartContainer(r) => Frame::json(c, r),
            Request::StopContainer(r) => Frame::json(c, r),
            Request::Exec(r) => Frame::json(c, r),
            Request::Wait(r) => Frame::json(c, r),
            Request::WriteFile(r) => Frame::json(c, r),
            Request::ReadFile(r) => Frame::json(c, r),
            Request::ReadLog(r) => Frame::json(c, r),
            Request::Signal(r) => Frame::json(c, r),
            Request::RemoveContainer(r) => Frame::json(c, r),
            Request::Stdin(r) => Frame::json(c, r),
            Request::Resize(r) => Frame::json(c, r),
            Request::Logs(r) => Frame::json(c, r),
        }
    }

    /// Decodes a frame received by the agent.
    pub fn decode(frame: &Frame) -> Result<Request, ProtocolError> {
        Ok(match frame.cmd {
            cmd::PING => {
                frame.parse::<Empty>()?;
                Request::Ping
            }
            cmd::DESTROYPOD => {
                frame.parse::<Empty>()?;
                Request::DestroyPod
            }
            cmd::NEWCONTAINER => Request::StartContainer(frame.parse()?),
            cmd::KILLCONTAINER => Request::StopContainer(frame.parse()?),
            cmd::EXECCMD => Request::Exec(frame.parse()?),
            cmd::WAITPROCESS => Request::Wait(frame.parse()?),
            cmd::WRITEFILE => Request::WriteFile(frame.parse()?),
            cmd::READFILE => Request::ReadFile(frame.parse()?),
            cmd::READLOG => Request::ReadLog(frame.parse()?),
            cmd::SIGNALPROCESS => Request::Signal(frame.parse()?),
            cmd::REMOVECONTAINER => Request::RemoveContainer(frame.parse()?),
            cmd::STDIN => Request::Stdin(frame.parse()?),
            cmd::RESIZE => Request::Resize(frame.parse()?),
            cmd::LOGS => Request::Logs(frame.parse()?),
            other => return Err(ProtocolError::UnknownCommand(other)),
        })
    }
}

/// READY payload: `{"version": "0.1.0", "pid1": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Agent version.
    pub version: String,
    /// Whether the agent runs as PID 1 (in a VM).
    #[serde(default)]
    pub pid1: bool,
}

/// ACK payload. Which fields are set depends on the request:
/// NEWCONTAINER/EXECCMD `pid`; WAITPROCESS/KILLCONTAINER `id` and `code`;
/// READFILE `data`; READLOG `data` and `next_offset`; PING `version`;
/// the others `{}`. Absent fields are omitted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkReply {
    /// Process id the reply is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Host-side (agent's) pid of a started process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Exit code: the status, or 128 + signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Base64 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Offset after `data` in a log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<u64>,
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// LOGS: the kept output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<Vec<LogRecord>>,
}

/// ERROR payload: `{"message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong.
    pub message: String,
}

/// PROCESSASYNCEVENT payload: `{"event": "exited", "id": "c1", "code": 0}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A container's main process or an exec'd process has exited.
    Exited {
        /// Process id (container id for main processes).
        id: String,
        /// Exit status, or 128 + signal.
        code: i32,
    },
    /// Output of a process started with `stdio`:
    /// `{"event": "output", "id": "c1", "stream": 1, "data": "aGkK"}`.
    /// A process's output events all come before its `exited` event.
    Output {
        /// Process id.
        id: String,
        /// 1 stdout, 2 stderr (Docker's stream numbers).
        stream: u8,
        /// Bytes, base64.
        data: String,
        /// This process's output counter (1, 2, ...), the `seq` of the
        /// same bytes in [`Logs`] records; 0 from agents that keep no log.
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A frame from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    /// READY.
    Ready(Ready),
    /// ACK.
    Ok(OkReply),
    /// ERROR.
    Error(ErrorReply),
    /// PROCESSASYNCEVENT.
    Event(Event),
}

impl AgentMessage {
    /// Encodes the message as a frame.
    pub fn encode(&self) -> Result<Frame, ProtocolError> {
        match self {
            AgentMessage::Ready(r) => Frame::json(cmd::READY, r),
            AgentMessage::Ok(r) => Frame::json(cmd::ACK, r),
            AgentMessage::Error(r) => Frame::json(cmd::ERROR, r),
            AgentMessage::Event(e) => Frame::json(cmd::PROCESSASYNCEVENT, e),
        }
    }

    /// Decodes a frame received by the host.
    pub fn decode(frame: &Frame) -> Result<AgentMessage, ProtocolError> {
        Ok(match frame.cmd {
            cmd::READY => AgentMessage::Ready(frame.parse()?),
            cmd::ACK => AgentMessage::Ok(frame.parse()?),
            cmd::ERROR => AgentMessage::Error(frame.parse()?),
            cmd::PROCESSASYNCEVENT => AgentMessage::Event(frame.parse()?),
            other => return Err(ProtocolError::UnknownCommand(other)),
        })
    }

    /// An ERROR message.
    pub fn error(message: impl Into<String>) -> AgentMessage {
        AgentMessage::Error(ErrorReply {
            message: message.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn start() -> StartContainer {
        StartContainer {
            id: "c1".into(),
            rootfs: Rootfs::BlockDevice {
                path: "/dev/vdb".into(),
                fstype: "ext4".into(),
                readonly: false,
            },
            cmd: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("PATH".into(), "/bin".into())],
            workdir: Some("/tmp".into()),
            user: Some("1000:1000".into()),
            mounts: Vec::new(),
            files: Vec::new(),
            stdio: false,
            tty: false,
        }
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Ping,
            Request::StartContainer(start()),
            Request::StopContainer(StopContainer {
                id: "c1".into(),
                signal: 15,
                timeout_ms: 500,
            }),
            Request::Exec(Exec {
                container: "c1".into(),
                id: "e1".into(),
                cmd: vec!["ls".into()],
                env: vec![],
                workdir: None,
                user: None,
                stdio: true,
                tty: true,
            }),
            Request::Wait(Wait {
                id: "c1".into(),
                timeout_ms: Some(3),
            }),
            Request::WriteFile(WriteFile {
                container: "c1".into(),
                path: "/etc/x".into(),
                data: "aGk=".into(),
                mode: 0o600,
            }),
            Request::ReadFile(ReadFile {
                container: "c1".into(),
                path: "/etc/x".into(),
            }),
            Request::ReadLog(ReadLog {
                id: "c1".into(),
                offset: 7,
            }),
            Request::Signal(Signal {
                id: "c1".into(),
                signal: 9,
            }),
            Request::RemoveContainer(RemoveContainer { id: "c1".into() }),
            Request::DestroyPod,
            Request::Stdin(Stdin {
                id: "c1".into(),
                data: "aGkK".into(),
                eof: true,
            }),
            Request::Resize(Resize {
                id: "c1".into(),
                rows: 24,
                cols: 80,
            }),
            Request::Logs(Logs { id: "c1".into() }),
        ]
    }

    #[test]
    fn requests_round_trip_through_bytes() {
        let mut wire = Vec::new();
        for r in all_requests() {
            write_frame(&mut wire, &r.encode().unwrap()).unwrap();
        }
        let mut cur = Cursor::new(wire);
        for r in all_requests() {
            let f = read_frame(&mut cur).unwrap();
            assert_eq!(f.cmd, r.cmd());
            assert_eq!(Request::decode(&f).unwrap(), r);
        }
        assert!(matches!(read_frame(&mut cur), Err(ProtocolError::Closed)));
    }

    #[test]
    fn file_contents_never_show_in_debug() {
        let f = ContainerFile {
            path: "/etc/secret".into(),
            data: crate::b64::encode(b"hunter2"),
            mode: 0o600,
            uid: None,
            gid: None,
        };
        let d = format!("{f:?}");
        assert!(
            d.contains("/etc/secret") && d.contains("<12 base64 characters>"),
            "{d}"
        );
        assert!(!d.contains(&f.data), "{d}");
    }

    #[test]
    fn header_is_big_endian_and_counts_payload_only() {
        let f = Request::Ping.encode().unwrap();
        let b = f.to_bytes();
        assert_eq!(&b[..4], &[0, 0, 0, 12]);
        assert_eq!(&b[4..8], &[0, 0, 0, 2]);
        assert_eq!(&b[8..], b"{}");
    }

    #[test]
    fn json_shapes() {
        let f = Request::StartContainer(start()).encode().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(v["rootfs"]["type"], "block_device");
        assert_eq!(v["rootfs"]["fstype"], "ext4");
        assert_eq!(v["env"][0][0], "PATH");
        assert_eq!(v["env"][0][1], "/bin");
        let ev = AgentMessage::Event(Event::Exited {
            id: "c1".into(),
            code: 143,
        })
        .encode()
        .unwrap();
        assert_eq!(ev.cmd, cmd::PROCESSASYNCEVENT);
        assert_eq!(
            std::str::from_utf8(&ev.payload).unwrap(),
            r#"{"event":"exited","id":"c1","code":143}"#
        );
        let ok = AgentMessage::Ok(OkReply {
            pid: Some(5),
            ..Default::default()
        })
        .encode()
        .unwrap();
        assert_eq!(ok.payload, br#"{"pid":5}"#);
    }

    #[test]
    fn defaults_and_open_schema() {
        let f = Frame {
            cmd: cmd::NEWCONTAINER,
            payload: br#"{"id":"a","rootfs":{"type":"block_device","path":"/dev/vdb"},"cmd":["x"],"future":1}"#.to_vec(),
        };
        match Request::decode(&f).unwrap() {
            Request::StartContainer(s) => {
                assert_eq!(
                    s.rootfs,
                    Rootfs::BlockDevice {
                        path: "/dev/vdb".into(),
                        fstype: "ext4".into(),
                        readonly: false
                    }
                );
                assert!(s.env.is_empty());
                assert_eq!(s.workdir, None);
            }
            other => panic!("{other:?}"),
        }
        let f = Frame {
            cmd: cmd::KILLCONTAINER,
            payload: br#"{"id":"a"}"#.to_vec(),
        };
        assert_eq!(
            Request::decode(&f).unwrap(),
            Request::StopContainer(StopContainer {
                id: "a".into(),
                signal: 15,
                timeout_ms: 10_000
            })
        );
        // Payload-less commands accept an empty payload.
        let f = Frame {
            cmd: cmd::PING,
            payload: vec![],
        };
        assert_eq!(Request::decode(&f).unwrap(), Request::Ping);
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut b = cmd::PING.to_be_bytes().to_vec();
        b.extend_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        // No payload follows: the reader must not try to read or allocate it.
        match read_frame(&mut Cursor::new(b)) {
            Err(ProtocolError::TooLarge(n)) => assert_eq!(n, u64::from(MAX_PAYLOAD) + 1),
            other => panic!("{other:?}"),
        }
        let big = Frame {
            cmd: cmd::ACK,
            payload: vec![b' '; MAX_PAYLOAD as usize + 1],
        };
        assert!(matches!(
            write_frame(&mut Vec::new(), &big),
            Err(ProtocolError::TooLarge(_))
        ));
        // Exactly the limit is fine.
        let max = Frame {
            cmd: cmd::ACK,
            payload: vec![b' '; MAX_PAYLOAD as usize],
        };
        let mut wire = Vec::new();
        write_frame(&mut wire, &max).unwrap();
        assert_eq!(read_frame(&mut Cursor::new(wire)).unwrap(), max);
    }

    #[test]
    fn junk_json_and_unknown_commands() {
        let junk = Frame {
            cmd: cmd::NEWCONTAINER,
            payload: b"{not json".to_vec(),
        };
        assert!(matches!(
            Request::decode(&junk),
            Err(ProtocolError::BadJson { cmd: 17, .. })
        ));
        let wrong_shape = Frame {
            cmd: cmd::WAITPROCESS,
            payload: br#"{"id": 5}"#.to_vec(),
        };
        assert!(matches!(
            Request::decode(&wrong_shape),
            Err(ProtocolError::BadJson { .. })
        ));
        let bad_rootfs = Frame {
            cmd: cmd::NEWCONTAINER,
            payload: br#"{"id":"a","rootfs":{"type":"nfs"},"cmd":[]}"#.to_vec(),
        };
        assert!(Request::decode(&bad_rootfs).is_err());
        let ping_junk = Frame {
            cmd: cmd::PING,
            payload: b"\xff\xfe".to_vec(),
        };
        assert!(Request::decode(&ping_junk).is_err());
        let unknown = Frame {
            cmd: 999,
            payload: b"{}".to_vec(),
        };
        assert!(matches!(
            Request::decode(&unknown),
            Err(ProtocolError::UnknownCommand(999))
        ));
        // A reply command is not a request.
        let ack = Frame {
            cmd: cmd::ACK,
            payload: b"{}".to_vec(),
        };
        assert!(matches!(
            Request::decode(&ack),
            Err(ProtocolError::UnknownCommand(9))
        ));
        assert!(matches!(
            AgentMessage::decode(&Request::Ping.encode().unwrap()),
            Err(ProtocolError::UnknownCommand(12))
        ));
    }

    #[test]
    fn truncated_frames() {
        let full = Request::StartContainer(start())
            .encode()
            .unwrap()
            .to_bytes();
        // Cut inside the header.
        match read_frame(&mut Cursor::new(&full[..5])) {
            Err(ProtocolError::Truncated {
                part: "header",
                got: 5,
                want: 8,
            }) => {}
            other => panic!("{other:?}"),
        }
        // Cut inside the payload.
        let cut = full.len() - 3;
        match read_frame(&mut Cursor::new(&full[..cut])) {
            Err(ProtocolError::Truncated {
                part: "payload",
                got,
                want,
            }) => {
                assert_eq!(want, full.len() - HEADER_LEN);
                assert_eq!(got, want - 3);
            }
            other => panic!("{other:?}"),
        }
        // Nothing at all is a clean close.
        assert!(matches!(
            read_frame(&mut Cursor::new(Vec::new())),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn agent_messages_round_trip() {
        let msgs = vec![
            AgentMessage::Ready(Ready {
                version: "0.1.0".into(),
                pid1: true,
            }),
            AgentMessage::Ok(OkReply {
                id: Some("c1".into()),
                code: Some(3),
                ..Default::default()
            }),
            AgentMessage::error("no such container: x"),
            AgentMessage::Event(Event::Exited {
                id: "e1".into(),
                code: 137,
            }),
            AgentMessage::Event(Event::Output {
                id: "e1".into(),
                stream: 2,
                data: "aGkK".into(),
                seq: 4,
            }),
        ];
        for m in msgs {
            let f = m.encode().unwrap();
            let back = read_frame(&mut Cursor::new(f.to_bytes())).unwrap();
            assert_eq!(AgentMessage::decode(&back).unwrap(), m);
        }
    }
}
