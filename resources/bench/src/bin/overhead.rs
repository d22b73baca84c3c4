//! overhead: API-ready time and VMM memory overhead of ember-vmm beside
//! their floors (api-floor, kvm-floor) and, when given, Firecracker.
//!
//! Usage: overhead [--runs N] [--vmm PATH] [--floor PATH] [--api-floor PATH]
//!                 [--firecracker PATH] [--mem MiB]
//!
//! Defaults: 20 runs, the binaries next to this one, the PVH test guest,
//! 128 MiB.

use std::process::ExitCode;

use ember_bench::overhead::{self, OverheadConfig};
use ember_bench::setup;

const USAGE: &str = "usage: overhead [--runs N] [--vmm PATH] [--floor PATH] [--api-floor PATH] [--firecracker PATH] [--mem MiB]";

fn parse_args(args: &[String]) -> Result<OverheadConfig, String> {
    let bin_dir = setup::bin_dir();
    let mut cfg = OverheadConfig {
        runs: 20,
        vmm: bin_dir.join("ember-vmm"),
        floor: bin_dir.join("kvm-floor"),
        api_floor: bin_dir.join("api-floor"),
        firecracker: None,
        kernel: ember_guests::PVH_ELF.into(),
        mem_mib: 128,
        dir: std::env::temp_dir().join(format!("ember-overhead-{}", std::process::id())),
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
            "--api-floor" => cfg.api_floor = value()?.into(),
            "--firecracker" => cfg.firecracker = Some(value()?.into()),
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
    let cfg = setup::config("overhead", USAGE, parse_args);
    println!(
        "overhead: {} interleaved runs, ember-vmm {}, guest {} MiB",
        cfg.runs,
        cfg.vmm.display(),
        cfg.mem_mib
    );
    let r = overhead::run(&cfg);
    let _ = std::fs::remove_dir_all(&cfg.dir);
    match r {
        Ok(series) => {
            print!("{}", overhead::render(&series));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("overhead: {e}");
            ExitCode::FAILURE
        }
    }
}
