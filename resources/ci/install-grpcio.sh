#!/usr/bin/env bash
# Installs the Python gRPC client tools (PyPI grpcio, grpcio-tools,
# grpcio-health-checking, grpcio-reflection) that the Flintlock gRPC tests
# (tests/tests/flintlock_grpc.rs) use to generate a client from ember's
# .proto files (api_server/proto/) and drive emberd with it.
# Idempotent: does nothing when they are already importable.
# The interpreter is $EMBER_PYTHON or python3, as in the tests.
set -euo pipefail
py="${EMBER_PYTHON:-python3}"
check='import grpc, grpc_tools.protoc, grpc_health.v1.health_pb2, grpc_reflection.v1alpha.reflection_pb2'
if ! command -v "$py" >/dev/null; then
    echo "install-grpcio: $py not found; install python3 and python3-pip" >&2
    exit 1
fi
if "$py" -c "$check" 2>/dev/null; then
    exit 0
fi
echo "install-grpcio: installing grpcio, grpcio-tools, grpcio-health-checking, grpcio-reflection with pip"
if ! "$py" -m pip --version >/dev/null 2>&1; then
    "$py" -m ensurepip --upgrade >/dev/null 2>&1 || {
        echo "install-grpcio: $py has no pip; install python3-pip" >&2
        exit 1
    }
fi
pkgs=(grpcio grpcio-tools grpcio-health-checking grpcio-reflection)
# Debian's system python refuses pip installs without this flag (PEP 668).
"$py" -m pip install --quiet "${pkgs[@]}" 2>/dev/null \
    || "$py" -m pip install --quiet --break-system-packages "${pkgs[@]}"
"$py" -c "$check"
