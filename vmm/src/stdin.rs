//! Feeds the VMM's stdin to the guest's COM1.

use std::io::Read;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

/// Event-loop subscriber for fd 0. Stdin that epoll cannot watch (a regular
/// file, /dev/null) is ignored.
pub struct SerialStdin {
    serial: Arc<Mutex<SerialDevice>>,
    stdin: std::io::Stdin,
}

impl SerialStdin {
    /// Feeds `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        SerialStdin {
            serial,
            stdin: std::io::stdin(),
        }
    }
}

impl MutEventSubscriber for SerialStdin {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = self.stdin.lock().read(&mut buf).unwrap_or(0);
        if n == 0 {
            // EOF or error: stop watching.
            let _ = events;
            let _ = ops.remove(Events::new(&self.stdin, EventSet::IN));
            return;
        }
        // Like a real UART, input the guest has no room for is dropped.
        let mut serial = self.serial.lock().expect("serial poisoned");
        if let Err(e) = serial.enqueue_input(&buf[..n]) {
            eprintln!("ember-vmm: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Fails with EPERM for files and /dev/null: then there is no input.
        let _ = ops.add(Events::new(&self.stdin, EventSet::IN));
    }
}
