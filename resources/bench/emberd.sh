#!/usr/bin/env bash
# emberd benchmark: instance starts per second through emberd's API (a hello
# C unikernel: run, wait for stopped, delete; and bursts), API requests per
# second (keep-alive and a new connection per request), next to the spawn
# rate of the same kernel under ember-jailer + ember-vmm and under bare
# ember-vmm, measured in the same run; and hyperd pod round trips (create,
# start, stop with its VM, delete) and idle VM creates in pod VMs whose
# kernel is ember's test guest (`ember.test=pod-agent`) and whose initramfs
# holds the release ember-agent. Needs root.
#
# Usage: resources/bench/emberd.sh [--runs N] [--burst K] [--requests M] [--pod-runs N] [other `emberd-bench` options]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

target_dir="${CARGO_TARGET_DIR:-target}"

if ! cargo build --release -p vmm -p jailer -p api_server -p ember-agent -p ember-bench; then
    # Like lifecycle.sh: a crate mid-edit elsewhere should not stop the
    # benchmark when earlier release binaries exist; say so loudly.
    cargo build --release -p ember-bench
    for b in emberd ember-vmm ember-jailer ember-agent; do
        if [[ ! -x "$target_dir/release/$b" ]]; then
            echo "emberd.sh: building failed and $target_dir/release/$b does not exist" >&2
            exit 1
        fi
    done
    echo "emberd.sh: building failed; benchmarking the binaries already in $target_dir/release (they may be stale)" >&2
fi

# emberd's jails run the static ember-vmm (nothing of the host's enters
# them); the dynamic build only if the static one cannot be built.
vmm="$target_dir/x86_64-unknown-linux-gnu/release/ember-vmm"
if ! cargo static-vmm --release; then
    vmm="$target_dir/release/ember-vmm"
    echo "emberd.sh: cargo static-vmm failed; benchmarking the dynamically linked $vmm" >&2
fi

exec "$target_dir/release/emberd-bench" \
    --emberd "$target_dir/release/emberd" \
    --vmm "$vmm" \
    --jailer "$target_dir/release/ember-jailer" \
    --pod-agent "$target_dir/release/ember-agent" \
    "$@"
