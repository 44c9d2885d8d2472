#!/usr/bin/env bash
# Install the built artefacts the way users do and run the end-to-end checks against them.
#
# For the wheel and for the sdist in turn: a fresh virtualenv, the CPU build of torch (pinned, as in
# set-up), `pip install ARTEFACT[...]` (the sdist compiles here), then, from a directory outside
# the checkout's src/, the part of tests/e2e that covers what a user does first: serve (with and
# without --model-repository), infer through tritonclient, every CLI verb, promote and rollback
# (test_installed.py, test_control_cli.py; the wheel also runs test_inference.py, every inference
# path on both transports). Every server and CLI call in them runs the virtualenv's installed
# `swapserve` entry point. test_installed.py also
# checks that the package is complete, that the wheel's native parts need no system grpc++
# (ldd, and a run with the system's grpc++ hidden), and that the sdist builds without grpc++ and
# says so once.
#
# Usage: scripts/test-dist.sh [DIST]        (default dist/, as scripts/build-dist.sh leaves it)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
dist=$(cd "${1:-dist}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

wheel=$(ls "$dist"/swapserve-*-manylinux*.whl)
sdist=$(ls "$dist"/swapserve-*.tar.gz)
IMPORT_ALL='
import importlib, pkgutil, swapserve
optional = {"swapserve.bench.worker_triton"}
failed = []
for m in pkgutil.walk_packages(swapserve.__path__, "swapserve."):
    if m.name in optional or m.name.endswith("__main__") or ".migrations" in m.name:
        continue
    try:
        importlib.import_module(m.name)
    except ImportError as e:
        failed.append(f"{m.name}: {e}")
if failed:
    raise SystemExit("test-dist: modules that do not import with the declared dependencies alone:\n" + "\n".join(failed))
print(f"test-dist: every module of {swapserve.__file__} imports with the declared dependencies alone")
'
status=0
for kind in wheel sdist; do
  artefact=$wheel
  suites=(tests/e2e/test_installed.py tests/e2e/test_control_cli.py tests/e2e/test_inference.py)
  if [[ $kind == sdist ]]; then
    artefact=$sdist
    suites=(tests/e2e/test_installed.py tests/e2e/test_control_cli.py)
  fi
  echo "test-dist: $kind: $(basename "$artefact")"
  venv="$work/venv-$kind"
  "$PY" -m venv "$venv"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  # The artefact alone first: every module must import with only its declared dependencies (the
  # test extras installed next would hide a missing one). bench.worker_triton is tritonclient's
  # bench client, which needs tritonclient by design.
  "$venv/bin/python" -m pip install -q "$artefact"
  (cd "$work" && "$venv/bin/python" -c "$IMPORT_ALL")
  "$venv/bin/python" -m pip install -q "$artefact[onnx,postgres,examples,test]"
  (
    cd "$ROOT"
    SWAPSERVE_TEST_ARTEFACT=$kind SWAPSERVE_TEST_SDIST=$sdist \
      "$venv/bin/python" -m pytest -q -p no:cacheprovider "${suites[@]}"
  ) || status=1
done
exit $status
