#!/usr/bin/env bash
# Fetches a stock Debian cloud kernel for tests/tests/acpi_linux.rs: the
# bzImage and the ELF vmlinux inside it (scripts/extract-vmlinux style: find the
# compressed payload's magic, decompress with the Debian tool). Idempotent:
# does nothing when the cache already holds both files.
#
# Cache: ${EMBER_KERNEL_CACHE:-/var/cache/ember/kernel}. Writes the two paths to
# $cache/bzImage.path and $cache/vmlinux.path (read by the test; the test also
# honours EMBER_TEST_KERNEL / EMBER_TEST_VMLINUX).
set -euo pipefail

cache=${EMBER_KERNEL_CACHE:-/var/cache/ember/kernel}
mkdir -p "$cache"
cd "$cache"

if [ -s bzImage.path ] && [ -s vmlinux.path ] &&
    [ -f "$(cat bzImage.path)" ] && [ -f "$(cat vmlinux.path)" ]; then
    echo "fetch-kernel: cached $(cat bzImage.path)"
    exit 0
fi

need=()
command -v lz4 >/dev/null || need+=(lz4)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

apt-get update -qq
# The newest 6.1 cloud kernel package (unsigned: a plain bzImage).
pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' |
    awk '{print $1}' | sort -V | tail -1)
if [ -z "$pkg" ]; then
    echo "fetch-kernel: no linux-image-6.1.0-*-cloud-amd64-unsigned package in the apt sources" >&2
    exit 1
fi
rm -f ./*.deb
# _apt cannot write to a root-owned cache; download as root without the sandbox warning mattering.
apt-get download "$pkg"
rm -rf root
dpkg-deb -x ./*.deb root
bz=$(ls "$cache"/root/boot/vmlinuz-* | head -1)
out="$cache/vmlinux"

# The payload: offset = (setup_sects + 1) * 512 + payload_offset, length payload_length.
python3 - "$bz" "$cache/payload" <<'EOF'
import sys
d = open(sys.argv[1], 'rb').read()
setup_sects = d[0x1f1] or 4
off = (setup_sects + 1) * 512 + int.from_bytes(d[0x248:0x24c], 'little')
ln = int.from_bytes(d[0x24c:0x250], 'little')
open(sys.argv[2], 'wb').write(d[off:off + ln])
EOF
magic=$(head -c 4 payload | od -An -tx1 | tr -d ' \n')
case "$magic" in
1f8b*) gzip -dc <payload >"$out" 2>/dev/null || true ;;
fd377a58) xz -dc <payload >"$out" 2>/dev/null || true ;;
28b52ffd) zstd -dcq <payload >"$out" 2>/dev/null || true ;;
02214c18) lz4 -dc <payload >"$out" 2>/dev/null || true ;;
*)
    echo "fetch-kernel: unknown payload magic $magic in $bz" >&2
    exit 1
    ;;
esac
rm -f payload
if [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' \n')" != "7f454c46" ]; then
    echo "fetch-kernel: decompressed payload of $bz is not an ELF file" >&2
    exit 1
fi
echo "$bz" >bzImage.path
echo "$out" >vmlinux.path
echo "fetch-kernel: $pkg -> $bz, $out"
