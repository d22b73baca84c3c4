//! Helpers shared by api_server's integration tests (`mod common;` in each
//! test file): temporary directories, the workspace's own binaries and
//! e2fsprogs' `debugfs`.
#![allow(dead_code)] // each test crate uses only part of this

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

/// A temporary directory, `ember-<tag>-<pid>-<seq>` under the system temp
/// dir, removed with everything in it on drop. The process-wide sequence
/// number keeps tests running in parallel (same tag or not) apart.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, empty directory (a leftover of the same name is removed).
    pub fn new(tag: &str) -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ember-{tag}-{}-{seq}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The workspace binary `name` of package `package`, at
/// `target/<profile>/<name>` next to the running test binary (which lives in
/// `target/<profile>/deps`). When it is missing it is built first with
/// `$CARGO build -p <package> --bin <name>` in the test binary's profile.
/// Each binary is looked up (and built) once per process; callers that come
/// meanwhile wait for that. An existing binary is used as it is.
pub fn workspace_bin(package: &str, name: &str) -> PathBuf {
    static FOUND: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    // A caller that panicked (failed build) leaves nothing behind: the
    // next one tries again and panics with its own message.
    let mut found = FOUND.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = found.get(name) {
        return p.clone();
    }

    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{}: not in target/<profile>/deps", exe.display()));
    let bin = profile_dir.join(name);
    if !bin.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--quiet", "-p", package, "--bin", name]);
        // target/debug is the dev (and test) profile, target/release the
        // release (and bench) one, any other directory a custom profile.
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(custom) => {
                cmd.args(["--profile", custom]);
            }
        }
        let st = cmd
            .status()
            .unwrap_or_else(|e| panic!("run {} to build {name}: {e}", Path::new(&cargo).display()));
        assert!(
            st.success(),
            "cargo build -p {package} --bin {name} failed: {st}"
        );
    }
    assert!(
        bin.is_file(),
        "{} missing after building it (is the test binary in another target \
         dir or built for a --target?)",
        bin.display()
    );
    found.insert(name.to_string(), bin.clone());
    bin
}

/// Runs e2fsprogs' `debugfs -R <req>` on the ext4 image `img` and returns
/// its stdout; fails the test with a clear message when debugfs is missing.
pub fn debugfs(img: &Path, req: &str) -> String {
    let tool = api_server::images::volumes::find_tool("debugfs")
        .expect("debugfs not found: these tests need e2fsprogs (apt-get install -y e2fsprogs)");
    let out = Command::new(tool)
        .arg("-R")
        .arg(req)
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs {req}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
