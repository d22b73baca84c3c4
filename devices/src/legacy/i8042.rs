//! i8042 keyboard controller, just enough for guests to reset the machine
//! (command 0xfe) and to receive Ctrl-Alt-Del.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Errors from the i8042 device.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The guest has not drained earlier key presses.
    #[error("i8042 output buffer is full")]
    BufferFull,
    /// Raising the keyboard interrupt failed.
    #[error("failed to raise the keyboard interrupt: {0}")]
    Interrupt(std::io::Error),
    /// A saved state cannot be restored.
    #[error("i8042 state: {0}")]
    State(String),
}

/// The controller's registers and output buffer, for a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub control: u8,
    /// Output port.
    pub outp: u8,
    /// A command waiting for its data byte.
    pub pending_cmd: Option<u8>,
    /// Bytes the guest has not read (at most 16).
    pub buf: Vec<u8>,
}

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;

const SB_OUT_FULL: u8 = 0x01;
const SB_SYS_FLAG: u8 = 0x04;
const SB_LAST_WAS_CMD: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;

const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const SELF_TEST_OK: u8 = 0x55;

/// Set-2 make codes for Ctrl, Alt and Delete.
pub const CTRL_ALT_DEL_SCANCODES: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

const BUF_SIZE: usize = 16;

/// The i8042 controller on ports 0x60 (data) and 0x64 (status/command).
pub struct I8042Device {
    reset_evt: EventFd,
    kbd_irq: EventFd,
    status: u8,
    control: u8,
    outp: u8,
    pending_cmd: Option<u8>,
    buf: VecDeque<u8>,
}

impl I8042Device {
    /// `reset_evt` is written when the guest asks for a CPU reset;
    /// `kbd_irq` raises IRQ 1.
    pub fn new(reset_evt: EventFd, kbd_irq: EventFd) -> Self {
        I8042Device {
            reset_evt,
            kbd_irq,
            status: SB_SYS_FLAG | SB_KBD_ENABLED,
            control: CB_KBD_INT | CB_POST_OK,
            outp: 0,
            pending_cmd: None,
            buf: VecDeque::with_capacity(BUF_SIZE),
        }
    }

    /// The registers and output buffer.
    pub fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            outp: self.outp,
            pending_cmd: self.pending_cmd,
            buf: self.buf.iter().copied().collect(),
        }
    }

    /// A controller in the saved `state`. A buffer over 16 bytes, or a
    /// pending command that takes no data byte, is refused; a non-empty
    /// buffer raises the keyboard interrupt again (if enabled).
    pub fn restore(
        reset_evt: EventFd,
        kbd_irq: EventFd,
        state: &I8042State,
    ) -> Result<Self, I8042Error> {
        if state.buf.len() > BUF_SIZE {
            return Err(I8042Error::State(format!(
                "{} buffered bytes, at most {BUF_SIZE}",
                state.buf.len()
            )));
        }
        if let Some(c) = state.pending_cmd {
            if ![CMD_WRITE_CTR, CMD_WRITE_OUTP, CMD_WRITE_KBD_OUT].contains(&c) {
                return Err(I8042Error::State(format!(
                    "pending command {c:#x} takes no data"
                )));
            }
        }
        let mut d = Self::new(reset_evt, kbd_irq);
        d.status = state.status;
        d.control = state.control;
        d.outp = state.outp;
        d.pending_cmd = state.pending_cmd;
        d.buf = state.buf.iter().copied().collect();
        if d.buf.is_empty() {
            d.status &= !SB_OUT_FULL;
        } else {
            d.status |= SB_OUT_FULL;
            d.raise_kbd_irq()?;
        }
        Ok(d)
    }

    /// Raises the keyboard interrupt again if bytes wait for the guest
    /// (after a restore, once the interrupt controller has its saved
    /// state).
    pub fn raise_pending(&self) {
        if !self.buf.is_empty() {
            if let Err(e) = self.raise_kbd_irq() {
                log::error!("i8042: {e}");
            }
        }
    }

    /// Queues Ctrl-Alt-Del key presses and raises the keyboard interrupt.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if self.buf.len() + CTRL_ALT_DEL_SCANCODES.len() > BUF_SIZE {
            return Err(I8042Error::BufferFull);
        }
        self.buf.extend(CTRL_ALT_DEL_SCANCODES);
        self.status |= SB_OUT_FULL;
        self.raise_kbd_irq()
    }

    fn raise_kbd_irq(&self) -> Result<(), I8042Error> {
        if self.control & CB_KBD_INT != 0 {
            self.kbd_irq.write(1).map_err(I8042Error::Interrupt)?;
        }
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.buf.len() < BUF_SIZE {
            self.buf.push_back(byte);
        }
        self.status |= SB_OUT_FULL;
    }

    fn pop(&mut self) -> u8 {
        let b = self.buf.pop_front().unwrap_or(0);
        if self.buf.is_empty() {
            self.status &= !SB_OUT_FULL;
        } else {
            let _ = self.raise_kbd_irq();
        }
        b
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_CMD;
        match cmd {
            CMD_READ_CTR => {
                let c = self.control;
                self.push(c)
            }
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUT => self.pending_cmd = Some(cmd),
            CMD_READ_OUTP => {
                let o = self.outp;
                self.push(o)
            }
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_KBD_TEST => self.push(0),
            CMD_DISABLE_KBD => self.status &= !SB_KBD_ENABLED,
            CMD_ENABLE_KBD => self.status |= SB_KBD_ENABLED,
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_RESET_CPU => {
                if let Err(e) = self.reset_evt.write(1) {
                    eprintln!("ember-vmm: i8042: failed to signal reset: {e}");
                }
            }
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTP) => self.outp = value,
            Some(CMD_WRITE_KBD_OUT) => {
                self.push(value);
                let _ = self.raise_kbd_irq();
            }
            _ => {
                // A command for the keyboard itself: acknowledge it, and
                // answer a reset with a passed self-test.
                self.push(KBD_ACK);
                if value == 0xff {
                    self.push(KBD_SELF_TEST_OK);
                }
                let _ = self.raise_kbd_irq();
            }
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            OFS_DATA => self.pop(),
            OFS_STATUS => self.status,
            _ => 0xff,
        };
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            OFS_DATA => self.data(data[0]),
            OFS_STATUS => self.command(data[0]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn dev() -> I8042Device {
        I8042Device::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
    }

    fn rd(d: &mut I8042Device, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(0x60, off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals() {
        let mut d = dev();
        d.write(0x60, 4, &[CMD_RESET_CPU]);
        assert_eq!(d.reset_evt.read().unwrap(), 1);
    }

    #[test]
    fn ctrl_alt_del_sequence_and_irq() {
        let mut d = dev();
        assert_eq!(rd(&mut d, 4) & SB_OUT_FULL, 0);
        d.trigger_ctrl_alt_del().unwrap();
        assert_eq!(d.kbd_irq.read().unwrap(), 1);
        let mut got = vec![];
        while rd(&mut d, 4) & SB_OUT_FULL != 0 {
            got.push(rd(&mut d, 0));
        }
        assert_eq!(got, CTRL_ALT_DEL_SCANCODES);
    }

    #[test]
    fn buffer_overflow_is_an_error() {
        let mut d = dev();
        for _ in 0..4 {
            d.trigger_ctrl_alt_del().unwrap();
        }
        assert!(matches!(
            d.trigger_ctrl_alt_del(),
            Err(I8042Error::BufferFull)
        ));
    }

    #[test]
    fn control_byte_round_trip_and_self_test() {
        let mut d = dev();
        d.write(0x60, 4, &[CMD_WRITE_CTR]);
        d.write(0x60, 0, &[0x45]);
        d.write(0x60, 4, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, 0), 0x45);
        d.write(0x60, 4, &[CMD_SELF_TEST]);
        assert_eq!(rd(&mut d, 0), SELF_TEST_OK);
        d.write(0x60, 0, &[0xff]);
        assert_eq!(rd(&mut d, 0), KBD_ACK);
        assert_eq!(rd(&mut d, 0), KBD_SELF_TEST_OK);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let mut d = dev();
        d.write(0x60, 4, &[CMD_WRITE_CTR]);
        d.write(0x60, 0, &[0x47]);
        d.write(0x60, 4, &[CMD_WRITE_OUTP]);
        d.trigger_ctrl_alt_del().unwrap();
        let st = d.save();
        assert_eq!(st.pending_cmd, Some(CMD_WRITE_OUTP));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut r = I8042Device::restore(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            irq.try_clone().unwrap(),
            &st,
        )
        .unwrap();
        assert_eq!(r.save(), st);
        assert_eq!(irq.read().unwrap(), 1);
        r.raise_pending();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut r, 0), CTRL_ALT_DEL_SCANCODES[0]);
        for bad in [
            I8042State {
                buf: vec![0; 17],
                ..st.clone()
            },
            I8042State {
                pending_cmd: Some(CMD_SELF_TEST),
                ..st.clone()
            },
        ] {
            let e = I8042Device::restore(
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
                &bad,
            );
            assert!(matches!(e, Err(I8042Error::State(_))));
        }
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let mut d = dev();
        let mut b = [0u8; 2];
        d.read(0x60, 0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        d.write(0x60, 4, &[CMD_RESET_CPU, 0]);
        assert!(d.reset_evt.read().is_err());
    }
}
