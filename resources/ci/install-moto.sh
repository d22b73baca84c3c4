#!/usr/bin/env bash
# Installs moto's standalone S3 server (PyPI 'moto[server]'), which the hub
# tests of api_server (api_server/tests/hub.rs) start on 127.0.0.1.
# Idempotent: does nothing when moto's server is already importable.
# The interpreter is $EMBER_PYTHON or python3, as in the tests.
set -euo pipefail
py="${EMBER_PYTHON:-python3}"
if ! command -v "$py" >/dev/null; then
    echo "install-moto: $py not found; install python3 and python3-pip" >&2
    exit 1
fi
if "$py" -c 'import moto.server, flask, flask_cors' 2>/dev/null; then
    exit 0
fi
echo "install-moto: installing moto[server] with pip"
if ! "$py" -m pip --version >/dev/null 2>&1; then
    "$py" -m ensurepip --upgrade >/dev/null 2>&1 || {
        echo "install-moto: $py has no pip; install python3-pip" >&2
        exit 1
    }
fi
# Debian's system python refuses pip installs without this flag (PEP 668).
"$py" -m pip install --quiet 'moto[server]' 2>/dev/null \
    || "$py" -m pip install --quiet --break-system-packages 'moto[server]'
"$py" -c 'import moto.server, flask, flask_cors'
