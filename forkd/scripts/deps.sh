#!/usr/bin/env bash
# Install what building and testing remotefork needs on a fresh machine of
# this kind (Debian 12, root, the machine's Rust toolchain and CPython 3.11).
# Sourced by test.sh and demo.sh; safe to run again.
set -euo pipefail

need_apt=()
# cmake, libclang-dev, clang and pkg-config build the `sideway` verbs
# bindings (the RDMA transport); libibverbs1 and ibverbs-providers are what
# it opens at run time (without them forkd runs with RDMA unavailable).
DEB_PKGS=(build-essential iproute2 procps cmake libclang-dev clang pkg-config
          libibverbs1 ibverbs-providers)
for pkg in "${DEB_PKGS[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ] || [ "${FORCE_APT:-0}" = 1 ]; then
    echo "deps: installing ${need_apt[*]:-packages}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${DEB_PKGS[@]}"
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
