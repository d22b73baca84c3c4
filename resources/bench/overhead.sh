#!/usr/bin/env bash
# Start-up overhead benchmark: API-ready time (spawn -> first 200 to GET /)
# and resident memory outside guest memory for an idle 128 MiB guest, for
# ember-vmm beside api-floor and kvm-floor (and Firecracker when
# FIRECRACKER=/path/to/firecracker is set), printed as ratios to the floors
# measured in the same run.
#
# Usage: resources/bench/overhead.sh [--runs N] [other `overhead` options]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

cargo build --release -p vmm -p ember-bench
target_dir="${CARGO_TARGET_DIR:-target}"
extra=()
if [ -n "${FIRECRACKER:-}" ]; then
    extra+=(--firecracker "$FIRECRACKER")
fi
exec "$target_dir/release/overhead" \
    --vmm "$target_dir/release/ember-vmm" \
    --floor "$target_dir/release/kvm-floor" \
    --api-floor "$target_dir/release/api-floor" \
    "${extra[@]}" "$@"
