//! Token-bucket rate limiter (bandwidth in bytes and operations), configured
//! with Firecracker's JSON shape:
//!
//! ```json
//! {"bandwidth": {"size": 1048576, "one_time_burst": 0, "refill_time": 100},
//!  "ops": {"size": 100, "refill_time": 1000}}
//! ```
//!
//! `size` tokens refill linearly over `refill_time` milliseconds;
//! `one_time_burst` extra tokens are available once and never refill. A
//! bucket with size 0 or refill_time 0 is unlimited. When a device is
//! throttled the limiter arms a timerfd; the device registers
//! `RateLimiter::as_raw_fd` with its event loop, calls
//! `RateLimiter::event_handler` when it fires and resumes processing.

use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// Errors of the rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// A timerfd could not be created or armed.
    #[error("timerfd: {0}")]
    Timer(#[from] std::io::Error),
    /// A timerfd could not be created.
    #[error("timerfd: {0}")]
    TimerCreate(#[from] vmm_sys_util::errno::Error),
}

/// One bucket's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Bucket capacity (tokens).
    pub size: u64,
    /// Extra tokens usable once.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill an empty bucket.
    pub refill_time: u64,
}

/// Configuration of a limiter (either bucket may be absent = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes per refill interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests or frames) per refill interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    one_time_burst: u64,
    refill_ms: u64,
    budget: u64,
    last: Instant,
}

impl TokenBucket {
    /// `None` when the config means "unlimited".
    pub fn new(cfg: &TokenBucketConfig) -> Option<Self> {
        Self::new_at(cfg, Instant::now())
    }

    fn new_at(cfg: &TokenBucketConfig, now: Instant) -> Option<Self> {
        (cfg.size != 0 && cfg.refill_time != 0).then_some(Self {
            size: cfg.size,
            one_time_burst: cfg.one_time_burst,
            refill_ms: cfg.refill_time,
            budget: cfg.size,
            last: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let window = u128::from(self.refill_ms) * 1_000_000;
        let add = elapsed * u128::from(self.size) / window;
        if add > 0 {
            self.budget = u64::try_from(u128::from(self.budget) + add)
                .unwrap_or(u64::MAX)
                .min(self.size);
            self.last = now;
        }
    }

    /// Takes `n` tokens if available. A request larger than the bucket is
    /// let through when the bucket is full (and empties it).
    pub fn try_consume(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let from_burst = n.min(self.one_time_burst);
        let rest = n - from_burst;
        if rest <= self.budget {
            self.one_time_burst -= from_burst;
            self.budget -= rest;
            true
        } else if rest > self.size && self.budget == self.size {
            self.one_time_burst -= from_burst;
            self.budget = 0;
            true
        } else {
            false
        }
    }

    /// Gives back `n` tokens (undo of a consume).
    pub fn replenish(&mut self, n: u64) {
        self.budget = self.budget.saturating_add(n).min(self.size);
    }

    /// Roughly how long until `n` tokens are available.
    fn wait_time(&self, n: u64) -> Duration {
        let need = n.min(self.size).saturating_sub(self.budget).max(1);
        let ns = u128::from(need) * u128::from(self.refill_ms) * 1_000_000 / u128::from(self.size);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)).clamp(
            Duration::from_millis(1),
            Duration::from_millis(self.refill_ms),
        )
    }

    /// Tokens currently in the bucket (after refill) plus the burst.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.budget.saturating_add(self.one_time_burst)
    }
}

/// A rate limiter with a bandwidth and an ops bucket and a wakeup timer.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter for `cfg` (`RateLimiterConfig::default()` = unlimited).
    pub fn new(cfg: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        let timer = TimerFd::new()?;
        // TimerFd is blocking by default; the event loop must never block
        set_nonblocking(timer.as_raw_fd())?;
        Ok(Self {
            bandwidth: cfg.bandwidth.as_ref().and_then(TokenBucket::new),
            ops: cfg.ops.as_ref().and_then(TokenBucket::new),
            timer,
            blocked: false,
        })
    }

    /// Replaces the buckets (API PATCH). Resets their budgets to full.
    pub fn update(&mut self, cfg: &RateLimiterConfig) {
        self.bandwidth = cfg.bandwidth.as_ref().and_then(TokenBucket::new);
        self.ops = cfg.ops.as_ref().and_then(TokenBucket::new);
    }

    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Whether the limiter is waiting for its timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Accounts one operation of `bytes`. Returns false (and arms the timer)
    /// when the caller must wait.
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        if let Some(ops) = &mut self.ops {
            if !ops.try_consume(1, now) {
                let wait = ops.wait_time(1);
                self.block(wait);
                return false;
            }
        }
        if let Some(bw) = &mut self.bandwidth {
            if !bw.try_consume(bytes, now) {
                let wait = bw.wait_time(bytes);
                if let Some(ops) = &mut self.ops {
                    ops.replenish(1);
                }
                self.block(wait);
                return false;
            }
        }
        true
    }

    fn block(&mut self, wait: Duration) {
        self.blocked = true;
        if let Err(e) = self.timer.reset(wait, None) {
            // without a timer we would stall forever: stay unblocked instead
            log::error!("rate limiter: arming timer failed: {e}");
            self.blocked = false;
        }
    }

    /// Call when the timer fd is readable: clears the blocked state.
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into a valid buffer from our own timerfd.
        let r = unsafe { libc::read(self.timer.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e.into());
            }
        }
        self.blocked = false;
        Ok(())
    }
}

pub(crate) fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own with valid flag arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: u64, burst: u64, refill: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time: refill,
        }
    }

    #[test]
    fn json_shape() {
        let j = r#"{"bandwidth": {"size": 1000, "one_time_burst": 5, "refill_time": 100},
                    "ops": {"size": 10, "refill_time": 1000}}"#;
        let c: RateLimiterConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c.bandwidth, Some(cfg(1000, 5, 100)));
        assert_eq!(c.ops, Some(cfg(10, 0, 1000)));
        let empty: RateLimiterConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, RateLimiterConfig::default());
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bw": {}}"#).is_err());
        let back = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<RateLimiterConfig>(&back).unwrap(), c);
    }

    #[test]
    fn bucket_math() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(&cfg(1000, 100, 1000), t0).unwrap();
        assert!(b.try_consume(1100, t0)); // burst + full budget
        assert!(!b.try_consume(1, t0));
        // half the refill time -> half the tokens
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.available(t1), 500);
        assert!(b.try_consume(500, t1));
        assert!(!b.try_consume(1, t1));
        // never above size
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(b.available(t2), 1000);
        // a request bigger than the bucket passes only when it is full
        assert!(b.try_consume(5000, t2));
        assert!(!b.try_consume(5000, t2));
        assert!(TokenBucket::new(&cfg(0, 0, 100)).is_none());
        assert!(TokenBucket::new(&cfg(10, 0, 0)).is_none());
    }

    #[test]
    fn limiter_blocks_and_unblocks() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(&RateLimiterConfig {
            bandwidth: Some(cfg(100, 0, 10)),
            ops: Some(cfg(2, 0, 10)),
        })
        .unwrap();
        assert!(rl.consume_at(60, t0));
        assert!(!rl.consume_at(60, t0)); // bandwidth exhausted
        assert!(rl.is_blocked());
        // the op taken by the failed attempt was given back
        assert_eq!(rl.ops.as_mut().unwrap().available(t0), 1);
        assert!(!rl.consume_at(1, t0 + Duration::from_secs(1))); // blocked until timer
                                                                 // wait for the timer (bounded by the poll timeout)
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1);
        rl.event_handler().unwrap();
        assert!(!rl.is_blocked());
        assert!(rl.consume(60));
        let mut unlimited = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        assert!(unlimited.is_unlimited());
        for _ in 0..1000 {
            assert!(unlimited.consume(u64::MAX));
        }
    }
}
