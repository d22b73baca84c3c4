//! virtio-balloon, with Firecracker's API semantics (`/balloon`).
//!
//! - The host sets a target (`num_pages`, 4 KiB pages) in the config space
//!   and raises a config interrupt; the guest inflates (hands pages to the
//!   device on the inflate queue as arrays of le32 page frame numbers) or
//!   deflates (takes them back on the deflate queue) and reports how many it
//!   holds by writing `actual`.
//! - Inflated pages are given back to the host with
//!   `madvise(MADV_DONTNEED)`: the guest's memory mapping stays, the host
//!   frees the backing pages, and a later guest access faults in zero pages.
//!   A frame number outside guest memory is skipped (and counted); nothing
//!   a guest sends can reach host memory outside its own.
//! - `deflate_on_oom` offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may
//!   take pages back under memory pressure without asking.
//! - Statistics (`stats_polling_interval_s` > 0) offer
//!   VIRTIO_BALLOON_F_STATS_VQ: the guest posts its statistics buffer, the
//!   device keeps the last values, holds the buffer, and gives it back every
//!   interval (a timerfd) to ask for fresh values.
//! - Free page reporting (`free_page_reporting`) offers
//!   VIRTIO_BALLOON_F_PAGE_REPORTING: the guest reports free ranges on the
//!   reporting queue and the device discards them like inflated pages.
//! - Free page hinting (`free_page_hinting`) offers
//!   VIRTIO_BALLOON_F_FREE_PAGE_HINT: the host starts a run by writing a
//!   command id (>= 2) to `free_page_hint_cmd_id`; the guest answers with
//!   that id, then hints free ranges (discarded like reported ones), then
//!   `STOP` (0). The host ends the run with `DONE` (1), automatically when
//!   `acknowledge_on_stop` was asked.
//! - Every pass is bounded ([`PASS_REQUESTS`] chains, [`MAX_PFNS`] frame
//!   numbers a chain), then yields to the event loop.
//!
//! Queue order follows the virtio spec: inflate, deflate, then stats, free
//! page hint and reporting queues, each only when its feature is offered.

use std::os::unix::io::AsRawFd;
use std::time::Duration;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::Serialize;
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::timerfd::TimerFd;

use super::desc::ParsedChain;
use super::persist::{BalloonState, Persist, PersistError};
use super::{drain_evt, DeviceBase, VirtioDevice, TOKEN_ACTIVATE, TOKEN_QUEUE_BASE};

/// Device type of virtio-balloon.
pub const TYPE_BALLOON: u32 = 5;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Balloon pages are 4 KiB whatever the guest's page size.
pub const PAGE_SIZE: u64 = 4096;
/// Pages per MiB.
pub const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;
/// At most this many frame numbers are taken from one chain.
pub const MAX_PFNS: usize = 4096;
/// Chains served per queue and pass before yielding to the event loop.
pub const PASS_REQUESTS: u32 = 64;

/// The host must be told before the guest uses a deflated page.
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u64 = 1 << 0;
/// The statistics queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// The guest may deflate under memory pressure.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// The free page hinting queue exists.
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u64 = 1 << 3;
/// The free page reporting queue exists.
pub const VIRTIO_BALLOON_F_PAGE_REPORTING: u64 = 1 << 5;

/// Free page hinting: the guest stopped hinting (or the host asks it to).
pub const FREE_PAGE_HINT_STOP: u32 = 0;
/// Free page hinting: the host is done with the run.
pub const FREE_PAGE_HINT_DONE: u32 = 1;

// Above every queue token (TOKEN_QUEUE_BASE + up to 5 queues).
const TOKEN_TIMER: u32 = 100;

/// Errors of the balloon device and its API operations.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// An eventfd or timerfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// A timerfd operation failed.
    #[error("stats timer: {0}")]
    Timer(#[from] vmm_sys_util::errno::Error),
    /// The target is larger than guest memory.
    #[error("amount_mib {amount} is larger than the guest memory ({mem} MiB)")]
    TooLarge {
        /// Requested MiB.
        amount: u64,
        /// Guest memory MiB.
        mem: u64,
    },
    /// Statistics were not enabled before boot.
    #[error("statistics are not enabled (stats_polling_interval_s was 0 when the balloon was configured)")]
    StatsDisabled,
    /// Statistics cannot be turned on or off after boot.
    #[error("statistics cannot be turned on or off after boot")]
    StatsToggle,
    /// Free page hinting was not enabled.
    #[error("free page hinting is not enabled (free_page_hinting was false when the balloon was configured)")]
    HintingDisabled,
    /// The driver has not activated the device yet.
    #[error("the balloon device has not been activated by the guest driver")]
    NotActivated,
    /// A saved state cannot be restored.
    #[error("restoring balloon state: {0}")]
    Restore(#[from] PersistError),
}

/// The balloon's configuration (`PUT /balloon`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BalloonConfig {
    /// Target size in MiB.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Statistics interval in seconds (0 = no statistics queue).
    pub stats_polling_interval_s: u16,
    /// Offer free page hinting.
    pub free_page_hinting: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
}

/// The guest's last statistics, in Firecracker's `GET /balloon/statistics`
/// shape (values the guest did not send are left out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BalloonStats {
    /// Target pages.
    pub target_pages: u32,
    /// Pages the guest holds in the balloon.
    pub actual_pages: u32,
    /// Target MiB.
    pub target_mib: u32,
    /// MiB the guest holds in the balloon.
    pub actual_mib: u32,
    /// Bytes swapped in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Unused memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Available memory estimate, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Successful hugetlb allocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb allocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    /// Allocation stalls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    /// Memory scanned asynchronously.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    /// Memory scanned directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    /// Memory reclaimed asynchronously.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    /// Memory reclaimed directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

impl BalloonStats {
    /// The values the guest sent, as (virtio tag, value) pairs.
    fn tagged(&self) -> Vec<(u16, u64)> {
        [
            self.swap_in,
            self.swap_out,
            self.major_faults,
            self.minor_faults,
            self.free_memory,
            self.total_memory,
            self.available_memory,
            self.disk_caches,
            self.hugetlb_allocations,
            self.hugetlb_failures,
            self.oom_kill,
            self.alloc_stall,
            self.async_scan,
            self.direct_scan,
            self.async_reclaim,
            self.direct_reclaim,
        ]
        .iter()
        .enumerate()
        .filter_map(|(tag, v)| v.map(|v| (tag as u16, v)))
        .collect()
    }

    fn set(&mut self, tag: u16, val: u64) {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kill,
            11 => &mut self.alloc_stall,
            12 => &mut self.async_scan,
            13 => &mut self.direct_scan,
            14 => &mut self.async_reclaim,
            15 => &mut self.direct_reclaim,
            _ => return,
        };
        *slot = Some(val);
    }
}

/// The free page hinting state (`GET /balloon/hinting/status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HintingStatus {
    /// The last command the host issued.
    pub host_cmd: u32,
    /// The last command the guest sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cmd: Option<u32>,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BalloonCounters {
    /// Pages given back to the host (inflate, reporting, hinting).
    pub discarded_pages: u64,
    /// Frame numbers or ranges outside guest memory, skipped.
    pub invalid_ranges: u64,
    /// Statistics updates received.
    pub stats_updates: u64,
}

/// Which queue is which (indices depend on the offered features).
#[derive(Debug, Clone, Copy)]
struct Queues {
    stats: Option<usize>,
    hint: Option<usize>,
    report: Option<usize>,
    count: usize,
}

impl Queues {
    fn for_config(c: &BalloonConfig) -> Self {
        let mut next = 2;
        let mut take = |on: bool| {
            on.then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(c.stats_polling_interval_s > 0);
        let hint = take(c.free_page_hinting);
        let report = take(c.free_page_reporting);
        Queues {
            stats,
            hint,
            report,
            count: next,
        }
    }
}

/// The virtio-balloon device.
#[derive(Debug)]
pub struct Balloon {
    base: DeviceBase,
    config: BalloonConfig,
    queues: Queues,
    num_pages: u32,
    actual_pages: u32,
    hint_cmd: u32,
    last_run: u32,
    guest_cmd: Option<u32>,
    ack_on_stop: bool,
    stats: BalloonStats,
    stats_head: Option<u16>,
    timer: TimerFd,
    /// Counters for metrics.
    pub counters: BalloonCounters,
}

impl Balloon {
    /// A new, not yet activated device.
    pub fn new(config: BalloonConfig) -> Result<Self, BalloonError> {
        let queues = Queues::for_config(&config);
        let mut features = 0;
        if config.deflate_on_oom {
            features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if queues.stats.is_some() {
            features |= VIRTIO_BALLOON_F_STATS_VQ;
        }
        if queues.hint.is_some() {
            features |= VIRTIO_BALLOON_F_FREE_PAGE_HINT;
        }
        if queues.report.is_some() {
            features |= VIRTIO_BALLOON_F_PAGE_REPORTING;
        }
        let sizes = vec![QUEUE_SIZE; queues.count];
        let timer = TimerFd::new().map_err(BalloonError::Timer)?;
        // SAFETY: fcntl on a timerfd this device owns.
        unsafe {
            let fd = timer.as_raw_fd();
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Self {
            base: DeviceBase::new("virtio-balloon", features, &sizes)
                .map_err(BalloonError::EventFd)?,
            num_pages: mib_to_pages(config.amount_mib),
            config,
            queues,
            actual_pages: 0,
            hint_cmd: 0,
            last_run: 1,
            guest_cmd: None,
            ack_on_stop: false,
            stats: BalloonStats::default(),
            stats_head: None,
            timer,
            counters: BalloonCounters::default(),
        })
    }

    /// The configuration (with the current target).
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// Sets a new target (`PATCH /balloon`); `mem_mib` is the guest's
    /// memory size.
    pub fn update_target(&mut self, amount_mib: u32, mem_mib: u64) -> Result<(), BalloonError> {
        if u64::from(amount_mib) > mem_mib {
            return Err(BalloonError::TooLarge {
                amount: u64::from(amount_mib),
                mem: mem_mib,
            });
        }
        self.config.amount_mib = amount_mib;
        self.num_pages = mib_to_pages(amount_mib);
        self.base.config_changed();
        Ok(())
    }

    /// Changes the statistics interval (`PATCH /balloon/statistics`).
    /// Statistics cannot be turned on or off after boot.
    pub fn update_stats_interval(&mut self, secs: u16) -> Result<(), BalloonError> {
        if self.queues.stats.is_none() {
            return Err(BalloonError::StatsDisabled);
        }
        if secs == 0 {
            return Err(BalloonError::StatsToggle);
        }
        self.config.stats_polling_interval_s = secs;
        // Fresh values at once, then every interval.
        self.ask_stats();
        self.arm_timer();
        Ok(())
    }

    /// The latest statistics (`GET /balloon/statistics`).
    pub fn stats(&self) -> Result<BalloonStats, BalloonError> {
        if self.queues.stats.is_none() {
            return Err(BalloonError::StatsDisabled);
        }
        let mut s = self.stats;
        s.target_pages = self.num_pages;
        s.actual_pages = self.actual_pages;
        s.target_mib = self.num_pages / PAGES_PER_MIB as u32;
        s.actual_mib = self.actual_pages / PAGES_PER_MIB as u32;
        Ok(s)
    }

    /// Pages the guest says it holds.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    /// Starts a free page hinting run (`PATCH /balloon/hinting/start`).
    pub fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<(), BalloonError> {
        if self.queues.hint.is_none() {
            return Err(BalloonError::HintingDisabled);
        }
        if !self.base.is_active() {
            return Err(BalloonError::NotActivated);
        }
        // Command ids 0 and 1 are STOP and DONE; runs count up from 2, and
        // each run has a new id (the driver ignores an id it has seen).
        self.last_run = self.last_run.checked_add(1).unwrap_or(2);
        self.hint_cmd = self.last_run;
        self.ack_on_stop = acknowledge_on_stop;
        self.guest_cmd = None;
        self.base.config_changed();
        Ok(())
    }

    /// Ends a free page hinting run (`PATCH /balloon/hinting/stop`).
    pub fn stop_hinting(&mut self) -> Result<(), BalloonError> {
        if self.queues.hint.is_none() {
            return Err(BalloonError::HintingDisabled);
        }
        if !self.base.is_active() {
            return Err(BalloonError::NotActivated);
        }
        self.hint_cmd = FREE_PAGE_HINT_DONE;
        self.base.config_changed();
        Ok(())
    }

    /// The hinting state (`GET /balloon/hinting/status`).
    pub fn hinting_status(&self) -> Result<HintingStatus, BalloonError> {
        if self.queues.hint.is_none() {
            return Err(BalloonError::HintingDisabled);
        }
        Ok(HintingStatus {
            host_cmd: self.hint_cmd,
            guest_cmd: self.guest_cmd,
        })
    }

    fn arm_timer(&mut self) {
        let secs = u64::from(self.config.stats_polling_interval_s);
        if secs == 0 {
            return;
        }
        let every = Duration::from_secs(secs);
        if let Err(e) = self.timer.reset(every, Some(every)) {
            log::error!("virtio-balloon: arming the stats timer: {e}");
        }
    }

    /// Gives the held statistics buffer back so the guest refills it.
    fn ask_stats(&mut self) {
        let (Some(q), Some(head)) = (self.queues.stats, self.stats_head.take()) else {
            return;
        };
        self.base.add_used(q, head, 0);
        self.base.notify_used(q);
    }

    /// Processes every queue.
    pub fn process_queues(&mut self) {
        self.process_pfns(0, true);
        self.process_pfns(1, false);
        if let Some(q) = self.queues.stats {
            self.process_stats(q);
        }
        if let Some(q) = self.queues.hint {
            self.process_hints(q);
        }
        if let Some(q) = self.queues.report {
            self.process_ranges(q);
        }
    }

    /// Inflate (`discard`) or deflate queue: arrays of le32 frame numbers.
    fn process_pfns(&mut self, q: usize, discard: bool) {
        let Some(mem) = self.base.mem.clone() else {
            return;
        };
        let mut served = 0;
        let mut used = false;
        let mut buf = Vec::new();
        while let Some((head, parsed)) = self.base.pop_parsed(q) {
            if served >= PASS_REQUESTS {
                self.yield_queue(q);
                break;
            }
            served += 1;
            if let Ok(c) = parsed {
                let n = (c.readable_len() as usize / 4).min(MAX_PFNS);
                buf.resize(n * 4, 0);
                if c.read_at(&mem, 0, &mut buf).is_ok() && discard {
                    let pfns = buf
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    self.discard_pfns(&mem, pfns);
                }
            }
            self.base.add_used(q, head, 0);
            used = true;
        }
        if used {
            self.base.notify_used(q);
        }
    }

    /// Discards runs of consecutive frame numbers in one madvise each.
    fn discard_pfns(&mut self, mem: &GuestMemoryMmap, pfns: impl Iterator<Item = u32>) {
        let mut run: Option<(u64, u64)> = None;
        for pfn in pfns.map(u64::from) {
            match &mut run {
                Some((start, len)) if *start + *len == pfn => *len += 1,
                _ => {
                    if let Some((s, l)) = run.take() {
                        self.discard(mem, s * PAGE_SIZE, l * PAGE_SIZE);
                    }
                    run = Some((pfn, 1));
                }
            }
        }
        if let Some((s, l)) = run {
            self.discard(mem, s * PAGE_SIZE, l * PAGE_SIZE);
        }
    }

    /// Gives the host pages of guest range `[gpa, gpa+len)` back, if the
    /// range is page-aligned and inside one memory region.
    fn discard(&mut self, mem: &GuestMemoryMmap, gpa: u64, len: u64) {
        if discard_range(mem, gpa, len) {
            self.counters.discarded_pages += len / PAGE_SIZE;
        } else {
            self.counters.invalid_ranges += 1;
            log::debug!("virtio-balloon: range {gpa:#x}+{len:#x} is not guest memory; skipped");
        }
    }

    fn process_stats(&mut self, q: usize) {
        let Some(mem) = self.base.mem.clone() else {
            return;
        };
        while let Some((head, parsed)) = self.base.pop_parsed(q) {
            // A second buffer while one is held: give the old one back.
            if let Some(old) = self.stats_head.replace(head) {
                self.base.add_used(q, old, 0);
                self.base.notify_used(q);
            }
            let Ok(c) = parsed else { continue };
            let n = (c.readable_len() as usize / 10).min(64);
            let mut buf = vec![0u8; n * 10];
            if c.read_at(&mem, 0, &mut buf).is_ok() {
                for e in buf.chunks_exact(10) {
                    let tag = u16::from_le_bytes([e[0], e[1]]);
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&e[2..10]);
                    self.stats.set(tag, u64::from_le_bytes(v));
                }
                self.counters.stats_updates += 1;
            }
        }
    }

    /// Free page hinting queue: a command id (readable le32), or free ranges
    /// (writable buffers) while a run is on.
    fn process_hints(&mut self, q: usize) {
        let Some(mem) = self.base.mem.clone() else {
            return;
        };
        let mut served = 0;
        let mut used = false;
        while let Some((head, parsed)) = self.base.pop_parsed(q) {
            if served >= PASS_REQUESTS {
                self.yield_queue(q);
                break;
            }
            served += 1;
            if let Ok(c) = parsed {
                if c.readable_len() >= 4 {
                    let mut id = [0u8; 4];
                    if c.read_at(&mem, 0, &mut id).is_ok() {
                        let id = u32::from_le_bytes(id);
                        self.guest_cmd = Some(id);
                        if id == FREE_PAGE_HINT_STOP && self.ack_on_stop {
                            self.hint_cmd = FREE_PAGE_HINT_DONE;
                            self.base.config_changed();
                        }
                    }
                } else if self.hint_cmd >= 2 && self.guest_cmd == Some(self.hint_cmd) {
                    self.discard_chain(&mem, &c);
                }
            }
            self.base.add_used(q, head, 0);
            used = true;
        }
        if used {
            self.base.notify_used(q);
        }
    }

    /// Free page reporting queue: each buffer is a free range.
    fn process_ranges(&mut self, q: usize) {
        let Some(mem) = self.base.mem.clone() else {
            return;
        };
        let mut served = 0;
        let mut used = false;
        while let Some((head, parsed)) = self.base.pop_parsed(q) {
            if served >= PASS_REQUESTS {
                self.yield_queue(q);
                break;
            }
            served += 1;
            let mut len = 0;
            if let Ok(c) = parsed {
                self.discard_chain(&mem, &c);
                len = c.writable_len() as u32;
            }
            self.base.add_used(q, head, len);
            used = true;
        }
        if used {
            self.base.notify_used(q);
        }
    }

    fn discard_chain(&mut self, mem: &GuestMemoryMmap, c: &ParsedChain) {
        for seg in c.readable.iter().chain(c.writable.iter()) {
            self.discard(mem, seg.addr.0, u64::from(seg.len));
        }
    }

    fn yield_queue(&mut self, q: usize) {
        self.base.queues[q].go_to_previous_position();
        let _ = self.base.queue_evts[q].write(1);
    }

    fn register(&mut self, ops: &mut EventOps) {
        if !self.base.register_queue_events(ops) {
            return;
        }
        if self.queues.stats.is_some() {
            self.base.watch_fd(ops, self.timer.as_raw_fd(), TOKEN_TIMER);
            self.arm_timer();
        }
    }
}

fn mib_to_pages(mib: u32) -> u32 {
    (u64::from(mib) * PAGES_PER_MIB).min(u64::from(u32::MAX)) as u32
}

/// `madvise(MADV_DONTNEED)` over guest range `[gpa, gpa+len)` when it is
/// page-aligned and inside one region; false otherwise.
pub fn discard_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
    use vm_memory::GuestMemoryRegion;
    if len == 0 || gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return false;
    }
    let Some(end) = gpa.checked_add(len - 1) else {
        return false;
    };
    let Some(region) = mem.find_region(GuestAddress(gpa)) else {
        return false;
    };
    let region_end = region.start_addr().0 + (region.len() - 1);
    if end > region_end {
        return false;
    }
    let Ok(host) = mem.get_host_address(GuestAddress(gpa)) else {
        return false;
    };
    // SAFETY: [host, host+len) lies inside one mapping of guest memory that
    // this VMM owns (checked above); MADV_DONTNEED only drops its pages,
    // which read back as zeros: what a balloon promises the guest.
    let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        log::warn!(
            "virtio-balloon: madvise: {}",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

impl VirtioDevice for Balloon {
    fn base(&self) -> &DeviceBase {
        &self.base
    }
    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn config_bytes(&self) -> Vec<u8> {
        // struct virtio_balloon_config { le32 num_pages; le32 actual;
        // le32 free_page_hint_cmd_id; le32 poison_val; }
        let mut c = self.num_pages.to_le_bytes().to_vec();
        c.extend_from_slice(&self.actual_pages.to_le_bytes());
        c.extend_from_slice(&self.hint_cmd.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, 4 bytes) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.actual_pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        } else {
            log::debug!(
                "virtio-balloon: ignored config write at {offset:#x} len {}",
                data.len()
            );
        }
    }
    fn on_reset(&mut self) {
        self.actual_pages = 0;
        self.stats_head = None;
        self.guest_cmd = None;
    }
}

impl Persist for Balloon {
    type Config = BalloonConfig;
    type State = BalloonState;
    type Error = BalloonError;

    fn save(&self) -> BalloonState {
        BalloonState {
            base: self.base.save(),
            num_pages: self.num_pages,
            actual_pages: self.actual_pages,
            stats_polling_interval_s: self.config.stats_polling_interval_s,
            stats_head: self.stats_head,
            stats: self.stats.tagged(),
            hint_cmd: self.hint_cmd,
            last_run: self.last_run,
            guest_cmd: self.guest_cmd,
            ack_on_stop: self.ack_on_stop,
        }
    }

    /// The queues and features follow `config` (they must match the
    /// saved ones); the target and statistics interval are the saved ones
    /// (the API may have changed them after boot).
    fn restore(
        config: BalloonConfig,
        state: &BalloonState,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, BalloonError> {
        let field = |what: String| PersistError::Field {
            device: "virtio-balloon",
            what,
        };
        let mut b = Balloon::new(config)?;
        if (state.stats_polling_interval_s == 0) != b.queues.stats.is_none() {
            return Err(field(format!(
                "statistics interval {} does not match the configuration's statistics queue",
                state.stats_polling_interval_s
            ))
            .into());
        }
        if let Some(head) = state.stats_head {
            let live = b.queues.stats.and_then(|q| state.base.queues.get(q));
            if live.is_none_or(|q| head >= q.size) {
                return Err(field(format!(
                    "held statistics buffer {head} is not on the statistics queue"
                ))
                .into());
            }
        }
        let mem_pages = mem.last_addr().0 / PAGE_SIZE + 1;
        if u64::from(state.num_pages) > mem_pages {
            return Err(field(format!(
                "target of {} pages is larger than guest memory ({mem_pages} pages)",
                state.num_pages
            ))
            .into());
        }
        b.base.restore(&state.base, mem)?;
        b.num_pages = state.num_pages;
        b.config.amount_mib = state.num_pages / PAGES_PER_MIB as u32;
        b.config.stats_polling_interval_s = state.stats_polling_interval_s;
        b.actual_pages = state.actual_pages;
        b.stats_head = state.stats_head;
        for &(tag, v) in &state.stats {
            b.stats.set(tag, v);
        }
        b.hint_cmd = state.hint_cmd;
        b.last_run = state.last_run;
        b.guest_cmd = state.guest_cmd;
        b.ack_on_stop = state.ack_on_stop;
        Ok(b)
    }
}

impl MutEventSubscriber for Balloon {
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
                    self.process_queues();
                }
            }
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                self.ask_stats();
            }
            t if t >= TOKEN_QUEUE_BASE && ((t - TOKEN_QUEUE_BASE) as usize) < self.queues.count => {
                drain_evt(&self.base.queue_evts[(t - TOKEN_QUEUE_BASE) as usize]);
                self.process_queues();
            }
            t => log::warn!("virtio-balloon: unexpected event {t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{mem, TestQueue};
    use vm_memory::Bytes;

    const MEM: usize = 0x100000;

    struct Env {
        m: GuestMemoryMmap,
        qs: Vec<TestQueue>,
        b: Balloon,
    }

    fn env(cfg: BalloonConfig) -> Env {
        let m = mem(MEM);
        let mut b = Balloon::new(cfg).unwrap();
        let n = b.queue_max_sizes().len();
        let qs: Vec<TestQueue> = (0..n)
            .map(|i| TestQueue::new(&m, 0x10000 + i as u64 * 0x4000, 16))
            .collect();
        b.activate(m.clone(), qs.iter().map(|q| q.queue()).collect())
            .unwrap();
        Env { m, qs, b }
    }

    fn touched(m: &GuestMemoryMmap, gpa: u64) -> u8 {
        m.read_obj(GuestAddress(gpa)).unwrap()
    }

    #[test]
    fn features_and_queues_follow_the_config() {
        let b = Balloon::new(BalloonConfig::default()).unwrap();
        assert_eq!(b.queue_max_sizes().len(), 2);
        assert_eq!(b.avail_features() & 0xff, 0);
        let b = Balloon::new(BalloonConfig {
            amount_mib: 8,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: true,
            free_page_reporting: true,
        })
        .unwrap();
        assert_eq!(b.queue_max_sizes().len(), 5);
        assert_eq!(
            b.avail_features() & 0xff,
            VIRTIO_BALLOON_F_DEFLATE_ON_OOM
                | VIRTIO_BALLOON_F_STATS_VQ
                | VIRTIO_BALLOON_F_FREE_PAGE_HINT
                | VIRTIO_BALLOON_F_PAGE_REPORTING
        );
        // num_pages in the config space: 8 MiB of 4 KiB pages.
        assert_eq!(&b.config_bytes()[..4], &2048u32.to_le_bytes());
    }

    #[test]
    fn inflated_pages_are_given_back_and_bad_pfns_skipped() {
        let mut e = env(BalloonConfig::default());
        // Dirty pages 0x40..0x43 (gpa 0x40000..).
        for p in 0x40..0x43u64 {
            e.m.write_obj(0xabu8, GuestAddress(p * PAGE_SIZE)).unwrap();
        }
        // PFN array: 3 consecutive pages, one beyond memory, one huge.
        let pfns: Vec<u8> = [0x40u32, 0x41, 0x42, 0x1000, u32::MAX]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        e.m.write_slice(&pfns, GuestAddress(0x30000)).unwrap();
        e.qs[0].add_chain(&[(0x30000, pfns.len() as u32, false)]);
        e.b.process_queues();
        assert_eq!(e.qs[0].used_idx(), 1);
        for p in 0x40..0x43u64 {
            assert_eq!(touched(&e.m, p * PAGE_SIZE), 0, "page {p:#x}");
        }
        assert_eq!(e.b.counters.discarded_pages, 3);
        assert_eq!(e.b.counters.invalid_ranges, 2);
        // Deflate: returned, nothing discarded.
        e.m.write_obj(0xcdu8, GuestAddress(0x44000)).unwrap();
        e.m.write_slice(&0x44u32.to_le_bytes(), GuestAddress(0x31000))
            .unwrap();
        e.qs[1].add_chain(&[(0x31000, 4, false)]);
        e.b.process_queues();
        assert_eq!(e.qs[1].used_idx(), 1);
        assert_eq!(touched(&e.m, 0x44000), 0xcd);
    }

    #[test]
    fn the_target_and_actual_travel_through_the_config_space() {
        let mut e = env(BalloonConfig::default());
        e.b.update_target(4, 64).unwrap();
        let mut buf = [0u8; 4];
        e.b.read_config(0, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 1024);
        assert!(matches!(
            e.b.update_target(65, 64),
            Err(BalloonError::TooLarge { .. })
        ));
        e.b.write_config(4, &1000u32.to_le_bytes());
        assert_eq!(e.b.actual_pages(), 1000);
        // Writes elsewhere are ignored.
        e.b.write_config(0, &7u32.to_le_bytes());
        e.b.read_config(0, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 1024);
    }

    #[test]
    fn statistics_are_kept_and_the_buffer_held_until_asked() {
        let mut e = env(BalloonConfig {
            stats_polling_interval_s: 5,
            ..Default::default()
        });
        assert!(matches!(
            Balloon::new(BalloonConfig::default()).unwrap().stats(),
            Err(BalloonError::StatsDisabled)
        ));
        let mut raw = Vec::new();
        for (tag, val) in [(4u16, 1u64 << 20), (5, 64 << 20), (99, 1)] {
            raw.extend_from_slice(&tag.to_le_bytes());
            raw.extend_from_slice(&val.to_le_bytes());
        }
        e.m.write_slice(&raw, GuestAddress(0x30000)).unwrap();
        e.qs[2].add_chain(&[(0x30000, raw.len() as u32, false)]);
        e.b.process_queues();
        // Held, not returned.
        assert_eq!(e.qs[2].used_idx(), 0);
        let s = e.b.stats().unwrap();
        assert_eq!(s.free_memory, Some(1 << 20));
        assert_eq!(s.total_memory, Some(64 << 20));
        assert_eq!(s.swap_in, None);
        let json = serde_json::to_value(s).unwrap();
        assert!(json.get("swap_in").is_none(), "{json}");
        assert_eq!(json["free_memory"], 1 << 20);
        // PATCH /balloon/statistics asks at once: the buffer comes back.
        e.b.update_stats_interval(1).unwrap();
        assert_eq!(e.qs[2].used_idx(), 1);
        assert!(matches!(
            e.b.update_stats_interval(0),
            Err(BalloonError::StatsToggle)
        ));
    }

    #[test]
    fn reported_and_hinted_ranges_are_discarded() {
        let mut e = env(BalloonConfig {
            free_page_hinting: true,
            free_page_reporting: true,
            ..Default::default()
        });
        // Queues: 0 inflate, 1 deflate, 2 hint, 3 report.
        e.m.write_obj(1u8, GuestAddress(0x50000)).unwrap();
        e.qs[3].add_chain(&[(0x50000, 0x2000, true)]);
        e.b.process_queues();
        assert_eq!(e.qs[3].used_idx(), 1);
        assert_eq!(touched(&e.m, 0x50000), 0);

        // Hints before a run are ignored.
        e.m.write_obj(2u8, GuestAddress(0x60000)).unwrap();
        e.qs[2].add_chain(&[(0x60000, 0x1000, true)]);
        e.b.process_queues();
        assert_eq!(touched(&e.m, 0x60000), 2);
        // Start: the guest answers with the id, then hints, then STOP.
        e.b.start_hinting(true).unwrap();
        let id = e.b.hinting_status().unwrap().host_cmd;
        assert!(id >= 2);
        e.m.write_slice(&id.to_le_bytes(), GuestAddress(0x31000))
            .unwrap();
        e.qs[2].add_chain(&[(0x31000, 4, false)]);
        e.qs[2].add_chain(&[(0x60000, 0x1000, true)]);
        e.b.process_queues();
        assert_eq!(touched(&e.m, 0x60000), 0);
        e.m.write_slice(&FREE_PAGE_HINT_STOP.to_le_bytes(), GuestAddress(0x31000))
            .unwrap();
        e.qs[2].add_chain(&[(0x31000, 4, false)]);
        e.b.process_queues();
        let st = e.b.hinting_status().unwrap();
        assert_eq!(st.guest_cmd, Some(FREE_PAGE_HINT_STOP));
        // acknowledge_on_stop: DONE.
        assert_eq!(st.host_cmd, FREE_PAGE_HINT_DONE);
        // The next run has a new id.
        e.b.start_hinting(false).unwrap();
        assert_eq!(e.b.hinting_status().unwrap().host_cmd, id + 1);
        e.b.stop_hinting().unwrap();
        assert_eq!(e.b.hinting_status().unwrap().host_cmd, FREE_PAGE_HINT_DONE);
    }

    #[test]
    fn discard_range_checks_bounds_and_alignment() {
        let m = mem(MEM);
        assert!(discard_range(&m, 0, PAGE_SIZE));
        assert!(!discard_range(&m, 1, PAGE_SIZE));
        assert!(!discard_range(&m, 0, 100));
        assert!(!discard_range(&m, MEM as u64 - PAGE_SIZE, 2 * PAGE_SIZE));
        assert!(!discard_range(&m, u64::MAX - 0xfff, PAGE_SIZE));
        assert!(!discard_range(&m, 0, 0));
    }
}
