//! The emberd benchmark: instance starts per second through emberd's API
//! (a hello C unikernel: run, wait for `stopped`, delete), API requests per
//! second, and, in the same run, the spawn rate of the same kernel under
//! `ember-jailer` + `ember-vmm` and under `ember-vmm --no-api` alone.
//!
//! The sequential API starts, the jailer runs and the bare VMM runs are
//! interleaved round by round so all three see the same machine load; their
//! rates are `runs / sum of per-run wall times`. Then come the bursts (K
//! runs sent back to back, then waiting for all to stop), starts of a guest
//! that keeps running (run, wait for its line, forced delete) and the
//! request loops. Nothing here asserts on time.
//!
//! With `pod_runs` > 0, emberd also gets a pod kernel and agent and each
//! round adds a hyperd pod round trip and an idle VM create + delete
//! ([`pods`]); their medians are set against the API start's and the bare
//! VMM spawn's from the same rounds.
//!
//! With `warm_runs` > 0, emberd runs with `--snapshot-starts` and each of
//! that many rounds adds a cold and an instant (snapshot) start of the same
//! program, timed to the guest's first line ([`warm`]).

pub mod guard;
pub mod http;
pub mod pods;
pub mod warm;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::stats::{median, percentile};
use crate::throughput::vmrun::{self, interrupted, VmRunError};
use guard::Guard;
use http::{Conn, HttpError, Multipart};

/// The hello program the image is built from.
pub const HELLO_C: &str = "#include <stdio.h>\nint main(void){ printf(\"hi\\n\"); return 0; }\n";
/// A program that prints a line and then keeps running (halted).
pub const IDLE_C: &str =
    "#include <stdio.h>\nint main(void){ printf(\"idle up\\n\"); for(;;) __asm__ volatile(\"cli; hlt\"); }\n";
/// What [`IDLE_C`] prints.
pub const IDLE_LINE: &str = "idle up";
/// The line the ember runtime prints when main returns 0.
pub const EXIT_LINE: &str = "ember: exit 0";
/// Name of the hello image the benchmark creates.
pub const IMAGE: &str = "hello";
/// Name of the long-running image.
pub const IDLE_IMAGE: &str = "idle";

/// Bound on a single API request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the image build (gcc + link).
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on one instance or VMM run (spawn to exit).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on emberd coming up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the emberd benchmark.
#[derive(Debug, thiserror::Error)]
pub enum EmberdBenchError {
    #[error(
        "{0} not found (build it with `cargo build --release -p vmm -p jailer -p api_server -p ember-agent`)"
    )]
    Missing(PathBuf),
    #[error(transparent)]
    Guard(#[from] guard::GuardError),
    #[error("cannot start emberd {0}: {1}")]
    Spawn(PathBuf, #[source] io::Error),
    #[error("emberd exited during start-up ({0})")]
    EmberdDied(String),
    #[error("emberd did not serve {0} within {1:?}")]
    NoSocket(PathBuf, Duration),
    #[error("{what}: {err}")]
    Http {
        what: String,
        #[source]
        err: HttpError,
    },
    #[error("{what}: HTTP {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what}: unexpected answer: {detail}")]
    Unexpected { what: String, detail: String },
    #[error("instance {name} did not stop within {timeout:?} (last state {state:?})\n--- log ---\n{log}")]
    NotStopped {
        name: String,
        timeout: Duration,
        state: String,
        log: String,
    },
    #[error("instance {name} ended in state {state:?}\n--- log ---\n{log}")]
    BadInstance {
        name: String,
        state: String,
        log: String,
    },
    #[error("cannot {what}: {err}")]
    Io {
        what: String,
        #[source]
        err: io::Error,
    },
    #[error("{what} failed: {detail}")]
    BadRun { what: String, detail: String },
    #[error("{0}")]
    VmRun(#[from] VmRunError),
    #[error("interrupted")]
    Interrupted,
    #[error("{err}\n--- emberd log (tail) ---\n{log}")]
    WithLog {
        err: Box<EmberdBenchError>,
        log: String,
    },
}

type Result<T> = std::result::Result<T, EmberdBenchError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EmberdBenchError {
    let what = what.into();
    move |err| EmberdBenchError::Io { what, err }
}

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct EmberdBenchConfig {
    /// Sequential API starts (and as many jailer and bare VMM runs).
    pub runs: usize,
    /// Runs per burst.
    pub burst: usize,
    /// Number of bursts.
    pub burst_rounds: usize,
    /// Requests in each API request loop.
    pub requests: usize,
    /// What the request loops GET.
    pub api_path: String,
    pub emberd: PathBuf,
    pub vmm: PathBuf,
    pub jailer: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Status poll interval while waiting for instances to stop.
    pub poll: Duration,
    /// Also measure ember-jailer + ember-vmm without emberd.
    pub with_jailer: bool,
    /// API starts of a guest that keeps running (0: skip).
    pub idle_runs: usize,
    /// Pod round trips and idle VM creates, interleaved with the rounds
    /// above (0: skip, and emberd gets no pod flags).
    pub pod_runs: usize,
    /// emberd's `--pod-kernel` (the test guest where Linux cannot boot).
    pub pod_kernel: PathBuf,
    /// emberd's `--pod-boot-args`.
    pub pod_boot_args: String,
    /// emberd's `--pod-agent` (the `ember-agent` binary for the initramfs).
    pub pod_agent: PathBuf,
    /// emberd's `--pod-rootfs-mb` (size of each container's root disk).
    pub pod_rootfs_mb: u64,
    /// Rounds of one cold and one snapshot start, timed to the first line
    /// (0: skip, and emberd runs without `--snapshot-starts`).
    pub warm_runs: usize,
}

/// One sequential API start.
#[derive(Debug, Clone, Copy)]
pub struct ApiStart {
    /// `POST /instances/run` sent -> answered.
    pub post: Duration,
    /// `POST` sent -> `stopped` observed.
    pub stopped: Duration,
    /// `DELETE` sent -> answered.
    pub delete: Duration,
    /// The whole iteration: run, wait, log check, delete.
    pub total: Duration,
}

/// One burst.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    /// First `POST` sent -> last instance `stopped`.
    pub wall: Duration,
    /// Sending the K `POST`s.
    pub posts: Duration,
}

/// A request loop's result.
#[derive(Debug, Clone)]
pub struct RequestLoop {
    pub wall: Duration,
    pub samples: Vec<Duration>,
}

/// Everything measured.
#[derive(Debug, Default)]
pub struct Report {
    pub build: Option<Duration>,
    pub memory_mb: u64,
    pub cmdline: String,
    pub api: Vec<ApiStart>,
    /// Starts of the long-running guest (`stopped` holds "up observed").
    pub idle: Vec<ApiStart>,
    pub bursts: Vec<Burst>,
    pub burst_size: usize,
    pub jailer: Vec<Duration>,
    pub vmm: Vec<Duration>,
    pub api_path: String,
    pub keep_alive: Option<RequestLoop>,
    pub fresh: Option<RequestLoop>,
    /// VMM pids the final cleanup had to kill (none after a clean run).
    pub leftovers: Vec<i32>,
    /// `POST /image/create` of the pods' container image.
    pub pod_import: Option<Duration>,
    /// The warm-up pod's `POST /pod/start` (builds the pod VM image).
    pub pod_first_start: Option<Duration>,
    pub pods: Vec<pods::PodRound>,
    pub vms: Vec<pods::VmRound>,
    /// Pods and VMs the final cleanup had to remove (none after a clean run).
    pub pods_removed: Vec<String>,
    /// Cold starts timed to the first line, beside [`Report::warm`].
    pub cold_first: Vec<warm::Measured>,
    /// Snapshot starts (or their cold fall-backs) timed to the first line.
    pub warm: Vec<warm::Measured>,
    /// Why there are no snapshot starts, when there are none.
    pub warm_note: Option<String>,
}

/// Formats one table row: name, count, rate, samples.
type RowFn<'a> = dyn Fn(&str, String, Option<f64>, &[Duration]) -> String + 'a;

fn rate(n: usize, total: Duration) -> Option<f64> {
    (!total.is_zero()).then(|| n as f64 / total.as_secs_f64())
}

fn sum(d: &[Duration]) -> Duration {
    d.iter().sum()
}

/// A named column of a table group: which time of each sample it shows.
type Column<'a, T> = (&'a str, fn(&T) -> Duration);

/// A table group: the headline row (whole iterations, with their rate) and
/// a row per part, all with the same count.
fn rows<T>(row: &RowFn<'_>, samples: &[T], head: Column<'_, T>, parts: &[Column<'_, T>]) -> String {
    let n = samples.len().to_string();
    let col = |f: fn(&T) -> Duration| samples.iter().map(f).collect::<Vec<_>>();
    let total = col(head.1);
    let mut s = row(head.0, n.clone(), rate(total.len(), sum(&total)), &total);
    for (name, f) in parts {
        s += &row(name, n.clone(), None, &col(*f));
    }
    s
}

impl Report {
    /// Sequential API starts per second.
    pub fn api_rate(&self) -> Option<f64> {
        let t: Vec<Duration> = self.api.iter().map(|s| s.total).collect();
        rate(t.len(), sum(&t))
    }

    /// Burst instances per second.
    pub fn burst_rate(&self) -> Option<f64> {
        let t: Vec<Duration> = self.bursts.iter().map(|b| b.wall).collect();
        rate(t.len() * self.burst_size, sum(&t))
    }

    pub fn jailer_rate(&self) -> Option<f64> {
        rate(self.jailer.len(), sum(&self.jailer))
    }

    pub fn vmm_rate(&self) -> Option<f64> {
        rate(self.vmm.len(), sum(&self.vmm))
    }

    /// Median of the sequential API starts' whole iterations.
    pub fn api_median(&self) -> Option<Duration> {
        median(&self.api.iter().map(|a| a.total).collect::<Vec<_>>())
    }

    /// The pod phase's rows: pod round trips and idle VMs.
    fn render_pods(&self, row: &RowFn<'_>) -> String {
        let mut s = String::new();
        if !self.pods.is_empty() {
            s += &rows(
                row,
                &self.pods,
                ("pod: create, start, stop VM, delete", |p| p.total),
                &[
                    ("  POST /pod/create answered", |p| p.create),
                    ("  POST /pod/start answered (running)", |p| p.start),
                    ("  POST /pod/stop?stopVM=yes answered", |p| p.stop),
                    ("  DELETE /pod answered", |p| p.delete),
                ],
            );
        }
        if !self.vms.is_empty() {
            s += &rows(
                row,
                &self.vms,
                ("idle VM: POST /vm/create, DELETE /vm", |v| v.total),
                &[
                    ("  POST /vm/create answered (READY)", |v| v.create),
                    ("  DELETE /vm answered", |v| v.delete),
                ],
            );
        }
        s
    }

    /// Cold and snapshot starts side by side, with ratios.
    fn render_warm(&self, row: &RowFn<'_>) -> String {
        let mut s = String::new();
        if let Some(why) = &self.warm_note {
            s += &format!("snapshot starts: none ({why})\n");
        }
        if self.warm.is_empty() {
            return s;
        }
        let rate_of = |v: &[warm::Measured]| {
            let t: Vec<Duration> = v.iter().map(|m| m.total).collect();
            rate(t.len(), sum(&t))
        };
        s += "cold and snapshot starts of the same program, same rounds:\n";
        for (what, v) in [("cold", &self.cold_first), ("snapshot", &self.warm)] {
            s += &rows(
                row,
                v,
                (&format!("{what}: run, first line, stopped, delete"), |m| {
                    m.total
                }),
                &[
                    ("  POST /instances/run answered", |m| m.post),
                    ("  run sent -> first line in the log", |m| m.first_line),
                    ("  run sent -> stopped observed", |m| m.stopped),
                ],
            );
        }
        let restored = self.warm.iter().filter(|m| m.restored).count();
        let loads: Vec<Duration> = self
            .warm
            .iter()
            .filter_map(|m| m.load_us)
            .map(Duration::from_micros)
            .collect();
        s += &row(
            "  PUT /snapshot/load (ember-vmm)",
            loads.len().to_string(),
            None,
            &loads,
        );
        s += &format!(
            "snapshot starts restored: {restored} of {} (the others fell back to cold)\n",
            self.warm.len()
        );
        let med = |v: &[warm::Measured], f: fn(&warm::Measured) -> Duration| {
            median(&v.iter().map(f).collect::<Vec<_>>())
        };
        let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if !b.is_zero() => {
                format!("{:.3}", a.as_secs_f64() / b.as_secs_f64())
            }
            _ => "-".into(),
        };
        s += &format!(
            "  snapshot / cold, median run -> first line   {}\n",
            ratio(
                med(&self.warm, |m| m.first_line),
                med(&self.cold_first, |m| m.first_line)
            )
        );
        s += &format!(
            "  snapshot / cold, median whole start         {}\n",
            ratio(
                med(&self.warm, |m| m.total),
                med(&self.cold_first, |m| m.total)
            )
        );
        s += &format!(
            "  snapshot / cold, sequential starts per s    {}\n",
            match (rate_of(&self.warm), rate_of(&self.cold_first)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
                _ => "-".into(),
            }
        );
        s
    }

    /// Ratios of medians (times, so > 1 is slower) of the pod phase.
    fn render_pod_ratios(&self) -> String {
        if self.pods.is_empty() && self.vms.is_empty() {
            return String::new();
        }
        let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if !b.is_zero() => {
                format!("{:.3}", a.as_secs_f64() / b.as_secs_f64())
            }
            _ => "-".into(),
        };
        let med = |v: Vec<Duration>| median(&v);
        let pod_total = med(self.pods.iter().map(|p| p.total).collect());
        let pod_start = med(self.pods.iter().map(|p| p.start).collect());
        let pod_stop = med(self.pods.iter().map(|p| p.stop).collect());
        let vm_create = med(self.vms.iter().map(|v| v.create).collect());
        let (api, vmm) = (self.api_median(), median(&self.vmm));
        let mut s = String::from(
            "pod time ratios (median / median, > 1 is slower; API start = run, stopped, logs, delete):
",
        );
        for (name, t) in [
            ("pod round trip", pod_total),
            ("pod start", pod_start),
            ("pod stop", pod_stop),
            ("VM create", vm_create),
        ] {
            if t.is_none() {
                continue;
            }
            s += &format!(
                "  {:<16} / API start {:>8}   / VMM-only {:>8}\n",
                name,
                ratio(t, api),
                ratio(t, vmm)
            );
        }
        s
    }

    /// The table and the ratios.
    pub fn render(&self) -> String {
        let ms = |d: Option<Duration>| match d {
            Some(d) => format!("{:9.2} ms", d.as_secs_f64() * 1e3),
            None => format!("{:>12}", "-"),
        };
        let per_s = |r: Option<f64>| match r {
            Some(r) => format!("{r:10.2}"),
            None => format!("{:>10}", "-"),
        };
        let row = |name: &str, n: String, r: Option<f64>, s: &[Duration]| {
            format!(
                "{:<40} {:>7} {} {} {} {} {}\n",
                name,
                n,
                per_s(r),
                ms(median(s)),
                ms(percentile(s, 90.0)),
                ms(s.iter().min().copied()),
                ms(s.iter().max().copied()),
            )
        };
        let mut s = String::new();
        if let Some(b) = self.build {
            s += &format!(
                "image build (POST /images/{IMAGE}/create): {:.1} ms\n",
                b.as_secs_f64() * 1e3
            );
        }
        if let Some(b) = self.pod_import {
            s += &format!(
                "pod container image import (POST /image/create, OCI layout): {:.1} ms\n",
                b.as_secs_f64() * 1e3
            );
        }
        if let Some(b) = self.pod_first_start {
            s += &format!(
                "first POST /pod/start (also builds the pod VM image): {:.1} ms\n",
                b.as_secs_f64() * 1e3
            );
        }
        s += &format!(
            "{:<40} {:>7} {:>10} {:>12} {:>12} {:>12} {:>12}\n",
            "what", "n", "per s", "median", "p90", "min", "max"
        );
        // Always shown, so an empty report still has the API row.
        s += &rows(
            &row,
            &self.api,
            ("API start: run, stopped, logs, delete", |a| a.total),
            &[
                ("  POST /instances/run answered", |a| a.post),
                ("  run sent -> stopped observed", |a| a.stopped),
                ("  DELETE answered", |a| a.delete),
            ],
        );
        s += &self.render_pods(&row);
        if !self.idle.is_empty() {
            s += &rows(
                &row,
                &self.idle,
                ("API start, guest stays up: run, up, del", |a| a.total),
                &[
                    ("  POST /instances/run answered", |a| a.post),
                    ("  run sent -> guest line in the log", |a| a.stopped),
                    ("  DELETE ?force=true answered", |a| a.delete),
                ],
            );
        }
        if !self.bursts.is_empty() {
            let walls: Vec<Duration> = self.bursts.iter().map(|b| b.wall).collect();
            let posts: Vec<Duration> = self.bursts.iter().map(|b| b.posts).collect();
            let n = format!("{}x{}", self.bursts.len(), self.burst_size);
            s += &row(
                &format!("API burst: {} runs, wait all stopped", self.burst_size),
                n.clone(),
                self.burst_rate(),
                &walls,
            );
            s += &row(
                &format!("  {} POSTs answered", self.burst_size),
                n,
                None,
                &posts,
            );
        }
        if !self.jailer.is_empty() {
            s += &row(
                "ember-jailer + ember-vmm (no emberd)",
                self.jailer.len().to_string(),
                self.jailer_rate(),
                &self.jailer,
            );
        }
        s += &row(
            "ember-vmm --no-api (no jailer)",
            self.vmm.len().to_string(),
            self.vmm_rate(),
            &self.vmm,
        );
        for (name, l) in [
            ("keep-alive", &self.keep_alive),
            ("new connection each", &self.fresh),
        ] {
            if let Some(l) = l {
                s += &row(
                    &format!("GET {} ({name})", self.api_path),
                    l.samples.len().to_string(),
                    rate(l.samples.len(), l.wall),
                    &l.samples,
                );
            }
        }
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
            _ => "-".into(),
        };
        s += "ratios (starts or spawns per second):\n";
        s += &format!(
            "  API sequential / VMM-only    {}\n",
            ratio(self.api_rate(), self.vmm_rate())
        );
        if !self.bursts.is_empty() {
            s += &format!(
                "  API burst / VMM-only         {}\n",
                ratio(self.burst_rate(), self.vmm_rate())
            );
        }
        if !self.jailer.is_empty() {
            s += &format!(
                "  API sequential / jailer+VMM  {}\n",
                ratio(self.api_rate(), self.jailer_rate())
            );
            s += &format!(
                "  jailer+VMM / VMM-only        {}\n",
                ratio(self.jailer_rate(), self.vmm_rate())
            );
        }
        if let (Some(k), Some(f)) = (&self.keep_alive, &self.fresh) {
            s += &format!(
                "  requests keep-alive / new connection  {}\n",
                ratio(rate(k.samples.len(), k.wall), rate(f.samples.len(), f.wall))
            );
        }
        s += &self.render_pod_ratios();
        s += &self.render_warm(&row);
        if !self.pods_removed.is_empty() {
            s += &format!(
                "cleanup: removed leftover pods / VMs {:?}\n",
                self.pods_removed
            );
        }
        s += &if self.leftovers.is_empty() {
            "cleanup: no VMM left behind\n".to_string()
        } else {
            format!("cleanup: killed leftover VMMs {:?}\n", self.leftovers)
        };
        s
    }
}

/// A keep-alive connection to emberd that reconnects when the server closed
/// it.
struct Client {
    sock: PathBuf,
    conn: Option<Conn>,
}

impl Client {
    fn new(sock: &Path) -> Self {
        Client {
            sock: sock.to_path_buf(),
            conn: None,
        }
    }

    fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<http::Response> {
        let what = || format!("{method} {path}");
        // A reused connection the server dropped while idle shows up as a
        // truncated answer: idempotent requests are retried once.
        for attempt in 0..2 {
            let reused = self.conn.as_ref().is_some_and(|c| !c.is_closed());
            if !reused {
                self.conn = Some(
                    Conn::connect(&self.sock)
                        .map_err(|err| EmberdBenchError::Http { what: what(), err })?,
                );
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            match conn.request(method, path, headers, body, true, timeout) {
                Ok(r) => return Ok(r),
                Err(HttpError::Truncated)
                    if reused && attempt == 0 && matches!(method, "GET" | "DELETE") =>
                {
                    self.conn = None;
                }
                Err(err) => {
                    self.conn = None;
                    return Err(EmberdBenchError::Http { what: what(), err });
                }
            }
        }
        Err(EmberdBenchError::Http {
            what: what(),
            err: HttpError::Truncated,
        })
    }

    /// A request that must answer `want`.
    fn expect(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        want: u16,
    ) -> Result<http::Response> {
        let r = self.call(method, path, &[], body, REQUEST_TIMEOUT)?;
        if r.status != want {
            return Err(EmberdBenchError::Status {
                what: format!("{method} {path}"),
                status: r.status,
                body: r.text(),
            });
        }
        Ok(r)
    }

    fn state(&mut self, name: &str) -> Result<String> {
        let v = self
            .expect("GET", &format!("/instances/{name}"), None, 200)?
            .json();
        Ok(v["State"].as_str().unwrap_or_default().to_string())
    }

    fn logs(&mut self, name: &str) -> Result<String> {
        Ok(self
            .expect("GET", &format!("/instances/{name}/logs"), None, 200)?
            .text())
    }

    /// `POST /instances/run` of the hello image; returns the instance id.
    fn run(&mut self, name: &str, memory_mb: u64) -> Result<String> {
        self.run_image(name, IMAGE, memory_mb)
    }

    /// `POST /instances/run`; returns the instance id.
    fn run_image(&mut self, name: &str, image: &str, memory_mb: u64) -> Result<String> {
        let body =
            json!({"InstanceName": name, "ImageName": image, "MemoryMb": memory_mb}).to_string();
        let v = self
            .expect("POST", "/instances/run", Some(body.as_bytes()), 201)?
            .json();
        match v["Id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => Err(EmberdBenchError::Unexpected {
                what: format!("run {name}"),
                detail: v.to_string(),
            }),
        }
    }

    /// Checks the log of a stopped instance for the exit line (bounded).
    fn check_exit_line(&mut self, name: &str, state: &str) -> Result<()> {
        self.wait_log(
            name,
            EXIT_LINE,
            state,
            Duration::from_secs(5),
            Duration::from_millis(5),
        )
    }

    /// Polls the log of `name` until it contains `needle` (bounded).
    fn wait_log(
        &mut self,
        name: &str,
        needle: &str,
        state: &str,
        timeout: Duration,
        poll: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.logs(name)?;
            if log.contains(needle) {
                return Ok(());
            }
            if interrupted() {
                return Err(EmberdBenchError::Interrupted);
            }
            if Instant::now() > deadline {
                return Err(EmberdBenchError::BadInstance {
                    name: name.into(),
                    state: state.into(),
                    log,
                });
            }
            std::thread::sleep(poll);
        }
    }

    /// Builds an image from one C file, booting cold
    /// (`snapshot_starts=false`); returns its id, default memory and the
    /// build time.
    fn create_image(
        &mut self,
        dir: &Path,
        name: &str,
        source: &str,
    ) -> Result<(String, u64, Duration)> {
        self.create_image_with(dir, name, source, &[("snapshot_starts", "false")])
    }

    /// [`Client::create_image`] with these form fields.
    fn create_image_with(
        &mut self,
        dir: &Path,
        name: &str,
        source: &str,
        fields: &[(&str, &str)],
    ) -> Result<(String, u64, Duration)> {
        let tgz = c_tarball(dir, name, source)?;
        let mut form = Multipart::new("emberdbenchboundary7d1f")
            .text("provider", "ember")
            .text("base", "ember")
            .text("lang", "c");
        for (k, v) in fields {
            form = form.text(k, v);
        }
        let (ct, body) = form
            .file(
                "tarfile",
                &format!("{name}.tar.gz"),
                "application/gzip",
                &tgz,
            )
            .finish();
        let path = format!("/images/{name}/create");
        let t0 = Instant::now();
        let r = self.call(
            "POST",
            &path,
            &[("Content-Type", &ct)],
            Some(&body),
            BUILD_TIMEOUT,
        )?;
        let took = t0.elapsed();
        if r.status != 201 {
            return Err(EmberdBenchError::Status {
                what: format!("POST {path}"),
                status: r.status,
                body: r.text(),
            });
        }
        let img = r.json();
        let id = img["Id"].as_str().unwrap_or_default().to_string();
        let mem = img["RunSpec"]["DefaultInstanceMemory"]
            .as_u64()
            .unwrap_or(0);
        if id.is_empty() || mem == 0 {
            return Err(EmberdBenchError::Unexpected {
                what: format!("POST {path}"),
                detail: img.to_string(),
            });
        }
        Ok((id, mem, took))
    }
}

/// Waits until every instance in `names` reads `stopped`; returns, for each,
/// when that was observed.
fn wait_stopped(c: &mut Client, names: &[String], poll: Duration) -> Result<Vec<Instant>> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut done: Vec<Option<Instant>> = vec![None; names.len()];
    let mut last = vec![String::new(); names.len()];
    loop {
        for (i, name) in names.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let st = c.state(name)?;
            match st.as_str() {
                "stopped" => done[i] = Some(Instant::now()),
                "error" => {
                    return Err(EmberdBenchError::BadInstance {
                        name: name.clone(),
                        log: c.logs(name).unwrap_or_default(),
                        state: st,
                    })
                }
                _ => {}
            }
            last[i] = st;
        }
        if done.iter().all(Option::is_some) {
            return Ok(done.into_iter().flatten().collect());
        }
        if interrupted() {
            return Err(EmberdBenchError::Interrupted);
        }
        if Instant::now() > deadline {
            let i = done.iter().position(Option::is_none).unwrap_or(0);
            let name = names.get(i).cloned().unwrap_or_default();
            return Err(EmberdBenchError::NotStopped {
                log: c.logs(&name).unwrap_or_default(),
                state: last.get(i).cloned().unwrap_or_default(),
                name,
                timeout: RUN_TIMEOUT,
            });
        }
        std::thread::sleep(poll);
    }
}

/// `POST /instances/run` of `image` (unless interrupted), the instance
/// tracked for the final cleanup; returns when it was sent and how long the
/// answer took.
fn launch(
    c: &mut Client,
    g: &mut Guard,
    name: &str,
    image: &str,
    mem: u64,
) -> Result<(Instant, Duration)> {
    if interrupted() {
        return Err(EmberdBenchError::Interrupted);
    }
    let t0 = Instant::now();
    let id = c.run_image(name, image, mem)?;
    g.track(&id);
    Ok((t0, t0.elapsed()))
}

/// One sequential API start: run, wait for `stopped`, check the log, delete.
fn api_start(
    c: &mut Client,
    g: &mut Guard,
    name: &str,
    cfg: &EmberdBenchConfig,
    mem: u64,
) -> Result<ApiStart> {
    let (t0, post) = launch(c, g, name, IMAGE, mem)?;
    let stopped_at = wait_stopped(c, &[name.to_string()], cfg.poll)?;
    let stopped = stopped_at
        .first()
        .map(|t| t.saturating_duration_since(t0))
        .unwrap_or_default();
    c.check_exit_line(name, "stopped")?;
    let t1 = Instant::now();
    c.expect("DELETE", &format!("/instances/{name}"), None, 204)?;
    let delete = t1.elapsed();
    Ok(ApiStart {
        post,
        stopped,
        delete,
        total: t0.elapsed(),
    })
}

/// One start of the long-running guest: run, wait for its line in the log,
/// forced delete (stops the VMM).
fn idle_start(
    c: &mut Client,
    g: &mut Guard,
    name: &str,
    cfg: &EmberdBenchConfig,
    mem: u64,
) -> Result<ApiStart> {
    let (t0, post) = launch(c, g, name, IDLE_IMAGE, mem)?;
    c.wait_log(name, IDLE_LINE, "running", RUN_TIMEOUT, cfg.poll)?;
    let up = t0.elapsed();
    let state = c.state(name)?;
    if state != "running" {
        return Err(EmberdBenchError::BadInstance {
            name: name.into(),
            log: c.logs(name).unwrap_or_default(),
            state,
        });
    }
    let t1 = Instant::now();
    c.expect(
        "DELETE",
        &format!("/instances/{name}?force=true"),
        None,
        204,
    )?;
    let delete = t1.elapsed();
    Ok(ApiStart {
        post,
        stopped: up,
        delete,
        total: t0.elapsed(),
    })
}

/// One burst: `k` runs back to back, then wait for all to stop; the
/// instances are deleted afterwards (not timed).
fn burst(
    c: &mut Client,
    g: &mut Guard,
    round: usize,
    cfg: &EmberdBenchConfig,
    mem: u64,
) -> Result<Burst> {
    if interrupted() {
        return Err(EmberdBenchError::Interrupted);
    }
    let names: Vec<String> = (0..cfg.burst)
        .map(|i| format!("burst-{round}-{i}"))
        .collect();
    let t0 = Instant::now();
    for n in &names {
        let id = c.run(n, mem)?;
        g.track(&id);
    }
    let posts = t0.elapsed();
    let stopped = wait_stopped(c, &names, cfg.poll)?;
    let wall = stopped
        .iter()
        .max()
        .map(|t| t.saturating_duration_since(t0))
        .unwrap_or_default();
    for n in &names {
        c.check_exit_line(n, "stopped")?;
        c.expect("DELETE", &format!("/instances/{n}"), None, 204)?;
    }
    Ok(Burst { wall, posts })
}

/// `m` sequential GETs, on one keep-alive connection or a new one each.
fn request_loop(sock: &Path, path: &str, m: usize, keep_alive: bool) -> Result<RequestLoop> {
    let what = || format!("GET {path}");
    let mut samples = Vec::with_capacity(m);
    let mut conn: Option<Conn> = None;
    let t0 = Instant::now();
    for _ in 0..m {
        if interrupted() {
            return Err(EmberdBenchError::Interrupted);
        }
        let t = Instant::now();
        let r = if keep_alive {
            if conn.as_ref().is_none_or(Conn::is_closed) {
                conn = Some(
                    Conn::connect(sock)
                        .map_err(|err| EmberdBenchError::Http { what: what(), err })?,
                );
            }
            match conn.as_mut() {
                Some(c) => c.request("GET", path, &[], None, true, REQUEST_TIMEOUT),
                None => Err(HttpError::Truncated),
            }
        } else {
            http::once(sock, "GET", path, &[], None, REQUEST_TIMEOUT)
        }
        .map_err(|err| EmberdBenchError::Http { what: what(), err })?;
        samples.push(t.elapsed());
        if r.status != 200 {
            return Err(EmberdBenchError::Status {
                what: what(),
                status: r.status,
                body: r.text(),
            });
        }
    }
    Ok(RequestLoop {
        wall: t0.elapsed(),
        samples,
    })
}

/// A tar.gz holding `main.c` (made with `tar`, as users do).
fn c_tarball(dir: &Path, name: &str, source: &str) -> Result<Vec<u8>> {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).map_err(io_err(format!("create {}", src.display())))?;
    std::fs::write(src.join("main.c"), source).map_err(io_err("write main.c"))?;
    let out = dir.join(format!("{name}.tar.gz"));
    let st = Command::new("tar")
        .arg("czf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg("main.c")
        .status()
        .map_err(io_err("run tar"))?;
    if !st.success() {
        return Err(EmberdBenchError::BadRun {
            what: "tar czf".into(),
            detail: st.to_string(),
        });
    }
    std::fs::read(&out).map_err(io_err(format!("read {}", out.display())))
}

/// emberd's pod flags (none when the pod phase is skipped).
pub fn pod_flags(cfg: &EmberdBenchConfig) -> Vec<String> {
    if cfg.pod_runs == 0 {
        return Vec::new();
    }
    vec![
        "--pod-kernel".into(),
        cfg.pod_kernel.to_string_lossy().into_owned(),
        "--pod-boot-args".into(),
        cfg.pod_boot_args.clone(),
        "--pod-agent".into(),
        cfg.pod_agent.to_string_lossy().into_owned(),
        "--pod-rootfs-mb".into(),
        cfg.pod_rootfs_mb.to_string(),
        // The test guest's containers end on the first SIGTERM; the bound
        // only matters if one does not.
        "--pod-stop-timeout".into(),
        "1".into(),
    ]
}

/// Starts emberd and waits until its socket answers.
fn start_emberd(g: &mut Guard, cfg: &EmberdBenchConfig) -> Result<()> {
    let log = std::fs::File::create(g.emberd_log()).map_err(io_err("create emberd.log"))?;
    let log2 = log.try_clone().map_err(io_err("dup emberd.log"))?;
    let child = Command::new(&cfg.emberd)
        .arg("--socket")
        .arg(g.sock())
        .arg("--state-dir")
        .arg(g.state_dir())
        .arg("--chroot-base-dir")
        .arg(g.jail_base())
        // The pod phase imports an OCI layout it writes under the root;
        // emberd reads host paths only from its import directory.
        .arg("--import-dir")
        .arg(g.root())
        .arg("--vmm")
        .arg(&cfg.vmm)
        .arg("--jailer")
        .arg(&cfg.jailer)
        .args(["--uid", &cfg.uid.to_string(), "--gid", &cfg.gid.to_string()])
        .args(pod_flags(cfg))
        .args(if cfg.warm_runs > 0 {
            &["--snapshot-starts"][..]
        } else {
            &[]
        })
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| EmberdBenchError::Spawn(cfg.emberd.clone(), e))?;
    g.set_emberd(child);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(c) = g.emberd_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(EmberdBenchError::EmberdDied(st.to_string()));
            }
        }
        if std::os::unix::net::UnixStream::connect(g.sock()).is_ok() {
            return Ok(());
        }
        if interrupted() {
            return Err(EmberdBenchError::Interrupted);
        }
        if Instant::now() > deadline {
            return Err(EmberdBenchError::NoSocket(g.sock(), START_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The kernel command line emberd gives an instance with no env, mounts or
/// per-run args: the image's boot args, then `-- args` if it has any.
pub fn instance_cmdline(boot_args: &str, args: &str) -> String {
    let mut parts = Vec::new();
    if !boot_args.trim().is_empty() {
        parts.push(boot_args.trim().to_string());
    }
    if !args.trim().is_empty() {
        parts.push("--".into());
        parts.push(args.trim().to_string());
    }
    parts.join(" ")
}

/// The image's kernel path and the instance command line, from emberd's
/// state file.
fn image_boot(g: &Guard, image_id: &str) -> Result<(PathBuf, String)> {
    let path = g.state_dir().join("state.json");
    let text =
        std::fs::read_to_string(&path).map_err(io_err(format!("read {}", path.display())))?;
    let v: Value = serde_json::from_str(&text).unwrap_or_default();
    let img = &v["images"][image_id];
    let kernel = img["kernel"].as_str().unwrap_or_default();
    if kernel.is_empty() || kernel.contains('/') {
        return Err(EmberdBenchError::Unexpected {
            what: format!("image {image_id} in {}", path.display()),
            detail: format!("kernel {kernel:?}"),
        });
    }
    let cmdline = instance_cmdline(
        img["boot_args"].as_str().unwrap_or_default(),
        img["args"].as_str().unwrap_or_default(),
    );
    Ok((
        g.state_dir().join("images").join(image_id).join(kernel),
        cmdline,
    ))
}

/// ember-vmm's config for one run of the image.
pub fn vmm_config(kernel: &str, cmdline: &str, memory_mb: u64) -> Value {
    json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": cmdline},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": memory_mb},
    })
}

/// Checks a finished direct run: exit 0 and the exit line.
fn check_run(what: &str, r: &vmrun::VmRun) -> Result<()> {
    if r.status.success() && r.line(EXIT_LINE).is_some() {
        Ok(())
    } else {
        Err(EmberdBenchError::BadRun {
            what: what.into(),
            detail: r.transcript(),
        })
    }
}

/// One bare VMM run.
fn vmm_once(cfg: &EmberdBenchConfig, config: &Path) -> Result<Duration> {
    let mut cmd = Command::new(&cfg.vmm);
    cmd.arg("--no-api").arg("--config-file").arg(config);
    let t0 = Instant::now();
    let r = vmrun::run("ember-vmm", cmd, RUN_TIMEOUT)?;
    let t = t0.elapsed();
    check_run("ember-vmm --no-api", &r)?;
    Ok(t)
}

/// What a direct jailer run needs.
struct JailerSetup {
    base: PathBuf,
    kernel: PathBuf,
    libs: Vec<PathBuf>,
    config: String,
}

/// The shared libraries (and loader) `bin` needs, from `ldd` (the jail has
/// no /lib, so emberd places them in each jail; so does the benchmark).
fn shared_libraries(bin: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(bin).output() else {
        return Vec::new();
    };
    let mut libs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let p = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// One jailer run the way emberd launches an instance (jail directory with
/// the kernel, the VMM's libraries and the config, `ember-jailer ... --
/// --api-sock /run/api.sock --config-file /vm.json --id ID`), minus
/// emberd's detaching; the jail is removed afterwards. All of it is timed.
fn jailer_once(
    cfg: &EmberdBenchConfig,
    s: &JailerSetup,
    g: &mut Guard,
    id: &str,
) -> Result<Duration> {
    g.track(id);
    let t0 = Instant::now();
    let exec_name = cfg
        .vmm
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| "ember-vmm".into());
    let jail = s.base.join(exec_name).join(id);
    let root = jail.join("root");
    let result = (|| {
        std::fs::create_dir_all(&root).map_err(io_err(format!("create {}", root.display())))?;
        // emberd's installed kernels are root's (0600): like emberd, give
        // the jail a read-only copy the VMM's user can read (a hard link
        // would share, and so change, the original's owner and mode).
        let k = root.join("kernel");
        std::fs::copy(&s.kernel, &k).map_err(io_err("place the kernel"))?;
        std::os::unix::fs::chown(&k, Some(cfg.uid), Some(cfg.gid))
            .map_err(io_err("give the kernel to the VMM's user"))?;
        std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .map_err(io_err("make the kernel read-only"))?;
        for lib in &s.libs {
            let dst = root.join(lib.strip_prefix("/").unwrap_or(lib));
            if let Some(d) = dst.parent() {
                std::fs::create_dir_all(d).map_err(io_err(format!("create {}", d.display())))?;
            }
            let real =
                std::fs::canonicalize(lib).map_err(io_err(format!("resolve {}", lib.display())))?;
            if std::fs::hard_link(&real, &dst).is_err() {
                std::fs::copy(&real, &dst).map_err(io_err(format!("place {}", lib.display())))?;
            }
        }
        std::fs::write(root.join("vm.json"), &s.config).map_err(io_err("write vm.json"))?;
        let mut cmd = Command::new(&cfg.jailer);
        cmd.args(["--id", id])
            .arg("--exec-file")
            .arg(&cfg.vmm)
            .args(["--uid", &cfg.uid.to_string(), "--gid", &cfg.gid.to_string()])
            .arg("--chroot-base-dir")
            .arg(&s.base)
            .args([
                "--",
                "--api-sock",
                "/run/api.sock",
                "--config-file",
                "/vm.json",
                "--id",
                id,
            ]);
        let r = vmrun::run("ember-jailer", cmd, RUN_TIMEOUT)?;
        check_run("ember-jailer + ember-vmm", &r)
    })();
    let _ = std::fs::remove_dir_all(&jail);
    result?;
    Ok(t0.elapsed())
}

/// Runs the whole benchmark; `progress` gets a line per phase.
pub fn run(cfg: &EmberdBenchConfig, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let pod_files = [&cfg.pod_kernel, &cfg.pod_agent];
    let pod_files = if cfg.pod_runs > 0 {
        &pod_files[..]
    } else {
        &[]
    };
    for p in [&cfg.emberd, &cfg.vmm, &cfg.jailer].iter().chain(pod_files) {
        if !p.is_file() {
            return Err(EmberdBenchError::Missing(p.to_path_buf()));
        }
    }
    let root = std::env::temp_dir().join(format!("ember-emberd-bench-{}", std::process::id()));
    let mut g = Guard::new(root)?;
    let r = run_in(cfg, &mut g, progress);
    match r {
        Ok(mut report) => {
            report.leftovers = g.kill_all();
            report.pods_removed = g.removed().to_vec();
            Ok(report)
        }
        Err(err) => {
            let log = std::fs::read_to_string(g.emberd_log()).unwrap_or_default();
            let tail: String = {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            };
            Err(EmberdBenchError::WithLog {
                err: Box::new(err),
                log: tail,
            })
        }
    }
}

fn run_in(
    cfg: &EmberdBenchConfig,
    g: &mut Guard,
    progress: &mut dyn FnMut(&str),
) -> Result<Report> {
    let mut report = Report {
        burst_size: cfg.burst,
        api_path: cfg.api_path.clone(),
        ..Default::default()
    };
    start_emberd(g, cfg)?;
    progress(&format!("emberd up on {}", g.sock().display()));
    let mut c = Client::new(&g.sock());

    // The image.
    let (image_id, mem, took) = c.create_image(g.root(), IMAGE, HELLO_C)?;
    report.build = Some(took);
    report.memory_mb = mem;
    let (kernel, cmdline) = image_boot(g, &image_id)?;
    report.cmdline = cmdline.clone();
    progress(&format!(
        "image {IMAGE} ({image_id}) built in {:.0} ms: {}, cmdline {cmdline:?}, {mem} MiB",
        took.as_secs_f64() * 1e3,
        kernel.display()
    ));

    // Direct runs: the same kernel, command line and memory.
    let vmm_cfg_path = g.root().join("vmm-only.json");
    let vmm_cfg = vmm_config(&kernel.to_string_lossy(), &cmdline, mem).to_string();
    std::fs::write(&vmm_cfg_path, &vmm_cfg).map_err(io_err("write vmm-only.json"))?;
    let jailer = cfg.with_jailer.then(|| JailerSetup {
        base: g.root().join("jail-direct"),
        kernel: kernel.clone(),
        libs: shared_libraries(&cfg.vmm),
        config: vmm_config("/kernel", &cmdline, mem).to_string(),
    });

    // The pods' container image, imported once.
    if cfg.pod_runs > 0 {
        let layout = pods::write_oci_layout(g.root(), pods::POD_IMAGE_REF)?;
        let took = c.import_image(&layout)?;
        report.pod_import = Some(took);
        progress(&format!(
            "container image {} imported in {:.0} ms from {}",
            pods::POD_IMAGE_REF,
            took.as_secs_f64() * 1e3,
            layout.display()
        ));
    }

    // Warm-up (page cache, binaries, the pod VM image): one of each, not
    // recorded.
    api_start(&mut c, g, "warmup", cfg, mem)?;
    if let Some(s) = &jailer {
        jailer_once(cfg, s, g, "emberd-bench-jail-warmup")?;
    }
    vmm_once(cfg, &vmm_cfg_path)?;
    if cfg.pod_runs > 0 {
        let first = pods::pod_round(&mut c, g, pods::POD_IMAGE_REF)?;
        report.pod_first_start = Some(first.start);
        pods::vm_round(&mut c, g)?;
    }
    progress("warm-up done");

    // Round i: an API start, a jailer run and a bare VMM run (i <= runs),
    // then a pod round trip and an idle VM (i <= pod_runs).
    let rounds = cfg.runs.max(cfg.pod_runs);
    for i in 1..=rounds {
        if interrupted() {
            return Err(EmberdBenchError::Interrupted);
        }
        if i <= cfg.runs {
            report
                .api
                .push(api_start(&mut c, g, &format!("seq-{i}"), cfg, mem)?);
            if let Some(s) = &jailer {
                report
                    .jailer
                    .push(jailer_once(cfg, s, g, &format!("emberd-bench-jail-{i}"))?);
            }
            report.vmm.push(vmm_once(cfg, &vmm_cfg_path)?);
        }
        if i <= cfg.pod_runs {
            report
                .pods
                .push(pods::pod_round(&mut c, g, pods::POD_IMAGE_REF)?);
            report.vms.push(pods::vm_round(&mut c, g)?);
        }
    }
    progress(&format!(
        "{rounds} interleaved rounds done ({} API / jailer / VMM, {} pod / VM)",
        cfg.runs, cfg.pod_runs
    ));

    if cfg.warm_runs > 0 {
        match warm::prepare(&mut c, g, cfg)? {
            Ok(warm_mem) => {
                for i in 1..=cfg.warm_runs {
                    if interrupted() {
                        return Err(EmberdBenchError::Interrupted);
                    }
                    let (cold, w) = warm::round(&mut c, g, i, cfg, mem, warm_mem)?;
                    report.cold_first.push(cold);
                    report.warm.push(w);
                }
                progress(&format!(
                    "{} rounds of a cold and a snapshot start done",
                    cfg.warm_runs
                ));
            }
            Err(why) => {
                progress(&format!("no snapshot starts: {why}"));
                report.warm_note = Some(why);
            }
        }
    }

    if cfg.burst > 0 {
        for round in 1..=cfg.burst_rounds {
            report.bursts.push(burst(&mut c, g, round, cfg, mem)?);
        }
        progress(&format!(
            "{} bursts of {} done",
            cfg.burst_rounds, cfg.burst
        ));
    }

    if cfg.idle_runs > 0 {
        let (_, idle_mem, _) = c.create_image(g.root(), IDLE_IMAGE, IDLE_C)?;
        idle_start(&mut c, g, "idle-warmup", cfg, idle_mem)?;
        for i in 1..=cfg.idle_runs {
            report
                .idle
                .push(idle_start(&mut c, g, &format!("idle-{i}"), cfg, idle_mem)?);
        }
        progress(&format!(
            "{} starts of a long-running guest done",
            cfg.idle_runs
        ));
    }

    if cfg.requests > 0 {
        report.keep_alive = Some(request_loop(&g.sock(), &cfg.api_path, cfg.requests, true)?);
        report.fresh = Some(request_loop(&g.sock(), &cfg.api_path, cfg.requests, false)?);
        progress(&format!("2 x {} GET {} done", cfg.requests, cfg.api_path));
    }

    // Everything was deleted: emberd should list no instance (pod VMs are
    // instances too), pod, VM or volume (container root disks).
    // hyperd answers its lists with 201, as hyperd 1.1.0 does.
    for (path, key, status) in [
        ("/instances", "", 200),
        ("/list?item=pod", "podData", 201),
        ("/list?item=vm", "vmData", 201),
        ("/volumes", "", 200),
    ] {
        let v = c.expect("GET", path, None, status)?.json();
        let list = if key.is_empty() { &v } else { &v[key] };
        if list.as_array().is_none_or(|a| !a.is_empty()) {
            return Err(EmberdBenchError::Unexpected {
                what: format!("GET {path} after the benchmark"),
                detail: v.to_string(),
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_like_emberd() {
        assert_eq!(instance_cmdline(" console=ttyS0 ", ""), "console=ttyS0");
        assert_eq!(
            instance_cmdline("console=ttyS0", "a b"),
            "console=ttyS0 -- a b"
        );
        assert_eq!(instance_cmdline("", " x "), "-- x");
    }

    #[test]
    fn vmm_config_shape() {
        let v = vmm_config("/k", "console=ttyS0", 32);
        assert_eq!(v["boot-source"]["kernel_image_path"], "/k");
        assert_eq!(v["boot-source"]["boot_args"], "console=ttyS0");
        assert_eq!(v["machine-config"]["mem_size_mib"], 32);
        assert_eq!(v["machine-config"]["vcpu_count"], 1);
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[test]
    fn report_rates_and_ratios() {
        let a = |t| ApiStart {
            post: ms(10),
            stopped: ms(40),
            delete: ms(5),
            total: ms(t),
        };
        let r = Report {
            api: vec![a(100), a(100)],
            idle: vec![a(400)],
            bursts: vec![Burst {
                wall: ms(250),
                posts: ms(50),
            }],
            burst_size: 5,
            jailer: vec![ms(50), ms(50)],
            vmm: vec![ms(25), ms(25)],
            api_path: "/instances".into(),
            keep_alive: Some(RequestLoop {
                wall: ms(100),
                samples: vec![ms(1); 100],
            }),
            fresh: Some(RequestLoop {
                wall: ms(200),
                samples: vec![ms(2); 100],
            }),
            ..Default::default()
        };
        assert_eq!(r.api_rate(), Some(10.0));
        assert_eq!(r.burst_rate(), Some(20.0));
        assert_eq!(r.jailer_rate(), Some(20.0));
        assert_eq!(r.vmm_rate(), Some(40.0));
        let text = r.render();
        assert!(
            text.contains("API sequential / VMM-only    0.250"),
            "{text}"
        );
        assert!(
            text.contains("API burst / VMM-only         0.500"),
            "{text}"
        );
        assert!(
            text.contains("API sequential / jailer+VMM  0.500"),
            "{text}"
        );
        assert!(
            text.contains("jailer+VMM / VMM-only        0.500"),
            "{text}"
        );
        assert!(
            text.contains("requests keep-alive / new connection  2.000"),
            "{text}"
        );
        assert!(text.contains("GET /instances (keep-alive)"), "{text}");
        assert!(text.contains("cleanup: no VMM left behind"), "{text}");
        assert!(
            text.contains("API start, guest stays up: run, up, del        1       2.50"),
            "{text}"
        );
    }

    #[test]
    fn pod_rows_and_ratios() {
        let a = ApiStart {
            post: ms(10),
            stopped: ms(40),
            delete: ms(5),
            total: ms(100),
        };
        let p = |start| pods::PodRound {
            create: ms(1),
            start: ms(start),
            stop: ms(50),
            delete: ms(2),
            total: ms(start + 60),
        };
        let r = Report {
            api: vec![a; 3],
            vmm: vec![ms(25); 3],
            pods: vec![p(100), p(140), p(400)],
            vms: vec![pods::VmRound {
                create: ms(200),
                delete: ms(10),
                total: ms(215),
            }],
            ..Default::default()
        };
        let text = r.render();
        assert!(
            text.contains(&format!(
                "{:<40} {:>7} {:10.2}",
                "pod: create, start, stop VM, delete",
                3,
                3.0 / 0.82
            )),
            "{text}"
        );
        assert!(
            text.contains("  pod round trip   / API start    2.000   / VMM-only    8.000"),
            "{text}"
        );
        assert!(
            text.contains("  pod start        / API start    1.400   / VMM-only    5.600"),
            "{text}"
        );
        assert!(
            text.contains("  VM create        / API start    2.000   / VMM-only    8.000"),
            "{text}"
        );
        assert!(text.contains("  DELETE /vm answered"), "{text}");
        assert!(!text.contains("removed leftover pods"), "{text}");
        assert!(!Report::default().render().contains("pod"));
    }

    #[test]
    fn pod_flags_only_with_pod_runs() {
        let mut cfg = EmberdBenchConfig {
            runs: 1,
            burst: 0,
            burst_rounds: 0,
            requests: 0,
            api_path: "/instances".into(),
            emberd: "e".into(),
            vmm: "v".into(),
            jailer: "j".into(),
            uid: 1,
            gid: 1,
            poll: ms(2),
            with_jailer: false,
            idle_runs: 0,
            pod_runs: 0,
            pod_kernel: "/k.elf".into(),
            pod_boot_args: "ember.test=pod-agent".into(),
            pod_agent: "/a".into(),
            pod_rootfs_mb: 16,
            warm_runs: 0,
        };
        assert!(pod_flags(&cfg).is_empty());
        cfg.pod_runs = 2;
        assert_eq!(
            pod_flags(&cfg).join(" "),
            "--pod-kernel /k.elf --pod-boot-args ember.test=pod-agent --pod-agent /a \
             --pod-rootfs-mb 16 --pod-stop-timeout 1"
        );
    }

    #[test]
    fn empty_report_renders_dashes() {
        let text = Report::default().render();
        assert!(text.contains("API sequential / VMM-only    -"), "{text}");
        assert!(!text.contains("jailer+VMM"), "{text}");
    }

    #[test]
    fn missing_binaries_are_reported_before_anything_starts() {
        let cfg = EmberdBenchConfig {
            runs: 1,
            burst: 1,
            burst_rounds: 1,
            requests: 1,
            api_path: "/instances".into(),
            emberd: "/nonexistent/emberd".into(),
            vmm: "/nonexistent/ember-vmm".into(),
            jailer: "/nonexistent/ember-jailer".into(),
            uid: 10502,
            gid: 10502,
            poll: ms(2),
            with_jailer: true,
            idle_runs: 1,
            pod_runs: 1,
            pod_kernel: "/nonexistent/pvh.elf".into(),
            pod_boot_args: "ember.test=pod-agent".into(),
            pod_agent: "/nonexistent/ember-agent".into(),
            pod_rootfs_mb: 16,
            warm_runs: 0,
        };
        let e = run(&cfg, &mut |_| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/emberd not found"), "{e}");
    }
}
