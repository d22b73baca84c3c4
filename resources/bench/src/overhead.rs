//! Two start-up figures Firecracker publishes, measured for ember-vmm beside
//! a baseline in the same run:
//!
//! - **API ready**: wall time from spawning the VMM until `GET /` on its API
//!   socket answers 200. The baseline is `api-floor`, the smallest program
//!   that binds a unix socket and answers one HTTP request (what any VMM
//!   must at least do), and Firecracker itself when `--firecracker` names a
//!   binary.
//! - **Memory overhead**: resident memory of the VMM process outside guest
//!   memory, for an idle guest of `--mem` MiB that has printed its first
//!   line (`ember.test=ticker`). The baseline is `kvm-floor` booting the
//!   same guest; Firecracker too when given.
//!
//! Runs are interleaved so every program sees the same machine load. Each
//! figure is printed with its median, and as a ratio to the baseline.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::stats::{median, percentile};

/// A run that takes longer than this fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the overhead benchmark.
#[derive(Debug, thiserror::Error)]
pub enum OverheadError {
    /// A program could not be started.
    #[error("cannot spawn {0}: {1}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// A program never got ready.
    #[error("{0}: {1}")]
    Run(String, String),
    /// A scratch file could not be written.
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct OverheadConfig {
    /// Runs of each program.
    pub runs: usize,
    /// ember-vmm.
    pub vmm: PathBuf,
    /// kvm-floor.
    pub floor: PathBuf,
    /// api-floor.
    pub api_floor: PathBuf,
    /// Firecracker, if measured too.
    pub firecracker: Option<PathBuf>,
    /// The guest (PVH ELF of the test guest).
    pub kernel: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Scratch directory.
    pub dir: PathBuf,
}

/// Samples of one program for one figure.
#[derive(Debug, Clone)]
pub struct Series {
    /// Program name.
    pub name: String,
    /// API ready times.
    pub ready: Vec<Duration>,
    /// Overhead bytes.
    pub overhead: Vec<u64>,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &Path, args: &[String], stdout: Stdio) -> Result<Killed, OverheadError> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .map(Killed)
        .map_err(|e| OverheadError::Spawn(program.to_path_buf(), e))
}

/// Spawns `program args` and times until `GET /` on `sock` answers 200.
fn api_ready(
    name: &str,
    program: &Path,
    args: &[String],
    sock: &Path,
) -> Result<Duration, OverheadError> {
    let _ = std::fs::remove_file(sock);
    let start = Instant::now();
    let mut child = spawn(program, args, Stdio::null())?;
    loop {
        if let Ok(mut s) = UnixStream::connect(sock) {
            s.set_read_timeout(Some(RUN_TIMEOUT)).ok();
            if s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
                .is_ok()
            {
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200") {
                    return Ok(start.elapsed());
                }
            }
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            return Err(OverheadError::Run(
                name.into(),
                format!("exited ({st}) before its API answered"),
            ));
        }
        if start.elapsed() > RUN_TIMEOUT {
            return Err(OverheadError::Run(name.into(), "API never answered".into()));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Resident bytes of `pid` outside its mapping of `guest_bytes` (the guest
/// memory: the largest anonymous mapping of at least that size).
fn overhead_of(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut size = 0u64;
    let mut anon = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            let mut r = first.split('-');
            let lo = u64::from_str_radix(r.next()?, 16).ok()?;
            let hi = u64::from_str_radix(r.next()?, 16).ok()?;
            size = hi - lo;
            // No path (or a path-less [anon...]) after inode.
            anon = line
                .split_whitespace()
                .nth(5)
                .is_none_or(|p| p.starts_with("[anon"));
        } else if first == "Rss:" {
            let kb: u64 = words.next()?.parse().ok()?;
            total += kb * 1024;
            if anon && size >= guest_bytes && size <= guest_bytes + (4 << 20) {
                guest += kb * 1024;
            }
        }
    }
    Some(total - guest)
}

/// Spawns `program args`, waits for `needle` on its stdout, measures.
fn overhead(
    name: &str,
    program: &Path,
    args: &[String],
    guest_bytes: u64,
) -> Result<u64, OverheadError> {
    let mut child = spawn(program, args, Stdio::piped())?;
    let mut out = child.0.stdout.take().expect("piped stdout");
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("ember-guest: tick 1") {
        let n = out
            .read(&mut buf)
            .map_err(|e| OverheadError::Run(name.into(), e.to_string()))?;
        if n == 0 || start.elapsed() > RUN_TIMEOUT {
            return Err(OverheadError::Run(
                name.into(),
                format!("the guest never ticked: {}", String::from_utf8_lossy(&seen)),
            ));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    // Keep draining its output so it never blocks on the pipe.
    let drain = std::thread::spawn(move || while matches!(out.read(&mut buf), Ok(n) if n > 0) {});
    let r = overhead_of(child.0.id(), guest_bytes)
        .ok_or_else(|| OverheadError::Run(name.into(), "cannot read /proc/PID/smaps".into()));
    drop(child);
    let _ = drain.join();
    r
}

/// Runs the benchmark.
pub fn run(cfg: &OverheadConfig) -> Result<Vec<Series>, OverheadError> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| OverheadError::Write(cfg.dir.clone(), e))?;
    let sock = cfg.dir.join("api.sock");
    let s = sock.display().to_string();
    let guest_bytes = cfg.mem_mib << 20;
    let vm_json = cfg.dir.join("vm.json");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": cfg.kernel, "boot_args": "ember.test=ticker"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": cfg.mem_mib}
    });
    std::fs::write(&vm_json, json.to_string())
        .map_err(|e| OverheadError::Write(vm_json.clone(), e))?;
    let cfg_file = vm_json.display().to_string();

    // (name, program, api args, overhead args)
    let mut programs: Vec<(String, PathBuf, Vec<String>, Vec<String>)> = vec![
        (
            "floor".into(),
            cfg.api_floor.clone(),
            vec![s.clone()],
            vec![
                "--pvh".into(),
                "--mem".into(),
                cfg.mem_mib.to_string(),
                cfg.kernel.display().to_string(),
                "ember.test=ticker".into(),
            ],
        ),
        (
            "ember-vmm".into(),
            cfg.vmm.clone(),
            vec!["--api-sock".into(), s.clone()],
            vec!["--no-api".into(), "--config-file".into(), cfg_file.clone()],
        ),
    ];
    if let Some(fc) = &cfg.firecracker {
        programs.push((
            "firecracker".into(),
            fc.clone(),
            vec!["--api-sock".into(), s.clone()],
            vec!["--no-api".into(), "--config-file".into(), cfg_file.clone()],
        ));
    }
    let mut series: Vec<Series> = programs
        .iter()
        .map(|(n, ..)| Series {
            name: n.clone(),
            ready: Vec::new(),
            overhead: Vec::new(),
        })
        .collect();
    for _ in 0..cfg.runs {
        for (i, (name, program, api_args, _)) in programs.iter().enumerate() {
            series[i]
                .ready
                .push(api_ready(name, program, api_args, &sock)?);
        }
    }
    for _ in 0..cfg.runs.clamp(1, 5) {
        for (i, (name, program, _, ov_args)) in programs.iter().enumerate() {
            let floor = i == 0;
            let prog = if floor { &cfg.floor } else { program };
            series[i]
                .overhead
                .push(overhead(name, prog, ov_args, guest_bytes)?);
        }
    }
    let _ = std::fs::remove_file(&sock);
    Ok(series)
}

fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The report: medians and ratios to the floor.
pub fn render(series: &[Series]) -> String {
    let mut out = String::new();
    let base_ready = median(&series[0].ready).unwrap_or_default();
    let base_mem = median_u64(&series[0].overhead);
    out.push_str("API ready (spawn -> first 200 to GET /):\n");
    for s in series {
        let m = median(&s.ready).unwrap_or_default();
        let p90 = percentile(&s.ready, 90.0).unwrap_or_default();
        let label = if s.name == "floor" {
            "api-floor (baseline)".to_string()
        } else {
            s.name.clone()
        };
        out.push_str(&format!(
            "  {label:<22} median {:>8.3} ms  p90 {:>8.3} ms  ratio {:.2}x\n",
            m.as_secs_f64() * 1e3,
            p90.as_secs_f64() * 1e3,
            m.as_secs_f64() / base_ready.as_secs_f64().max(1e-9)
        ));
    }
    out.push_str("memory overhead (resident outside guest memory, guest ticking):\n");
    for s in series {
        let m = median_u64(&s.overhead);
        let label = if s.name == "floor" {
            "kvm-floor (baseline)".to_string()
        } else {
            s.name.clone()
        };
        out.push_str(&format!(
            "  {label:<22} median {:>8.2} MiB  ratio {:.2}x\n",
            m as f64 / f64::from(1 << 20),
            m as f64 / (base_mem.max(1)) as f64
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_mapping_is_left_out_of_the_overhead() {
        // This process: no mapping of 1 TiB, so everything counts.
        let all = overhead_of(std::process::id(), 1 << 40).unwrap();
        assert!(all > 0);
        // A 64 MiB anonymous mapping, touched: left out when asked.
        let len = 64usize << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `p` maps `len` writable bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 1, len) };
        let with = overhead_of(std::process::id(), 1 << 40).unwrap();
        let without = overhead_of(std::process::id(), len as u64).unwrap();
        assert!(with >= without + (60 << 20), "{with} {without}");
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(p, len) };
    }
}
