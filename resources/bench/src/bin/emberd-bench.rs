//! emberd-bench: instance starts per second through emberd's API (a hello C
//! unikernel), API requests per second, and the spawn rate of the same
//! kernel under ember-jailer + ember-vmm and under bare ember-vmm, measured
//! in the same run; and hyperd pod round trips and idle VM creates in pod
//! VMs whose kernel is ember's test guest (`pod-agent` mode), set against
//! the same rounds' API starts and VMM spawns.
//!
//! Usage: emberd-bench [--runs N] [--burst K] [--burst-rounds R]
//!                     [--idle-runs N] [--requests M] [--api-path PATH] [--poll-ms MS]
//!                     [--pod-runs N] [--pod-kernel PATH] [--pod-boot-args ARGS]
//!                     [--pod-agent PATH] [--pod-rootfs-mb MB] [--warm-runs N]
//!                     [--no-jailer] [--emberd PATH] [--vmm PATH]
//!                     [--jailer PATH] [--uid UID] [--gid GID]
//!
//! Defaults: 20 runs, 3 bursts of 5, 5 starts of a guest that stays up, 2000 requests of GET /instances, 2 ms
//! status polls, 10 pod runs with the test guest as pod kernel
//! (`ember.test=pod-agent`) and 16 MB root disks, 20 rounds of a cold and a
//! snapshot start (emberd `--snapshot-starts`) timed to the guest's first
//! line, uid/gid 10502, emberd /
//! ember-vmm / ember-jailer / ember-agent next to this binary. Needs root
//! (emberd runs the jailer).

use std::process::ExitCode;
use std::time::Duration;

use ember_bench::emberd::{self, EmberdBenchConfig};
use ember_bench::setup;
use ember_bench::throughput::vmrun;

const USAGE: &str =
    "usage: emberd-bench [--runs N] [--burst K] [--burst-rounds R] [--idle-runs N] [--requests M] \
[--api-path PATH] [--poll-ms MS] [--pod-runs N] [--pod-kernel PATH] [--pod-boot-args ARGS] \
[--pod-agent PATH] [--pod-rootfs-mb MB] [--warm-runs N] [--no-jailer] [--emberd PATH] [--vmm PATH] [--jailer PATH] \
[--uid UID] [--gid GID]";

fn parse_args(args: &[String]) -> Result<EmberdBenchConfig, String> {
    let bin_dir = setup::bin_dir();
    let mut cfg = EmberdBenchConfig {
        runs: 20,
        burst: 5,
        burst_rounds: 3,
        requests: 2000,
        api_path: "/instances".into(),
        emberd: bin_dir.join("emberd"),
        vmm: bin_dir.join("ember-vmm"),
        jailer: bin_dir.join("ember-jailer"),
        uid: 10502,
        gid: 10502,
        poll: Duration::from_millis(2),
        with_jailer: true,
        idle_runs: 5,
        pod_runs: 10,
        pod_kernel: ember_guests::PVH_ELF.into(),
        pod_boot_args: "ember.test=pod-agent".into(),
        pod_agent: bin_dir.join("ember-agent"),
        pod_rootfs_mb: 16,
        warm_runs: 20,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--runs" => cfg.runs = num(value()?)?,
            "--burst" => cfg.burst = num(value()?)?,
            "--burst-rounds" => cfg.burst_rounds = num(value()?)?,
            "--requests" => cfg.requests = num(value()?)?,
            "--idle-runs" => cfg.idle_runs = num(value()?)?,
            "--api-path" => cfg.api_path = value()?,
            "--pod-runs" => cfg.pod_runs = num(value()?)?,
            "--warm-runs" => cfg.warm_runs = num(value()?)?,
            "--pod-kernel" => cfg.pod_kernel = value()?.into(),
            "--pod-boot-args" => cfg.pod_boot_args = value()?,
            "--pod-agent" => cfg.pod_agent = value()?.into(),
            "--pod-rootfs-mb" => cfg.pod_rootfs_mb = num(value()?)? as u64,
            "--poll-ms" => cfg.poll = Duration::from_millis(num(value()?)? as u64),
            "--no-jailer" => cfg.with_jailer = false,
            "--emberd" => cfg.emberd = value()?.into(),
            "--vmm" => cfg.vmm = value()?.into(),
            "--jailer" => cfg.jailer = value()?.into(),
            "--uid" => cfg.uid = value()?.parse().map_err(|e| format!("--uid: {e}"))?,
            "--gid" => cfg.gid = value()?.parse().map_err(|e| format!("--gid: {e}"))?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if cfg.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    if !cfg.api_path.starts_with('/') {
        return Err("--api-path must start with /".into());
    }
    if cfg.runs > 10_000
        || cfg.burst > 100
        || cfg.burst_rounds > 1000
        || cfg.idle_runs > 10_000
        || cfg.pod_runs > 10_000
        || cfg.warm_runs > 10_000
        || cfg.requests > 10_000_000
    {
        return Err("refusing absurd counts (runs <= 10000, burst <= 100, rounds <= 1000)".into());
    }
    if cfg.pod_rootfs_mb == 0 {
        return Err("--pod-rootfs-mb must be at least 1".into());
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cfg = setup::config("emberd-bench", USAGE, parse_args);
    vmrun::install_interrupt_handler();
    println!(
        "emberd-bench: {} interleaved rounds (+1 warm-up) of [API start{}, ember-vmm --no-api], \
         {} bursts of {}, {} starts of a guest that stays up, 2 x {} GET {}; emberd {}",
        cfg.runs,
        if cfg.with_jailer {
            ", ember-jailer + ember-vmm"
        } else {
            ""
        },
        cfg.burst_rounds,
        cfg.burst,
        cfg.idle_runs,
        cfg.requests,
        cfg.api_path,
        cfg.emberd.display()
    );
    if cfg.pod_runs > 0 {
        println!(
            "pod phase: {} rounds (+1 warm-up), interleaved with the above, of [pod create, start, \
             stop with its VM, delete; idle VM create, delete]; pod kernel {} ({}), agent {}",
            cfg.pod_runs,
            cfg.pod_kernel.display(),
            cfg.pod_boot_args,
            cfg.pod_agent.display()
        );
    }
    println!(
        "API start = POST /instances/run, poll GET /instances/<name> every {} ms until stopped, \
         check the log for {:?}, DELETE. Rates = runs / sum of per-run wall times. \
         The jailer runs use emberd's jail layout and VMM arguments (API socket on), \
         without emberd; VMM-only runs use --no-api.",
        cfg.poll.as_millis(),
        emberd::EXIT_LINE
    );
    let result = emberd::run(&cfg, &mut |msg| println!("  {msg}"));
    match result {
        Ok(report) => {
            println!();
            print!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("emberd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
