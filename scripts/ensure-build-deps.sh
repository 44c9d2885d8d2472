#!/usr/bin/env bash
# Make sure what `pip install -e .` compiles with is installed: a C++ compiler (the native core)
# and grpc++ found through pkg-config (the native gRPC front end of the inference port, and
# swapserve-loadgen, the native client of `swapserve bench`).
# Idempotent: does nothing when they exist.
#
# Installs Debian/Ubuntu's `libgrpc++-dev` and `pkg-config` (and `g++` when there is no C++
# compiler) non-interactively (root, or sudo without a password); `apt-get update` runs only
# when something must be installed. Without grpc++ the package still builds: the server falls
# back to grpc.aio and the harness to its Python client, so callers may treat a failure here as
# a warning.
#
# Usage: scripts/ensure-build-deps.sh        (prints the grpc++ version on success)
set -euo pipefail

have_grpcpp() {
  command -v pkg-config >/dev/null 2>&1 && pkg-config --exists grpc++
}

have_cxx() {
  command -v "${CXX:-c++}" >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1
}

missing=()
if ! have_grpcpp; then
  missing+=(libgrpc++-dev pkg-config)
fi
if ! have_cxx; then
  missing+=(g++)
fi
if [[ ${#missing[@]} -eq 0 ]]; then
  pkg-config --modversion grpc++
  exit 0
fi

# shellcheck source=lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"
need_root ensure-build-deps "install ${missing[*]} (Debian/Ubuntu: apt-get install ${missing[*]}) so that pip builds the native front end and swapserve-loadgen"
apt_install "${missing[@]}"

if ! have_grpcpp; then
  echo "ensure-build-deps: installed ${missing[*]} but \`pkg-config --exists grpc++\` still fails" >&2
  exit 1
fi
pkg-config --modversion grpc++
