#!/usr/bin/env bash
# Install what building and testing remotefork needs on a fresh machine of
# this kind (Debian 12, root, the machine's Rust toolchain and CPython 3.11).
# Sourced by test.sh and demo.sh; safe to run again.
set -euo pipefail

need_apt=()
for pkg in build-essential iproute2 procps; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ] || [ "${FORCE_APT:-0}" = 1 ]; then
    echo "deps: installing ${need_apt[*]:-packages}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q build-essential iproute2 procps
fi

if ! command -v cargo >/dev/null 2>&1; then
    # shellcheck disable=SC1091
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "deps: cargo not found (this machine kind ships rustup's toolchain)" >&2; exit 1; }

# The real interpreter behind the pyenv shim, resolved once.
PYTHON="$(python3 -c 'import sys; print(sys.executable)')"
export PYTHON
if ! "$PYTHON" -c 'import boto3' >/dev/null 2>&1; then
    echo "deps: installing boto3 for $PYTHON" >&2
    "$PYTHON" -m pip install -q boto3
fi
