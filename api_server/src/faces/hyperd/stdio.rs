//! hyperd's container stdio routes, as hyperctl 1.1.0 uses them
//! (`server/router/container/{exec.go,container_routes.go}`):
//!
//! | route | hyperctl | answer |
//! |---|---|---|
//! | `POST /exec/create?container&command&tty` | `CreateExec` | 201, the exec id as a JSON string |
//! | `POST /exec/start?container&exec` | `StartExec` (hijack) | `101 UPGRADED`, then the raw stream |
//! | `POST /attach?container` | `Attach` (hijack) | `101 UPGRADED`, then the raw stream |
//! | `GET /container/logs?container&stdout&stderr&since&timestamps&follow&tail` | `ContainerLogs` | 200, a chunked stream |
//! | `POST /tty/resize?container&exec&h&w` | `WinResize` | 200, empty |
//! | `GET /exitcode?container&exec` | `GetExitCode` (wait) | 200, the code as a JSON number |
//! | `POST /execvm?pod&command` | `ExecVM` | 500, a clear refusal |
//!
//! A hijacked stream carries Docker's multiplexed frames (`stdcopy`: stream
//! byte, three zero bytes, big-endian u32 length) when the process has no
//! terminal, raw bytes when it has one; the client half-closes to end
//! stdin, and emberd closes the connection when the process has exited
//! (the exit code is then `GET /exitcode`). Errors found before the hijack
//! are ordinary answers with hyperd's status rules and envelope. `logs`
//! uses the same framing rule, with each line prefixed by its Docker
//! timestamp when asked; with `follow` it ends when the container exits.
//!
//! hyperd 1.1.0 has no `/exec/inspect`: hyperctl reads exit codes from
//! `/exitcode` (and `/container/info` for terminal sessions, answered with
//! the other container routes in `containers.rs`).

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use ember_http::{Method, Reply, Request, Response, Upgrade, Upgraded};
use serde_json::json;

use super::{fail, required, Hyperd, HyperdError};
use crate::model::pods::stdio::{find_container, ExitCode};
use crate::model::supervisor::Supervisor;
use crate::runtime::stdio::{stdcopy_frame, timestamp, Chunk, Record};
use crate::server::{Ctx, Finish, StreamFeed};

/// What hyperd wrote before the raw stream of attach and exec.
pub const UPGRADED: &[u8] = b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n";

const ROUTES: [&str; 7] = [
    "/execvm",
    "/exec/create",
    "/exec/start",
    "/attach",
    "/container/logs",
    "/tty/resize",
    "/exitcode",
];

/// Docker's `httputils.BoolValue`: anything but empty, 0, no, false, none.
fn bool_value(req: &Request, name: &str) -> bool {
    let v = req
        .query_param(name)
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    !matches!(v.as_str(), "" | "0" | "no" | "false" | "none")
}

fn now(r: Result<Response, HyperdError>) -> Reply {
    Reply::Now(r.unwrap_or_else(|e| fail(&e)))
}

/// Handles the stdio routes (`path` without its version prefix).
pub(super) fn route(h: &mut Hyperd, ctx: &mut Ctx, req: &Request, path: &str) -> Option<Reply> {
    Some(match (&req.method, path) {
        (Method::Post, "/exec/create") => now(exec_create(h, ctx, req)),
        (Method::Post, "/exec/start") => {
            exec_start(h, ctx, req).unwrap_or_else(|e| Reply::Now(fail(&e)))
        }
        (Method::Post, "/attach") => attach(h, ctx, req).unwrap_or_else(|e| Reply::Now(fail(&e))),
        (Method::Get, "/container/logs") => {
            logs(h, ctx, req).unwrap_or_else(|e| Reply::Now(fail(&e)))
        }
        (Method::Post, "/tty/resize") => {
            resize(h, ctx, req).unwrap_or_else(|e| Reply::Now(fail(&e)))
        }
        (Method::Get, "/exitcode") => {
            exit_code(h, ctx, req).unwrap_or_else(|e| Reply::Now(fail(&e)))
        }
        // client/api/exec.go: (*Client).ExecVM (hyperctl exec -m)
        (Method::Post, "/execvm") => Reply::Now(fail(&HyperdError::Other(
            "exec outside of any container (hyperctl exec -m) is not supported: ember's pod VMs run only the agent and the containers; exec in a container instead".into(),
        ))),
        (_, p) if ROUTES.contains(&p) => Reply::Now(Response::json(
            405,
            &json!({"ID": "", "Code": 1, "Cause": format!("method {} is not allowed on {}", req.method, req.path)}),
        )),
        _ => return None,
    })
}

// client/api/exec.go: (*Client).CreateExec
fn exec_create(h: &Hyperd, ctx: &mut Ctx, req: &Request) -> Result<Response, HyperdError> {
    let container = required(req, "container")?;
    let command = required(req, "command")?;
    let tty = matches!(req.query_param("tty"), Some("yes" | "true" | "on"));
    let id = h.pods.exec_create(ctx.sup, container, command, tty)?;
    Ok(Response::json(201, &json!(id)))
}

/// The upgrade that hands the connection to `bridge` on a thread.
fn hijack(bridge: crate::model::pods::stdio::Bridge) -> Reply {
    Reply::Upgrade(Upgrade::new(UPGRADED, move |up: Upgraded| {
        let spawned = std::thread::Builder::new()
            .name("emberd-stdio".into())
            .spawn(move || match up.start() {
                Ok((stream, early)) => bridge.run(stream, early),
                Err(e) => log::debug!("hijacked client left before its stream began: {e}"),
            });
        if let Err(e) = spawned {
            log::error!("cannot start a stdio bridge thread: {e}");
        }
    }))
}

// client/api/exec.go: (*Client).StartExec
fn exec_start(h: &Hyperd, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
    let container = required(req, "container")?;
    let exec = required(req, "exec")?;
    let bridge = h
        .pods
        .prepare_exec_start(ctx.sup, ctx.jobs, container, exec)?;
    Ok(hijack(bridge))
}

// client/api/attach.go: (*Client).Attach
fn attach(h: &Hyperd, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
    let container = required(req, "container")?;
    let bridge = h.pods.prepare_attach(ctx.sup, ctx.jobs, container)?;
    Ok(hijack(bridge))
}

// client/api/misc.go: (*Client).WinResize
fn resize(h: &Hyperd, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
    let container = required(req, "container")?;
    let dim = |name: &str| -> Result<u16, HyperdError> {
        let v = required(req, name)?;
        v.parse::<u16>().map_err(|_| {
            HyperdError::BadParameter(format!(
                "{name} must be a number from 0 to 65535, not {v:?}"
            ))
        })
    };
    let (rows, cols) = (dim("h")?, dim("w")?);
    let job = h.pods.prepare_resize(
        ctx.sup,
        container,
        req.query_param("exec").unwrap_or(""),
        rows,
        cols,
    )?;
    Ok(ctx.spawn("tty-resize", move || {
        let res = job.run();
        Box::new(move |_: &mut Supervisor| match res {
            Ok(()) => Response::empty(200),
            Err(e) => fail(&e.into()),
        }) as Finish
    }))
}

// client/api/misc.go: (*Client).GetExitCode
fn exit_code(h: &Hyperd, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
    let container = required(req, "container")?;
    let exec = req.query_param("exec").unwrap_or("");
    Ok(match h.pods.exit_code(ctx.sup, container, exec)? {
        ExitCode::Now(code) => Reply::Now(Response::json(200, &json!(code))),
        ExitCode::Wait(w) => ctx.spawn("exit-code", move || {
            let res = w.run();
            Box::new(move |_: &mut Supervisor| match res {
                Ok(code) => Response::json(200, &json!(code)),
                Err(e) => fail(&e.into()),
            }) as Finish
        }),
    })
}

/// Docker's `since`: seconds since the epoch, optionally `.nanoseconds`.
fn parse_since(v: &str) -> Result<Option<SystemTime>, HyperdError> {
    if v.is_empty() {
        return Ok(None);
    }
    let bad = || {
        HyperdError::BadParameter(format!(
            "since must be seconds[.nanoseconds] since the epoch, not {v:?}"
        ))
    };
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: u64 = secs.parse().map_err(|_| bad())?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else if frac.len() <= 9 && frac.bytes().all(|b| b.is_ascii_digit()) {
        format!("{frac:0<9}").parse().map_err(|_| bad())?
    } else {
        return Err(bad());
    };
    Ok(Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)))
}

/// One log line as hyperd wrote it.
fn log_line(r: &Record, tty: bool, timestamps: bool) -> Vec<u8> {
    let mut line = Vec::with_capacity(r.data.len() + 32);
    if timestamps {
        line.extend_from_slice(timestamp(r.time).as_bytes());
        line.push(b' ');
    }
    line.extend_from_slice(&r.data);
    if tty {
        line
    } else {
        stdcopy_frame(r.stream, &line)
    }
}

// client/api/logs.go: (*Client).ContainerLogs
fn logs(h: &Hyperd, ctx: &mut Ctx, req: &Request) -> Result<Reply, HyperdError> {
    let container = required(req, "container")?;
    let (out, err) = (bool_value(req, "stdout"), bool_value(req, "stderr"));
    if !(out || err) {
        return Err(HyperdError::BadParameter(
            "you must choose at least one stream".into(),
        ));
    }
    let since = parse_since(req.query_param("since").unwrap_or(""))?;
    // hyperd: a tail that is not a number ("all", "") means everything.
    let tail = req
        .query_param("tail")
        .and_then(|t| t.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .map(|n| n as usize);
    let timestamps = bool_value(req, "timestamps");
    let follow = bool_value(req, "follow");
    let c = find_container(ctx.sup, container).map_err(HyperdError::from)?;
    let (mut records, sub) = h.pods.stdio().logs(&c.id, (out, err), tail, follow);
    if let Some(t) = since {
        records.retain(|r| r.time >= t);
    }
    let mut body = Vec::new();
    for r in &records {
        body.extend(log_line(r, c.tty, timestamps));
    }
    // Not application/json: hyperctl then copies (tty) or demultiplexes.
    let content_type = "text/plain; charset=utf-8";
    let Some(sub) = sub else {
        return Ok(Reply::Now(Response::bytes(200, content_type, body)));
    };
    let Some(StreamFeed {
        responder,
        conn,
        stop,
    }) = ctx.stream()
    else {
        return Ok(Reply::Now(Response::bytes(200, content_type, body)));
    };
    let tty = c.tty;
    std::thread::Builder::new()
        .name("emberd-logs".into())
        .spawn(move || {
            if responder.send_chunk(conn, body).is_err() {
                return;
            }
            while !stop.load(Ordering::SeqCst) {
                match sub.recv_timeout(Duration::from_millis(500)) {
                    Ok(Chunk::Out(r)) => {
                        let wanted = (r.stream == 1 && out) || (r.stream == 2 && err);
                        if wanted
                            && responder
                                .send_chunk(conn, log_line(&r, tty, timestamps))
                                .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Chunk::Exit(_)) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            let _ = responder.finish(conn);
        })
        .map_err(|e| HyperdError::Other(format!("cannot start a log thread: {e}")))?;
    Ok(Reply::Now(Response::stream(200, content_type)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_and_log_lines() {
        assert_eq!(parse_since("").unwrap(), None);
        assert_eq!(
            parse_since("10.5").unwrap(),
            Some(SystemTime::UNIX_EPOCH + Duration::new(10, 500_000_000))
        );
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("1.1234567890").is_err());
        let r = Record {
            stream: 2,
            time: SystemTime::UNIX_EPOCH,
            data: b"oops\n".to_vec(),
        };
        assert_eq!(log_line(&r, true, false), b"oops\n");
        assert_eq!(
            log_line(&r, false, true),
            [
                &[2u8, 0, 0, 0, 0, 0, 0, 36][..],
                b"1970-01-01T00:00:00.000000000Z oops\n"
            ]
            .concat()
        );
    }
}
