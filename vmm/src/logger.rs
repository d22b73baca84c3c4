//! ember-vmm's `log` backend: leveled lines on stderr by default, or, once
//! `PUT /logger` (or `--log-path`) names one, on a file or named pipe in
//! Firecracker's line format:
//!
//! ```text
//! 2026-12-05T14:30:50.123456789 [instance-id:thread:LEVEL:file.rs:42] message
//! ```
//!
//! where `:LEVEL` appears with `show_level` and `:file.rs:42` with
//! `show_log_origin`. A `module` filter keeps only lines whose module path
//! starts with it. The file is opened as Firecracker opens it: read-write
//! and non-blocking, never created, so a FIFO without a reader yet neither
//! blocks nor fails, and a full pipe drops lines instead of stalling the
//! VMM. Times are UTC (reading the local time zone would open files under
//! the seccomp filters).
//!
//! Lines are rate-limited (a burst of 50 per second, the rest counted and
//! reported) so that a guest provoking warnings in a loop cannot flood the
//! log.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::logger::LoggerConfig;

/// Errors installing or configuring the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The level name is not one of error, warn, info, debug, trace, off.
    #[error("unknown log level {0:?} (use error, warn, info, debug or trace)")]
    Level(String),
    /// The process already has a `log` backend.
    #[error("a logger is already installed")]
    AlreadySet,
    /// The log file or FIFO cannot be opened.
    #[error("Failed to open the log file {path}: {err}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::logger::LoggerConfigError),
}

/// Lines allowed per window before the rest are counted and dropped.
const BURST: u32 = 50;
/// Length of a rate-limit window in milliseconds.
const WINDOW_MS: u128 = 1000;

struct Window {
    start: Instant,
    used: u32,
    dropped: u64,
}

struct Sink {
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    instance_id: String,
}

struct EmberLogger {
    window: Mutex<Window>,
    sink: Mutex<Sink>,
}

impl EmberLogger {
    /// Whether a line may go out now; reports lines dropped in the last window.
    fn admit(&self) -> (bool, u64) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped_report = 0;
        if w.start.elapsed().as_millis() >= WINDOW_MS {
            dropped_report = w.dropped;
            *w = Window {
                start: Instant::now(),
                used: 0,
                dropped: 0,
            };
        }
        if w.used < BURST {
            w.used += 1;
            (true, dropped_report)
        } else {
            w.dropped += 1;
            (false, dropped_report)
        }
    }
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn` (UTC) for `t`.
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

impl Log for EmberLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = &sink.module {
            let path = r.module_path().unwrap_or("");
            if !(path == m || path.starts_with(&format!("{m}::"))) {
                return;
            }
        }
        let (ok, dropped) = self.admit();
        let lvl = level_name(r.level());
        let origin = if sink.show_origin {
            format!(":{}:{}", r.file().unwrap_or("?"), r.line().unwrap_or(0))
        } else {
            String::new()
        };
        let show_level = sink.show_level;
        let id = sink.instance_id.clone();
        match sink.file.as_mut() {
            Some(f) => {
                let thread = std::thread::current();
                let thread = thread.name().unwrap_or("-");
                let now = timestamp(SystemTime::now());
                let mut line = String::new();
                if dropped > 0 {
                    line.push_str(&format!(
                        "{now} [{id}:{thread}:WARN] {dropped} log lines suppressed (rate limit)\n"
                    ));
                }
                if ok {
                    let level = if show_level {
                        format!(":{lvl}")
                    } else {
                        String::new()
                    };
                    line.push_str(&format!(
                        "{now} [{id}:{thread}{level}{origin}] {}\n",
                        r.args()
                    ));
                }
                // One write per line: a non-blocking pipe takes it whole
                // (up to PIPE_BUF) or not at all.
                let _ = f.write(line.as_bytes());
            }
            None => {
                let mut err = std::io::stderr().lock();
                if dropped > 0 {
                    let _ = writeln!(
                        err,
                        "ember-vmm: [WARN] {dropped} log lines suppressed (rate limit)"
                    );
                }
                if ok {
                    let _ = writeln!(err, "ember-vmm: [{lvl}]{origin} {}", r.args());
                }
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: std::sync::OnceLock<EmberLogger> = std::sync::OnceLock::new();

fn logger() -> &'static EmberLogger {
    LOGGER.get_or_init(|| EmberLogger {
        window: Mutex::new(Window {
            start: Instant::now(),
            used: 0,
            dropped: 0,
        }),
        sink: Mutex::new(Sink {
            file: None,
            show_level: false,
            show_origin: false,
            module: None,
            instance_id: "anonymous-instance".into(),
        }),
    })
}

/// Parses a level name (Firecracker's, case-insensitive; `warning` and
/// `warn` are the same).
pub fn parse_level(s: &str) -> Result<LevelFilter, LoggerError> {
    crate::config::logger::LoggerLevel::parse(s)
        .map(|l| l.filter())
        .ok_or_else(|| LoggerError::Level(s.into()))
}

/// Installs the logger at `level`, writing to stderr.
pub fn init(level: LevelFilter) -> Result<(), LoggerError> {
    log::set_logger(logger()).map_err(|_| LoggerError::AlreadySet)?;
    log::set_max_level(level);
    Ok(())
}

/// Sets the instance id written on file log lines.
pub fn set_instance_id(id: &str) {
    logger()
        .sink
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .instance_id = id.to_string();
}

/// Opens a log or metrics file or FIFO as Firecracker does: read-write
/// (so a FIFO opens without a reader), non-blocking, never created; and
/// appending, so an existing file keeps its lines.
pub fn open_nonblocking(path: &str) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Applies `PUT /logger` (or the `--log-path` family of flags): fields
/// that are absent keep their value. Installs the backend if `init` was
/// not called (an embedder's process).
pub fn configure(cfg: &LoggerConfig) -> Result<(), LoggerError> {
    cfg.validate()?;
    let file = match &cfg.log_path {
        Some(p) => Some(open_nonblocking(p).map_err(|err| LoggerError::Open {
            path: p.clone(),
            err,
        })?),
        None => None,
    };
    let l = logger();
    // Ours if nobody else installed one; otherwise the settings below apply
    // whenever `log` reaches us.
    let _ = log::set_logger(l);
    let mut s = l.sink.lock().unwrap_or_else(|p| p.into_inner());
    if file.is_some() {
        s.file = file;
    }
    if let Some(v) = cfg.show_level {
        s.show_level = v;
    }
    if let Some(v) = cfg.show_log_origin {
        s.show_origin = v;
    }
    if cfg.module.is_some() {
        s.module = cfg.module.clone();
    }
    if let Some(level) = cfg.level {
        log::set_max_level(level.filter());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("WARN").unwrap(), LevelFilter::Warn);
        assert_eq!(parse_level("Warning").unwrap(), LevelFilter::Warn);
        assert_eq!(parse_level("debug").unwrap(), LevelFilter::Debug);
        assert!(parse_level("loud").is_err());
    }

    #[test]
    fn utc_timestamps() {
        let t = UNIX_EPOCH + std::time::Duration::new(1_764_945_050, 123);
        assert_eq!(timestamp(t), "2025-12-05T14:30:50.000000123");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
        let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000000000");
    }

    #[test]
    fn bursts_are_limited() {
        let l = EmberLogger {
            window: Mutex::new(Window {
                start: Instant::now(),
                used: 0,
                dropped: 0,
            }),
            sink: Mutex::new(Sink {
                file: None,
                show_level: false,
                show_origin: false,
                module: None,
                instance_id: String::new(),
            }),
        };
        let admitted = (0..BURST * 3).filter(|_| l.admit().0).count();
        assert_eq!(admitted as u32, BURST);
        assert_eq!(l.window.lock().unwrap().dropped, u64::from(BURST) * 2);
    }
}
