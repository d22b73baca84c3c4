//! The pod initramfs built from the workspace's real `ember-agent` is
//! self-contained: extracted into an empty directory, `chroot DIR /init
//! --version` runs the agent with nothing from the host but the kernel.
//! The chroot part needs root and is skipped (with a message) otherwise.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use api_server::build::pod_initramfs::{build, find_agent, AGENT_ENV};

mod common;
use common::{workspace_bin, TempDir};

/// One entry of interest that is not extracted.
struct Device {
    name: String,
    mode: u32,
    rdev: (u32, u32),
}

/// Unpacks the gzip newc archive `img` into `dir` (files, directories and
/// symlinks); returns the device nodes, which are skipped.
fn extract(img: &Path, dir: &Path) -> Vec<Device> {
    let gz = flate2::read::GzDecoder::new(fs::File::open(img).unwrap());
    let mut r: Box<dyn Read> = Box::new(gz);
    let mut devices = Vec::new();
    loop {
        let mut rd = cpio::newc::Reader::new(r).unwrap();
        let e = rd.entry();
        if e.is_trailer() {
            break;
        }
        let name = e.name().to_string();
        let mode = e.mode();
        let rdev = (e.rdev_major(), e.rdev_minor());
        let rel = Path::new(&name);
        assert!(
            rel.components().all(|c| matches!(c, Component::Normal(_))),
            "unsafe entry name {name:?}"
        );
        let path = dir.join(rel);
        let perm = fs::Permissions::from_mode(mode & 0o7777);
        match mode & 0o170000 {
            0o040000 => {
                fs::create_dir(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                fs::set_permissions(&path, perm).unwrap();
            }
            0o100000 => {
                let mut data = Vec::new();
                rd.read_to_end(&mut data).unwrap();
                fs::write(&path, data).unwrap_or_else(|e| panic!("{name}: {e}"));
                fs::set_permissions(&path, perm).unwrap();
            }
            0o120000 => {
                let mut target = String::new();
                rd.read_to_string(&mut target).unwrap();
                symlink(&target, &path).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            _ => devices.push(Device { name, mode, rdev }),
        }
        r = rd.finish().unwrap();
    }
    devices
}

/// coreutils' `chroot`, from `$PATH` or the sbin directories (it runs with
/// an empty environment, so the name alone would not be found).
fn chroot_command() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join("chroot"))
        .find(|p| p.is_file())
        .expect("chroot (coreutils) not found")
}

#[test]
fn real_agent_initramfs_is_self_contained() {
    let agent = workspace_bin("ember-agent", "ember-agent");
    let t = TempDir::new("pod-initramfs");
    let img = t.0.join("pod-initrd.gz");
    let info = build(&agent, &img).unwrap();
    assert_eq!(info.size, fs::metadata(&img).unwrap().len());
    println!(
        "pod initramfs from {}: {} bytes, {:?}",
        agent.display(),
        info.size,
        info.files
    );
    for p in [
        "/dev/console",
        "/init",
        "/proc",
        "/sys",
        "/run",
        "/tmp",
        "/etc",
        "/mnt",
    ] {
        assert!(info.files.iter().any(|f| f == p), "{p} missing");
    }

    // $EMBER_AGENT_BIN wins when it names a file (this is the file's only test).
    std::env::set_var(AGENT_ENV, &agent);
    assert_eq!(find_agent(), Some(agent.clone()));
    std::env::remove_var(AGENT_ENV);

    let root = t.0.join("root");
    fs::create_dir(&root).unwrap();
    let devices = extract(&img, &root);
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].name, "dev/console");
    assert_eq!(devices[0].mode, 0o020600, "a 0600 character device");
    assert_eq!(devices[0].rdev, (5, 1));
    assert_eq!(
        fs::read(root.join("init")).unwrap(),
        fs::read(&agent).unwrap()
    );

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipping chroot /init --version: not running as root");
        return;
    }
    let chroot = chroot_command();
    let out = Command::new(&chroot)
        .arg(&root)
        .args(["/init", "--version"])
        .env_clear()
        .output()
        .expect("run chroot");
    assert!(
        out.status.success(),
        "chroot /init --version: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("ember-agent {}\n", env!("CARGO_PKG_VERSION"))
    );

    // The libraries are what makes it work: a dynamic agent alone does not run.
    let skeleton_and_init = 9;
    if info.files.len() > skeleton_and_init {
        let bare = t.0.join("bare");
        fs::create_dir(&bare).unwrap();
        fs::copy(&agent, bare.join("init")).unwrap();
        let st = Command::new(&chroot)
            .arg(&bare)
            .args(["/init", "--version"])
            .env_clear()
            .output()
            .expect("run chroot");
        assert!(!st.status.success(), "the agent ran without its libraries");
    } else {
        println!("the agent is statically linked: no libraries in the image");
    }
}

/// The unpacked Debian cloud kernel package (`resources/ci/fetch-kernel.sh`),
/// or None (skip). Under CI a missing package is a failure, not a skip.
fn debian_kernel() -> Option<(PathBuf, PathBuf)> {
    let root = PathBuf::from(
        std::env::var_os("EMBER_KERNEL_CACHE").unwrap_or("/var/cache/ember/kernel".into()),
    )
    .join("root");
    let image = fs::read_dir(root.join("boot"))
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        });
    assert!(
        image.is_some() || std::env::var_os("CI").is_none(),
        "CI is set but there is no kernel package under {}: .ci/run runs resources/ci/fetch-kernel.sh",
        root.display()
    );
    if image.is_none() {
        println!(
            "SKIP: no Debian kernel package under {} (run resources/ci/fetch-kernel.sh)",
            root.display()
        );
    }
    image.map(|i| (i, root))
}

/// What the Debian 6.1 cloud kernel's `.modinfo` `depends=` fields say the
/// wanted modules need (ext4, jbd2, mbcache, crc16 and crc32c are built in).
const DEBIAN_CLOSURE: [&str; 10] = [
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

#[test]
fn debian_kernel_module_closure() {
    use api_server::build::kmod;
    let Some((image, root)) = debian_kernel() else {
        return;
    };
    let c = kmod::closure(&image, &root).unwrap();
    assert!(c.version.starts_with("6.1.0-"), "{}", c.version);
    let names: Vec<&str> = c.modules.iter().map(|m| m.name.as_str()).collect();
    println!("kernel {}: modules {names:?}", c.version);
    let mut got = names.clone();
    got.sort();
    let mut want = DEBIAN_CLOSURE.to_vec();
    want.sort();
    assert_eq!(got, want, "exactly the modules the dependencies need");
    let pos = |n: &str| names.iter().position(|m| *m == n).unwrap();
    for (before, after) in [
        ("virtio", "virtio_mmio"),
        ("virtio_ring", "virtio_mmio"),
        ("virtio", "virtio_blk"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
        ("vsock", "vmw_vsock_virtio_transport_common"),
        (
            "vmw_vsock_virtio_transport_common",
            "vmw_vsock_virtio_transport",
        ),
    ] {
        assert!(
            pos(before) < pos(after),
            "{before} must load before {after}"
        );
    }
    // Every dependency of every module comes earlier (checked by modinfo).
    for (i, m) in c.modules.iter().enumerate() {
        assert!(m.src.is_file(), "{}", m.src.display());
        assert!(
            m.dest
                .starts_with(&format!("lib/modules/{}/kernel/", c.version))
                && m.dest.ends_with(".ko"),
            "{}",
            m.dest
        );
        let out = Command::new("strings").arg("-a").arg(&m.src).output();
        if let Ok(out) = out {
            let text = String::from_utf8_lossy(&out.stdout);
            for dep in text
                .lines()
                .filter_map(|l| l.strip_prefix("depends="))
                .flat_map(|d| d.split(','))
                .filter(|d| !d.is_empty())
            {
                assert!(
                    names[..i].contains(&dep),
                    "{} depends on {dep}, which is not loaded before it",
                    m.name
                );
            }
        }
    }
    // The ELF vmlinux extracted from the same bzImage gives the same version
    // (from its `Linux version` banner).
    let vmlinux = image
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("vmlinux");
    if vmlinux.is_file() {
        assert_eq!(kmod::kernel_version(&vmlinux).unwrap(), c.version);
    } else {
        println!(
            "no {}: the ELF version path is not checked",
            vmlinux.display()
        );
    }
    // Without the module directory: a clear refusal that names the modular
    // drivers from the package's own config-<version> beside the bzImage.
    let err = kmod::closure(&image, Path::new("/nonexistent")).unwrap_err();
    assert!(
        matches!(&err, kmod::KmodError::ModulesNotInstalled { modular, .. }
            if modular.iter().any(|m| m == "virtio_mmio")
                && modular.iter().any(|m| m == "vmw_vsock_virtio_transport")),
        "{err}"
    );
    assert!(err.to_string().contains("no module directory"), "{err}");
    // Without module directory or configuration: refused too, never
    // accepted as a kernel with everything built in.
    let t = TempDir::new("kmod-noconfig");
    let lone = t.0.join("vmlinuz");
    std::fs::copy(&image, &lone).unwrap();
    let err = kmod::closure(&lone, Path::new("/nonexistent")).unwrap_err();
    assert!(matches!(err, kmod::KmodError::NoConfig { .. }), "{err}");
}

#[test]
fn debian_kernel_pod_initramfs_carries_its_modules() {
    use api_server::build::{kmod, pod_initramfs::build_with_modules};
    let Some((image, root)) = debian_kernel() else {
        return;
    };
    let agent = workspace_bin("ember-agent", "ember-agent");
    let c = kmod::closure(&image, &root).unwrap();
    let t = TempDir::new("pod-initramfs-kmod");
    let img = t.0.join("pod-initrd.gz");
    let info = build_with_modules(&agent, &img, Some(&c)).unwrap();
    let x = t.0.join("root");
    fs::create_dir(&x).unwrap();
    extract(&img, &x);
    // The list: one absolute path per line, in load order.
    let list = fs::read_to_string(x.join("etc/ember-modules")).unwrap();
    let want: Vec<String> = c.modules.iter().map(|m| format!("/{}", m.dest)).collect();
    assert_eq!(list.lines().collect::<Vec<_>>(), want);
    println!("/etc/ember-modules:\n{list}");
    // Exactly those .ko files, byte for byte (the package's are uncompressed).
    let mut kos = Vec::new();
    let mut stack = vec![x.join("lib/modules")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                kos.push(format!("/{}", p.strip_prefix(&x).unwrap().display()));
            }
        }
    }
    kos.sort();
    let mut sorted = want.clone();
    sorted.sort();
    assert_eq!(kos, sorted);
    for m in &c.modules {
        assert_eq!(
            fs::read(x.join(&m.dest)).unwrap(),
            kmod::read_module(m).unwrap(),
            "{}",
            m.dest
        );
    }
    for w in &want {
        assert!(info.files.contains(w), "{w} not in {:?}", info.files);
    }
    assert!(info.files.iter().any(|f| f == "/etc/ember-modules"));
    assert_eq!(fs::read(x.join("init")).unwrap(), fs::read(&agent).unwrap());
}
