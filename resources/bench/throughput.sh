#!/usr/bin/env bash
# Virtio throughput benchmark: blk (1 MiB in 4 KiB reads) and net (256 UDP
# datagrams of 1024 bytes through a TAP in a private network namespace) of
# the ember test guest under ember-vmm, next to the host's raw pread / TAP
# write throughput in the same run, interleaved. The net part needs root.
#
# Usage: resources/bench/throughput.sh [--runs N] [--only blk|net] [other `throughput` options]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

cargo build --release -p vmm -p ember-bench

target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/throughput" \
    --vmm "$target_dir/release/ember-vmm" \
    "$@"
