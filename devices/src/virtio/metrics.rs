//! Per-device counters, read by the VMM's metrics writer under
//! Firecracker's names. Each device owns an `Arc` of its counters and bumps
//! them with relaxed atomics; the writer takes (reads and zeroes) them, so
//! every metrics line holds what happened since the previous one.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1)
    }
    /// The value since the last take, and zero.
    pub fn take(&self) -> u64 {
        self.0.swap(0, Ordering::Relaxed)
    }
}

macro_rules! counters {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: Counter,)*
        }

        impl $name {
            /// Every counter by its Firecracker name, taken (zeroed).
            pub fn take(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.take()),)*]
            }
        }
    };
}

counters!(
    /// virtio-blk counters (Firecracker's `block` group).
    BlockMetrics {
        /// Queue notifications from the guest.
        queue_event_count,
        /// Read requests served.
        read_count,
        /// Bytes read for the guest.
        read_bytes,
        /// Write requests served.
        write_count,
        /// Bytes written for the guest.
        write_bytes,
        /// Flush requests.
        flush_count,
        /// Malformed or oversized requests.
        invalid_reqs_count,
        /// Requests that ended with an I/O error.
        execute_fails,
        /// Times the rate limiter held requests back.
        rate_limiter_throttled_events,
    }
);

counters!(
    /// virtio-net counters (Firecracker's `net` group).
    NetMetrics {
        /// rx queue notifications from the guest.
        rx_queue_event_count,
        /// tx queue notifications from the guest.
        tx_queue_event_count,
        /// Frames handed to the guest.
        rx_packets_count,
        /// Their bytes (without the virtio-net header).
        rx_bytes_count,
        /// Frames dropped on the way in (no fitting buffer, bad chain).
        rx_fails,
        /// Frames sent for the guest.
        tx_packets_count,
        /// Their bytes (without the virtio-net header).
        tx_bytes_count,
        /// Frames dropped on the way out (malformed, backend refused).
        tx_fails,
        /// Malformed tx frames.
        tx_malformed_frames,
        /// Times the rx limiter held frames back.
        rx_rate_limiter_throttled,
        /// Times the tx limiter held frames back.
        tx_rate_limiter_throttled,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_reads_and_zeroes() {
        let m = BlockMetrics::default();
        m.read_count.inc();
        m.read_bytes.add(512);
        let t = m.take();
        assert!(t.contains(&("read_count", 1)));
        assert!(t.contains(&("read_bytes", 512)));
        assert!(m.take().iter().all(|(_, v)| *v == 0));
    }
}
