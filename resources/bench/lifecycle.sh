#!/usr/bin/env bash
# Lifecycle benchmark: wall time from spawning the VMM until it exits after
# the ember test guest printed "ember-guest: done", for ember-vmm and for the
# bare-KVM floor (kvm-floor), interleaved.
#
# Usage: resources/bench/lifecycle.sh [--runs N] [other `lifecycle` options]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if ! cargo build --release -p vmm -p ember-bench; then
    echo "lifecycle.sh: building vmm failed; benchmarking kvm-floor only" >&2
    cargo build --release -p ember-bench
fi

target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/lifecycle" \
    --vmm "$target_dir/release/ember-vmm" \
    --floor "$target_dir/release/kvm-floor" \
    "$@"
