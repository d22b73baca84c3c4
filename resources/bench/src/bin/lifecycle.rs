//! lifecycle: boot-to-exit wall time of ember-vmm vs kvm-floor.
//!
//! Usage: lifecycle [--runs N] [--vmm PATH] [--floor PATH] [--kernel PATH]
//!                  [--cmdline STR] [--mem MiB]
//!
//! Defaults: 20 runs, ember-vmm and kvm-floor next to this binary, the
//! linux64 test guest built by ember-guests, `ember.test=hello`, 64 MiB.

use std::path::PathBuf;
use std::process::ExitCode;

use ember_bench::lifecycle::{self, LifecycleConfig};

const USAGE: &str = "usage: lifecycle [--runs N] [--vmm PATH] [--floor PATH] [--kernel PATH] [--cmdline STR] [--mem MiB]";

fn parse_args(args: &[String]) -> Result<LifecycleConfig, String> {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
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
        let mut value = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(&args) {
        Ok(c) => c,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("lifecycle: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
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
