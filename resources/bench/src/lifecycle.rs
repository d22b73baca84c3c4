//! The lifecycle benchmark: wall time from spawning a VMM process until it
//! exits after the guest (`ember.test=hello`) printed `ember-guest: done` and
//! reset. ember-vmm and kvm-floor runs are interleaved so both see the same
//! machine load.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::stats::{median, percentile};

/// A run that did not finish in this time is killed and counted as failed.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the lifecycle benchmark.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("cannot spawn {0}: {1}")]
    Spawn(PathBuf, #[source] io::Error),
    #[error("waiting for {0}: {1}")]
    Wait(PathBuf, #[source] io::Error),
    #[error("{0} timed out after {1:?}")]
    Timeout(String, Duration),
    #[error("{name} run {run} failed (exit {code:?}, no `ember-guest: done`={missing_done})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")]
    BadRun {
        name: String,
        run: usize,
        code: Option<i32>,
        missing_done: bool,
        stdout: String,
        stderr: String,
    },
    #[error("cannot write the VMM config file {0}: {1}")]
    Config(PathBuf, #[source] io::Error),
}

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    pub runs: usize,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vmm: PathBuf,
    pub floor: PathBuf,
}

/// One measured program.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub samples: Vec<Duration>,
}

impl Target {
    fn new(name: &str, program: &Path, args: Vec<String>) -> Self {
        Target {
            name: name.into(),
            program: program.to_path_buf(),
            args,
            samples: Vec::new(),
        }
    }

    /// Runs the program once; records and returns its wall time.
    fn run_once(&mut self, run: usize) -> Result<Duration, LifecycleError> {
        let start = Instant::now();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LifecycleError::Spawn(self.program.clone(), e))?;
        let stdout = child.stdout.take().map(reader_thread);
        let stderr = child.stderr.take().map(reader_thread);
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if start.elapsed() > RUN_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(LifecycleError::Timeout(self.name.clone(), RUN_TIMEOUT));
                }
                Ok(None) => std::thread::sleep(Duration::from_micros(200)),
                Err(e) => return Err(LifecycleError::Wait(self.program.clone(), e)),
            }
        };
        let elapsed = start.elapsed();
        let join = |t: Option<std::thread::JoinHandle<String>>| {
            t.and_then(|t| t.join().ok()).unwrap_or_default()
        };
        let (stdout, stderr) = (join(stdout), join(stderr));
        let missing_done = !stdout
            .lines()
            .any(|l| l.trim_end() == ember_guests::DONE_LINE);
        if missing_done || !status.success() {
            return Err(LifecycleError::BadRun {
                name: self.name.clone(),
                run,
                code: status.code(),
                missing_done,
                stdout,
                stderr,
            });
        }
        self.samples.push(elapsed);
        Ok(elapsed)
    }
}

fn reader_thread<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Escapes `s` as a JSON string literal (with the quotes).
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// ember-vmm's Firecracker-shaped JSON config for one boot.
pub fn vmm_config_json(kernel: &Path, cmdline: &str, mem_mib: u64) -> String {
    format!(
        "{{\"boot-source\":{{\"kernel_image_path\":{},\"boot_args\":{}}},\
         \"machine-config\":{{\"vcpu_count\":1,\"mem_size_mib\":{mem_mib}}}}}",
        json_string(&kernel.to_string_lossy()),
        json_string(cmdline)
    )
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Results of a benchmark run.
#[derive(Debug)]
pub struct Report {
    pub targets: Vec<Target>,
    /// Why ember-vmm was not measured, if it was not.
    pub vmm_skipped: Option<String>,
}

impl Report {
    /// Human-readable table: median, p90, min, max per target and the
    /// vmm/floor ratios.
    pub fn render(&self) -> String {
        let ms = |d: Option<Duration>| match d {
            Some(d) => format!("{:9.2} ms", d.as_secs_f64() * 1e3),
            None => format!("{:>12}", "-"),
        };
        let mut s = format!(
            "{:<10} {:>5} {:>12} {:>12} {:>12} {:>12}\n",
            "target", "runs", "median", "p90", "min", "max"
        );
        for t in &self.targets {
            s += &format!(
                "{:<10} {:>5} {} {} {} {}\n",
                t.name,
                t.samples.len(),
                ms(median(&t.samples)),
                ms(percentile(&t.samples, 90.0)),
                ms(t.samples.iter().min().copied()),
                ms(t.samples.iter().max().copied()),
            );
        }
        if let Some(why) = &self.vmm_skipped {
            s += &format!("ember-vmm skipped: {why}\n");
        }
        let find = |n: &str| self.targets.iter().find(|t| t.name == n);
        if let (Some(v), Some(f)) = (find("ember-vmm"), find("kvm-floor")) {
            let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
                (Some(a), Some(b)) if !b.is_zero() => {
                    format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
                }
                _ => "-".into(),
            };
            s += &format!(
                "ratio vmm/floor: median {}  p90 {}\n",
                ratio(median(&v.samples), median(&f.samples)),
                ratio(percentile(&v.samples, 90.0), percentile(&f.samples, 90.0)),
            );
        }
        s
    }
}

/// Runs the benchmark: `cfg.runs` interleaved rounds of ember-vmm (when its
/// binary exists) and kvm-floor.
pub fn run(cfg: &LifecycleConfig) -> Result<Report, LifecycleError> {
    let tmp = TempDir(std::env::temp_dir().join(format!("ember-lifecycle-{}", std::process::id())));
    let mut targets = Vec::new();
    let vmm_skipped = if cfg.vmm.is_file() {
        std::fs::create_dir_all(&tmp.0).map_err(|e| LifecycleError::Config(tmp.0.clone(), e))?;
        let config = tmp.0.join("vmm-config.json");
        std::fs::write(
            &config,
            vmm_config_json(&cfg.kernel, &cfg.cmdline, cfg.mem_mib),
        )
        .map_err(|e| LifecycleError::Config(config.clone(), e))?;
        let args = vec![
            "--no-api".into(),
            "--config-file".into(),
            config.to_string_lossy().into_owned(),
        ];
        targets.push(Target::new("ember-vmm", &cfg.vmm, args));
        None
    } else {
        Some(format!(
            "{} not found (build it with `cargo build --release -p vmm`)",
            cfg.vmm.display()
        ))
    };
    let floor_args = vec![
        "--mem".into(),
        cfg.mem_mib.to_string(),
        cfg.kernel.to_string_lossy().into_owned(),
        cfg.cmdline.clone(),
    ];
    targets.push(Target::new("kvm-floor", &cfg.floor, floor_args));

    // One warm-up run each (page cache, binary loading), not recorded.
    for t in &mut targets {
        t.run_once(0)?;
        t.samples.clear();
    }
    for run in 1..=cfg.runs {
        for t in &mut targets {
            t.run_once(run)?;
        }
    }
    Ok(Report {
        targets,
        vmm_skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escaping() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\u0001""#);
    }

    #[test]
    fn vmm_config_shape() {
        let j = vmm_config_json(Path::new("/k/guest.elf"), "ember.test=hello x=\"1\"", 64);
        assert_eq!(
            j,
            r#"{"boot-source":{"kernel_image_path":"/k/guest.elf","boot_args":"ember.test=hello x=\"1\""},"machine-config":{"vcpu_count":1,"mem_size_mib":64}}"#
        );
    }

    #[test]
    fn report_without_vmm() {
        let mut floor = Target::new("kvm-floor", Path::new("/bin/true"), vec![]);
        floor.samples = vec![Duration::from_millis(10), Duration::from_millis(20)];
        let r = Report {
            targets: vec![floor],
            vmm_skipped: Some("missing".into()),
        };
        let text = r.render();
        assert!(text.contains("kvm-floor"), "{text}");
        assert!(text.contains("15.00 ms"), "{text}");
        assert!(text.contains("ember-vmm skipped: missing"), "{text}");
        assert!(!text.contains("ratio"), "{text}");
    }

    #[test]
    fn report_ratio() {
        let mut v = Target::new("ember-vmm", Path::new("/x"), vec![]);
        v.samples = vec![Duration::from_millis(30)];
        let mut f = Target::new("kvm-floor", Path::new("/y"), vec![]);
        f.samples = vec![Duration::from_millis(10)];
        let r = Report {
            targets: vec![v, f],
            vmm_skipped: None,
        };
        assert!(r
            .render()
            .contains("ratio vmm/floor: median 3.00  p90 3.00"));
    }
}
