//! A small `log` backend: leveled lines on stderr, rate-limited so that a
//! guest provoking warnings in a loop cannot flood the VMM's log.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Errors installing the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The level name is not one of error, warn, info, debug, trace, off.
    #[error("unknown log level {0:?} (use error, warn, info, debug or trace)")]
    Level(String),
    /// The process already has a `log` backend.
    #[error("a logger is already installed")]
    AlreadySet,
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

struct StderrLogger {
    window: Mutex<Window>,
}

impl StderrLogger {
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

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let (ok, dropped) = self.admit();
        let mut err = std::io::stderr().lock();
        if dropped > 0 {
            let _ = writeln!(
                err,
                "ember-vmm: [WARN] {dropped} log lines suppressed (rate limit)"
            );
        }
        if ok {
            let lvl = match r.level() {
                Level::Error => "ERROR",
                Level::Warn => "WARN",
                Level::Info => "INFO",
                Level::Debug => "DEBUG",
                Level::Trace => "TRACE",
            };
            let _ = writeln!(err, "ember-vmm: [{lvl}] {}", r.args());
        }
    }

    fn flush(&self) {}
}

/// Parses a level name.
pub fn parse_level(s: &str) -> Result<LevelFilter, LoggerError> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Ok(LevelFilter::Off),
        "error" => Ok(LevelFilter::Error),
        "warn" | "warning" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        _ => Err(LoggerError::Level(s.into())),
    }
}

/// Installs the logger at `level`.
pub fn init(level: LevelFilter) -> Result<(), LoggerError> {
    static LOGGER: std::sync::OnceLock<StderrLogger> = std::sync::OnceLock::new();
    let l = LOGGER.get_or_init(|| StderrLogger {
        window: Mutex::new(Window {
            start: Instant::now(),
            used: 0,
            dropped: 0,
        }),
    });
    log::set_logger(l).map_err(|_| LoggerError::AlreadySet)?;
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("WARN").unwrap(), LevelFilter::Warn);
        assert_eq!(parse_level("debug").unwrap(), LevelFilter::Debug);
        assert!(parse_level("loud").is_err());
    }

    #[test]
    fn bursts_are_limited() {
        let l = StderrLogger {
            window: Mutex::new(Window {
                start: Instant::now(),
                used: 0,
                dropped: 0,
            }),
        };
        let admitted = (0..BURST * 3).filter(|_| l.admit().0).count();
        assert_eq!(admitted as u32, BURST);
        assert_eq!(l.window.lock().unwrap().dropped, u64::from(BURST) * 2);
    }
}
