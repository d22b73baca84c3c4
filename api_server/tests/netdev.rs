//! TAP lifecycle inside a network namespace this test creates (and always
//! deletes), plus static-address parsing and the kernel `ip=` parameter.
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns) and `ip`.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use api_server::runtime::netdev::{
    create_tap, delete_tap, kernel_ip_param, tap_exists, tap_name, validate_ifname, NetdevError,
    StaticAddress,
};

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_PERSIST: u32 = 0x0800;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// A network namespace created with `ip netns add`, deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "embnd{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip netns add {name} failed");
        NetNs { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// `ip -n NS ARGS...`: (success, stdout).
    fn ip(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Reads a file under /sys as seen from inside the namespace
    /// (`ip netns exec` remounts sysfs; a setns'd thread would still see
    /// the host's /sys/class/net).
    fn sys(&self, rel: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{rel}"))
            .output()
            .expect("run ip netns exec");
        assert!(
            out.status.success(),
            "cat {rel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Opens /dev/net/tun from a thread inside the namespace: the tun file
    /// belongs to the namespace it was opened in.
    fn open_tun(&self) -> File {
        let ns = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this short-lived thread with a valid fd.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("open /dev/net/tun")
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

fn ifreq(name: &str) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

/// Attaches `tun` to the TAP `name` in a forked child running as
/// `uid:gid` (no supplementary groups, no capabilities): the child's exit
/// status is 0 on success, else the errno of TUNSETIFF.
fn attach_as(tun: &File, name: &str, uid: u32, gid: u32) -> i32 {
    let mut req = ifreq(name);
    let fd = tun.as_raw_fd();
    // SAFETY: the child only makes async-signal-safe system calls on
    // memory prepared before the fork, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: raw syscalls in the forked child (see above).
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(100);
            }
            let r = libc::ioctl(fd, TUNSETIFF as _, &mut req);
            let code = if r == 0 { 0 } else { *libc::__errno_location() };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// Waits until `name` is gone from the namespace. A TAP goes when its last
/// descriptor closes: a process another test forks at that moment holds a
/// copy until it execs, so the end is waited for (a safety net of 10 s,
/// never a timing check), not expected on the first look.
fn gone(name: &str, ns: &Path) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tap_exists(name, Some(ns)) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

#[test]
fn persistent_tap_owned_by_the_vmm_user_in_a_netns() {
    let ns = NetNs::new();
    let name = tap_name(&format!("netdev-test-{}", std::process::id()), 0);
    assert!(!tap_exists(&name, Some(&ns.path())));

    create_tap(&name, Some((123, 456)), Some(&ns.path())).expect("create_tap");

    // Visible in the namespace, UP, and not in the host namespace.
    assert!(tap_exists(&name, Some(&ns.path())));
    assert!(!tap_exists(&name, None));
    let (ok, show) = ns.ip(&["link", "show", &name]);
    assert!(ok, "ip link show {name}");
    let flags = show
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(f, _)| f.split(',').map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(flags.iter().any(|f| f == "UP"), "{show}");
    let (ok, detail) = ns.ip(&["-d", "link", "show", &name]);
    assert!(ok && detail.contains("tun type tap"), "{detail}");

    // Persistent TAP with vnet headers, owned by 123:456 (from sysfs).
    let tun_flags = ns.sys(&format!("{name}/tun_flags"));
    let tun_flags = u32::from_str_radix(tun_flags.trim_start_matches("0x"), 16).unwrap();
    assert_ne!(tun_flags & IFF_PERSIST, 0, "tun_flags {tun_flags:#x}");
    assert_ne!(tun_flags & IFF_TAP as u32, 0, "tun_flags {tun_flags:#x}");
    assert_ne!(
        tun_flags & IFF_VNET_HDR as u32,
        0,
        "tun_flags {tun_flags:#x}"
    );
    assert_eq!(ns.sys(&format!("{name}/owner")), "123");
    assert_eq!(ns.sys(&format!("{name}/group")), "456");

    // Creating it again is refused.
    match create_tap(&name, Some((123, 456)), Some(&ns.path())) {
        Err(NetdevError::AlreadyExists(n)) => assert_eq!(n, name),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    // So is a TAP over an existing non-TAP device.
    match create_tap("lo", None, Some(&ns.path())) {
        Err(NetdevError::AlreadyExists(_)) => {}
        other => panic!("expected AlreadyExists for lo, got {other:?}"),
    }

    // 123:456 (no capabilities) may attach; with both owner and group set
    // the kernel requires both to match. The tun device node's own
    // permissions are the jail's business: the file is opened here as
    // root and inherited.
    assert_eq!(
        attach_as(&ns.open_tun(), &name, 123, 456),
        0,
        "owner attach"
    );
    for (uid, gid) in [(123, 999), (124, 456), (124, 999)] {
        assert_eq!(
            attach_as(&ns.open_tun(), &name, uid, gid),
            libc::EPERM,
            "{uid}:{gid} attach"
        );
    }
    assert!(tap_exists(&name, Some(&ns.path())), "still persistent");

    // While a "VMM" holds it, deletion reports Busy and keeps it.
    {
        let held = ns.open_tun();
        let mut req = ifreq(&name);
        // SAFETY: TUNSETIFF on a valid `struct ifreq`.
        let r = unsafe { libc::ioctl(held.as_raw_fd(), TUNSETIFF as _, &mut req) };
        assert_eq!(r, 0, "attach: {}", std::io::Error::last_os_error());
        match delete_tap(&name, Some(&ns.path())) {
            Err(NetdevError::Busy(n)) => assert_eq!(n, name),
            other => panic!("expected Busy, got {other:?}"),
        }
        assert!(tap_exists(&name, Some(&ns.path())));
    }

    delete_tap(&name, Some(&ns.path())).expect("delete_tap");
    assert!(gone(&name, &ns.path()));
    let (ok, _) = ns.ip(&["link", "show", &name]);
    assert!(!ok, "{name} still listed");
    match delete_tap(&name, Some(&ns.path())) {
        Err(NetdevError::NotFound(n)) => assert_eq!(n, name),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // Not a TAP.
    match delete_tap("lo", Some(&ns.path())) {
        Err(NetdevError::NotATap(_)) => {}
        other => panic!("expected NotATap, got {other:?}"),
    }
}

#[test]
fn tap_without_owner_and_several_indexes() {
    let ns = NetNs::new();
    let id = format!("netdev-multi-{}", std::process::id());
    let names: Vec<String> = (0..3).map(|i| tap_name(&id, i)).collect();
    for n in &names {
        create_tap(n, None, Some(&ns.path())).expect("create_tap");
    }
    for n in &names {
        assert!(tap_exists(n, Some(&ns.path())));
        // No owner: the kernel reports -1.
        assert_eq!(ns.sys(&format!("{n}/owner")), "-1");
    }
    // Without an owner the kernel checks nothing beyond access to the tun
    // device node: any user may attach.
    assert_eq!(attach_as(&ns.open_tun(), &names[1], 123, 456), 0);
    for n in &names {
        delete_tap(n, Some(&ns.path())).expect("delete_tap");
        assert!(gone(n, &ns.path()));
    }
}

#[test]
fn bad_names_and_namespaces() {
    for bad in ["", "0123456789abcdef", "a/b", "a b", "a:b", ".."] {
        match create_tap(bad, None, None) {
            Err(NetdevError::InvalidName { .. }) => {}
            other => panic!("{bad:?}: expected InvalidName, got {other:?}"),
        }
        assert!(delete_tap(bad, None).is_err());
        assert!(!tap_exists(bad, None));
    }
    let missing = PathBuf::from("/var/run/netns/ember-no-such-netns-xyz");
    let e = create_tap("embnotcreated0", None, Some(&missing)).unwrap_err();
    assert!(matches!(e, NetdevError::Netns { .. }), "{e:?}");
    assert!(e.to_string().contains("ember-no-such-netns-xyz"), "{e}");
    assert!(!tap_exists("embnotcreated0", Some(&missing)));
    assert!(validate_ifname("emb12345678999").is_ok());
}

#[test]
fn static_addresses() {
    let a = StaticAddress::parse(
        "192.168.10.5/24",
        Some("192.168.10.1"),
        &["8.8.8.8".into(), "1.1.1.1".into()],
    )
    .unwrap();
    assert_eq!(
        kernel_ip_param(&a, "eth0", "vm1").unwrap(),
        "ip=192.168.10.5::192.168.10.1:255.255.255.0:vm1:eth0:off:8.8.8.8:1.1.1.1"
    );
    assert_eq!(a.netmask_v4().unwrap().to_string(), "255.255.255.0");

    // No gateway, no nameservers, no hostname; empty gateway = none.
    let b = StaticAddress::parse("10.0.0.2/30", Some(""), &[]).unwrap();
    assert_eq!(b.gateway, None);
    assert_eq!(
        kernel_ip_param(&b, "eth1", "").unwrap(),
        "ip=10.0.0.2:::255.255.255.252::eth1:off"
    );

    // IPv6 nameservers are skipped, at most two IPv4 ones kept.
    let c = StaticAddress::parse(
        "172.16.0.9/12",
        Some("172.16.0.1"),
        &[
            "2001:4860:4860::8888".into(),
            "9.9.9.9".into(),
            "8.8.4.4".into(),
            "1.1.1.1".into(),
        ],
    )
    .unwrap();
    assert_eq!(
        kernel_ip_param(&c, "eth0", "a.b-c").unwrap(),
        "ip=172.16.0.9::172.16.0.1:255.240.0.0:a.b-c:eth0:off:9.9.9.9:8.8.4.4"
    );

    // IPv6 parses but has no kernel ip= form.
    let v6 = StaticAddress::parse("fd00::5/64", Some("fd00::1"), &["fd00::53".into()]).unwrap();
    assert!(v6.netmask_v4().is_none());
    let e = kernel_ip_param(&v6, "eth0", "vm").unwrap_err();
    assert!(e.to_string().contains("IPv4 only"), "{e}");

    for (cidr, gw, why) in [
        ("192.168.1.5", None, "CIDR"),
        ("192.168.1.5/33", None, "prefix"),
        ("192.168.1.5/", None, "prefix"),
        ("192.168.1.5/+8", None, "prefix"),
        ("300.1.1.1/24", None, "IP address"),
        ("0.0.0.0/0", None, "unspecified"),
        ("fd00::1/129", None, "prefix"),
        ("10.0.0.2/24", Some("fd00::1"), "families"),
        ("10.0.0.2/24", Some("gw"), "gateway"),
    ] {
        let e = StaticAddress::parse(cidr, gw, &[]).unwrap_err();
        assert!(e.to_string().contains(why), "{cidr} {gw:?}: {e}");
    }
    let e = StaticAddress::parse("10.0.0.2/24", None, &["dns".into()]).unwrap_err();
    assert!(e.to_string().contains("nameserver"), "{e}");

    // Hostname and device are checked.
    assert!(kernel_ip_param(&a, "eth0", "bad:host").is_err());
    assert!(kernel_ip_param(&a, "eth0", &"h".repeat(65)).is_err());
    assert!(kernel_ip_param(&a, "eth 0", "vm").is_err());
}
