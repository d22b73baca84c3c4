//! throughput: virtio-blk and virtio-net throughput of the ember test guest
//! under ember-vmm, next to the host's raw file / TAP throughput.
//!
//! Usage: throughput [--runs N] [--vmm PATH] [--kernel PATH] [--mem MiB]
//!                   [--only blk|net]
//!
//! Defaults: 10 interleaved runs, ember-vmm next to this binary, the PVH
//! test guest built by ember-guests, 64 MiB. The net part needs root and
//! iproute2 (it creates and removes its own network namespace).

use std::process::ExitCode;

use ember_bench::setup;
use ember_bench::throughput::{self, vmrun, ThroughputConfig};

const USAGE: &str =
    "usage: throughput [--runs N] [--vmm PATH] [--kernel PATH] [--mem MiB] [--only blk|net]";

fn parse_args(args: &[String]) -> Result<ThroughputConfig, String> {
    let bin_dir = setup::bin_dir();
    let mut cfg = ThroughputConfig {
        runs: 10,
        vmm: bin_dir.join("ember-vmm"),
        kernel: ember_guests::PVH_ELF.into(),
        mem_mib: 64,
        blk: true,
        net: true,
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
            "--kernel" => cfg.kernel = value()?.into(),
            "--mem" => cfg.mem_mib = value()?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--only" => match value()?.as_str() {
                "blk" => cfg.net = false,
                "net" => cfg.blk = false,
                other => return Err(format!("--only: unknown part {other}")),
            },
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
    let cfg = setup::config("throughput", USAGE, parse_args);
    vmrun::install_interrupt_handler();
    println!(
        "throughput: {} interleaved runs (+1 warm-up), guest {}, {} MiB, {}",
        cfg.runs,
        cfg.kernel.display(),
        cfg.mem_mib,
        cfg.vmm.display()
    );
    if cfg.blk {
        println!(
            "blk: guest bench-blk reads 1 MiB as 256 x 4 KiB from a 2 MiB file; it prints nothing \
             before the transfer, so guest time = median(spawn -> 'bench blk bytes') - \
             median(spawn -> 'blk capacity' of ember.test=blk, same drive). Host: 256 x pread \
             4 KiB of the same file. Page cache warm for both."
        );
    }
    if cfg.net {
        println!(
            "net: guest bench-net sends 256 UDP datagrams of 1024 B to 10.0.0.1:9 via TAP {} in \
             a private netns; host writes the same frames into the same TAP. Rate = payload / \
             (last - first kernel arrival stamp) at the receiver.",
            throughput::TAP_NAME
        );
    }
    match throughput::run(&cfg) {
        Ok(report) => {
            println!();
            print!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("throughput: {e}");
            ExitCode::FAILURE
        }
    }
}
