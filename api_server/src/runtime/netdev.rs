//! Host network devices for microVM interfaces: persistent TAPs and static
//! guest addresses.
//!
//! * [`tap_name`] derives a deterministic host TAP name (at most 15 bytes,
//!   the kernel's `IFNAMSIZ - 1`) from an instance id and interface index.
//! * [`create_tap`] makes a *persistent* TAP (`IFF_TAP | IFF_NO_PI |
//!   IFF_VNET_HDR`), optionally owned by the jailed VMM's uid:gid so the
//!   VMM can attach to it without `CAP_NET_ADMIN`, brings it up, and can do
//!   all of that inside another network namespace. [`delete_tap`] and
//!   [`tap_exists`] complete the lifecycle.
//! * [`create_macvtap`] makes a macvtap link (mode bridge, the guest's MAC,
//!   up) on a parent link, as flintlockd does for `MACVTAP` interfaces;
//!   [`macvtap_dev`] reads the major:minor of its character device (which
//!   the jailer recreates as `/dev/macvtap/<name>` for the VMM) and
//!   [`delete_macvtap`] removes it. These run iproute2's `ip` (every name
//!   and MAC is validated first, none may start with '-') in emberd's own
//!   network namespace; sysfs must be that namespace's (as under
//!   `ip netns exec`).
//! * [`StaticAddress`] validates a Flintlock static address (CIDR, optional
//!   gateway, nameservers) and [`kernel_ip_param`] turns it into the Linux
//!   `ip=` boot parameter so a Linux guest configures the interface itself.
//!
//! Everything else uses plain ioctls (no netlink, no external commands).
//! Namespace switches happen on a short-lived dedicated thread: `setns`
//! with `CLONE_NEWNET` only affects the calling thread, so the caller's
//! threads never change namespace.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Errors from TAP management and address handling.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    /// The interface name breaks the kernel's naming rules.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded?): {0}")]
    TunOpen(#[source] io::Error),
    /// The network namespace file could not be opened or entered.
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A device with this name already exists (`create_tap`).
    #[error("network device {0:?} already exists")]
    AlreadyExists(String),
    /// No device with this name exists (`delete_tap`).
    #[error("TAP device {0:?} does not exist")]
    NotFound(String),
    /// The device is attached to another process (`delete_tap`).
    #[error("TAP device {0:?} is busy: another process (a VMM still running?) has it open")]
    Busy(String),
    /// The device exists but is not a single-queue TAP.
    #[error("network device {0:?} exists but is not a single-queue TAP")]
    NotATap(String),
    /// EPERM/EACCES from the kernel.
    #[error(
        "permission denied to {op} TAP {name:?}: needs CAP_NET_ADMIN \
         (or the TAP belongs to another user)"
    )]
    PermissionDenied { op: &'static str, name: String },
    /// Any other failing ioctl or socket call.
    #[error("{op} on {name:?} failed: {source}")]
    Os {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    /// The namespace worker thread could not be spawned or panicked.
    #[error("network namespace worker thread failed: {0}")]
    Worker(String),
    /// A static address, gateway or nameserver is malformed.
    #[error("invalid static address: {0}")]
    InvalidAddress(String),
    /// A MAC address is malformed, multicast or all zeros.
    #[error("invalid MAC address {0:?}: six ':'-separated hex pairs, unicast, not all zeros")]
    InvalidMac(String),
    /// The `ip` command failed (its stderr, at most 300 bytes).
    #[error("ip {op} for {name:?} failed: {stderr}")]
    IpCommand {
        op: &'static str,
        name: String,
        stderr: String,
    },
    /// A device exists under this name but is not a macvtap link.
    #[error("network device {0:?} exists but is not a macvtap link")]
    NotAMacvtap(String),
    /// The macvtap's character device could not be read from sysfs.
    #[error("cannot read the character device of macvtap {name:?} from sysfs: {reason}")]
    MacvtapDev { name: String, reason: String },
    /// A hostname cannot be used in the kernel `ip=` parameter.
    #[error("invalid hostname {0:?}: letters, digits, '-' and '.' only, at most 64 bytes")]
    InvalidHostname(String),
}

/// Longest interface name the kernel accepts (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;

const IFNAMSIZ: usize = 16;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// Fail TUNSETIFF with EBUSY when the device already exists.
const IFF_TUN_EXCL: i16 = 0x8000_u16 as i16;
const TAP_FLAGS: i16 = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;

// _IOW('T', n, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

/// `struct ifreq` with the `short ifr_flags` member of its union (40 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> Self {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        // validate_ifname guarantees len <= 15, leaving the NUL.
        let bytes = name.as_bytes();
        let n = bytes.len().min(MAX_IFNAME_LEN);
        req.name[..n].copy_from_slice(&bytes[..n]);
        req
    }
}

/// Deterministic host TAP name for interface `index` of `instance_id`.
///
/// The form is `emb` + 8 lowercase base-36 characters of the 64-bit FNV-1a
/// hash of `instance_id` + `index` in decimal, e.g. `emb0k3x9a7b0` for
/// eth0 and `emb0k3x9a7b1` for eth1: at most 15 characters for any index
/// below 10 000. The hash part has a fixed width, so two different indexes
/// of one instance never collide, and different instances collide only if
/// their hashes agree on ~41 bits. Indexes of 10 000 or more (never used in
/// practice) fall back to `emx` + 12 base-36 characters of the hash of
/// `instance_id`, a NUL byte and `index`.
///
/// The hash is FNV-1a, fixed here, so names are stable across emberd builds
/// and restarts (a restarted daemon finds its TAPs again).
pub fn tap_name(instance_id: &str, index: usize) -> String {
    if index < 10_000 {
        let h = fnv1a(instance_id.as_bytes());
        format!("emb{}{}", base36(h, 8), index)
    } else {
        let mut key = instance_id.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(index.to_string().as_bytes());
        format!("emx{}", base36(fnv1a(&key), 12))
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The low `width` base-36 digits of `v`, most significant first.
fn base36(mut v: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(v % 36) as usize];
        v /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks a network interface name against the kernel's rules: 1 to 15
/// bytes, not `.` or `..`, no `/`, `:`, whitespace or NUL.
pub fn validate_ifname(name: &str) -> Result<(), NetdevError> {
    let bad = |reason| {
        Err(NetdevError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_IFNAME_LEN {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are reserved");
    }
    if let Some(c) = name
        .chars()
        .find(|&c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Err(NetdevError::InvalidName {
            name: name.to_string(),
            reason: match c {
                '/' => "contains '/'",
                ':' => "contains ':'",
                '\0' => "contains NUL",
                _ => "contains whitespace",
            },
        });
    }
    Ok(())
}

/// Creates the persistent TAP `name` and brings it up.
///
/// * `owner`: `(uid, gid)` set with TUNSETOWNER/TUNSETGROUP, so a process
///   with that effective uid *and* that gid among its groups can attach to
///   the TAP without any capability — the jailed VMM's credentials. Anyone
///   else needs `CAP_NET_ADMIN`. With `None` the kernel checks nothing
///   beyond access to `/dev/net/tun`: any user who can open it may attach.
/// * `netns`: a network namespace file (`/var/run/netns/NAME`,
///   `/proc/PID/ns/net`) to create the TAP in; `None` uses the caller's.
///
/// Fails with [`NetdevError::AlreadyExists`] if any device with that name
/// exists (delete it first to re-create). On any failure nothing is left
/// behind: the TAP is made persistent only as the last step.
pub fn create_tap(
    name: &str,
    owner: Option<(u32, u32)>,
    netns: Option<&Path>,
) -> Result<(), NetdevError> {
    validate_ifname(name)?;
    let name = name.to_string();
    in_netns(netns, move || create_tap_here(&name, owner))?
}

/// Deletes the persistent TAP `name` (clears TUNSETPERSIST; the kernel
/// removes the device when the last file descriptor closes).
///
/// Errors: [`NetdevError::NotFound`] if it does not exist,
/// [`NetdevError::Busy`] while a VMM still has it open,
/// [`NetdevError::NotATap`] for a device of another kind.
pub fn delete_tap(name: &str, netns: Option<&Path>) -> Result<(), NetdevError> {
    validate_ifname(name)?;
    let name = name.to_string();
    in_netns(netns, move || delete_tap_here(&name))?
}

/// `SIOCBRADDIF` (linux/sockios.h): add a device to a bridge.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// `struct ifreq` with the `int ifr_ifindex` member of its union.
#[repr(C)]
struct IfReqIndex {
    name: [u8; IFNAMSIZ],
    index: i32,
    _pad: [u8; 20],
}

/// Adds the device `dev` (a TAP) to the existing bridge `bridge`, in
/// `netns` if given ([`NetdevError::NotFound`] when either is missing).
pub fn add_to_bridge(dev: &str, bridge: &str, netns: Option<&Path>) -> Result<(), NetdevError> {
    validate_ifname(dev)?;
    validate_ifname(bridge)?;
    let (dev, bridge) = (dev.to_string(), bridge.to_string());
    in_netns(netns, move || add_to_bridge_here(&dev, &bridge))?
}

fn add_to_bridge_here(dev: &str, bridge: &str) -> Result<(), NetdevError> {
    let index = ifindex(dev).ok_or_else(|| NetdevError::NotFound(dev.to_string()))?;
    if ifindex(bridge).is_none() {
        return Err(NetdevError::NotFound(bridge.to_string()));
    }
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_error(
            "socket(AF_INET)",
            bridge,
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqIndex {
        name: [0; IFNAMSIZ],
        index: index as i32,
        _pad: [0; 20],
    };
    let b = bridge.as_bytes();
    req.name[..b.len().min(MAX_IFNAME_LEN)].copy_from_slice(&b[..b.len().min(MAX_IFNAME_LEN)]);
    // SAFETY: SIOCBRADDIF reads ifr_name and ifr_ifindex of a valid
    // `struct ifreq` that outlives the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDIF as _, &req) };
    if r < 0 {
        return Err(os_error(
            "SIOCBRADDIF (add to bridge)",
            bridge,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// `struct ifreq` with a `struct sockaddr_in` in its union.
#[repr(C)]
struct IfReqAddr {
    name: [u8; IFNAMSIZ],
    addr: libc::sockaddr_in,
    _pad: [u8; 8],
}

/// Gives `dev` the IPv4 address `ip`/`prefix` (SIOCSIFADDR, then
/// SIOCSIFNETMASK, which also adds the subnet's route), in `netns` if given.
pub fn set_ipv4(
    dev: &str,
    ip: Ipv4Addr,
    prefix: u8,
    netns: Option<&Path>,
) -> Result<(), NetdevError> {
    validate_ifname(dev)?;
    if prefix > 32 {
        return Err(NetdevError::InvalidAddress(format!("prefix /{prefix}")));
    }
    let dev = dev.to_string();
    in_netns(netns, move || set_ipv4_here(&dev, ip, prefix))?
}

fn set_ipv4_here(dev: &str, ip: Ipv4Addr, prefix: u8) -> Result<(), NetdevError> {
    if ifindex(dev).is_none() {
        return Err(NetdevError::NotFound(dev.to_string()));
    }
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_error("socket(AF_INET)", dev, io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    for (req, v, op) in [
        (libc::SIOCSIFADDR, ip, "SIOCSIFADDR"),
        (
            libc::SIOCSIFNETMASK,
            prefix_to_mask(prefix),
            "SIOCSIFNETMASK",
        ),
    ] {
        // SAFETY: sockaddr_in is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr = libc::in_addr {
            s_addr: u32::from(v).to_be(),
        };
        let mut r = IfReqAddr {
            name: [0; IFNAMSIZ],
            addr,
            _pad: [0; 8],
        };
        let b = dev.as_bytes();
        let n = b.len().min(MAX_IFNAME_LEN);
        r.name[..n].copy_from_slice(&b[..n]);
        // SAFETY: these ioctls read ifr_name and ifr_addr of a valid
        // `struct ifreq` that outlives the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), req as _, &r) } < 0 {
            return Err(os_error(op, dev, io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Whether a network device called `name` exists (in `netns` if given).
/// Invalid names and unreadable namespaces answer `false`.
pub fn tap_exists(name: &str, netns: Option<&Path>) -> bool {
    if validate_ifname(name).is_err() {
        return false;
    }
    let name = name.to_string();
    in_netns(netns, move || ifindex(&name).is_some()).unwrap_or(false)
}

/// Runs `f` in the network namespace `netns` (on a dedicated thread that
/// is discarded afterwards), or directly when `netns` is `None`.
fn in_netns<T, F>(netns: Option<&Path>, f: F) -> Result<T, NetdevError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let Some(path) = netns else {
        return Ok(f());
    };
    // Open here so a bad path is reported without spawning anything.
    let ns = File::open(path).map_err(|source| NetdevError::Netns {
        path: path.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    let handle = std::thread::Builder::new()
        .name("netns-worker".into())
        .spawn(move || {
            // SAFETY: setns on a valid open namespace fd; CLONE_NEWNET
            // changes only this thread, which ends after `f`.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                return Err(NetdevError::Netns {
                    path,
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .map_err(|e| NetdevError::Worker(e.to_string()))?;
    handle
        .join()
        .map_err(|_| NetdevError::Worker("panicked".into()))?
}

fn open_tun() -> Result<File, NetdevError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetdevError::TunOpen)
}

/// `ioctl(fd, req, value)` for the TUN ioctls that take an integer value.
fn tun_ioctl_val(
    tun: &File,
    req: libc::c_ulong,
    val: libc::c_ulong,
    op: &'static str,
    name: &str,
) -> Result<(), NetdevError> {
    // SAFETY: these TUN ioctls take a plain integer argument.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), req as _, val) };
    if r < 0 {
        return Err(os_error(op, name, io::Error::last_os_error()));
    }
    Ok(())
}

fn tun_setiff(tun: &File, name: &str, flags: i16) -> Result<(), io::Error> {
    let mut req = IfReq::new(name, flags);
    // SAFETY: TUNSETIFF reads/writes a `struct ifreq`, which `IfReq` lays
    // out and which outlives the call.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn os_error(op: &'static str, name: &str, source: io::Error) -> NetdevError {
    match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => NetdevError::PermissionDenied {
            op,
            name: name.to_string(),
        },
        _ => NetdevError::Os {
            op,
            name: name.to_string(),
            source,
        },
    }
}

fn create_tap_here(name: &str, owner: Option<(u32, u32)>) -> Result<(), NetdevError> {
    let tun = open_tun()?;
    tun_setiff(&tun, name, TAP_FLAGS | IFF_TUN_EXCL).map_err(|e| match e.raw_os_error() {
        // With IFF_TUN_EXCL, EBUSY means "a device of that name exists".
        Some(libc::EBUSY) | Some(libc::EEXIST) => NetdevError::AlreadyExists(name.to_string()),
        Some(libc::EINVAL) if ifindex(name).is_some() => {
            NetdevError::AlreadyExists(name.to_string())
        }
        _ => os_error("create (TUNSETIFF)", name, e),
    })?;
    if let Some((uid, gid)) = owner {
        tun_ioctl_val(
            &tun,
            TUNSETOWNER,
            libc::c_ulong::from(uid),
            "TUNSETOWNER",
            name,
        )?;
        tun_ioctl_val(
            &tun,
            TUNSETGROUP,
            libc::c_ulong::from(gid),
            "TUNSETGROUP",
            name,
        )?;
    }
    set_up(name)?;
    // Last: until now, closing `tun` (on any error) removes the device.
    tun_ioctl_val(&tun, TUNSETPERSIST, 1, "TUNSETPERSIST", name)?;
    Ok(())
}

fn delete_tap_here(name: &str) -> Result<(), NetdevError> {
    if ifindex(name).is_none() {
        return Err(NetdevError::NotFound(name.to_string()));
    }
    let tun = open_tun()?;
    tun_setiff(&tun, name, TAP_FLAGS).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => NetdevError::Busy(name.to_string()),
        Some(libc::EINVAL) => NetdevError::NotATap(name.to_string()),
        _ => os_error("attach (TUNSETIFF)", name, e),
    })?;
    tun_ioctl_val(&tun, TUNSETPERSIST, 0, "TUNSETPERSIST 0", name)?;
    drop(tun);
    Ok(())
}

/// Interface index of `name` in the current thread's namespace.
fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Sets IFF_UP on `name` with SIOCGIFFLAGS/SIOCSIFFLAGS on an AF_INET
/// socket (created in the current thread's namespace).
fn set_up(name: &str) -> Result<(), NetdevError> {
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_error(
            "socket(AF_INET)",
            name,
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name, 0);
    // SAFETY: SIOCGIFFLAGS fills ifr_flags of a valid `struct ifreq`.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) };
    if r < 0 {
        return Err(os_error("SIOCGIFFLAGS", name, io::Error::last_os_error()));
    }
    req.flags |= libc::IFF_UP as i16;
    // SAFETY: SIOCSIFFLAGS reads ifr_name/ifr_flags of a valid `struct ifreq`.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) };
    if r < 0 {
        return Err(os_error(
            "SIOCSIFFLAGS (up)",
            name,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Checks a MAC address: `xx:xx:xx:xx:xx:xx` in hex, unicast (low bit of
/// the first octet clear) and not all zeros; returns it lowercased.
pub fn validate_mac(mac: &str) -> Result<String, NetdevError> {
    let bad = || NetdevError::InvalidMac(mac.to_string());
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(bad());
    }
    let octets: Vec<u8> = parts
        .iter()
        .map(|p| u8::from_str_radix(p, 16).map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if octets[0] & 1 == 1 || octets.iter().all(|&o| o == 0) {
        return Err(bad());
    }
    Ok(mac.to_ascii_lowercase())
}

/// A stable, locally administered unicast MAC for the link `name`
/// (`02:` + five bytes of its FNV-1a hash), for interfaces given none.
pub fn generated_mac(name: &str) -> String {
    let h = fnv1a(name.as_bytes()).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[3], h[4], h[5], h[6], h[7]
    )
}

/// [`validate_ifname`], and no leading '-' (names go to `ip` as arguments).
fn validate_ip_arg_name(name: &str) -> Result<(), NetdevError> {
    validate_ifname(name)?;
    if name.starts_with('-') {
        return Err(NetdevError::InvalidName {
            name: name.to_string(),
            reason: "starts with '-'",
        });
    }
    Ok(())
}

/// Runs `ip args...`; its stderr (trimmed to 300 bytes) becomes the error.
fn run_ip(op: &'static str, name: &str, args: &[&str]) -> Result<(), NetdevError> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| NetdevError::IpCommand {
            op,
            name: name.to_string(),
            stderr: format!("cannot run ip (is iproute2 installed?): {e}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.len() > 300 {
        let mut cut = 300;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
    }
    Err(NetdevError::IpCommand {
        op,
        name: name.to_string(),
        stderr,
    })
}

/// Whether `name` exists and is a macvtap link (its sysfs `macvtap` dir).
pub fn is_macvtap(name: &str) -> bool {
    validate_ifname(name).is_ok()
        && Path::new("/sys/class/net")
            .join(name)
            .join("macvtap")
            .is_dir()
}

/// Creates the macvtap link `name` on `parent` in mode bridge with MAC
/// `mac`, and brings it up, as flintlockd does:
/// `ip link add link PARENT name NAME address MAC type macvtap mode bridge`.
///
/// Fails with [`NetdevError::AlreadyExists`] when a device called `name`
/// exists and [`NetdevError::NotFound`] when `parent` does not. A link that
/// cannot be brought up is removed again.
pub fn create_macvtap(name: &str, parent: &str, mac: &str) -> Result<(), NetdevError> {
    validate_ip_arg_name(name)?;
    validate_ip_arg_name(parent)?;
    let mac = validate_mac(mac)?;
    if ifindex(name).is_some() {
        return Err(NetdevError::AlreadyExists(name.to_string()));
    }
    if ifindex(parent).is_none() {
        return Err(NetdevError::NotFound(parent.to_string()));
    }
    run_ip(
        "link add (macvtap)",
        name,
        &[
            "link", "add", "link", parent, "name", name, "address", &mac, "type", "macvtap",
            "mode", "bridge",
        ],
    )?;
    if let Err(e) = set_up(name) {
        let _ = run_ip("link del", name, &["link", "del", "dev", name]);
        return Err(e);
    }
    Ok(())
}

/// Deletes the macvtap link `name`; refuses ([`NetdevError::NotAMacvtap`])
/// to delete a device of any other kind.
pub fn delete_macvtap(name: &str) -> Result<(), NetdevError> {
    validate_ip_arg_name(name)?;
    if ifindex(name).is_none() {
        return Err(NetdevError::NotFound(name.to_string()));
    }
    if !is_macvtap(name) {
        return Err(NetdevError::NotAMacvtap(name.to_string()));
    }
    run_ip("link del", name, &["link", "del", "dev", name])
}

/// The (major, minor) of the macvtap link `name`'s character device, read
/// from `/sys/class/net/<name>/macvtap/tap<ifindex>/dev`.
pub fn macvtap_dev(name: &str) -> Result<(u32, u32), NetdevError> {
    validate_ifname(name)?;
    let bad = |reason: String| NetdevError::MacvtapDev {
        name: name.to_string(),
        reason,
    };
    let idx = ifindex(name).ok_or_else(|| NetdevError::NotFound(name.to_string()))?;
    let path = Path::new("/sys/class/net")
        .join(name)
        .join("macvtap")
        .join(format!("tap{idx}"))
        .join("dev");
    let text =
        std::fs::read_to_string(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    parse_dev_numbers(text.trim())
        .ok_or_else(|| bad(format!("{}: not MAJOR:MINOR", path.display())))
}

fn parse_dev_numbers(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    let num = |x: &str| {
        (!x.is_empty() && x.len() <= 7 && x.bytes().all(|c| c.is_ascii_digit()))
            .then(|| x.parse::<u32>().ok())
            .flatten()
    };
    Some((num(a)?, num(b)?))
}

/// A Flintlock static address: `cidr` such as `192.168.10.5/24` (IPv4) or
/// `fd00::5/64` (IPv6), an optional gateway of the same family, and
/// nameservers (any family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticAddress {
    pub cidr: String,
    pub gateway: Option<String>,
    pub nameservers: Vec<String>,
}

impl StaticAddress {
    /// Builds and validates a static address. An empty gateway string
    /// counts as none (protojson sends `""` for unset fields).
    pub fn parse(
        cidr: &str,
        gateway: Option<&str>,
        nameservers: &[String],
    ) -> Result<Self, NetdevError> {
        let addr = StaticAddress {
            cidr: cidr.trim().to_string(),
            gateway: gateway
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_string),
            nameservers: nameservers.iter().map(|s| s.trim().to_string()).collect(),
        };
        addr.validate()?;
        Ok(addr)
    }

    /// Checks the CIDR (address and prefix length for its family), that
    /// the gateway has the address's family, and that every nameserver is
    /// an IP address.
    pub fn validate(&self) -> Result<(), NetdevError> {
        let (ip, _) = self.ip_prefix()?;
        if let Some(gw) = self.gateway_ip()? {
            if gw.is_ipv4() != ip.is_ipv4() {
                return Err(NetdevError::InvalidAddress(format!(
                    "gateway {gw} and address {ip} are of different IP families"
                )));
            }
            if gw.is_unspecified() {
                return Err(NetdevError::InvalidAddress(format!(
                    "gateway {gw} is unspecified"
                )));
            }
        }
        self.nameserver_ips()?;
        Ok(())
    }

    /// The address and prefix length of the CIDR.
    pub fn ip_prefix(&self) -> Result<(IpAddr, u8), NetdevError> {
        let bad = |why: &str| NetdevError::InvalidAddress(format!("{:?}: {why}", self.cidr));
        let (ip, len) = self
            .cidr
            .split_once('/')
            .ok_or_else(|| bad("not CIDR notation (ADDRESS/PREFIX)"))?;
        let ip: IpAddr = ip.parse().map_err(|_| bad("not an IP address"))?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || len.len() > 3 {
            return Err(bad("prefix length is not a number"));
        }
        let len: u8 = len
            .parse()
            .map_err(|_| bad("prefix length is not a number"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad(&format!("prefix length above {max}")));
        }
        if ip.is_unspecified() {
            return Err(bad("unspecified address"));
        }
        Ok((ip, len))
    }

    /// The parsed gateway, if any.
    pub fn gateway_ip(&self) -> Result<Option<IpAddr>, NetdevError> {
        match &self.gateway {
            None => Ok(None),
            Some(g) => g.parse().map(Some).map_err(|_| {
                NetdevError::InvalidAddress(format!("gateway {g:?} is not an IP address"))
            }),
        }
    }

    /// The parsed nameservers, in order.
    pub fn nameserver_ips(&self) -> Result<Vec<IpAddr>, NetdevError> {
        self.nameservers
            .iter()
            .map(|n| {
                n.parse().map_err(|_| {
                    NetdevError::InvalidAddress(format!("nameserver {n:?} is not an IP address"))
                })
            })
            .collect()
    }

    /// IPv4 netmask of the prefix (e.g. 255.255.255.0 for /24); `None` for
    /// IPv6 or an invalid CIDR.
    pub fn netmask_v4(&self) -> Option<Ipv4Addr> {
        match self.ip_prefix().ok()? {
            (IpAddr::V4(_), len) => Some(prefix_to_mask(len)),
            _ => None,
        }
    }
}

fn prefix_to_mask(len: u8) -> Ipv4Addr {
    let bits = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    Ipv4Addr::from(bits)
}

/// Linux kernel `ip=` boot parameter configuring `device_name` (e.g.
/// `eth0`) statically at boot:
/// `ip=<client>::<gateway>:<netmask>:<hostname>:<device>:off[:<dns0>[:<dns1>]]`.
///
/// The kernel's parser is IPv4-only: an IPv6 address is an error, IPv6
/// nameservers are skipped and at most the first two IPv4 ones are used.
/// An empty `hostname` leaves the field empty.
pub fn kernel_ip_param(
    addr: &StaticAddress,
    device_name: &str,
    hostname: &str,
) -> Result<String, NetdevError> {
    addr.validate()?;
    validate_ifname(device_name)?;
    validate_hostname(hostname)?;
    let (ip, len) = addr.ip_prefix()?;
    let IpAddr::V4(ip) = ip else {
        return Err(NetdevError::InvalidAddress(format!(
            "{:?}: the kernel ip= parameter supports IPv4 only",
            addr.cidr
        )));
    };
    let gw = addr
        .gateway_ip()?
        .map(|g| g.to_string())
        .unwrap_or_default();
    let mut out = format!(
        "ip={ip}::{gw}:{}:{hostname}:{device_name}:off",
        prefix_to_mask(len)
    );
    for dns in addr
        .nameserver_ips()?
        .into_iter()
        .filter(IpAddr::is_ipv4)
        .take(2)
    {
        out.push(':');
        out.push_str(&dns.to_string());
    }
    Ok(out)
}

/// Hostnames usable in `ip=`: empty, or at most 64 bytes of ASCII letters,
/// digits, `-` and `.`.
pub fn validate_hostname(hostname: &str) -> Result<(), NetdevError> {
    let ok = hostname.len() <= 64
        && hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NetdevError::InvalidHostname(hostname.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_short_stable_and_distinct() {
        let a0 = tap_name("01HZX8Q4W3KJ5V7Y2N6M9P0R1S", 0);
        assert_eq!(a0, tap_name("01HZX8Q4W3KJ5V7Y2N6M9P0R1S", 0));
        assert!(a0.starts_with("emb") && a0.ends_with('0'), "{a0}");
        assert_eq!(a0.len(), 12);
        let mut seen = std::collections::HashSet::new();
        for id in ["a", "b", "default/vm1", "default/vm2", ""] {
            for idx in [0usize, 1, 9, 10, 99, 9999, 10_000, usize::MAX] {
                let n = tap_name(id, idx);
                assert!(n.len() <= MAX_IFNAME_LEN, "{n}");
                validate_ifname(&n).unwrap();
                assert!(seen.insert(n.clone()), "duplicate {n}");
            }
        }
        // The hash is pinned: names survive daemon rebuilds.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    /// Privileged: a TAP joins a bridge inside a network namespace this
    /// test creates (skipped, with the reason, where that is not possible).
    #[test]
    fn taps_join_bridges_in_a_private_netns() {
        use std::process::Command;
        let ns = format!("ember-brtest{}", std::process::id());
        let ip = |args: &[&str]| Command::new("ip").args(args).output();
        match ip(&["netns", "add", &ns]) {
            Ok(o) if o.status.success() => {}
            other => {
                eprintln!("SKIP: cannot create a network namespace here: {other:?}");
                return;
            }
        }
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .output();
            }
        }
        let _del = Del(ns.clone());
        let path = PathBuf::from(format!("/var/run/netns/{ns}"));
        let o = ip(&["-n", &ns, "link", "add", "embr0", "type", "bridge"]).unwrap();
        assert!(o.status.success(), "{o:?}");
        create_tap("embtap0", None, Some(&path)).unwrap();
        add_to_bridge("embtap0", "embr0", Some(&path)).unwrap();
        let o = ip(&["-n", &ns, "-o", "link", "show", "embtap0"]).unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("master embr0"), "{text}");
        assert!(matches!(
            add_to_bridge("embtap0", "nosuchbr", Some(&path)),
            Err(NetdevError::NotFound(b)) if b == "nosuchbr"
        ));
        assert!(add_to_bridge("nosuchtap", "embr0", Some(&path)).is_err());
        set_ipv4("embr0", Ipv4Addr::new(10, 77, 0, 1), 24, Some(&path)).unwrap();
        let o = ip(&["-n", &ns, "-o", "-4", "addr", "show", "embr0"]).unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("10.77.0.1/24"), "{text}");
        assert!(set_ipv4("nosuchdev", Ipv4Addr::new(10, 0, 0, 1), 24, Some(&path)).is_err());
        delete_tap("embtap0", Some(&path)).unwrap();
    }

    #[test]
    fn macs_and_dev_numbers() {
        assert_eq!(
            validate_mac("02:AB:cd:00:11:22").unwrap(),
            "02:ab:cd:00:11:22"
        );
        for bad in [
            "",
            "02:ab:cd:00:11",
            "02:ab:cd:00:11:22:33",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "02-ab-cd-00-11-22",
            "2:ab:cd:00:11:22",
            "0g:ab:cd:00:11:22",
            "-2:ab:cd:00:11:22",
        ] {
            assert!(validate_mac(bad).is_err(), "{bad}");
        }
        let m = generated_mac("emb0k3x9a7b0");
        assert_eq!(m, generated_mac("emb0k3x9a7b0"));
        assert_ne!(m, generated_mac("emb0k3x9a7b1"));
        assert!(m.starts_with("02:"));
        validate_mac(&m).unwrap();
        assert_eq!(parse_dev_numbers("246:1"), Some((246, 1)));
        for bad in [
            "",
            "246",
            ":1",
            "246:",
            "a:1",
            "1:2:3",
            "-1:2",
            "99999999:1",
        ] {
            assert_eq!(parse_dev_numbers(bad), None, "{bad}");
        }
        assert!(validate_ip_arg_name("-x").is_err());
        assert!(create_macvtap("-x", "p0", "02:00:00:00:00:01").is_err());
        assert!(create_macvtap("x", "--help", "02:00:00:00:00:01").is_err());
        assert!(matches!(
            create_macvtap("x", "p0", "ff:ff:ff:ff:ff:ff"),
            Err(NetdevError::InvalidMac(_))
        ));
    }

    #[test]
    fn base36_pads_and_truncates() {
        assert_eq!(base36(0, 4), "0000");
        assert_eq!(base36(35, 2), "0z");
        assert_eq!(base36(36, 2), "10");
        assert_eq!(base36(36 * 36, 2), "00");
    }

    #[test]
    fn ifname_rules() {
        for ok in ["a", "eth0", "emb123456789012", "tap-1.x_y"] {
            validate_ifname(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a:b",
            "a\tb",
            "a\0",
            "0123456789abcdef",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn netmasks() {
        assert_eq!(prefix_to_mask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(prefix_to_mask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(prefix_to_mask(20), Ipv4Addr::new(255, 255, 240, 0));
        assert_eq!(prefix_to_mask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
