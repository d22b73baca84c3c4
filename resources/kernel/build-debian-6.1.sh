#!/usr/bin/env bash
# Builds a self-contained ember guest kernel (ELF vmlinux, PVH) from Debian's
# linux-source-6.1 package: Debian's cloud config with ember.config merged on
# top, so virtio-mmio, virtio-blk, virtio-net, vsock, ext4, ACPI and the 8250
# console are built in and no module has to be loaded.
#
# Usage: resources/kernel/build-debian-6.1.sh [OUT_DIR]   (default ./kernel-out)
# Needs: apt sources with linux-source-6.1 and linux-config-6.1, root for
# apt-get, and the usual build tools (installed below). Takes a while; CI does
# not run it.
#
# Then: emberd --pod-kernel OUT_DIR/vmlinux, or EMBER_LINUX_KERNEL=OUT_DIR/vmlinux
# for the linux-* compilers.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-kernel-out}" && cd "${1:-kernel-out}" && pwd)

DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    linux-source-6.1 linux-config-6.1 build-essential bc bison flex \
    libelf-dev libssl-dev xz-utils python3

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xaf /usr/src/linux-source-6.1.tar.xz -C "$work"
src=$(echo "$work"/linux-source-6.1)
cd "$src"

# Debian's cloud-amd64 config as the base.
base=$(ls /usr/src/linux-config-6.1/config.amd64_none_cloud-amd64.xz)
xz -dc "$base" >.config
# No signing keys in a local build.
scripts/config --set-str SYSTEM_TRUSTED_KEYS "" --set-str SYSTEM_REVOCATION_KEYS "" \
    --disable MODULE_SIG_ALL --disable DEBUG_INFO_BTF
scripts/kconfig/merge_config.sh -m .config "$here/ember.config"
make olddefconfig

# Every =y of the fragment must have survived (a dependency may veto one).
fail=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=y) grep -qx "$line" .config || { echo "not set: $line" >&2; fail=1; } ;; esac
done <"$here/ember.config"
[ "$fail" = 0 ] || exit 1

make -j"$(nproc)" vmlinux bzImage
cp vmlinux "$out/vmlinux"
cp arch/x86/boot/bzImage "$out/bzImage"
cp .config "$out/config"
# emberd reads <kernel>.config to know that the drivers it needs are built in.
cp .config "$out/vmlinux.config"
cp .config "$out/bzImage.config"
echo "built $out/vmlinux and $out/bzImage ($(make -s kernelrelease))"
