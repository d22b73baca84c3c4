//! Shared harness: an EventManager loop in a thread serving a toy handler on
//! a temporary unix socket, plus raw-socket helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_http::{
    ConnectionId, Handler, HttpServer, Method, Reply, Request, Responder, Response, ServerConfig,
};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

pub const T: Duration = Duration::from_secs(20);

/// Events the toy handler reports to the test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Later(ConnectionId),
    Stream(ConnectionId),
    Big(ConnectionId),
    Closed(ConnectionId),
}

pub struct Toy {
    pub tx: Sender<Ev>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Handler for Toy {
    fn handle(&mut self, conn: ConnectionId, req: Request) -> Reply {
        self.log.lock().unwrap().push(req.path.clone());
        let resp = match (&req.method, req.path.as_str()) {
            (Method::Get | Method::Head, "/hello") => Response::text(200, "hello"),
            (_, "/hello") => Response::fault(405, "method not allowed"),
            (Method::Put | Method::Post, "/echo") => Response::bytes(
                200,
                req.header("content-type")
                    .unwrap_or("application/octet-stream"),
                req.body.to_vec(),
            ),
            (Method::Put | Method::Post, "/len") => {
                // Length, and a checksum so every byte is looked at.
                let sum = req.body.iter().fold(0u64, |a, &b| a.wrapping_add(b as u64));
                Response::text(200, format!("{} {}", req.body.len(), sum))
            }
            (Method::Get, "/json") => Response::json(
                200,
                &serde_json::json!({
                    "path": req.path,
                    "query": req.query,
                    "x": req.query_param("x"),
                }),
            ),
            (Method::Put, "/config") => match req.json::<serde_json::Value>() {
                Ok(v) => Response::json(200, &v),
                Err(e) => Response::fault(e.status(), &e.to_string()),
            },
            (Method::Get, "/big") => {
                let n: usize = req
                    .query_param("n")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let _ = self.tx.send(Ev::Big(conn));
                Response::bytes(200, "application/octet-stream", vec![b'x'; n])
            }
            (_, "/later") => {
                let _ = self.tx.send(Ev::Later(conn));
                return Reply::Later;
            }
            (Method::Get, "/stream") => {
                let _ = self.tx.send(Ev::Stream(conn));
                Response::stream(200, "text/plain")
            }
            (_, "/close") => Response::text(200, "bye").with_header("Connection", "close"),
            _ => Response::fault(404, &format!("no route for {}", req.path)),
        };
        Reply::Now(resp)
    }

    fn closed(&mut self, conn: ConnectionId) {
        let _ = self.tx.send(Ev::Closed(conn));
    }
}

static N: AtomicUsize = AtomicUsize::new(0);

pub struct TestServer {
    pub path: PathBuf,
    dir: PathBuf,
    pub responder: Responder,
    pub events: Receiver<Ev>,
    pub log: Arc<Mutex<Vec<String>>>,
    pub server: Arc<Mutex<HttpServer<Toy>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start() -> Self {
        Self::with_config(ServerConfig::default())
    }

    pub fn with_config(config: ServerConfig) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ember-http-it-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let (tx, events) = channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let toy = Toy {
            tx,
            log: log.clone(),
        };
        let server = HttpServer::new(&path, toy, config).unwrap();
        let responder = server.responder();
        let server = Arc::new(Mutex::new(server));
        let stop = Arc::new(AtomicBool::new(false));
        let sub: Arc<Mutex<dyn MutEventSubscriber + Send>> = server.clone();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
            let id = em.add_subscriber(sub);
            while !stop2.load(Ordering::SeqCst) {
                em.run_with_timeout(20).unwrap();
            }
            em.remove_subscriber(id).unwrap();
        });
        TestServer {
            path,
            dir,
            responder,
            events,
            log,
            server,
            stop,
            thread: Some(thread),
        }
    }

    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.set_write_timeout(Some(T)).unwrap();
        s
    }

    pub fn next_event(&self) -> Ev {
        self.events.recv_timeout(T).expect("handler event")
    }

    /// Next event matching `f`, skipping others (e.g. `closed` callbacks of
    /// unrelated connections).
    pub fn wait_for(&self, f: impl Fn(&Ev) -> Option<ConnectionId>) -> ConnectionId {
        loop {
            if let Some(c) = f(&self.next_event()) {
                return c;
            }
        }
    }

    pub fn wait_later(&self) -> ConnectionId {
        self.wait_for(|e| match e {
            Ev::Later(c) => Some(*c),
            _ => None,
        })
    }

    pub fn wait_stream(&self) -> ConnectionId {
        self.wait_for(|e| match e {
            Ev::Stream(c) => Some(*c),
            _ => None,
        })
    }

    pub fn wait_big(&self) -> ConnectionId {
        self.wait_for(|e| match e {
            Ev::Big(c) => Some(*c),
            _ => None,
        })
    }

    pub fn wait_closed(&self, conn: ConnectionId) {
        self.wait_for(|e| match e {
            Ev::Closed(c) if *c == conn => Some(*c),
            _ => None,
        });
    }

    /// Waits (bounded) until the server has no open connections.
    pub fn wait_idle(&self) {
        let deadline = Instant::now() + T;
        while self.server.lock().unwrap().connection_count() != 0 {
            assert!(Instant::now() < deadline, "connections did not drain");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The event manager dropped its Arc; dropping ours drops the server,
        // which removes the socket file.
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A parsed raw response.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads exactly one response (Content-Length or none) from `s`, keeping any
/// extra bytes in `buf` for the next call.
pub fn read_response(s: &mut UnixStream, buf: &mut Vec<u8>) -> Raw {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(n) = resp.parse(buf).unwrap() {
            let status = resp.code.unwrap();
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or(0);
            while buf.len() < n + len {
                fill(s, buf);
            }
            let body = buf[n..n + len].to_vec();
            buf.drain(..n + len);
            return Raw {
                status,
                headers,
                body,
            };
        }
        fill(s, buf);
    }
}

/// Reads some bytes; panics on EOF.
pub fn fill(s: &mut UnixStream, buf: &mut Vec<u8>) {
    let mut tmp = [0u8; 64 * 1024];
    let n = s.read(&mut tmp).expect("read");
    assert!(
        n > 0,
        "unexpected EOF; have {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&tmp[..n]);
}

/// Reads until `buf` contains `needle`.
pub fn read_until(s: &mut UnixStream, buf: &mut Vec<u8>, needle: &[u8]) {
    while !buf.windows(needle.len()).any(|w| w == needle) {
        fill(s, buf);
    }
}

/// Whether the peer closed (EOF or reset) with nothing more to read.
pub fn at_eof(s: &mut UnixStream) -> bool {
    let mut tmp = [0u8; 16];
    match s.read(&mut tmp) {
        Ok(0) => true,
        Ok(n) => panic!("unexpected data: {:?}", String::from_utf8_lossy(&tmp[..n])),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

pub fn send(s: &mut UnixStream, data: &[u8]) {
    s.write_all(data).unwrap();
}

pub fn fault_message(r: &Raw) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["fault_message"].as_str().unwrap().to_string()
}

/// curl (a child process, so another peer) against the server; (status, body).
#[allow(dead_code)]
pub fn curl(srv: &TestServer, args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("/usr/bin/curl")
        .args(["-sS", "--max-time", "20", "--unix-socket"])
        .arg(&srv.path)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}
