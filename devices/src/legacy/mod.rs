//! Legacy port-I/O devices: COM1 (vm-superio's 8250) and the i8042 controller.

pub mod i8042;
pub mod serial;

pub use i8042::{I8042Device, I8042Error};
pub use serial::{EventFdTrigger, SerialDevice, SerialError};
