//! TAP backend: /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a
//! 12-byte vnet header (virtio_net_hdr_v1) and non-blocking I/O.
//!
//! macvtap (an ember extension): when the character device
//! `/dev/macvtap/<name>` exists, it is opened instead of `/dev/net/tun`
//! and given the same flags and header size (the macvtap driver ignores
//! the name in TUNSETIFF and accepts exactly these flags). The node is the
//! macvtap link's `/dev/tapN` (major:minor from
//! `/sys/class/net/<name>/macvtap/tap<ifindex>/dev`); ember-jailer makes it
//! with `--macvtap NAME=MAJOR:MINOR`, and an unjailed ember-vmm user can
//! `mknod` it there themselves.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::{NetBackend, NetError, VNET_HDR_LEN};

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// IFNAMSIZ.
pub const IFNAMSIZ: usize = 16;
/// Directory where a macvtap link's character device is looked up.
pub const MACVTAP_DIR: &str = "/dev/macvtap";

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates) the TAP interface `name`; a macvtap link when
    /// `/dev/macvtap/<name>` exists.
    pub fn open(name: &str) -> Result<Self, NetError> {
        let bytes = name.as_bytes();
        if bytes.is_empty()
            || bytes.len() >= IFNAMSIZ
            || bytes.contains(&0)
            || bytes.contains(&b'/')
            || name == "."
            || name == ".."
        {
            return Err(NetError::BadTapName(name.to_string()));
        }
        let macvtap = std::path::Path::new(MACVTAP_DIR).join(name);
        let dev = if macvtap.exists() {
            macvtap.as_path()
        } else {
            std::path::Path::new("/dev/net/tun")
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(dev)
            .map_err(|e| NetError::TapOpen(dev.to_path_buf(), e))?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads/writes a struct ifreq, which `IfReq` lays
        // out (40 bytes) and which outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(NetError::TapSetup(std::io::Error::last_os_error()));
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from a valid pointer.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr_len) };
        if r < 0 {
            return Err(NetError::TapSetup(std::io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
    fn write_frame(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
}
