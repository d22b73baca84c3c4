//! Cold and instant (snapshot) starts side by side, in the same emberd and
//! the same run: emberd runs with `--snapshot-starts`; the hello image is
//! built with `snapshot_starts=false` (cold) and the same program again as
//! [`WARM_IMAGE`] with `snapshot_starts=true`. Each round makes one cold
//! and one warm start, each: `POST /instances/run`, the guest's first line
//! ([`FIRST_LINE`]) seen in the instance's console log file, `stopped`
//! seen through the API, `DELETE`. The first line is found by polling the
//! log file every [`LINE_POLL`] (so its times carry up to that much
//! granularity). The restore time inside ember-vmm is emberd's
//! `snapshot load: N us` note in the log (the `PUT /snapshot/load` call,
//! seen from emberd).

use std::path::Path;
use std::time::{Duration, Instant};

use super::{
    interrupted, io_err, launch, wait_stopped, Client, EmberdBenchConfig, EmberdBenchError, Guard,
    Result, HELLO_C, IMAGE,
};

/// The image restored from snapshots.
pub const WARM_IMAGE: &str = "hello-warm";
/// The hello program's only line.
pub const FIRST_LINE: &str = "hi";
/// How often the log file is read while waiting for the first line.
pub const LINE_POLL: Duration = Duration::from_micros(200);
/// Warm-up runs of the warm image allowed before the template is in use.
const WARMUP_TRIES: usize = 100;

/// One start, cold or warm.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// `POST /instances/run` answered.
    pub post: Duration,
    /// `POST` sent -> the guest's first line in the log.
    pub first_line: Duration,
    /// `POST` sent -> `stopped` observed.
    pub stopped: Duration,
    /// The whole iteration: run, first line, stopped, delete.
    pub total: Duration,
    /// Restored from a snapshot (emberd's `StartedFrom`).
    pub restored: bool,
    /// emberd's `snapshot load: N us` note, for restored starts.
    pub load_us: Option<u64>,
}

/// Waits for a line equal to [`FIRST_LINE`] in `log` (bounded).
fn wait_first_line(log: &Path, timeout: Duration) -> Option<Instant> {
    let end = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(log) {
            if text.lines().any(|l| l.trim_end() == FIRST_LINE) {
                return Some(Instant::now());
            }
        }
        if Instant::now() > end || interrupted() {
            return None;
        }
        std::thread::sleep(LINE_POLL);
    }
}

/// emberd's `snapshot load: N us` in `log`.
pub fn load_us(log: &str) -> Option<u64> {
    let rest = log.split("snapshot load: ").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}

/// One measured start of `image`.
pub(super) fn measured_start(
    c: &mut Client,
    g: &mut Guard,
    name: &str,
    image: &str,
    cfg: &EmberdBenchConfig,
    mem: u64,
) -> Result<Measured> {
    let (t0, post) = launch(c, g, name, image, mem)?;
    let v = c
        .expect("GET", &format!("/instances/{name}"), None, 200)?
        .json();
    let id = v["Id"].as_str().unwrap_or_default().to_string();
    let restored = v["StartedFrom"] == "snapshot";
    let log = g.state_dir().join("logs").join(format!("{id}.log"));
    let first =
        wait_first_line(&log, super::RUN_TIMEOUT).ok_or_else(|| EmberdBenchError::BadInstance {
            name: name.into(),
            state: "no first line".into(),
            log: std::fs::read_to_string(&log).unwrap_or_default(),
        })?;
    let stopped_at = wait_stopped(c, &[name.to_string()], cfg.poll)?;
    let stopped = stopped_at
        .first()
        .map(|t| t.saturating_duration_since(t0))
        .unwrap_or_default();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    c.expect("DELETE", &format!("/instances/{name}"), None, 204)?;
    Ok(Measured {
        post,
        first_line: first.saturating_duration_since(t0),
        stopped,
        total: t0.elapsed(),
        restored,
        load_us: load_us(&text),
    })
}

/// Builds the warm image and runs it until a start is restored (the first
/// runs boot cold while emberd makes the template and fills its pool).
/// Err(reason) when no start was restored within [`WARMUP_TRIES`].
pub(super) fn prepare(
    c: &mut Client,
    g: &mut Guard,
    cfg: &EmberdBenchConfig,
) -> Result<std::result::Result<u64, String>> {
    let (_, mem, _) = c.create_image_with(
        g.root(),
        WARM_IMAGE,
        HELLO_C,
        &[("snapshot_starts", "true")],
    )?;
    for i in 0..WARMUP_TRIES {
        let m = measured_start(c, g, &format!("warm-warmup-{i}"), WARM_IMAGE, cfg, mem)?;
        if m.restored {
            return Ok(Ok(mem));
        }
        // The template is built in the background: give it a moment.
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(g.emberd_log()).map_err(io_err("read emberd.log"))?;
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("snapshot"))
        .rev()
        .take(3)
        .collect();
    Ok(Err(format!(
        "no start of {WARM_IMAGE} was restored in {WARMUP_TRIES} runs; emberd says: {}",
        why.join(" | ")
    )))
}

/// Round `i`: one cold start of [`IMAGE`], one warm of [`WARM_IMAGE`].
pub(super) fn round(
    c: &mut Client,
    g: &mut Guard,
    i: usize,
    cfg: &EmberdBenchConfig,
    mem: u64,
    warm_mem: u64,
) -> Result<(Measured, Measured)> {
    let cold = measured_start(c, g, &format!("cold-{i}"), IMAGE, cfg, mem)?;
    let warm = measured_start(c, g, &format!("warm-{i}"), WARM_IMAGE, cfg, warm_mem)?;
    Ok((cold, warm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_time_is_read_from_emberds_note() {
        let log = "emberd: starting instance w1 from its image's snapshot\nhi\n\
                   emberd: restored from snapshot (snapshot load: 1302 us)\nember: exit 0\n";
        assert_eq!(load_us(log), Some(1302));
        assert_eq!(load_us("emberd: starting instance w1\nhi\n"), None);
        assert_eq!(load_us("snapshot load: lots us"), None);
    }
}
