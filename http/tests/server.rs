//! Integration tests over a real unix socket with the server running in an
//! EventManager loop thread.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;
use ember_http::{client, Response, ServerConfig};

#[test]
fn keep_alive_serves_sequential_requests_on_one_connection() {
    let srv = TestServer::start();
    let mut s = srv.connect();
    let mut buf = Vec::new();
    for i in 0..5 {
        send(
            &mut s,
            format!("GET /json?x={i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        let r = read_response(&mut s, &mut buf);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["x"], i.to_string());
    }
    send(&mut s, b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n");
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.text(), "hello");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(at_eof(&mut s));
    // Handler-requested close.
    let mut s = srv.connect();
    send(&mut s, b"GET /close HTTP/1.1\r\n\r\n");
    let r = read_response(&mut s, &mut buf);
    assert_eq!(
        (r.text().as_str(), r.header("connection")),
        ("bye", Some("close"))
    );
    assert!(at_eof(&mut s));
}

#[test]
fn http10_closes_unless_keep_alive() {
    let srv = TestServer::start();
    let mut buf = Vec::new();
    let mut s = srv.connect();
    send(&mut s, b"GET /hello HTTP/1.0\r\n\r\n");
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 200);
    assert!(at_eof(&mut s));

    let mut s = srv.connect();
    send(
        &mut s,
        b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.header("connection"), Some("keep-alive"));
    send(
        &mut s,
        b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    assert_eq!(read_response(&mut s, &mut buf).text(), "hello");
}

#[test]
fn pipelined_requests_answered_in_order() {
    let srv = TestServer::start();
    let mut s = srv.connect();
    send(
        &mut s,
        b"GET /hello HTTP/1.1\r\n\r\n\
PUT /echo HTTP/1.1\r\nContent-Type: text/x\r\nContent-Length: 3\r\n\r\nabc\
GET /json?x=a+b%21 HTTP/1.1\r\n\r\n\
HEAD /hello HTTP/1.1\r\n\r\n\
GET /nope HTTP/1.1\r\n\r\n\
DELETE /hello HTTP/1.1\r\n\r\n",
    );
    let mut buf = Vec::new();
    let r1 = read_response(&mut s, &mut buf);
    let r2 = read_response(&mut s, &mut buf);
    let r3 = read_response(&mut s, &mut buf);
    assert_eq!(r1.text(), "hello");
    assert_eq!(
        (r2.text().as_str(), r2.header("content-type")),
        ("abc", Some("text/x"))
    );
    let v: serde_json::Value = serde_json::from_slice(&r3.body).unwrap();
    assert_eq!(v["x"], "a b!");
    // HEAD: Content-Length of the GET body, no body bytes.
    let mut head = Vec::new();
    read_until(&mut s, &mut buf, b"\r\n\r\n");
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    head.extend(buf.drain(..end));
    let head = String::from_utf8(head).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\n") && head.contains("Content-Length: 5\r\n"),
        "{head}"
    );
    let r5 = read_response(&mut s, &mut buf);
    assert_eq!(r5.status, 404);
    assert_eq!(fault_message(&r5), "no route for /nope");
    let r6 = read_response(&mut s, &mut buf);
    assert_eq!(r6.status, 405);
    assert!(buf.is_empty());
}

#[test]
fn layer_errors_have_fault_json_bodies() {
    let config = ServerConfig {
        max_body_bytes: 100,
        max_header_bytes: 1024,
        ..ServerConfig::default()
    };
    let srv = TestServer::with_config(config);
    let mut buf = Vec::new();

    // 400: malformed request line; connection closed afterwards.
    let mut s = srv.connect();
    send(&mut s, b"THIS IS NOT HTTP\r\n\r\n");
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 400);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(fault_message(&r).starts_with("malformed request"));
    assert!(at_eof(&mut s));

    // 413 via the client (body sent in full before the server answers).
    let r = client::request(&srv.path, "PUT", "/echo", Some(&[b'a'; 101]), T).unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["fault_message"], "request body exceeds 100 bytes");
    // At the limit it is fine.
    let r = client::request(&srv.path, "PUT", "/echo", Some(&[b'a'; 100]), T).unwrap();
    assert_eq!((r.status, r.body.len()), (200, 100));

    // 413 for chunked bodies that grow too large.
    let mut s = srv.connect();
    send(
        &mut s,
        b"PUT /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n50\r\n",
    );
    send(&mut s, &[b'z'; 80]);
    send(&mut s, b"\r\n50\r\n");
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 413);

    // 431: header block too large.
    let mut s = srv.connect();
    let big = format!("GET /hello HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(2000));
    send(&mut s, big.as_bytes());
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 431);
    assert!(fault_message(&r).contains("1024"));

    // 400 from a handler on invalid JSON.
    let r = client::request(&srv.path, "PUT", "/config", Some(b"{oops"), T).unwrap();
    assert_eq!(r.status, 400);
    let r = client::request(&srv.path, "PUT", "/config", Some(br#"{"a":[1,2]}"#), T).unwrap();
    assert_eq!(r.text(), r#"{"a":[1,2]}"#);
    // 404 from the handler.
    let r = client::request(&srv.path, "GET", "/missing", None, T).unwrap();
    assert_eq!(r.status, 404);
}

#[test]
fn pluggable_error_body() {
    let config = ServerConfig {
        error_response: std::sync::Arc::new(|status, msg| {
            Response::json(
                status,
                &serde_json::json!({"error": {"code": status, "message": msg}}),
            )
        }),
        ..ServerConfig::default()
    };
    let srv = TestServer::with_config(config);
    let mut s = srv.connect();
    send(&mut s, b"GET /%zz HTTP/1.1\r\n\r\n");
    let r = read_response(&mut s, &mut Vec::new());
    assert_eq!(r.status, 400);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], 400);
}

#[test]
fn expect_100_continue_and_chunked_request_body() {
    let srv = TestServer::with_config(ServerConfig {
        max_body_bytes: 1000,
        ..ServerConfig::default()
    });
    let mut s = srv.connect();
    let mut buf = Vec::new();
    send(
        &mut s,
        b"PUT /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    );
    read_until(&mut s, &mut buf, b"\r\n\r\n");
    assert_eq!(buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    buf.clear();
    send(&mut s, b"12345");
    assert_eq!(read_response(&mut s, &mut buf).text(), "12345");

    // Chunked body, split oddly across writes, then a pipelined request.
    send(
        &mut s,
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWi",
    );
    send(&mut s, b"ki\r\n5;ext=x\r\npedia\r\n0\r\n");
    send(&mut s, b"Trailer: t\r\n\r\nGET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_response(&mut s, &mut buf).text(), "Wikipedia");
    assert_eq!(read_response(&mut s, &mut buf).text(), "hello");

    // Too large with Expect: 413 right away, no 100, body never sent.
    send(
        &mut s,
        b"PUT /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
    );
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 413);
    assert!(at_eof(&mut s));
}

#[test]
fn half_sent_request_does_not_block_other_clients() {
    let srv = TestServer::start();
    // Client A: half a header block, then stalls.
    let mut a = srv.connect();
    send(&mut a, b"GET /hello HTTP/1.1\r\nHo");
    // Client B: half a body, then stalls.
    let mut b = srv.connect();
    send(
        &mut b,
        b"PUT /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345",
    );
    // Client C: a stalled reader of a big response (never reads).
    let mut c = srv.connect();
    send(&mut c, b"GET /big?n=4000000 HTTP/1.1\r\n\r\n");
    // Others get served meanwhile.
    for _ in 0..3 {
        let r = client::request(&srv.path, "GET", "/hello", None, T).unwrap();
        assert_eq!(r.text(), "hello");
    }
    // The stalled ones complete when they resume.
    let mut buf = Vec::new();
    send(&mut a, b"st: x\r\n\r\n");
    assert_eq!(read_response(&mut a, &mut buf).text(), "hello");
    send(&mut b, b"67890");
    assert_eq!(read_response(&mut b, &mut buf).text(), "1234567890");
    let r = read_response(&mut c, &mut buf);
    assert_eq!(r.body.len(), 4_000_000);
}

#[test]
fn later_answered_from_another_thread_keeps_order() {
    let srv = TestServer::start();
    let mut s = srv.connect();
    send(
        &mut s,
        b"GET /later HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n",
    );
    let conn = srv.wait_later();
    // Another client is served while the first waits.
    assert_eq!(
        client::request(&srv.path, "GET", "/hello", None, T)
            .unwrap()
            .status,
        200
    );
    assert_eq!(*srv.log.lock().unwrap(), ["/later", "/hello"]);
    let responder = srv.responder.clone();
    std::thread::spawn(move || {
        responder
            .respond(
                conn,
                Response::json(202, &serde_json::json!({"done": true})),
            )
            .unwrap();
    })
    .join()
    .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf);
    assert_eq!((r.status, r.text().as_str()), (202, r#"{"done":true}"#));
    assert_eq!(read_response(&mut s, &mut buf).text(), "hello");
    assert_eq!(*srv.log.lock().unwrap(), ["/later", "/hello", "/hello"]);

    // A Later answered after the client left is dropped; `closed` is reported.
    let mut s = srv.connect();
    send(&mut s, b"PUT /later HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    let conn = srv.wait_later();
    drop(s);
    srv.wait_closed(conn);
    srv.responder.respond(conn, Response::empty(204)).unwrap();
    srv.server
        .lock()
        .unwrap()
        .respond(conn, Response::empty(204))
        .unwrap();
    assert_eq!(
        client::request(&srv.path, "GET", "/hello", None, T)
            .unwrap()
            .status,
        200
    );
}

#[test]
fn streaming_chunks_then_keep_alive() {
    let srv = TestServer::start();
    let mut s = srv.connect();
    send(&mut s, b"GET /stream HTTP/1.1\r\n\r\n");
    let conn = srv.wait_stream();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"\r\n\r\n");
    let head = String::from_utf8(buf.clone()).unwrap();
    assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
    buf.clear();
    // Pipelined request must wait for the stream to finish.
    send(&mut s, b"GET /hello HTTP/1.1\r\n\r\n");
    let responder = srv.responder.clone();
    let t = std::thread::spawn(move || {
        for i in 0..3 {
            responder.send_chunk(conn, format!("line {i}\n")).unwrap();
        }
        responder.send_chunk(conn, Vec::new()).unwrap();
        responder.finish(conn).unwrap();
    });
    read_until(&mut s, &mut buf, b"0\r\n\r\n");
    t.join().unwrap();
    let expected = b"7\r\nline 0\n\r\n7\r\nline 1\n\r\n7\r\nline 2\n\r\n0\r\n\r\n";
    assert_eq!(&buf[..expected.len()], expected);
    buf.drain(..expected.len());
    assert_eq!(read_response(&mut s, &mut buf).text(), "hello");

    // The client library decodes the chunked stream.
    let path = srv.path.clone();
    let t = std::thread::spawn(move || client::request(&path, "GET", "/stream", None, T));
    let conn = srv.wait_stream();
    srv.responder.send_chunk(conn, &b"abc"[..]).unwrap();
    srv.responder.send_chunk(conn, &b"def"[..]).unwrap();
    srv.responder.finish(conn).unwrap();
    assert_eq!(t.join().unwrap().unwrap().text(), "abcdef");
}

#[test]
fn streaming_client_disconnect_is_reported() {
    let srv = TestServer::start();
    let mut s = srv.connect();
    send(&mut s, b"GET /stream HTTP/1.1\r\n\r\n");
    let conn = srv.wait_stream();
    srv.responder.send_chunk(conn, &b"first"[..]).unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"first\r\n");
    drop(s);
    srv.wait_closed(conn);
    // Chunks for the gone connection are dropped harmlessly.
    srv.responder.send_chunk(conn, &b"more"[..]).unwrap();
    srv.responder.finish(conn).unwrap();
    srv.wait_idle();
    // Responder::close ends a stream from the server side.
    let mut s = srv.connect();
    send(&mut s, b"GET /stream HTTP/1.1\r\n\r\n");
    let conn = srv.wait_stream();
    srv.responder.close(conn).unwrap();
    srv.wait_closed(conn);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

#[test]
fn client_disconnect_mid_response() {
    let srv = TestServer::start();
    let mut s = srv.connect();
    send(&mut s, b"GET /big?n=20000000 HTTP/1.1\r\n\r\n");
    let conn = srv.wait_big();
    let mut buf = Vec::new();
    fill(&mut s, &mut buf);
    drop(s);
    srv.wait_closed(conn);
    srv.wait_idle();
    assert_eq!(
        client::request(&srv.path, "GET", "/hello", None, T)
            .unwrap()
            .text(),
        "hello"
    );
}

#[test]
fn max_connections_refused_politely() {
    let srv = TestServer::with_config(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    });
    let mut buf = Vec::new();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = srv.connect();
        send(&mut s, b"GET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(read_response(&mut s, &mut buf).status, 200);
        held.push(s);
    }
    let r = client::request(&srv.path, "GET", "/hello", None, T).unwrap();
    assert_eq!(r.status, 503);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["fault_message"], "too many connections");
    drop(held);
    srv.wait_idle();
    assert_eq!(
        client::request(&srv.path, "GET", "/hello", None, T)
            .unwrap()
            .status,
        200
    );
}

#[test]
fn client_timeout_on_unanswered_request() {
    let srv = TestServer::start();
    let r = client::request(&srv.path, "GET", "/later", None, Duration::from_millis(200));
    assert!(matches!(r, Err(client::ClientError::Timeout)), "{r:?}");
}

#[test]
fn real_curl() {
    let srv = TestServer::start();
    assert_eq!(
        curl(&srv, &["http://localhost/hello"]),
        ("200".into(), "hello".into())
    );
    let (code, body) = curl(&srv, &["http://localhost/json?x=a%20b&y=1"]);
    assert_eq!(code, "200");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["x"], "a b");
    let (code, body) = curl(
        &srv,
        &[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"vcpu_count":2}"#,
            "http://localhost/config",
        ],
    );
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", r#"{"vcpu_count":2}"#)
    );
    // curl sends chunked bodies when told to, and Expect: 100-continue.
    let (code, body) = curl(
        &srv,
        &[
            "-X",
            "PUT",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            "chunky body",
            "http://localhost/echo",
        ],
    );
    assert_eq!((code.as_str(), body.as_str()), ("200", "chunky body"));
    let (code, body) = curl(&srv, &["http://localhost/nothing"]);
    assert_eq!(code, "404");
    assert_eq!(body, r#"{"fault_message":"no route for /nothing"}"#);
    // Two URLs over one keep-alive connection.
    let out = std::process::Command::new("/usr/bin/curl")
        .args(["-sS", "-v", "--max-time", "20", "--unix-socket"])
        .arg(&srv.path)
        .args(["http://localhost/hello", "http://localhost/hello"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hellohello");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing"),
        "{err}"
    );
}

#[test]
fn slow_stream_consumer_is_dropped_at_buffer_limit() {
    let srv = TestServer::with_config(ServerConfig {
        max_stream_buffer: 64 * 1024,
        ..ServerConfig::default()
    });
    let mut s = srv.connect();
    send(&mut s, b"GET /stream HTTP/1.1\r\n\r\n");
    let conn = srv.wait_stream();
    // Never read: the socket buffer fills, then the server's own buffer
    // passes the limit and the connection is closed.
    let chunk = vec![b'y'; 8192];
    let mut closed = false;
    for _ in 0..10_000 {
        srv.responder.send_chunk(conn, chunk.clone()).unwrap();
        if let Ok(ev) = srv.events.try_recv() {
            if ev == Ev::Closed(conn) {
                closed = true;
                break;
            }
        }
    }
    if !closed {
        srv.wait_closed(conn);
    }
    drop(s);
    srv.wait_idle();
}

#[test]
fn http10_stream_is_raw_until_close() {
    let srv = TestServer::start();
    let mut s = srv.connect();
    send(&mut s, b"GET /stream HTTP/1.0\r\n\r\n");
    let conn = srv.wait_stream();
    srv.responder.send_chunk(conn, &b"raw "[..]).unwrap();
    srv.responder.send_chunk(conn, &b"bytes"[..]).unwrap();
    srv.responder.finish(conn).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let text = String::from_utf8(all).unwrap();
    assert!(text.contains("Connection: close\r\n"), "{text}");
    assert!(!text.contains("chunked"), "{text}");
    assert!(text.ends_with("\r\n\r\nraw bytes"), "{text}");
}

#[test]
fn many_pipelined_requests_with_backpressure() {
    let srv = TestServer::start();
    let s = srv.connect();
    let mut w = s.try_clone().unwrap();
    let n = 400;
    // ~40 MB of responses requested up front; the server must stop
    // dispatching while its output is unsent and resume as we read.
    let writer = std::thread::spawn(move || {
        for _ in 0..n {
            send(&mut w, b"GET /big?n=100000 HTTP/1.1\r\n\r\n");
        }
        send(&mut w, b"GET /hello HTTP/1.1\r\n\r\n");
    });
    let mut s = s;
    let mut buf = Vec::new();
    for _ in 0..n {
        let r = read_response(&mut s, &mut buf);
        assert_eq!(r.body.len(), 100_000);
    }
    assert_eq!(read_response(&mut s, &mut buf).text(), "hello");
    writer.join().unwrap();
}

#[test]
fn stalled_clients_are_closed_after_the_idle_timeout() {
    let srv = TestServer::with_config(ServerConfig {
        max_connections: 3,
        idle_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::default()
    });
    let mut buf = Vec::new();
    // A: half a request, then nothing.
    let mut a = srv.connect();
    send(&mut a, b"GET /hel");
    // B: one request answered, then an idle keep-alive connection.
    let mut b = srv.connect();
    send(&mut b, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_response(&mut b, &mut buf).status, 200);
    // C: waits for a deferred reply; the server must not drop it.
    let mut c = srv.connect();
    send(&mut c, b"GET /later HTTP/1.1\r\n\r\n");
    let conn = srv.wait_later();
    // Every slot is taken now.
    assert_eq!(
        client::request(&srv.path, "GET", "/hello", None, T)
            .unwrap()
            .status,
        503
    );
    // The stalled ones are closed (read timeouts bound the wait)...
    for s in [&mut a, &mut b] {
        s.set_read_timeout(Some(T)).unwrap();
        assert!(at_eof(s), "a stalled client was not closed");
    }
    // ...which frees their slots for new clients.
    assert_eq!(
        client::request(&srv.path, "GET", "/hello", None, T)
            .unwrap()
            .status,
        200
    );
    // C is still there and gets its answer.
    srv.responder.respond(conn, Response::empty(204)).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    assert_eq!(read_response(&mut c, &mut buf).status, 204);
}
