//! Firecracker-shaped metrics: one JSON object per line, appended to the
//! file or named pipe given by `PUT /metrics` (or `--metrics-path`).
//!
//! A line is written when `InstanceStart` succeeds, then every 60 seconds
//! (a timerfd on the VMM thread's event loop), and on each `FlushMetrics`.
//! As in Firecracker, counters are deltas: each line holds what happened
//! since the previous line, and the counter restarts at zero.
//!
//! What ember counts today, under Firecracker's names:
//! - every API request by resource and method (`get_api_requests`,
//!   `put_api_requests`, `patch_api_requests`, each with `<resource>_count`
//!   and, for PUT/PATCH, `<resource>_fails`);
//! - virtio-blk and virtio-net devices ([`devices::virtio::metrics`]), per
//!   device (`block_<drive_id>`, `net_<iface_id>`) and summed (`block`,
//!   `net`): requests, bytes, frames, failures, rate-limiter holds;
//! - the entropy device (`entropy`: `entropy_bytes`, `host_rng_fails`);
//! - serial output bytes dropped by `PUT /serial`'s rate limiter
//!   (`uart.rate_limiter_dropped_bytes`);
//! - the process start-up time derived from `--start-time-us` and
//!   `--start-time-cpu-us` (`api_server`).
//!
//! Not counted yet, and absent rather than reported as zero: vsock, i8042,
//! the rest of uart, vCPU exits, seccomp and signals.
//!
//! The file is opened like the log file ([`crate::logger::open_nonblocking`]):
//! a reader that stalls makes ember drop lines, never wait.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{json, Map, Value};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use devices::virtio::metrics::{BlockMetrics, Counter, NetMetrics};
use devices::virtio::rng::Rng;

use crate::actions::VmmAction;
use crate::config::metrics::MetricsConfig;

/// Seconds between periodic lines (Firecracker's interval).
pub const METRICS_PERIOD_S: u64 = 60;

/// Errors configuring or writing metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Metrics were already configured (Firecracker allows it once).
    #[error("Reinitialization of metrics not allowed.")]
    AlreadyInitialized,
    /// The file or FIFO cannot be opened.
    #[error("Cannot initialize the metrics system due to an error opening {path}: {err}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// A line could not be written.
    #[error("Failed to write metrics: {0}")]
    Write(std::io::Error),
    /// The periodic timer could not be set up.
    #[error("Cannot start the periodic metrics timer: {0}")]
    Timer(vmm_sys_util::errno::Error),
}

/// The counters and, once configured, where they go.
#[derive(Debug, Default)]
pub struct Metrics {
    out: Option<(File, MetricsConfig)>,
    instance_id: String,
    counters: BTreeMap<&'static str, BTreeMap<String, u64>>,
    gauges: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    blocks: Vec<(String, Arc<BlockMetrics>)>,
    nets: Vec<(String, Arc<NetMetrics>)>,
    uart_dropped: Option<Arc<Counter>>,
    /// The entropy device and its totals at the previous line.
    entropy: Option<(Arc<Mutex<Rng>>, u64, u64)>,
}

/// Adds one device's taken counters as `<group>_<id>` and into the
/// `<group>` sum, as Firecracker reports per-device and aggregate groups.
fn add_device(m: &mut Map<String, Value>, group: &str, id: &str, taken: Vec<(&str, u64)>) {
    let mut own = Map::new();
    for (k, v) in &taken {
        own.insert(k.to_string(), json!(v));
    }
    m.insert(format!("{group}_{id}"), Value::Object(own));
    let sum = m
        .entry(group.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(o) = sum {
        for (k, v) in taken {
            let cur = o.get(k).and_then(Value::as_u64).unwrap_or(0);
            o.insert(k.to_string(), json!(cur + v));
        }
    }
}

/// The metrics group and name prefix an API action is counted under.
pub fn api_counter(a: &VmmAction) -> (&'static str, &'static str) {
    use VmmAction::*;
    const G: &str = "get_api_requests";
    const P: &str = "put_api_requests";
    const PA: &str = "patch_api_requests";
    match a {
        GetInstanceInfo => (G, "instance_info"),
        GetVersion => (G, "vmm_version"),
        GetVmConfig => (G, "vm_config"),
        GetMachineConfig => (G, "machine_cfg"),
        GetMmds => (G, "mmds"),
        GetBalloon => (G, "balloon_cfg"),
        GetBalloonStats => (G, "balloon_stats"),
        GetBalloonHinting => (G, "hinting_status"),
        GetMemoryHotplug => (G, "hotplug_memory"),
        PutBootSource(_) => (P, "boot_source"),
        PutMachineConfig(_) => (P, "machine_cfg"),
        PutCpuConfig(_) => (P, "cpu_cfg"),
        PutDrive(..) => (P, "drive"),
        PutNetworkInterface(..) => (P, "network"),
        PutVsock(_) => (P, "vsock"),
        ConfigureLogger(_) => (P, "logger"),
        ConfigureMetrics(_) => (P, "metrics"),
        ConfigureSerial(_) => (P, "serial"),
        PutMmds(_) | ConfigureMmds(_) => (P, "mmds"),
        PutEntropy(_) => (P, "entropy"),
        PutBalloon(_) => (P, "balloon"),
        PutPmem(..) => (P, "pmem"),
        PutMemoryHotplug(_) => (P, "hotplug_memory"),
        CreateSnapshot(_) => (P, "snapshot_create"),
        LoadSnapshot(_) => (P, "snapshot_load"),
        InstanceStart | SendCtrlAltDel | FlushMetrics => (P, "actions"),
        PatchMachineConfig(_) => (PA, "machine_cfg"),
        PatchDrive(..) => (PA, "drive"),
        PatchNetworkInterface(..) => (PA, "network"),
        PatchMmds(_) => (PA, "mmds"),
        PatchBalloon(_) => (PA, "balloon"),
        PatchBalloonStats(_) => (PA, "balloon_stats"),
        StartBalloonHinting(_) | StopBalloonHinting => (PA, "hinting"),
        PatchPmem(..) => (PA, "pmem"),
        PatchMemoryHotplug(_) => (PA, "hotplug_memory"),
        Pause | Resume => (PA, "vm"),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Metrics {
    /// Counters only; nothing is written until [`Metrics::configure`].
    pub fn new(instance_id: &str) -> Self {
        Metrics {
            instance_id: instance_id.to_string(),
            ..Default::default()
        }
    }

    /// Counts one API request and whether it failed.
    pub fn count_api(&mut self, a: &VmmAction, ok: bool) {
        let key = api_counter(a);
        self.count_request(key);
        if !ok {
            self.count_failure(key);
        }
    }

    /// Counts a request under `key` (from [`api_counter`]) as it arrives,
    /// as Firecracker's parsers do, so a line written while handling it
    /// (InstanceStart's) includes it.
    pub fn count_request(&mut self, key: (&'static str, &'static str)) {
        let (group, name) = key;
        let g = self.counters.entry(group).or_default();
        *g.entry(format!("{name}_count")).or_default() += 1;
        if group != "get_api_requests" {
            g.entry(format!("{name}_fails")).or_default();
        }
    }

    /// Counts a failed request under `key`.
    pub fn count_failure(&mut self, key: (&'static str, &'static str)) {
        let (group, name) = key;
        if group != "get_api_requests" {
            *self
                .counters
                .entry(group)
                .or_default()
                .entry(format!("{name}_fails"))
                .or_default() += 1;
        }
    }

    /// The counter of serial output bytes dropped by `PUT /serial`'s
    /// rate limiter (`uart.rate_limiter_dropped_bytes`).
    pub fn uart_dropped(&mut self) -> Arc<Counter> {
        self.uart_dropped.get_or_insert_with(Arc::default).clone()
    }

    /// Reports the entropy device's counters from now on (its totals are
    /// turned into deltas here).
    pub fn set_entropy(&mut self, rng: Arc<Mutex<Rng>>) {
        self.entropy = Some((rng, 0, 0));
    }

    /// Reports a virtio-blk device's counters from now on.
    pub fn add_block(&mut self, id: &str, m: Arc<BlockMetrics>) {
        self.blocks.push((id.to_string(), m));
    }

    /// Reports a virtio-net device's counters from now on.
    pub fn add_net(&mut self, id: &str, m: Arc<NetMetrics>) {
        self.nets.push((id.to_string(), m));
    }

    /// Records a value that is reported on every line (not a delta).
    pub fn set_gauge(&mut self, group: &'static str, name: &'static str, v: u64) {
        self.gauges.entry(group).or_default().insert(name, v);
    }

    /// Whether a destination is set.
    pub fn configured(&self) -> bool {
        self.out.is_some()
    }

    /// Opens the destination (once).
    pub fn configure(&mut self, cfg: &MetricsConfig) -> Result<(), MetricsError> {
        if self.out.is_some() {
            return Err(MetricsError::AlreadyInitialized);
        }
        let f = crate::logger::open_nonblocking(&cfg.metrics_path).map_err(|err| {
            MetricsError::Open {
                path: cfg.metrics_path.clone(),
                err,
            }
        })?;
        self.out = Some((f, cfg.clone()));
        Ok(())
    }

    /// The next line's JSON, resetting the counters.
    pub fn snapshot(&mut self) -> Value {
        let mut m = Map::new();
        m.insert("utc_timestamp_ms".into(), json!(now_ms()));
        for (g, c) in std::mem::take(&mut self.counters) {
            let fields: Map<String, Value> = c.into_iter().map(|(k, v)| (k, json!(v))).collect();
            m.insert(g.into(), Value::Object(fields));
        }
        for (id, b) in &self.blocks {
            add_device(&mut m, "block", id, b.take());
        }
        if let Some((rng, bytes, fails)) = &mut self.entropy {
            let (b, f) = {
                let r = rng.lock().expect("rng poisoned");
                (r.bytes_served, r.failures)
            };
            m.insert(
                "entropy".into(),
                json!({
                    "entropy_bytes": b.saturating_sub(*bytes),
                    "host_rng_fails": f.saturating_sub(*fails),
                }),
            );
            *bytes = b;
            *fails = f;
        }
        if let Some(d) = &self.uart_dropped {
            m.insert(
                "uart".into(),
                json!({ "rate_limiter_dropped_bytes": d.take() }),
            );
        }
        for (id, n) in &self.nets {
            add_device(&mut m, "net", id, n.take());
        }
        for (g, c) in &self.gauges {
            let e = m
                .entry(g.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(o) = e {
                for (k, v) in c {
                    o.insert(k.to_string(), json!(v));
                }
            }
        }
        if let Some((_, cfg)) = &self.out {
            if cfg.emit_id {
                m.insert("id".into(), json!(self.instance_id));
            }
            if !cfg.properties.is_empty() {
                m.insert("properties".into(), json!(cfg.properties));
            }
        }
        Value::Object(m)
    }

    /// Writes one line if configured; `Ok(false)` when not configured.
    pub fn write(&mut self) -> Result<bool, MetricsError> {
        if self.out.is_none() {
            return Ok(false);
        }
        let mut line = self.snapshot().to_string();
        line.push('\n');
        let (f, _) = self.out.as_mut().expect("checked above");
        match f.write(line.as_bytes()) {
            Ok(_) => Ok(true),
            // A full pipe: the line is dropped, never waited for.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(MetricsError::Write(e)),
        }
    }
}

/// Writes a metrics line every [`METRICS_PERIOD_S`] seconds from the VMM
/// thread's event loop.
pub struct PeriodicMetrics {
    timer: TimerFd,
    metrics: Arc<Mutex<Metrics>>,
}

impl PeriodicMetrics {
    /// Arms the timer.
    pub fn new(metrics: Arc<Mutex<Metrics>>) -> Result<Self, MetricsError> {
        let mut timer = TimerFd::new().map_err(MetricsError::Timer)?;
        let period = std::time::Duration::from_secs(METRICS_PERIOD_S);
        timer
            .reset(period, Some(period))
            .map_err(MetricsError::Timer)?;
        Ok(PeriodicMetrics { timer, metrics })
    }
}

impl MutEventSubscriber for PeriodicMetrics {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        if let Err(e) = self.metrics.lock().expect("metrics poisoned").write() {
            log::warn!("metrics: {e}");
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("metrics: cannot watch the timer: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_deltas_under_firecracker_names() {
        let mut m = Metrics::new("vm1");
        m.count_api(&VmmAction::InstanceStart, true);
        m.count_api(&VmmAction::FlushMetrics, false);
        m.count_api(&VmmAction::GetInstanceInfo, true);
        m.set_gauge("api_server", "process_startup_time_us", 7);
        let s = m.snapshot();
        assert_eq!(s["put_api_requests"]["actions_count"], 2);
        assert_eq!(s["put_api_requests"]["actions_fails"], 1);
        assert_eq!(s["get_api_requests"]["instance_info_count"], 1);
        assert_eq!(s["api_server"]["process_startup_time_us"], 7);
        assert!(s["utc_timestamp_ms"].as_u64().unwrap() > 0);
        let b = Arc::new(BlockMetrics::default());
        m.add_block("rootfs", b.clone());
        m.add_block("data", Arc::new(BlockMetrics::default()));
        b.read_count.add(3);
        let again = m.snapshot();
        assert!(again.get("put_api_requests").is_none());
        assert_eq!(again["block_rootfs"]["read_count"], 3);
        assert_eq!(again["block_data"]["read_count"], 0);
        assert_eq!(again["block"]["read_count"], 3);
        assert_eq!(again["api_server"]["process_startup_time_us"], 7);
    }

    #[test]
    fn writes_lines_to_the_configured_file() {
        let p = std::env::temp_dir().join(format!("ember-metrics-{}", std::process::id()));
        std::fs::write(&p, b"").unwrap();
        let mut m = Metrics::new("vm1");
        assert!(!m.write().unwrap());
        let mut cfg = MetricsConfig {
            metrics_path: p.to_string_lossy().into(),
            emit_id: true,
            ..Default::default()
        };
        cfg.properties.insert("team".into(), "a".into());
        m.configure(&cfg).unwrap();
        assert!(matches!(
            m.configure(&cfg),
            Err(MetricsError::AlreadyInitialized)
        ));
        m.count_api(&VmmAction::GetVersion, true);
        assert!(m.write().unwrap());
        assert!(m.write().unwrap());
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["get_api_requests"]["vmm_version_count"], 1);
        assert_eq!(lines[0]["id"], "vm1");
        assert_eq!(lines[0]["properties"]["team"], "a");
        std::fs::remove_file(p).unwrap();
    }
}
