//! What the bench binaries share at start-up: where ember's other binaries
//! are, and their command line turned into a config or a usage error.

use std::path::PathBuf;

/// The directory of the running binary: ember's other binaries
/// (`ember-vmm`, `emberd`, `kvm-floor`, ...) are built next to it. Empty
/// when it cannot be told.
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default()
}

/// Parses this process's arguments (without the program name) with `parse`.
/// On an error prints `{name}: {msg}` (nothing for an empty message, as
/// `--help` gives) and `usage` to stderr, and exits with status 2.
pub fn config<T>(name: &str, usage: &str, parse: impl FnOnce(&[String]) -> Result<T, String>) -> T {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(cfg) => cfg,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("{name}: {msg}");
            }
            eprintln!("{usage}");
            std::process::exit(2)
        }
    }
}
