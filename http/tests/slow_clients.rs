//! Slow and greedy clients: a per-peer connection cap (peers told apart by
//! SO_PEERCRED), a header deadline and a minimum body rate. Own test binary:
//! it holds many sockets open at once.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ember_http::{client, PeerKey, ServerConfig};

#[test]
fn slowloris_from_one_peer_does_not_cost_another_peer_a_503() {
    // Only the per-peer cap is at work here: no idle or header deadline
    // frees the slow connections.
    let srv = TestServer::with_config(ServerConfig {
        max_connections: 32,
        max_connections_per_peer: Some(8),
        idle_timeout: None,
        header_timeout: None,
        ..ServerConfig::default()
    });
    let mut buf = Vec::new();
    // 64 connections from this process, each starting a head it never ends.
    // The listener accepts in order: the first 8 are served, the rest are
    // over this peer's limit and get 503 and EOF right away.
    let mut held = Vec::new();
    for i in 0..64 {
        let mut s = srv.connect();
        // A refused connection may already be closed: the write can fail.
        let _ = s.write_all(b"GET /hello HTTP/1.1\r\nX-Slow: ");
        if i < 8 {
            held.push(s);
        } else {
            let r = read_response(&mut s, &mut buf);
            assert_eq!(r.status, 503, "connection {i}");
            assert_eq!(fault_message(&r), "too many connections from this client");
            assert!(at_eof(&mut s));
        }
    }
    // The 8 keep trickling one header byte at a time...
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let stop = stop.clone();
        let mut socks: Vec<UnixStream> = held.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            for _ in 0..10_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                for s in &mut socks {
                    s.write_all(b"a").unwrap();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // ...while another process is served normally, every time.
    for _ in 0..5 {
        assert_eq!(
            curl(&srv, &["http://localhost/hello"]),
            ("200".to_string(), "hello".to_string())
        );
    }
    stop.store(true, Ordering::SeqCst);
    trickler.join().unwrap();
    // The slow ones were only limited, not harmed: they complete.
    for s in &mut held {
        send(s, b"\r\n\r\n");
        assert_eq!(read_response(s, &mut buf).text(), "hello");
    }
}

#[test]
fn per_peer_limit_by_uid() {
    let srv = TestServer::with_config(ServerConfig {
        max_connections_per_peer: Some(2),
        peer_key: PeerKey::Uid,
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
    // Another connection by the same user is over the limit. (Not tried
    // with curl: it may see the close before it finished connecting.)
    let mut s = srv.connect();
    let _ = s.write_all(b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_response(&mut s, &mut buf).status, 503);
    drop(held);
    srv.wait_idle();
    assert_eq!(curl(&srv, &["http://localhost/hello"]).0, "200");
}

/// Sends `head` then `byte` repeatedly every 20 ms until the server answers
/// (bounded: 1000 rounds); returns the answer.
fn trickle_until_answered(srv: &TestServer, head: &[u8], byte: &[u8]) -> Raw {
    let mut s = srv.connect();
    send(&mut s, head);
    s.set_nonblocking(true).unwrap();
    let mut first = [0u8; 1];
    let mut got = None;
    for _ in 0..1000 {
        match s.read(&mut first) {
            Ok(1) => {
                got = Some(first[0]);
                break;
            }
            Ok(_) => panic!("closed without an answer"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
        // The server may stop reading and close once it answered.
        if s.write_all(byte).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf: Vec<u8> = got.into_iter().collect();
    let r = read_response(&mut s, &mut buf);
    assert!(at_eof(&mut s));
    r
}

#[test]
fn trickled_head_gets_408_at_the_header_deadline() {
    let srv = TestServer::with_config(ServerConfig {
        header_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::default()
    });
    // Every byte is progress, so the idle timeout would never fire.
    let r = trickle_until_answered(&srv, b"GET /hello HTTP/1.1\r\nX-Slow: ", b"a");
    assert_eq!(r.status, 408);
    assert!(
        fault_message(&r).contains("header"),
        "{}",
        fault_message(&r)
    );
    // Normal clients are unaffected, including a keep-alive connection that
    // sits idle between requests for longer than the header deadline.
    let mut s = srv.connect();
    let mut buf = Vec::new();
    send(&mut s, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_response(&mut s, &mut buf).status, 200);
    std::thread::sleep(Duration::from_millis(700));
    send(&mut s, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_response(&mut s, &mut buf).status, 200);
}

#[test]
fn slow_body_gets_408_and_fast_bodies_pass() {
    let srv = TestServer::with_config(ServerConfig {
        max_body_bytes: 16 << 20,
        min_body_rate: Some(100_000),
        body_rate_grace: Duration::from_millis(200),
        ..ServerConfig::default()
    });
    let r = trickle_until_answered(
        &srv,
        b"PUT /len HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n",
        &[b'b'; 100],
    );
    assert_eq!(r.status, 408);
    assert!(
        fault_message(&r).contains("bytes/s"),
        "{}",
        fault_message(&r)
    );
    // A body sent at full speed is fine (spooled, too: over 1 MiB).
    let body = vec![1u8; 4 << 20];
    let r = client::request(&srv.path, "PUT", "/len", Some(&body), T).unwrap();
    assert_eq!(
        (r.status, r.text()),
        (200, format!("{} {}", 4 << 20, 4 << 20))
    );
}
