//! virtio-rng (Firecracker's "entropy" device): the guest posts writable
//! buffers on its one request queue and the device fills them with bytes
//! from the host kernel's CSPRNG (`getrandom(2)`).
//!
//! - One queue of [`QUEUE_SIZE`]; no feature bits beyond VERSION_1; no
//!   configuration space.
//! - A request is filled up to [`MAX_REQUEST`] bytes (the used length says
//!   how many; virtio allows a partial fill). A chain with no writable
//!   buffer, or a malformed one, is returned with used length 0.
//! - An optional rate limiter (Firecracker's `rate_limiter` of
//!   `PUT /entropy`) accounts each request as one operation of the bytes it
//!   gets; a throttled queue resumes when the limiter's timer fires.
//! - One pass serves at most [`PASS_REQUESTS`] requests, then yields to the
//!   event loop with the queue eventfd signalled again, so a guest that
//!   keeps the queue full cannot hold the VMM thread.

use std::os::unix::io::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};

use virtio_queue::QueueOwnedT;

use super::persist::{Persist, PersistError, RngState};
use super::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
use super::{drain_evt, DeviceBase, VirtioDevice, TOKEN_ACTIVATE, TOKEN_QUEUE_BASE};

/// Device type of virtio-rng ("entropy source").
pub const TYPE_RNG: u32 = 4;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// At most this many bytes go into one request.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// Requests served per pass before yielding to the event loop.
pub const PASS_REQUESTS: u32 = 64;

const TOKEN_QUEUE: u32 = TOKEN_QUEUE_BASE;
const TOKEN_LIMITER: u32 = 2;

/// Errors of the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The rate limiter could not be created.
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
    /// A saved state cannot be restored.
    #[error("restoring entropy device state: {0}")]
    Restore(#[from] PersistError),
}

/// Configuration of the entropy device (`PUT /entropy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RngConfig {
    /// Optional rate limiter.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    base: DeviceBase,
    config: RngConfig,
    limiter: RateLimiter,
    /// Bytes handed to the guest (metrics).
    pub bytes_served: u64,
    /// Requests the host could not fill (getrandom failed).
    pub failures: u64,
}

/// Fills `buf` from the kernel's CSPRNG. getrandom(2) without flags blocks
/// only until the pool is first initialised, long before a VMM runs.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`,
        // which getrandom only writes.
        let n = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr().cast::<libc::c_void>(),
                buf.len() - done,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl Rng {
    /// A new, not yet activated device.
    pub fn new(config: RngConfig) -> Result<Self, RngError> {
        let limiter = RateLimiter::new(&config.rate_limiter.unwrap_or_default())?;
        Ok(Self {
            base: DeviceBase::new("virtio-rng", 0, &[QUEUE_SIZE]).map_err(RngError::EventFd)?,
            config,
            limiter,
            bytes_served: 0,
            failures: 0,
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &RngConfig {
        &self.config
    }

    /// Replaces the rate limiter configuration.
    pub fn update_rate_limiter(&mut self, cfg: &RateLimiterConfig) {
        self.limiter.update(cfg);
        self.config.rate_limiter = Some(*cfg);
    }

    /// Serves the request queue. Returns whether the guest was notified.
    pub fn process_queue(&mut self) -> bool {
        let Some(mem) = self.base.mem.clone() else {
            return false;
        };
        let mut used = false;
        let mut served = 0u32;
        let mut buf = Vec::new();
        while !self.limiter.is_blocked() {
            let Some((head, parsed)) = self.base.pop_parsed(0) else {
                break;
            };
            if served >= PASS_REQUESTS {
                self.base.queues[0].go_to_previous_position();
                let _ = self.base.queue_evts[0].write(1);
                break;
            }
            served += 1;
            let chain = match parsed {
                Ok(c) if c.writable_len() > 0 => c,
                other => {
                    log::warn!("virtio-rng: request {head} has no writable buffer: {other:?}");
                    self.base.add_used(0, head, 0);
                    used = true;
                    continue;
                }
            };
            let want = chain.writable_len().min(MAX_REQUEST);
            if !self.limiter.consume(want) {
                self.base.queues[0].go_to_previous_position();
                break;
            }
            buf.resize(want as usize, 0);
            let len = match fill_random(&mut buf) {
                Ok(()) => match chain.write_at(&mem, 0, &buf) {
                    Ok(()) => want as u32,
                    Err(e) => {
                        log::warn!("virtio-rng: request {head}: {e}");
                        0
                    }
                },
                Err(e) => {
                    self.failures += 1;
                    log::error!("virtio-rng: getrandom: {e}");
                    0
                }
            };
            self.bytes_served += u64::from(len);
            self.base.add_used(0, head, len);
            used = true;
        }
        used && self.base.notify_used(0)
    }

    fn register(&mut self, ops: &mut EventOps) {
        if !self.base.register_queue_events(ops) {
            return;
        }
        self.base
            .watch_fd(ops, self.limiter.as_raw_fd(), TOKEN_LIMITER);
    }
}

impl VirtioDevice for Rng {
    fn base(&self) -> &DeviceBase {
        &self.base
    }
    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn config_bytes(&self) -> Vec<u8> {
        Vec::new()
    }
}

impl Persist for Rng {
    type Config = RngConfig;
    type State = RngState;
    type Error = RngError;

    fn save(&self) -> RngState {
        RngState {
            base: self.base.save(),
        }
    }

    fn restore(
        config: RngConfig,
        state: &RngState,
        mem: &crate::GuestMemoryMmap,
    ) -> Result<Self, RngError> {
        let mut rng = Rng::new(config)?;
        rng.base.restore(&state.base, mem)?;
        Ok(rng)
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if self.base.watch_activation(ops) {
            self.register(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                if self.base.on_activation() {
                    self.register(ops);
                    self.process_queue();
                }
            }
            TOKEN_QUEUE => {
                drain_evt(&self.base.queue_evts[0]);
                self.process_queue();
            }
            TOKEN_LIMITER => {
                if let Err(e) = self.limiter.event_handler() {
                    log::error!("virtio-rng: rate limiter: {e}");
                }
                self.process_queue();
            }
            t => log::warn!("virtio-rng: unexpected event {t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rate_limiter::TokenBucketConfig;
    use crate::virtio::test_utils::{mem, TestQueue};
    use crate::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    fn env(cfg: RngConfig) -> (GuestMemoryMmap, TestQueue, Rng) {
        let m = mem(0x80000);
        let q = TestQueue::new(&m, 0x1000, 16);
        let mut rng = Rng::new(cfg).unwrap();
        rng.activate(m.clone(), vec![q.queue()]).unwrap();
        (m, q, rng)
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let (m, mut q, mut rng) = env(RngConfig::default());
        assert_eq!(rng.device_type(), TYPE_RNG);
        assert!(rng.config_bytes().is_empty());
        // Two buffers in one chain: both are filled.
        let h = q.add_chain(&[(0x10000, 64, true), (0x11000, 32, true)]);
        assert!(rng.process_queue());
        assert_eq!(q.used_idx(), 1);
        assert_eq!(q.used_elem(0), (u32::from(h), 96));
        let mut a = [0u8; 64];
        m.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        let mut b = [0u8; 32];
        m.read_slice(&mut b, GuestAddress(0x11000)).unwrap();
        // 96 zero bytes from a CSPRNG would be a 2^-768 event.
        assert!(a.iter().chain(b.iter()).any(|&x| x != 0));
        assert_eq!(rng.bytes_served, 96);
    }

    #[test]
    fn a_huge_request_gets_at_most_max_request_bytes() {
        let (_m, mut q, mut rng) = env(RngConfig::default());
        let h = q.add_chain(&[(0x10000, 0x40000, true)]);
        rng.process_queue();
        assert_eq!(q.used_elem(0), (u32::from(h), MAX_REQUEST as u32));
    }

    #[test]
    fn a_chain_without_writable_buffers_is_returned_empty() {
        let (_m, mut q, mut rng) = env(RngConfig::default());
        let h = q.add_chain(&[(0x10000, 64, false)]);
        rng.process_queue();
        assert_eq!(q.used_elem(0), (u32::from(h), 0));
        assert_eq!(rng.bytes_served, 0);
    }

    #[test]
    fn a_full_queue_is_served_in_bounded_passes() {
        let m = mem(0x80000);
        let mut q = TestQueue::new(&m, 0x1000, 256);
        let mut rng = Rng::new(RngConfig::default()).unwrap();
        rng.activate(m.clone(), vec![q.queue()]).unwrap();
        let n = PASS_REQUESTS as u64 + 36;
        for i in 0..n {
            q.add_chain(&[(0x10000 + i * 0x100, 16, true)]);
        }
        rng.process_queue();
        // One pass stops at the bound and signals its queue to come back.
        assert_eq!(u32::from(q.used_idx()), PASS_REQUESTS);
        assert_eq!(rng.base.queue_evts[0].read().unwrap(), 1);
        rng.process_queue();
        assert_eq!(u64::from(q.used_idx()), n);
    }

    #[test]
    fn the_rate_limiter_throttles_and_resumes() {
        let cfg = RngConfig {
            rate_limiter: Some(RateLimiterConfig {
                bandwidth: None,
                ops: Some(TokenBucketConfig {
                    size: 1,
                    one_time_burst: 0,
                    refill_time: 20,
                }),
            }),
        };
        let (_m, mut q, mut rng) = env(cfg);
        for i in 0..2u64 {
            q.add_chain(&[(0x10000 + i * 0x100, 16, true)]);
        }
        rng.process_queue();
        // One operation allowed; the second waits for the timer.
        assert_eq!(q.used_idx(), 1);
        assert!(rng.limiter.is_blocked());
        // When the limiter's timer fires (as the event loop would see it),
        // the queue resumes.
        let mut pfd = libc::pollfd {
            fd: rng.limiter.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the timeout is only a safety net.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
        rng.limiter.event_handler().unwrap();
        rng.process_queue();
        assert_eq!(q.used_idx(), 2);
    }
}
