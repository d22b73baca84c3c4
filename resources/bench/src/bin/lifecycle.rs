//! lifecycle: boot-to-exit wall time of ember-vmm vs kvm-floor.
//!
//! Usage: lifecycle [--runs N] [--vmm PATH] [--floor PATH] [--kernel PATH]
//!                  [--cmdline STR] [--mem MiB]
//!
//! Defaults: 20 runs, ember-vmm and kvm-floor next to this binary, the
//! linux64 test guest built by ember-guests, `ember.test=hello`, 64 MiB.

use std::process::ExitCode;

use ember_bench::lifecycle::{self, LifecycleConfig};
use ember_bench::setup;

const USAGE: &str = "usage: lifecycle [--runs N] [--vmm PATH] [--floor PATH] [--kernel PATH] [--cmdline STR] [--mem MiB]";

fn parse_args(args: &[String]) -> Result<LifecycleConfig, String> {
    let bin_dir = setup::bin_dir();
    let mut cfg = LifecycleConfig {
        runs: 20,
        kernel: ember_guests::LINUX64_ELF.into(),
        cmdline: "ember.test=hello".into(),
        mem_mib: 64,
        vmm: bin_dir.join("ember-vmm"),
        floor: bin_dir.join("kvm-floor"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--runs" => cfg.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--vmm" => cfg.vmm = value()?.into(),
            "--floor" => cfg.floor = value()?.into(),
            "--kernel" => cfg.kernel = value()?.into(),
            "--cmdline" => cfg.cmdline = value()?,
            "--mem" => cfg.mem_mib = value()?.parse().map_err(|e| format!("--mem: {e}"))?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if cfg.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cfg = setup::config("lifecycle", USAGE, parse_args);
    println!(
        "lifecycle: {} interleaved runs, guest {}, cmdline {:?}, {} MiB",
        cfg.runs,
        cfg.kernel.display(),
        cfg.cmdline,
        cfg.mem_mib
    );
    match lifecycle::run(&cfg) {
        Ok(report) => {
            print!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lifecycle: {e}");
            ExitCode::FAILURE
        }
    }
}
