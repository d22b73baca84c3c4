//! [`AgentClient`]: the blocking host side of the protocol, for emberd.
//!
//! Generic over the transport (a vsock or unix stream, anything
//! `Read + Write`); timeouts are the transport's (e.g.
//! `UnixStream::set_read_timeout`). Exit events that arrive while waiting for
//! a reply are queued and returned by [`AgentClient::take_events`] /
//! [`AgentClient::next_event`].

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::b64;
use crate::protocol::{
    read_frame, write_frame, AgentMessage, Event, Exec, OkReply, ProtocolError, ReadFile, ReadLog,
    Ready, RemoveContainer, Request, Signal, StartContainer, StopContainer, Wait, WriteFile,
    CONTROL_PORT,
};

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Framing, decoding or transport failure.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent answered with ERROR.
    #[error("agent error: {0}")]
    Agent(String),
    /// The agent sent a frame that makes no sense here.
    #[error("unexpected message from the agent: {0}")]
    Unexpected(String),
    /// An ACK lacks a field this request needs.
    #[error("agent reply lacks `{0}`")]
    MissingField(&'static str),
    /// The agent's base64 data is invalid.
    #[error("bad data from the agent: {0}")]
    Base64(#[from] b64::Base64Error),
    /// The VMM's hybrid-vsock socket refused `CONNECT <port>`.
    #[error("vsock handshake with {path}: {reason}")]
    Handshake {
        /// The VMM's vsock unix socket.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Opens a host-initiated connection to guest vsock `port` through the
/// VMM's hybrid-vsock unix socket (`CONNECT <port>\n`, answered `OK <n>\n`;
/// see `devices::virtio::vsock`). `timeout` bounds the handshake and stays
/// set as the stream's read timeout.
pub fn connect_vsock_uds(
    uds_path: &Path,
    port: u32,
    timeout: Option<Duration>,
) -> Result<UnixStream, ClientError> {
    let fail = |reason: String| ClientError::Handshake {
        path: uds_path.display().to_string(),
        reason,
    };
    let mut s = UnixStream::connect(uds_path).map_err(|e| fail(format!("connect: {e}")))?;
    s.set_read_timeout(timeout)
        .map_err(|e| fail(format!("set_read_timeout: {e}")))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| fail(format!("write: {e}")))?;
    // Byte by byte, so nothing after the line is consumed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(fail("closed before OK (is the guest listening?)".into())),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(b[0]),
            Ok(_) => return Err(fail("answer line too long".into())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(format!("read: {e}"))),
        }
    }
    let line = String::from_utf8_lossy(&line);
    if line.starts_with("OK ") {
        Ok(s)
    } else {
        Err(fail(format!("unexpected answer {line:?}")))
    }
}

impl AgentClient<UnixStream> {
    /// Connects to the agent of a VM through the VMM's hybrid-vsock unix
    /// socket, on the control port 2718, and reads READY.
    pub fn connect_vsock_uds(
        uds_path: &Path,
        timeout: Option<Duration>,
    ) -> Result<Self, ClientError> {
        AgentClient::new(connect_vsock_uds(uds_path, CONTROL_PORT, timeout)?)
    }
}

/// A blocking connection to one agent.
pub struct AgentClient<S: Read + Write> {
    stream: S,
    ready: Ready,
    events: VecDeque<Event>,
}

impl<S: Read + Write> AgentClient<S> {
    /// Wraps a freshly connected stream and reads the agent's READY frame.
    pub fn new(mut stream: S) -> Result<Self, ClientError> {
        let frame = read_frame(&mut stream)?;
        match AgentMessage::decode(&frame)? {
            AgentMessage::Ready(ready) => Ok(AgentClient {
                stream,
                ready,
                events: VecDeque::new(),
            }),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} instead of READY"
            ))),
        }
    }

    /// The agent's READY payload.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// The underlying stream (e.g. to set timeouts).
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Sends any request and returns the ACK payload (an ERROR reply is
    /// [`ClientError::Agent`]). Events received meanwhile are queued.
    pub fn request(&mut self, req: &Request) -> Result<OkReply, ClientError> {
        write_frame(&mut self.stream, &req.encode()?)?;
        loop {
            match self.recv()? {
                AgentMessage::Ok(ok) => return Ok(ok),
                AgentMessage::Error(e) => return Err(ClientError::Agent(e.message)),
                AgentMessage::Event(ev) => self.events.push_back(ev),
                AgentMessage::Ready(_) => {
                    return Err(ClientError::Unexpected("a second READY".into()))
                }
            }
        }
    }

    fn recv(&mut self) -> Result<AgentMessage, ClientError> {
        let frame = read_frame(&mut self.stream)?;
        Ok(AgentMessage::decode(&frame)?)
    }

    /// PING; returns the agent's version.
    pub fn ping(&mut self) -> Result<String, ClientError> {
        let ok = self.request(&Request::Ping)?;
        ok.version.ok_or(ClientError::MissingField("version"))
    }

    /// NEWCONTAINER; returns the main process's pid (in the agent's pid namespace).
    pub fn start_container(&mut self, req: StartContainer) -> Result<u32, ClientError> {
        let ok = self.request(&Request::StartContainer(req))?;
        ok.pid.ok_or(ClientError::MissingField("pid"))
    }

    /// KILLCONTAINER: `signal`, then SIGKILL after `timeout`; returns the exit code.
    pub fn stop_container(
        &mut self,
        id: &str,
        signal: i32,
        timeout: Duration,
    ) -> Result<i32, ClientError> {
        let ok = self.request(&Request::StopContainer(StopContainer {
            id: id.to_string(),
            signal,
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
        }))?;
        ok.code.ok_or(ClientError::MissingField("code"))
    }

    /// EXECCMD; returns the new process's pid.
    pub fn exec(&mut self, req: Exec) -> Result<u32, ClientError> {
        let ok = self.request(&Request::Exec(req))?;
        ok.pid.ok_or(ClientError::MissingField("pid"))
    }

    /// WAITPROCESS: blocks until process `id` has exited (or `timeout`
    /// passes: an agent error); returns the exit code.
    pub fn wait(&mut self, id: &str, timeout: Option<Duration>) -> Result<i32, ClientError> {
        let ok = self.request(&Request::Wait(Wait {
            id: id.to_string(),
            timeout_ms: timeout.map(|t| t.as_millis().try_into().unwrap_or(u64::MAX)),
        }))?;
        ok.code.ok_or(ClientError::MissingField("code"))
    }

    /// SIGNALPROCESS.
    pub fn signal(&mut self, id: &str, signal: i32) -> Result<(), ClientError> {
        self.request(&Request::Signal(Signal {
            id: id.to_string(),
            signal,
        }))
        .map(drop)
    }

    /// WRITEFILE.
    pub fn write_file(
        &mut self,
        container: &str,
        path: &str,
        data: &[u8],
        mode: u32,
    ) -> Result<(), ClientError> {
        self.request(&Request::WriteFile(WriteFile {
            container: container.to_string(),
            path: path.to_string(),
            data: b64::encode(data),
            mode,
        }))
        .map(drop)
    }

    /// READFILE.
    pub fn read_file(&mut self, container: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        let ok = self.request(&Request::ReadFile(ReadFile {
            container: container.to_string(),
            path: path.to_string(),
        }))?;
        let data = ok.data.ok_or(ClientError::MissingField("data"))?;
        Ok(b64::decode(&data)?)
    }

    /// READLOG: the bytes of process `id`'s output from `offset`, and the
    /// offset to continue from.
    pub fn read_log(&mut self, id: &str, offset: u64) -> Result<(Vec<u8>, u64), ClientError> {
        let ok = self.request(&Request::ReadLog(ReadLog {
            id: id.to_string(),
            offset,
        }))?;
        let data = ok.data.ok_or(ClientError::MissingField("data"))?;
        let next = ok
            .next_offset
            .ok_or(ClientError::MissingField("next_offset"))?;
        Ok((b64::decode(&data)?, next))
    }

    /// The whole log of process `id` (READLOG until no more data).
    pub fn read_whole_log(&mut self, id: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let (chunk, next) = self.read_log(id, out.len() as u64)?;
            if chunk.is_empty() || next <= out.len() as u64 {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }

    /// REMOVECONTAINER.
    pub fn remove_container(&mut self, id: &str) -> Result<(), ClientError> {
        self.request(&Request::RemoveContainer(RemoveContainer {
            id: id.to_string(),
        }))
        .map(drop)
    }

    /// DESTROYPOD: the agent kills everything, answers, and shuts down
    /// (exits on a host; reboots the VM as PID 1).
    pub fn destroy_pod(&mut self) -> Result<(), ClientError> {
        self.request(&Request::DestroyPod).map(drop)
    }

    /// Events queued so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// The next event: a queued one, or the next frame (which must be an event).
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(ev);
        }
        match self.recv()? {
            AgentMessage::Event(ev) => Ok(ev),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} while waiting for an event"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{cmd, Frame};
    use std::io::{self, Cursor};

    /// Scripted agent: reads come from `input`, writes go to `output`.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn script(msgs: &[AgentMessage]) -> Script {
        let mut input = Vec::new();
        for m in msgs {
            input.extend_from_slice(&m.encode().unwrap().to_bytes());
        }
        Script {
            input: Cursor::new(input),
            output: Vec::new(),
        }
    }

    fn ready() -> AgentMessage {
        AgentMessage::Ready(Ready {
            version: "9".into(),
            pid1: false,
        })
    }

    #[test]
    fn wait_queues_events_and_sends_the_request() {
        let ev = Event::Exited {
            id: "other".into(),
            code: 1,
        };
        let s = script(&[
            ready(),
            AgentMessage::Event(ev.clone()),
            AgentMessage::Ok(OkReply {
                id: Some("c".into()),
                code: Some(7),
                ..Default::default()
            }),
        ]);
        let mut c = AgentClient::new(s).unwrap();
        assert_eq!(c.ready().version, "9");
        assert_eq!(c.wait("c", Some(Duration::from_secs(2))).unwrap(), 7);
        assert_eq!(c.take_events(), vec![ev]);
        let out = c.into_inner().output;
        let f = read_frame(&mut Cursor::new(out)).unwrap();
        assert_eq!(f.cmd, cmd::WAITPROCESS);
        assert_eq!(
            Request::decode(&f).unwrap(),
            Request::Wait(Wait {
                id: "c".into(),
                timeout_ms: Some(2000)
            })
        );
    }

    #[test]
    fn error_reply_and_missing_fields() {
        let s = script(&[
            ready(),
            AgentMessage::error("no such process: x"),
            AgentMessage::Ok(OkReply::default()),
        ]);
        let mut c = AgentClient::new(s).unwrap();
        match c.wait("x", None) {
            Err(ClientError::Agent(m)) => assert_eq!(m, "no such process: x"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.ping(),
            Err(ClientError::MissingField("version"))
        ));
        // The stream has ended.
        assert!(matches!(
            c.ping(),
            Err(ClientError::Protocol(ProtocolError::Closed))
        ));
    }

    #[test]
    fn first_frame_must_be_ready() {
        let s = script(&[AgentMessage::Ok(OkReply::default())]);
        assert!(matches!(
            AgentClient::new(s),
            Err(ClientError::Unexpected(_))
        ));
        let mut junk = Script {
            input: Cursor::new(
                Frame {
                    cmd: cmd::READY,
                    payload: b"nope".to_vec(),
                }
                .to_bytes(),
            ),
            output: Vec::new(),
        };
        junk.output.clear();
        assert!(matches!(
            AgentClient::new(junk),
            Err(ClientError::Protocol(ProtocolError::BadJson { .. }))
        ));
    }

    #[test]
    fn read_file_decodes_base64() {
        let s = script(&[
            ready(),
            AgentMessage::Ok(OkReply {
                data: Some(b64::encode(b"\x00\x01hello")),
                ..Default::default()
            }),
            AgentMessage::Ok(OkReply {
                data: Some("!!!!".into()),
                ..Default::default()
            }),
        ]);
        let mut c = AgentClient::new(s).unwrap();
        assert_eq!(c.read_file("c", "/f").unwrap(), b"\x00\x01hello");
        assert!(matches!(
            c.read_file("c", "/f"),
            Err(ClientError::Base64(_))
        ));
    }
}
