//! kvm-floor: the smallest VMM that boots the ember test guest.
//!
//! Usage: kvm-floor [--pvh] [--mem MiB] [--cpus N] [--initrd FILE] <kernel> [cmdline]
//!
//! <kernel> is an ELF (Linux 64-bit protocol, or PVH with --pvh) or a bzImage.
//! Guest COM1 output goes to stdout. Exit status 0 when the guest resets
//! (i8042 0xfe), 1 on shutdown (triple fault), internal error or halt,
//! 2 on usage or setup errors.

use std::io::Write;
use std::process::ExitCode;

use ember_bench::floor::{self, FloorConfig, FloorExit};
use ember_bench::setup;

const USAGE: &str =
    "usage: kvm-floor [--pvh] [--mem MiB] [--cpus N] [--initrd FILE] <kernel> [cmdline]";

fn parse_args(args: &[String]) -> Result<FloorConfig, String> {
    let mut pvh = false;
    let mut mem_mib = 64;
    let mut cpus = None;
    let mut initrd = None;
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--pvh" => pvh = true,
            "--mem" => mem_mib = value("--mem")?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--cpus" => {
                cpus = Some(
                    value("--cpus")?
                        .parse()
                        .map_err(|e| format!("--cpus: {e}"))?,
                )
            }
            "--initrd" => initrd = Some(value("--initrd")?.into()),
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with("--") && positional.is_empty() => {
                return Err(format!("unknown option {s}"))
            }
            _ => positional.push(a.clone()),
        }
    }
    let (kernel, cmdline) = match positional.as_slice() {
        [k] => (k.clone(), String::new()),
        [k, c] => (k.clone(), c.clone()),
        _ => return Err("expected <kernel> [cmdline]".into()),
    };
    Ok(FloorConfig {
        pvh,
        mem_mib,
        mptable_cpus: cpus,
        initrd,
        ..FloorConfig::new(kernel, cmdline)
    })
}

fn main() -> ExitCode {
    let cfg = setup::config("kvm-floor", USAGE, parse_args);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = floor::run(&cfg, &mut out);
    let _ = out.flush();
    match result {
        Ok(exit) => {
            match &exit {
                FloorExit::Reset => {}
                FloorExit::Shutdown => {
                    eprintln!("kvm-floor: guest shut down (KVM_EXIT_SHUTDOWN, triple fault?)")
                }
                FloorExit::Halted => eprintln!("kvm-floor: guest halted (KVM_EXIT_HLT)"),
                FloorExit::InternalError { suberror, data } => eprintln!(
                    "kvm-floor: KVM internal error (KVM_EXIT_INTERNAL_ERROR), suberror {suberror}, data {data:x?}"
                ),
                FloorExit::FailEntry(r) => {
                    eprintln!("kvm-floor: VM entry failed, hardware reason {r:#x}")
                }
                FloorExit::Unexpected(e) => eprintln!("kvm-floor: unexpected exit {e}"),
            }
            ExitCode::from(exit.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("kvm-floor: {e}");
            ExitCode::from(2)
        }
    }
}
