#!/usr/bin/env bash
# Create the peer servers' virtualenvs under benchmarks/peers/.venvs/ (git-ignored), pinned.
#   MLServer 1.7.1 (uvloop pinned to 0.21.0: newer uvloop crashes its workers at start)
#   KServe 0.21.0 Python model server
# Both get the same CPU torch as swapserve, so the TorchScript digits model runs on the same kernels.
# Usage: benchmarks/peers/setup_peers.sh [mlserver|kserve ...]   (default: both); idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3.11}"
TORCH="torch==2.13.0+cpu"
declare -A PKGS=(
  [mlserver]="mlserver==1.7.1 uvloop==0.21.0 $TORCH"
  [kserve]="kserve==0.21.0 $TORCH"
)
peers=("$@"); [ ${#peers[@]} -eq 0 ] && peers=(mlserver kserve)
for peer in "${peers[@]}"; do
  venv="$HERE/.venvs/$peer"
  if [ -x "$venv/bin/python" ] && [ -f "$venv/.installed" ]; then echo "$peer: $venv ready"; continue; fi
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086
  if "$venv/bin/python" -m pip install --quiet ${PKGS[$peer]} > "$venv/install.log" 2>&1; then
    "$venv/bin/python" -m pip freeze > "$venv/.installed"
    echo "$peer: installed into $venv"
  else
    echo "$peer: install FAILED (see $venv/install.log)" >&2
    tail -5 "$venv/install.log" >&2
  fi
done
