//! Many sequential connections must not leak file descriptors. Kept in its
//! own test binary so no other test opens fds concurrently.

mod common;

use common::*;
use ember_http::client;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn no_fd_leak_over_many_connections() {
    let srv = TestServer::start();
    // Warm up (lazy allocations in the loop thread).
    client::request(&srv.path, "GET", "/hello", None, T).unwrap();
    srv.wait_idle();
    let before = open_fds();
    let mut buf = Vec::new();
    for i in 0..300 {
        match i % 5 {
            // Plain one-shot requests.
            0 | 1 => assert_eq!(
                client::request(&srv.path, "GET", "/hello", None, T)
                    .unwrap()
                    .status,
                200
            ),
            // Keep-alive connection dropped by the client after a response.
            2 => {
                let mut s = srv.connect();
                send(&mut s, b"GET /hello HTTP/1.1\r\n\r\n");
                assert_eq!(read_response(&mut s, &mut buf).status, 200);
            }
            // Disconnect mid-request.
            3 => {
                let mut s = srv.connect();
                send(
                    &mut s,
                    b"PUT /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc",
                );
            }
            // Malformed request.
            _ => {
                let mut s = srv.connect();
                send(&mut s, b"garbage\r\n\r\n");
                assert_eq!(read_response(&mut s, &mut buf).status, 400);
            }
        }
    }
    srv.wait_idle();
    assert_eq!(open_fds(), before);
}
