#!/usr/bin/env bash
# Install what building and testing remotefork needs on a fresh machine of
# this kind (Debian 12, root, the machine's Rust toolchain and CPython 3.11).
# Sourced by test.sh and demo.sh; safe to run again.
set -euo pipefail

need_apt=()
# cmake, libclang-dev, clang and pkg-config build the `sideway` verbs
# bindings (the RDMA transport); libibverbs1 and ibverbs-providers are what
# it opens at run time (without them forkd runs with RDMA unavailable).
# golang-go and ruby run the multi-threaded restore tests' Go and Ruby
# programs (forkd/tests/threads.rs); the JDK (javac, for the Java programs
# and clients/java) and the JRE run the runtimes tests' JVM
# (forkd/tests/runtimes.rs). runc runs the container tests' OCI bundle,
# whose rootfs is built from Debian's python3 (forkd/scripts/oci-bundle.sh).
# dnsmasq-base (the binary, no system service) publishes the nodes of the
# discovery tests under one DNS name (forkd/tests/discovery.rs).
DEB_PKGS=(build-essential iproute2 procps cmake libclang-dev clang pkg-config
          libibverbs1 ibverbs-providers golang-go ruby
          openjdk-17-jre-headless openjdk-17-jdk-headless runc python3
          dnsmasq-base)
for pkg in "${DEB_PKGS[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ] || [ "${FORCE_APT:-0}" = 1 ]; then
    echo "deps: installing ${need_apt[*]:-packages}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${DEB_PKGS[@]}"
fi

# kubectl renders the Kubernetes manifests (kubectl kustomize); a machine
# without one gets Debian's (kubernetes-client).
if ! command -v kubectl >/dev/null 2>&1; then
    echo "deps: installing kubernetes-client (kubectl)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q kubernetes-client
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
# numpy (with OpenBLAS's threads) for the multi-threaded restore tests.
if ! "$PYTHON" -c 'import numpy' >/dev/null 2>&1; then
    echo "deps: installing numpy for $PYTHON" >&2
    "$PYTHON" -m pip install -q numpy
fi

# Stock gRPC clients for the conformance tests and the Python client
# (remotefork.client): grpcio and its tools, health and reflection clients;
# openapi-spec-validator checks the gateway's /openapi.json, jsonschema the
# CLIs' --json output against docs/cli-schema.json; kubernetes-validate (and
# PyYAML) the rendered Kubernetes manifests, offline, against the schemas it
# ships.
PY_PKGS=(grpcio grpcio-tools grpcio-health-checking grpcio-reflection openapi-spec-validator jsonschema
         kubernetes-validate pyyaml)
if ! "$PYTHON" -c 'import grpc, grpc_tools, grpc_health.v1, grpc_reflection, openapi_spec_validator, jsonschema, kubernetes_validate, yaml' >/dev/null 2>&1; then
    echo "deps: installing ${PY_PKGS[*]} for $PYTHON" >&2
    "$PYTHON" -m pip install -q "${PY_PKGS[@]}"
fi
# The Python client's stubs are generated, not kept in the repository.
(cd python && "$PYTHON" -m remotefork.generate >/dev/null)

# Node and the Node client's packages (@grpc/grpc-js, @grpc/proto-loader).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "deps: installing nodejs npm" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q nodejs npm
fi
if [ ! -d clients/node/node_modules/@grpc/grpc-js ] || [ clients/node/package-lock.json -nt clients/node/node_modules ]; then
    echo "deps: npm ci in clients/node" >&2
    (cd clients/node && npm ci --no-audit --no-fund --loglevel=error)
fi
