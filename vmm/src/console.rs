//! Where a microVM's console (COM1) output goes ([`Serial`], re-exported
//! by [`crate::microvm`]).

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use std::sync::Arc;
use std::time::Instant;

use devices::legacy::serial::{NonBlockingOut, SerialOut};
use devices::virtio::metrics::Counter;
use devices::virtio::rate_limiter::{TokenBucket, TokenBucketConfig};

use crate::actions::ActionError;

/// A function that receives guest console output ([`Serial::Callback`]).
pub type ConsoleCallback = Box<dyn FnMut(&[u8]) + Send>;

/// Where the guest's console (COM1) output goes.
pub enum Serial {
    /// The process's standard output.
    Stdout,
    /// Appended to this file (created if missing).
    File(PathBuf),
    /// Handed to this function, on the vCPU thread that wrote it, in pieces
    /// as the guest writes them (often a byte at a time). It runs under the
    /// serial device's lock: keep it short (push into a channel or buffer).
    Callback(ConsoleCallback),
    /// Written to this descriptor (a pipe, socket or terminal) without ever
    /// blocking: output that does not fit is dropped, as a UART with nobody
    /// reading loses bytes. [`Serial::pipe`] makes one with a reader.
    Fd(OwnedFd),
    /// Dropped.
    Discard,
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Serial::Stdout => write!(f, "Stdout"),
            Serial::File(p) => f.debug_tuple("File").field(p).finish(),
            Serial::Callback(_) => write!(f, "Callback(..)"),
            Serial::Fd(fd) => f.debug_tuple("Fd").field(fd).finish(),
            Serial::Discard => write!(f, "Discard"),
        }
    }
}

/// A [`Serial::Callback`] as the serial device's writer.
struct CallbackOut(ConsoleCallback);

impl Write for CallbackOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (self.0)(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Serial {
    /// A pipe for the console: the [`Serial::Fd`] to give the builder and
    /// the reading end. Read it steadily: while the pipe (64 KiB) is full,
    /// guest output is dropped.
    pub fn pipe() -> std::io::Result<(Serial, std::fs::File)> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Serial::Fd(w), std::fs::File::from(r)))
    }

    /// The writer for the serial device. `Stdout` is a dup of fd 1, written
    /// unbuffered and never blocking (output that does not fit is dropped).
    pub(crate) fn into_writer(self) -> Result<SerialOut, ActionError> {
        match self {
            Serial::File(p) => OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&p)
                .map(|f| Box::new(NonBlockingOut::new(f)) as SerialOut)
                .map_err(|err| ActionError::SerialOut {
                    path: p.display().to_string(),
                    err,
                }),
            Serial::Stdout => {
                // Unbuffered: guest output must show up as it is written.
                // SAFETY: dup(1) returns a new fd we own (or -1, checked).
                let fd = unsafe { libc::dup(libc::STDOUT_FILENO) };
                if fd < 0 {
                    return Err(ActionError::SerialOut {
                        path: "stdout".into(),
                        err: std::io::Error::last_os_error(),
                    });
                }
                // SAFETY: `fd` is a fresh descriptor owned by nobody else.
                let f = unsafe { std::fs::File::from_raw_fd(fd) };
                Ok(Box::new(NonBlockingOut::new(f)))
            }
            Serial::Callback(f) => Ok(Box::new(CallbackOut(f))),
            Serial::Fd(fd) => Ok(Box::new(NonBlockingOut::new(std::fs::File::from(fd)))),
            Serial::Discard => Ok(Box::new(std::io::sink())),
        }
    }
}

/// `PUT /serial`'s `rate_limiter`: guest output beyond the bucket is
/// dropped (a UART write is never held back) and counted, as in
/// Firecracker (`uart.rate_limiter_dropped_bytes`).
pub(crate) struct RateLimitedOut {
    inner: SerialOut,
    bucket: TokenBucket,
    dropped: Arc<Counter>,
}

impl RateLimitedOut {
    /// Wraps `inner`; `None` when the bucket is unlimited (size or refill
    /// time 0).
    pub fn wrap(inner: SerialOut, cfg: &TokenBucketConfig, dropped: Arc<Counter>) -> SerialOut {
        match TokenBucket::new(cfg) {
            Some(bucket) => Box::new(RateLimitedOut {
                inner,
                bucket,
                dropped,
            }),
            None => inner,
        }
    }
}

impl Write for RateLimitedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bucket.try_consume(buf.len() as u64, Instant::now()) {
            self.inner.write_all(buf)?;
        } else {
            self.dropped.add(buf.len() as u64);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_beyond_the_bucket_is_dropped_and_counted() {
        let sink = Sink::default();
        let dropped = Arc::new(Counter::default());
        let cfg = TokenBucketConfig {
            size: 10,
            one_time_burst: 0,
            refill_time: 1_000_000,
        };
        let mut out = RateLimitedOut::wrap(Box::new(sink.clone()), &cfg, dropped.clone());
        for _ in 0..25 {
            assert_eq!(out.write(b"x").unwrap(), 1);
        }
        assert_eq!(sink.0.lock().unwrap().len(), 10);
        assert_eq!(dropped.take(), 15);
        let unlimited = TokenBucketConfig {
            size: 0,
            one_time_burst: 0,
            refill_time: 0,
        };
        let mut out = RateLimitedOut::wrap(Box::new(sink.clone()), &unlimited, dropped.clone());
        out.write_all(&[b'y'; 100]).unwrap();
        assert_eq!(dropped.take(), 0);
    }
}
