//! Concurrent large uploads must not be held in anonymous memory. Own test
//! binary so no other test's allocations disturb the RSS reading.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use ember_http::ServerConfig;

const UPLOADS: usize = 4;
const SIZE: usize = 64 << 20;

fn rss_anon_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/self/status")
}

#[test]
fn concurrent_large_uploads_stay_out_of_anonymous_memory() {
    let spool = std::env::temp_dir().join(format!("ember-http-spool-{}", std::process::id()));
    std::fs::create_dir_all(&spool).unwrap();
    let srv = TestServer::with_config(ServerConfig {
        max_body_bytes: 128 << 20,
        spool_dir: spool.clone(),
        ..ServerConfig::default()
    });
    // Warm up the loop thread and this one.
    let mut buf = Vec::new();
    let mut s = srv.connect();
    send(&mut s, b"PUT /len HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(read_response(&mut s, &mut buf).text(), "3 294");
    drop(s);
    let base = rss_anon_kib();
    let peak = Arc::new(AtomicU64::new(base));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            // Bounded: the uploads below finish or fail within their timeouts.
            for _ in 0..100_000 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                peak.fetch_max(rss_anon_kib(), Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let uploads: Vec<_> = (0..UPLOADS)
        .map(|i| {
            let mut s = srv.connect();
            std::thread::spawn(move || {
                let chunk: Vec<u8> = (0..64 * 1024).map(|j| (i + j) as u8).collect();
                let head = format!("PUT /len HTTP/1.1\r\nContent-Length: {SIZE}\r\n\r\n");
                s.write_all(head.as_bytes()).unwrap();
                for _ in 0..SIZE / chunk.len() {
                    s.write_all(&chunk).unwrap();
                }
                let mut buf = Vec::new();
                let r = read_response(&mut s, &mut buf);
                assert_eq!(r.status, 200);
                r.text()
            })
        })
        .collect();
    let answers: Vec<String> = uploads.into_iter().map(|t| t.join().unwrap()).collect();
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let growth_kib = peak.load(Ordering::SeqCst).saturating_sub(base);
    eprintln!(
        "RssAnon: base {base} KiB, peak growth {growth_kib} KiB for {} MiB uploaded",
        (UPLOADS * SIZE) >> 20
    );
    for a in &answers {
        assert_eq!(a.split(' ').next(), Some(SIZE.to_string().as_str()), "{a}");
    }
    // Spool files are unlinked from the start and gone with their bodies.
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    drop(srv);
    std::fs::remove_dir(&spool).unwrap();
    assert!(
        growth_kib < 32 * 1024,
        "RssAnon grew by {growth_kib} KiB while {} MiB were uploaded",
        (UPLOADS * SIZE) >> 20
    );
}
