//! COM1: vm-superio's 8250 UART on the port bus, interrupting through an
//! EventFd (irqfd), printing to any writer.

use std::io::Write;
use std::os::fd::AsRawFd;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Errors from the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Queuing input for the guest failed.
    #[error("serial input: {0}")]
    Input(String),
    /// A saved state cannot be restored.
    #[error("serial state: {0}")]
    State(String),
}

/// The UART's registers and pending input, for a snapshot (vm-superio's
/// `SerialState`, with serde).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt Enable Register.
    pub interrupt_enable: u8,
    /// Interrupt Identification Register.
    pub interrupt_identification: u8,
    /// Line Control Register.
    pub line_control: u8,
    /// Line Status Register.
    pub line_status: u8,
    /// Modem Control Register.
    pub modem_control: u8,
    /// Modem Status Register.
    pub modem_status: u8,
    /// Scratch Register.
    pub scratch: u8,
    /// Input the guest has not read yet (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

/// An EventFd that vm-superio can trigger.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The output side: anything that takes bytes.
pub type SerialOut = Box<dyn Write + Send>;

/// Guest output to a file, pipe, socket or terminal that never blocks:
/// before each write it asks `poll` (timeout 0) whether there is room, and
/// drops what does not fit (a UART with nobody reading loses bytes too).
/// Serial writes happen on vCPU threads under the serial lock, which the
/// VMM thread takes for input and at shutdown: a blocked write to a full
/// pipe would stall the guest and then the VMM. Regular files always have
/// room. The fd is left as it is (stdout's flags are shared with others).
pub struct NonBlockingOut<W: Write + AsRawFd + Send> {
    inner: W,
    /// Bytes dropped since output last went through.
    dropped: u64,
}

impl<W: Write + AsRawFd + Send> NonBlockingOut<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner, dropped: 0 }
    }

    fn has_room(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.inner.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, timeout 0: returns at once.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1 && p.revents & libc::POLLOUT != 0
    }

    fn drop_bytes(&mut self, n: usize) -> std::io::Result<usize> {
        if self.dropped == 0 {
            log::warn!("serial: output dropped: its reader is not keeping up");
        }
        self.dropped += n as u64;
        Ok(n)
    }
}

impl<W: Write + AsRawFd + Send> Write for NonBlockingOut<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !self.has_room() {
            return self.drop_bytes(buf.len());
        }
        // POLLOUT on a pipe promises room for PIPE_BUF bytes.
        let n = buf.len().min(libc::PIPE_BUF);
        match self.inner.write(&buf[..n]) {
            Ok(w) => {
                if self.dropped > 0 {
                    log::warn!("serial: {} output byte(s) were dropped", self.dropped);
                    self.dropped = 0;
                }
                Ok(w)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.drop_bytes(n),
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Only userspace buffers would need it, and there are none.
        Ok(())
    }
}

/// 8250 UART bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing guest output to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues bytes for the guest to read; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        self.serial
            .enqueue_raw_bytes(bytes)
            .map_err(|e| SerialError::Input(format!("{e:?}")))
    }

    /// Room left in the input FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// The registers and pending input.
    pub fn save(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the saved `state`, raising `irq` and writing to `out`. An
    /// interrupt the state has pending is raised again. More input than
    /// the FIFO holds is refused.
    pub fn restore(irq: EventFd, out: SerialOut, state: &SerialState) -> Result<Self, SerialError> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&s, EventFdTrigger(irq), NoEvents, out).map_err(|e| {
            SerialError::State(format!("{e} ({} input bytes saved)", state.in_buffer.len()))
        })?;
        Ok(SerialDevice { serial })
    }

    /// Raises the interrupt again if one is pending (the Interrupt
    /// Identification Register says so): after a restore, once the VM's
    /// interrupt controller has its saved state, which would otherwise
    /// hide a pulse sent before it. A repeated edge is harmless.
    pub fn raise_pending(&self) {
        const IIR_NO_INTERRUPT_PENDING: u8 = 0x01;
        if self.serial.state().interrupt_identification & IIR_NO_INTERRUPT_PENDING == 0 {
            if let Err(e) = self.serial.interrupt_evt().trigger() {
                log::error!("serial: raising the interrupt: {e}");
            }
        }
    }

    /// Flushes the output writer.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            eprintln!("ember-vmm: serial: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn state_round_trips_and_an_overfull_fifo_is_refused() {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        s.write(0x3f8, 3, &[0x80]); // DLAB
        s.write(0x3f8, 0, &[0x0c]);
        s.write(0x3f8, 3, &[0x03]);
        s.write(0x3f8, 7, &[0x5a]);
        s.write(0x3f8, 1, &[0x01]);
        s.enqueue_input(b"ab").unwrap();
        let st = s.save();
        assert_eq!(st.in_buffer, b"ab");
        let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut r =
            SerialDevice::restore(irq2.try_clone().unwrap(), Box::new(out.clone()), &st).unwrap();
        assert_eq!(r.save(), st);
        // the pending "data available" interrupt is raised again, and once
        // more on demand (after the irqchip is restored)
        assert!(irq2.read().unwrap() >= 1);
        r.raise_pending();
        assert_eq!(irq2.read().unwrap(), 1);
        let mut b = [0u8];
        r.read(0x3f8, 7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0x3f8, 0, &mut b);
        assert_eq!(b[0], b'a');
        let big = SerialState {
            in_buffer: vec![0; 65],
            ..st
        };
        let irq3 = EventFd::new(EFD_NONBLOCK).unwrap();
        assert!(SerialDevice::restore(irq3, Box::new(out), &big).is_err());
    }

    #[test]
    fn output_to_a_full_pipe_is_dropped_not_waited_for() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: fresh fds from pipe2, owned here.
        let (mut r, w) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq, Box::new(NonBlockingOut::new(w)));
        // Far more than a pipe holds (64 KiB): a blocking writer would hang.
        for _ in 0..(256 << 10) {
            s.write(0x3f8, 0, b"x");
        }
        // The reader comes back: output flows again.
        let mut buf = vec![0u8; 256 << 10];
        use std::io::Read;
        let got = r.read(&mut buf).unwrap();
        assert!(got > 0 && got < 256 << 10, "{got}");
        s.write(0x3f8, 0, b"!");
        let mut one = [0u8; 1 << 16];
        let n = r.read(&mut one).unwrap();
        assert_eq!(one[n - 1], b'!');
    }

    #[test]
    fn output_reaches_the_writer_and_input_the_guest() {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0x3f8, 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // enable "received data available" interrupts, then feed input
        s.write(0x3f8, 1, &[0x01]);
        assert_eq!(s.enqueue_input(b"x").unwrap(), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(0x3f8, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1);
        let mut rbr = [0u8];
        s.read(0x3f8, 0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }
}
