//! What the examples share: finding the test guest and /dev/kvm.

use std::path::PathBuf;

/// Name of the PVH image of ember's test guest (`resources/guests/`).
const GUEST: &str = "ember-guest-pvh.elf";

/// The test guest, like the tests find it: `$EMBER_GUEST_KERNEL`, else
/// `<target dir>/guests/ember-guest-pvh.elf` (the guest crate's build
/// script puts it there). Exits with status 0 and a message when the guest
/// or `/dev/kvm` is missing, so CI without them still passes.
pub fn guest_or_exit() -> PathBuf {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("skipped: /dev/kvm is missing (this example boots a KVM guest)");
        std::process::exit(0);
    }
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("EMBER_GUEST_KERNEL") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("guests").join(GUEST));
    }
    // <target>/<profile>/examples/<name>
    if let Ok(exe) = std::env::current_exe() {
        if let Some(target) = exe.ancestors().nth(3) {
            candidates.push(target.join("guests").join(GUEST));
        }
    }
    match candidates.into_iter().find(|p| p.is_file()) {
        Some(p) => p,
        None => {
            println!(
                "skipped: the test guest {GUEST} was not found; build it with \
                 `cargo build -p ember-guests` or set EMBER_GUEST_KERNEL"
            );
            std::process::exit(0);
        }
    }
}
