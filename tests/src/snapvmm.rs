//! ember-vmm processes driven through their Firecracker API for the
//! snapshot tests (`snapshot.rs`, `snapshot_memory.rs`): a plain VMM, a
//! jailed one, and Firecracker's page-fault handler process.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{bin, http, wait_for_socket, HttpResponse, Proc, TempDir};

/// The uid the jailed VMMs run as.
pub const JAIL_UID: u32 = 123;
/// The gid the jailed VMMs run as.
pub const JAIL_GID: u32 = 456;

/// An ember-vmm with its API socket.
pub struct ApiVmm {
    /// The process.
    pub p: Proc,
    /// Its API socket (host path).
    pub sock: PathBuf,
}

impl ApiVmm {
    /// `ember-vmm --api-sock <dir>/<tag>.sock --id <tag> --level Info`.
    pub fn start(dir: &Path, tag: &str) -> Self {
        let sock = dir.join(format!("{tag}.sock"));
        let mut cmd = Command::new(bin("ember-vmm"));
        cmd.arg("--api-sock")
            .arg(&sock)
            .args(["--id", tag, "--level", "Info"]);
        let p = Proc::spawn(cmd, dir, tag);
        wait_for_socket(&sock);
        ApiVmm { p, sock }
    }

    /// One request with a JSON body.
    pub fn req(&self, method: &str, path: &str, body: serde_json::Value) -> HttpResponse {
        http(&self.sock, method, path, Some(&body.to_string()))
    }

    /// 204, as firecracker-go-sdk's operations expect.
    pub fn ok(&self, method: &str, path: &str, body: serde_json::Value) {
        let r = self.req(method, path, body);
        assert_eq!(
            r.status,
            204,
            "{method} {path}: {}\nstderr:\n{}",
            String::from_utf8_lossy(&r.body),
            self.p.err()
        );
    }

    /// 400 with a JSON `fault_message` (returned), and the VMM still answers.
    pub fn fault(&self, method: &str, path: &str, body: serde_json::Value) -> String {
        let r = self.req(method, path, body);
        assert_eq!(r.status, 400, "{method} {path} should fail");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let msg = r.json()["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!msg.is_empty());
        assert_eq!(http(&self.sock, "GET", "/", None).status, 200);
        msg
    }

    /// A PUT's status and `fault_message` (empty on success).
    pub fn put_status(&self, path: &str, body: serde_json::Value) -> (u16, String) {
        let r = self.req("PUT", path, body);
        let msg = if r.body.is_empty() {
            String::new()
        } else {
            r.json()["fault_message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        (r.status, msg)
    }

    /// A GET answered 200, as JSON.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let r = http(&self.sock, "GET", path, None);
        assert_eq!(r.status, 200);
        r.json()
    }

    /// Boots `kernel` with `boot_args` and `machine_config` the way
    /// firecracker-go-sdk's `Machine.Start` does: `PUT /boot-source`,
    /// `PUT /machine-config`, `PUT /actions {"action_type": "InstanceStart"}`.
    pub fn boot(&self, kernel: &str, boot_args: &str, machine_config: serde_json::Value) {
        self.ok(
            "PUT",
            "/boot-source",
            serde_json::json!({"kernel_image_path": kernel, "boot_args": boot_args}),
        );
        self.ok("PUT", "/machine-config", machine_config);
        self.ok(
            "PUT",
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        );
    }

    /// `Machine.PauseVM` / `Machine.ResumeVM`: `PATCH /vm {"state": ...}`.
    pub fn set_state(&self, state: &str) {
        self.ok("PATCH", "/vm", serde_json::json!({ "state": state }));
    }
}

/// Prints the VMM's own "snapshot created/loaded in N us" log lines
/// (measured inside ember-vmm; printed, not asserted).
pub fn print_vmm_times(p: &Proc) {
    for l in p.err().lines().filter(|l| l.contains("snapshot ")) {
        eprintln!("{l}");
    }
}

/// A jail for the dynamically linked ember-vmm (its libraries copied in,
/// as tests/tests/jailer.rs does), under its own chroot base.
pub struct VmmJail {
    base: TempDir,
    id: String,
}

impl VmmJail {
    /// A jail named after `tag` and this process.
    pub fn new(tag: &str) -> Self {
        let j = VmmJail {
            base: TempDir::new(&format!("snap-jail-{tag}")),
            id: format!("snap-{tag}-{}", std::process::id()),
        };
        std::fs::create_dir_all(j.root()).unwrap();
        let out = Command::new("ldd").arg(bin("ember-vmm")).output().unwrap();
        for lib in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let dst = j.host(lib);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(lib, &dst).unwrap();
        }
        j
    }

    /// The jail's root directory on the host.
    pub fn root(&self) -> PathBuf {
        self.base
            .path()
            .join("ember-vmm")
            .join(&self.id)
            .join("root")
    }

    /// The host path of `inside`, a path in the jail.
    pub fn host(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// Hard-links (or copies) `src` into the jail at `inside`, owned by the
    /// VMM's user.
    pub fn place(&self, inside: &str, src: &Path) {
        let dst = self.host(inside);
        if std::fs::hard_link(src, &dst).is_err() {
            std::fs::copy(src, &dst).unwrap();
        }
        std::os::unix::fs::chown(&dst, Some(JAIL_UID), Some(JAIL_GID)).unwrap();
    }

    /// ember-jailer (with `jailer_args`) running ember-vmm unprivileged with
    /// its API at /api.sock.
    pub fn spawn(&self, jailer_args: &[&str], logs: &Path) -> ApiVmm {
        let mut c = Command::new(bin("ember-jailer"));
        c.arg("--id")
            .arg(&self.id)
            .arg("--exec-file")
            .arg(bin("ember-vmm"))
            .args(["--uid", &JAIL_UID.to_string()])
            .args(["--gid", &JAIL_GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(self.base.path())
            .args(jailer_args)
            .args(["--", "--api-sock", "/api.sock", "--id", "jailed"])
            .args(["--level", "Info"]);
        let p = Proc::spawn(c, logs, &self.id);
        let sock = self.host("/api.sock");
        wait_for_socket(&sock);
        ApiVmm { p, sock }
    }
}

/// `ember-uffd-handler --socket <socket> --mem-file <mem>`, once it listens.
pub fn spawn_uffd_handler(logs: &Path, socket: &Path, mem: &Path) -> Proc {
    let mut c = Command::new(bin("ember-uffd-handler"));
    c.arg("--socket").arg(socket).arg("--mem-file").arg(mem);
    let mut h = Proc::spawn(c, logs, "handler");
    h.expect_out("listening on");
    h
}
