//! The virtio throughput benchmark: block and network throughput of the
//! ember test guest under ember-vmm, next to the host's raw file / TAP
//! throughput measured in the same run, interleaved round by round.
//!
//! - **blk**: the guest's `bench-blk` mode reads 1 MiB as 256 x 4 KiB from a
//!   2 MiB temp file (a drive) and then prints `bench blk bytes 1048576`; it
//!   prints nothing before the transfer. So the transfer time is the
//!   difference of medians of two boots with the same drive: spawn to `bench
//!   blk bytes` (bench-blk) minus spawn to `blk capacity` (`ember.test=blk`,
//!   whose first line comes right after the same virtio discovery and
//!   initialisation). The host does 256 `pread`s of 4 KiB of the same file at
//!   the same offsets. The page cache is warm in both cases.
//! - **net**: in a namespace of its own, with TAP `embtap0` at 10.0.0.1/24,
//!   the guest's `bench-net` mode ARPs and sends 256 UDP datagrams of 1024
//!   bytes to 10.0.0.1:9. A receiver socket there stamps each datagram with
//!   its kernel arrival time (SO_TIMESTAMPNS); throughput is payload bytes /
//!   (last - first arrival). The host baseline writes the same 256 frames
//!   into the same TAP (after the VMM exited) and is measured by the same
//!   receiver.
//!
//! Nothing here asserts on time.

pub mod frame;
pub mod netns;
pub mod vmrun;

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::lifecycle::json_string;
use crate::stats::median;
use netns::{NetError, NetNs, RecvStats};
use vmrun::{VmRun, VmRunError};

/// One VMM run that has not finished in this time is killed (an error).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Size of the drive's backing file.
pub const BLK_FILE_BYTES: usize = 2 << 20;
/// Size of one guest / host read.
pub const BLK_CHUNK: usize = 4096;
/// Reads per transfer (1 MiB in all, as the guest's `bench-blk`).
pub const BLK_READS: usize = 256;
/// Datagrams per transfer (as the guest's `bench-net`).
pub const NET_FRAMES: usize = 256;
/// UDP payload bytes per datagram.
pub const NET_PAYLOAD: usize = 1024;
/// The TAP inside the benchmark's namespace.
pub const TAP_NAME: &str = "embtap0";
/// The TAP's (host side) MAC and address.
pub const TAP_MAC: &str = "06:00:0a:00:00:01";
pub const HOST_IP: [u8; 4] = [10, 0, 0, 1];
/// The guest's MAC and address.
pub const GUEST_MAC: &str = "06:00:0a:00:00:02";
pub const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
/// UDP ports of the guest's `bench-net` datagrams.
pub const GUEST_PORT: u16 = 4000;
pub const DISCARD_PORT: u16 = 9;

const BLK_REF_LINE: &str = "ember-guest: blk capacity ";
const BLK_BENCH_LINE: &str = "ember-guest: bench blk bytes ";
const NET_BENCH_LINE: &str = "ember-guest: bench net bytes ";

/// Errors of the throughput benchmark.
#[derive(Debug, thiserror::Error)]
pub enum ThroughputError {
    #[error(transparent)]
    VmRun(#[from] VmRunError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{0}: {1}: {2}")]
    File(&'static str, PathBuf, #[source] io::Error),
    #[error("{what} run {run} went wrong: {why}\n{transcript}")]
    BadRun {
        what: &'static str,
        run: usize,
        why: String,
        transcript: String,
    },
    #[error("interrupted")]
    Interrupted,
}

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct ThroughputConfig {
    pub runs: usize,
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub mem_mib: u64,
    pub blk: bool,
    pub net: bool,
}

/// ember-vmm's JSON config: one vCPU, the test guest, optionally a drive and
/// a network interface (TAP name, guest MAC).
pub fn vmm_config_json(
    kernel: &Path,
    cmdline: &str,
    mem_mib: u64,
    drive: Option<&Path>,
    net: Option<(&str, &str)>,
) -> String {
    let mut s = format!(
        "{{\"boot-source\":{{\"kernel_image_path\":{},\"boot_args\":{}}},\
         \"machine-config\":{{\"vcpu_count\":1,\"mem_size_mib\":{mem_mib}}}",
        json_string(&kernel.to_string_lossy()),
        json_string(cmdline)
    );
    if let Some(d) = drive {
        s += &format!(
            ",\"drives\":[{{\"drive_id\":\"data0\",\"path_on_host\":{},\"is_root_device\":false}}]",
            json_string(&d.to_string_lossy())
        );
    }
    if let Some((tap, mac)) = net {
        s += &format!(
            ",\"network-interfaces\":[{{\"iface_id\":\"eth0\",\"host_dev_name\":{},\"guest_mac\":{}}}]",
            json_string(tap),
            json_string(mac)
        );
    }
    s.push('}');
    s
}

/// The drive's contents: byte i of the file is (i * 7 + i / 4096) & 0xff.
pub fn blk_pattern() -> Vec<u8> {
    (0..BLK_FILE_BYTES)
        .map(|i| (i.wrapping_mul(7).wrapping_add(i / BLK_CHUNK) & 0xff) as u8)
        .collect()
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn create(tag: &str) -> Result<Self, ThroughputError> {
        let p =
            std::env::temp_dir().join(format!("ember-{tag}-{}-{}", std::process::id(), nanos()));
        std::fs::create_dir_all(&p).map_err(|e| ThroughputError::File("mkdir", p.clone(), e))?;
        Ok(TempDir(p))
    }

    fn write(&self, name: &str, data: &[u8]) -> Result<PathBuf, ThroughputError> {
        let p = self.0.join(name);
        std::fs::write(&p, data).map_err(|e| ThroughputError::File("write", p.clone(), e))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn check_interrupt() -> Result<(), ThroughputError> {
    if vmrun::interrupted() {
        Err(ThroughputError::Interrupted)
    } else {
        Ok(())
    }
}

fn vmm_command(program: &Path, config: &Path) -> Command {
    let mut c = Command::new(program);
    c.arg("--no-api").arg("--config-file").arg(config);
    c
}

/// Runs one VMM and checks that it exited 0 after printing `line` (the
/// prefix of a line) and `ember-guest: done`.
fn expect_run(
    what: &'static str,
    run: usize,
    cmd: Command,
    line: &str,
) -> Result<VmRun, ThroughputError> {
    let r = vmrun::run(what, cmd, RUN_TIMEOUT).map_err(|e| match e {
        VmRunError::Interrupted => ThroughputError::Interrupted,
        e => e.into(),
    })?;
    let why = if !r.status.success() {
        Some("the VMM did not exit with status 0".to_string())
    } else if r.line(line).is_none() {
        Some(format!("no line starting with {line:?}"))
    } else if r.line(ember_guests::DONE_LINE).is_none() {
        Some(format!("no {:?}", ember_guests::DONE_LINE))
    } else {
        None
    };
    match why {
        Some(why) => Err(ThroughputError::BadRun {
            what,
            run,
            why,
            transcript: r.transcript(),
        }),
        None => Ok(r),
    }
}

/// The blk part: its files and samples.
struct Blk {
    _dir: TempDir,
    image: PathBuf,
    ref_config: PathBuf,
    bench_config: PathBuf,
    samples: BlkSamples,
}

/// Per-round times of the blk part.
#[derive(Debug, Clone, Default)]
pub struct BlkSamples {
    /// Spawn to `blk capacity` (`ember.test=blk`): boot + virtio init.
    pub vm_ref: Vec<Duration>,
    /// Spawn to `bench blk bytes` (`ember.test=bench-blk`): boot + virtio
    /// init + 1 MiB.
    pub vm_bench: Vec<Duration>,
    /// 256 x 4 KiB pread on the host.
    pub host: Vec<Duration>,
}

impl Blk {
    fn setup(cfg: &ThroughputConfig) -> Result<Self, ThroughputError> {
        let dir = TempDir::create("throughput-blk")?;
        let image = dir.write("disk.img", &blk_pattern())?;
        let ref_config = dir.write(
            "ref.json",
            vmm_config_json(
                &cfg.kernel,
                "ember.test=blk",
                cfg.mem_mib,
                Some(&image),
                None,
            )
            .as_bytes(),
        )?;
        let bench_config = dir.write(
            "bench.json",
            vmm_config_json(
                &cfg.kernel,
                "ember.test=bench-blk",
                cfg.mem_mib,
                Some(&image),
                None,
            )
            .as_bytes(),
        )?;
        Ok(Blk {
            _dir: dir,
            image,
            ref_config,
            bench_config,
            samples: BlkSamples::default(),
        })
    }

    fn round(
        &mut self,
        cfg: &ThroughputConfig,
        run: usize,
        record: bool,
    ) -> Result<(), ThroughputError> {
        check_interrupt()?;
        let r = expect_run(
            "blk reference (ember.test=blk)",
            run,
            vmm_command(&cfg.vmm, &self.ref_config),
            BLK_REF_LINE,
        )?;
        let t_ref = r.time_to(BLK_REF_LINE).unwrap_or_default();
        check_interrupt()?;
        let r = expect_run(
            "bench-blk",
            run,
            vmm_command(&cfg.vmm, &self.bench_config),
            BLK_BENCH_LINE,
        )?;
        let want = format!("{BLK_BENCH_LINE}{}", BLK_READS * BLK_CHUNK);
        if r.line(BLK_BENCH_LINE) != Some(want.as_str()) {
            return Err(ThroughputError::BadRun {
                what: "bench-blk",
                run,
                why: format!("expected {want:?}"),
                transcript: r.transcript(),
            });
        }
        let t_bench = r.time_to(BLK_BENCH_LINE).unwrap_or_default();
        check_interrupt()?;
        let t_host = host_preads(&self.image)?;
        if record {
            self.samples.vm_ref.push(t_ref);
            self.samples.vm_bench.push(t_bench);
            self.samples.host.push(t_host);
        }
        Ok(())
    }
}

/// 256 x 4 KiB `pread`s at the offsets the guest reads, timed.
fn host_preads(image: &Path) -> Result<Duration, ThroughputError> {
    let f =
        std::fs::File::open(image).map_err(|e| ThroughputError::File("open", image.into(), e))?;
    let chunks = (BLK_FILE_BYTES / BLK_CHUNK) as u64;
    let mut buf = vec![0u8; BLK_CHUNK];
    let mut sum = 0u64;
    let start = Instant::now();
    for i in 0..BLK_READS as u64 {
        f.read_exact_at(&mut buf, (i % chunks) * BLK_CHUNK as u64)
            .map_err(|e| ThroughputError::File("pread", image.into(), e))?;
        sum = sum.wrapping_add(u64::from(buf[i as usize % BLK_CHUNK]));
    }
    let t = start.elapsed();
    std::hint::black_box(sum);
    Ok(t)
}

/// The net part: its namespace, receiver socket, frames and samples.
struct Net {
    dir: TempDir,
    config: PathBuf,
    /// Declared after everything using the namespace so it drops last.
    sock: std::net::UdpSocket,
    frames: Vec<Vec<u8>>,
    samples: NetSamples,
    ns: NetNs,
}

/// Per-round receiver statistics of the net part.
#[derive(Debug, Clone, Default)]
pub struct NetSamples {
    pub netns: String,
    pub vm: Vec<RecvStats>,
    pub host: Vec<RecvStats>,
}

impl Net {
    fn setup(cfg: &ThroughputConfig) -> Result<Self, ThroughputError> {
        let name = format!(
            "ember-tp-{}-{}",
            std::process::id(),
            nanos() % 1_000_000_000
        );
        let mut ns = NetNs::create(&name)?;
        ns.add_tap(TAP_NAME, TAP_MAC, "10.0.0.1/24")?;
        let bind = format!(
            "{}.{}.{}.{}:{DISCARD_PORT}",
            HOST_IP[0], HOST_IP[1], HOST_IP[2], HOST_IP[3]
        );
        let sock = ns.run_in(|| netns::bind_receiver(&bind))?;
        let dir = TempDir::create("throughput-net")?;
        let cmdline = format!(
            "ember.test=bench-net ember.ip={}.{}.{}.{} ember.peer={}.{}.{}.{}",
            GUEST_IP[0],
            GUEST_IP[1],
            GUEST_IP[2],
            GUEST_IP[3],
            HOST_IP[0],
            HOST_IP[1],
            HOST_IP[2],
            HOST_IP[3]
        );
        let config = dir.write(
            "net.json",
            vmm_config_json(
                &cfg.kernel,
                &cmdline,
                cfg.mem_mib,
                None,
                Some((TAP_NAME, GUEST_MAC)),
            )
            .as_bytes(),
        )?;
        let flow = frame::Flow {
            src_mac: frame::parse_mac(GUEST_MAC).unwrap_or_default(),
            dst_mac: frame::parse_mac(TAP_MAC).unwrap_or_default(),
            src_ip: GUEST_IP,
            dst_ip: HOST_IP,
            src_port: GUEST_PORT,
            dst_port: DISCARD_PORT,
        };
        let payload = vec![b'x'; NET_PAYLOAD];
        let frames = (0..NET_FRAMES)
            .filter_map(|i| frame::udp_frame(&flow, i as u16, &payload))
            .collect();
        Ok(Net {
            samples: NetSamples {
                netns: name,
                ..Default::default()
            },
            dir,
            config,
            sock,
            frames,
            ns,
        })
    }

    fn round(
        &mut self,
        cfg: &ThroughputConfig,
        run: usize,
        record: bool,
    ) -> Result<(), ThroughputError> {
        check_interrupt()?;
        // Guest -> TAP -> receiver.
        netns::drain(&self.sock)?;
        let rx = netns::Receiver::start(&self.sock, NET_FRAMES as u64)?;
        let mut cmd = self.ns.exec_command(&cfg.vmm);
        cmd.arg("--no-api").arg("--config-file").arg(&self.config);
        let r = expect_run("bench-net", run, cmd, NET_BENCH_LINE);
        let vm = rx.finish()?;
        let r = r?;
        let want = format!("{NET_BENCH_LINE}{}", NET_FRAMES * NET_PAYLOAD);
        if r.line(NET_BENCH_LINE) != Some(want.as_str()) {
            return Err(ThroughputError::BadRun {
                what: "bench-net",
                run,
                why: format!(
                    "expected {want:?} (receiver got {} datagrams)",
                    vm.datagrams
                ),
                transcript: r.transcript(),
            });
        }
        check_interrupt()?;
        // Host: the same frames written into the same TAP (the VMM has
        // exited, so its queue is free) -> receiver.
        netns::drain(&self.sock)?;
        let rx = netns::Receiver::start(&self.sock, NET_FRAMES as u64)?;
        let mut tap = self.ns.run_in(|| netns::open_tap(TAP_NAME))?;
        let written = netns::write_frames(&mut tap, &self.frames);
        drop(tap);
        let host = rx.finish()?;
        written?;
        if record {
            self.samples.vm.push(vm);
            self.samples.host.push(host);
        }
        Ok(())
    }
}

impl Net {
    fn into_samples(self) -> NetSamples {
        let Net {
            samples,
            dir,
            sock,
            ns,
            ..
        } = self;
        drop(sock);
        drop(dir);
        drop(ns);
        samples
    }
}

/// Results of a benchmark run.
#[derive(Debug, Default)]
pub struct Report {
    pub runs: usize,
    pub blk: Option<BlkSamples>,
    pub blk_skipped: Option<String>,
    pub net: Option<NetSamples>,
    pub net_skipped: Option<String>,
}

/// MiB/s for `bytes` in `d`; `None` for a zero or missing duration.
pub fn mib_per_s(bytes: u64, d: Option<Duration>) -> Option<f64> {
    d.filter(|d| !d.is_zero())
        .map(|d| bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64())
}

fn median_f64(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:10.3} ms"))
        .unwrap_or_else(|| format!("{:>13}", "-"))
}

fn fmt_rate(v: Option<f64>) -> String {
    v.map(|v| format!("{v:12.2}"))
        .unwrap_or_else(|| format!("{:>12}", "-"))
}

fn ms_row(name: &str, ms: &[f64]) -> String {
    let min = ms.iter().copied().reduce(f64::min);
    let max = ms.iter().copied().reduce(f64::max);
    format!(
        "{name:<50} {:>4} {} {} {}\n",
        ms.len(),
        fmt_ms(median_f64(ms)),
        fmt_ms(min),
        fmt_ms(max)
    )
}

fn to_ms(d: &[Duration]) -> Vec<f64> {
    d.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.4}", a / b),
        _ => "-".into(),
    }
}

impl Report {
    /// The guest's blk transfer time: median(bench-blk) - median(reference).
    pub fn blk_guest_transfer(b: &BlkSamples) -> Option<Duration> {
        median(&b.vm_bench)?.checked_sub(median(&b.vm_ref)?)
    }

    /// Human-readable table and ratios.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{:<50} {:>4} {:>13} {:>13} {:>13}\n",
            "measurement", "runs", "median", "min", "max"
        );
        let mut rates = String::new();
        if let Some(b) = &self.blk {
            s += &ms_row(
                "blk vm: spawn -> 'blk capacity' (ember.test=blk)",
                &to_ms(&b.vm_ref),
            );
            s += &ms_row(
                "blk vm: spawn -> 'bench blk bytes' (bench-blk)",
                &to_ms(&b.vm_bench),
            );
            let paired: Vec<f64> = b
                .vm_bench
                .iter()
                .zip(&b.vm_ref)
                .map(|(x, y)| (x.as_secs_f64() - y.as_secs_f64()) * 1e3)
                .collect();
            s += &ms_row("blk vm: per-round difference (noise check)", &paired);
            s += &ms_row("blk host: 256 x pread 4 KiB", &to_ms(&b.host));
            let bytes = (BLK_READS * BLK_CHUNK) as u64;
            let guest = mib_per_s(bytes, Self::blk_guest_transfer(b));
            let host = mib_per_s(bytes, median(&b.host));
            rates += &format!(
                "{:<30} {} {} {:>10}\n",
                "blk 1 MiB in 4 KiB reads",
                fmt_rate(guest),
                fmt_rate(host),
                ratio(guest, host)
            );
            if guest.is_none() {
                rates += "  (blk: the bench-blk median is not above the reference median; boot noise hides the transfer, try more --runs)\n";
            }
        }
        if let Some(n) = &self.net {
            let span_ms = |v: &[RecvStats]| -> Vec<f64> {
                v.iter()
                    .filter_map(|r| r.span())
                    .map(|d| d.as_secs_f64() * 1e3)
                    .collect()
            };
            s += &ms_row("net vm: first -> last datagram", &span_ms(&n.vm));
            s += &ms_row(
                "net host: first -> last datagram (tap write)",
                &span_ms(&n.host),
            );
            let rate = |v: &[RecvStats]| -> Option<f64> {
                let r: Vec<f64> = v
                    .iter()
                    .filter_map(|r| mib_per_s(r.bytes, r.span()))
                    .collect();
                median_f64(&r)
            };
            let (guest, host) = (rate(&n.vm), rate(&n.host));
            rates += &format!(
                "{:<30} {} {} {:>10}\n",
                "net 256 x 1024 B UDP",
                fmt_rate(guest),
                fmt_rate(host),
                ratio(guest, host)
            );
            let arrived = |v: &[RecvStats]| {
                let c: Vec<u64> = v.iter().map(|r| r.datagrams).collect();
                match (c.iter().min(), c.iter().max()) {
                    (Some(a), Some(b)) if a == b => format!("{a}/{NET_FRAMES} every run"),
                    (Some(a), Some(b)) => format!("{a}..{b}/{NET_FRAMES}"),
                    _ => "-".into(),
                }
            };
            rates += &format!(
                "  net datagrams arrived: ember-vmm {}, host {} (netns {})\n",
                arrived(&n.vm),
                arrived(&n.host),
                n.netns
            );
        }
        if !rates.is_empty() {
            s += &format!(
                "\n{:<30} {:>12} {:>12} {:>10}\n{rates}",
                "throughput (MiB/s, medians)", "ember-vmm", "host raw", "guest/host"
            );
        }
        if let Some(why) = &self.blk_skipped {
            s += &format!("blk skipped: {why}\n");
        }
        if let Some(why) = &self.net_skipped {
            s += &format!("net skipped: {why}\n");
        }
        s
    }
}

/// Runs the benchmark: one unrecorded warm-up round, then `cfg.runs`
/// rounds of (blk reference, bench-blk, host preads, bench-net, host TAP
/// writes). Everything it creates is removed before it returns, also on
/// errors and on SIGINT/SIGTERM (when [`vmrun::install_interrupt_handler`]
/// was called).
pub fn run(cfg: &ThroughputConfig) -> Result<Report, ThroughputError> {
    let mut report = Report {
        runs: cfg.runs,
        ..Default::default()
    };
    if !cfg.vmm.is_file() {
        return Err(ThroughputError::File(
            "ember-vmm not found (cargo build --release -p vmm)",
            cfg.vmm.clone(),
            io::Error::from(io::ErrorKind::NotFound),
        ));
    }
    let mut blk = if cfg.blk {
        Some(Blk::setup(cfg)?)
    } else {
        None
    };
    if !cfg.blk {
        report.blk_skipped = Some("not selected".into());
    }
    let mut net = if cfg.net {
        match Net::setup(cfg) {
            Ok(n) => Some(n),
            Err(e) => {
                report.net_skipped = Some(format!("setup failed (needs root and iproute2): {e}"));
                None
            }
        }
    } else {
        report.net_skipped = Some("not selected".into());
        None
    };
    for run in 0..=cfg.runs {
        if let Some(b) = &mut blk {
            b.round(cfg, run, run > 0)?;
        }
        if let Some(n) = &mut net {
            n.round(cfg, run, run > 0)?;
        }
    }
    report.blk = blk.map(|b| b.samples);
    report.net = net.map(Net::into_samples);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_shapes() {
        let k = Path::new("/g/guest.elf");
        assert_eq!(
            vmm_config_json(k, "ember.test=hello", 64, None, None),
            r#"{"boot-source":{"kernel_image_path":"/g/guest.elf","boot_args":"ember.test=hello"},"machine-config":{"vcpu_count":1,"mem_size_mib":64}}"#
        );
        assert_eq!(
            vmm_config_json(
                k,
                "ember.test=bench-blk",
                64,
                Some(Path::new("/t/d.img")),
                None
            ),
            r#"{"boot-source":{"kernel_image_path":"/g/guest.elf","boot_args":"ember.test=bench-blk"},"machine-config":{"vcpu_count":1,"mem_size_mib":64},"drives":[{"drive_id":"data0","path_on_host":"/t/d.img","is_root_device":false}]}"#
        );
        assert_eq!(
            vmm_config_json(k, "x", 32, None, Some(("embtap0", "06:00:0a:00:00:02"))),
            r#"{"boot-source":{"kernel_image_path":"/g/guest.elf","boot_args":"x"},"machine-config":{"vcpu_count":1,"mem_size_mib":32},"network-interfaces":[{"iface_id":"eth0","host_dev_name":"embtap0","guest_mac":"06:00:0a:00:00:02"}]}"#
        );
    }

    #[test]
    fn pattern_size_and_chunks_differ() {
        let p = blk_pattern();
        assert_eq!(p.len(), BLK_FILE_BYTES);
        assert_ne!(p[..BLK_CHUNK], p[BLK_CHUNK..2 * BLK_CHUNK]);
    }

    #[test]
    fn host_preads_reads_the_file() {
        let dir = TempDir::create("throughput-test").unwrap();
        let img = dir.write("d.img", &blk_pattern()).unwrap();
        host_preads(&img).unwrap();
        let short = dir.write("short.img", &[0u8; 100]).unwrap();
        assert!(matches!(
            host_preads(&short),
            Err(ThroughputError::File("pread", ..))
        ));
        let p = dir.0.clone();
        drop(dir);
        assert!(!p.exists());
    }

    #[test]
    fn rates_and_medians() {
        assert_eq!(
            mib_per_s(1 << 20, Some(Duration::from_millis(500))),
            Some(2.0)
        );
        assert_eq!(mib_per_s(1 << 20, Some(Duration::ZERO)), None);
        assert_eq!(mib_per_s(1 << 20, None), None);
        assert_eq!(median_f64(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median_f64(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median_f64(&[]), None);
    }

    #[test]
    fn report_renders_rates_and_ratios() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        let stats = |bytes, span_ns: i128| RecvStats {
            datagrams: bytes / 1024,
            bytes,
            first_ns: Some(1_000),
            last_ns: Some(1_000 + span_ns),
        };
        let r = Report {
            runs: 3,
            blk: Some(BlkSamples {
                vm_ref: ms(&[50, 52, 51]),
                vm_bench: ms(&[60, 62, 61]),
                host: ms(&[1, 1, 1]),
            }),
            blk_skipped: None,
            net: Some(NetSamples {
                netns: "ember-tp-x".into(),
                vm: vec![stats(262_144, 250_000_000); 3],
                host: vec![stats(262_144, 2_500_000); 3],
            }),
            net_skipped: None,
        };
        let text = r.render();
        // blk: 1 MiB in 10 ms = 100 MiB/s vs 1000 MiB/s.
        assert!(text.contains("100.00"), "{text}");
        assert!(text.contains("1000.00"), "{text}");
        assert!(text.contains("0.1000"), "{text}");
        // net: 0.25 MiB in 250 ms = 1 MiB/s vs 100 MiB/s.
        assert!(text.contains("1.00"), "{text}");
        assert!(text.contains("0.0100"), "{text}");
        assert!(
            text.contains("ember-vmm 256/256 every run, host 256/256 every run"),
            "{text}"
        );
    }

    #[test]
    fn host_tap_frames_reach_the_receiver_in_a_private_netns() {
        let name = format!("ember-tp-test-{}", std::process::id());
        let mut ns = match NetNs::create(&name) {
            Ok(ns) => ns,
            Err(e) => {
                eprintln!(
                    "skipped: cannot create a network namespace ({e}); needs root and iproute2"
                );
                return;
            }
        };
        ns.add_tap(TAP_NAME, TAP_MAC, "10.0.0.1/24").unwrap();
        let sock = ns.run_in(|| netns::bind_receiver("10.0.0.1:9")).unwrap();
        let flow = frame::Flow {
            src_mac: frame::parse_mac(GUEST_MAC).unwrap(),
            dst_mac: frame::parse_mac(TAP_MAC).unwrap(),
            src_ip: GUEST_IP,
            dst_ip: HOST_IP,
            src_port: GUEST_PORT,
            dst_port: DISCARD_PORT,
        };
        let frames: Vec<Vec<u8>> = (0..16)
            .map(|i| frame::udp_frame(&flow, i, &[b'x'; NET_PAYLOAD]).unwrap())
            .collect();
        let rx = netns::Receiver::start(&sock, 16).unwrap();
        let mut tap = ns.run_in(|| netns::open_tap(TAP_NAME)).unwrap();
        netns::write_frames(&mut tap, &frames).unwrap();
        drop(tap);
        let st = rx.finish().unwrap();
        assert_eq!(st.datagrams, 16);
        assert_eq!(st.bytes, 16 * NET_PAYLOAD as u64);
        drop(sock);
        drop(ns);
        assert!(!Path::new(&format!("/run/netns/{name}")).exists());
    }

    #[test]
    fn report_blk_noise_and_skips() {
        let r = Report {
            runs: 1,
            blk: Some(BlkSamples {
                vm_ref: vec![Duration::from_millis(60)],
                vm_bench: vec![Duration::from_millis(50)],
                host: vec![Duration::from_millis(1)],
            }),
            net_skipped: Some("not selected".into()),
            ..Default::default()
        };
        let text = r.render();
        assert!(text.contains("boot noise hides the transfer"), "{text}");
        assert!(text.contains("net skipped: not selected"), "{text}");
    }
}
