"""The Helm chart in deploy/helm/swapserve: rendered and schema-validated offline by
scripts/validate-deploy.sh, then checked for what the server itself expects of it (ports, probes,
flags and environment names that `swapserve serve` accepts, Secrets, drain time), and its probes
run against a real in-process server."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swapserve.cli import build_parser
from swapserve.config import DEFAULT_SHUTDOWN_GRACE_S, Settings
from swapserve.server.app import INFERENCE_SERVICE

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "swapserve"
RENDERS = {"default": {}, "fleet-gpu": yaml.safe_load((CHART / "ci" / "fleet-gpu-values.yaml").read_text()),
           "pvc-url": yaml.safe_load((CHART / "ci" / "pvc-url-values.yaml").read_text()),
           "tls": yaml.safe_load((CHART / "ci" / "tls-values.yaml").read_text())}
#: scripts/validate-deploy.sh's exit status when a tool cannot be installed (no network to PyPI).
CANNOT_INSTALL = 3
#: Environment variables the operator CLI (not `swapserve serve`) reads, set for `kubectl exec`.
CLI_ENV = {"SWAPSERVE_TOKEN"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("rendered")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "validate-deploy.sh"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280, check=False)
    if proc.returncode == CANNOT_INSTALL:
        pytest.skip(f"scripts/validate-deploy.sh could not install its tools: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"validate-deploy failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    assert re.search(r"validate-manifests: \d+ objects, 0 failed", proc.stdout), proc.stdout[-2000:]
    return {name: [d for d in yaml.safe_load_all((out / f"{name}.yaml").read_text()) if d] for name in RENDERS}


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = [c for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "swapserve"]
    return c


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def container_port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


@pytest.mark.parametrize("render", list(RENDERS))
def test_server_flags_and_environment_are_what_swapserve_serve_accepts(rendered, render: str) -> None:  # type: ignore[no-untyped-def]
    c = server_container(rendered[render])
    args = build_parser().parse_args(c["args"])  # an unknown flag exits here
    assert args.command == "serve" and str(args.model_repository) == "/models"
    assert args.grpc_port == container_port(c, "grpc") == 8001
    assert args.metrics_port == container_port(c, "metrics") == 8002
    assert args.control_address == f"0.0.0.0:{container_port(c, 'control')}" and container_port(c, "control") == 8003
    assert args.control_token is None, "the token must come from a Secret through the environment, not argv"
    # pydantic-settings ignores unknown SWAPSERVE_* variables: a misspelt one would be silently lost.
    for name in env_of(c):
        if name.startswith("SWAPSERVE_") and name not in CLI_ENV:
            assert name[len("SWAPSERVE_"):].lower() in Settings.model_fields, name
    assert args.device == ("cuda" if render == "fleet-gpu" else "cpu")
    # Closed by default: the pod binds beyond loopback, so TLS from the Secret, or --insecure said
    # explicitly (a mesh's mTLS expected), never neither.
    assert args.host == "0.0.0.0"
    if render == "tls":
        assert not args.insecure and str(args.tls_cert) == "/etc/swapserve/tls/tls.crt"
        assert str(args.tls_key) == "/etc/swapserve/tls/tls.key" and str(args.tls_ca) == "/etc/swapserve/tls/ca.crt"
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["tls"]["mountPath"] == "/etc/swapserve/tls" and "subPath" not in mounts["tls"]
    else:
        assert args.insecure and args.tls_cert is None
    # Identities: an auth file from a Secret where one is named; inference closed unless opened.
    if render == "tls":
        assert str(args.auth_file) == "/etc/swapserve/auth/auth.yaml"
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["auth"]["mountPath"] == "/etc/swapserve/auth" and mounts["auth"]["readOnly"]
    else:
        assert args.auth_file is None
    assert args.inference_open is (True if render == "pvc-url" else None)


@pytest.mark.parametrize("render", list(RENDERS))
def test_probes_point_at_the_inference_port(rendered, render: str) -> None:  # type: ignore[no-untyped-def]
    c = server_container(rendered[render])
    grpc_port = container_port(c, "grpc")
    if render == "tls":  # the kubelet's gRPC probe speaks plaintext: in-pod probes over mTLS
        command = c["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and "ServerReady" in command[2] and "secure_channel" in command[2]
    else:
        assert c["readinessProbe"]["grpc"] == {"port": grpc_port, "service": INFERENCE_SERVICE}
    for probe in ("livenessProbe", "startupProbe"):
        command = c[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and "ServerLive" in command[2]
        assert f"127.0.0.1:{grpc_port}" in command[2]
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 120


@pytest.mark.parametrize("render", list(RENDERS))
def test_graceful_termination_covers_the_drain(rendered, render: str) -> None:  # type: ignore[no-untyped-def]
    pod = one(rendered[render], "Deployment")["spec"]["template"]["spec"]
    c = server_container(rendered[render])
    drain = float(env_of(c)["SWAPSERVE_SHUTDOWN_GRACE_S"]["value"])
    assert drain >= DEFAULT_SHUTDOWN_GRACE_S
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    # Kubernetes counts preStop inside the grace period; Server.stop() stops control (1 s), then
    # drains for up to SWAPSERVE_SHUTDOWN_GRACE_S, then unloads.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 1 + drain


@pytest.mark.parametrize("render", list(RENDERS))
def test_control_is_in_cluster_only_and_authenticated(rendered, render: str) -> None:  # type: ignore[no-untyped-def]
    docs = rendered[render]
    c = server_container(docs)
    svc = one(docs, "Service", "swapserve-control")
    assert svc["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8003, "control")]
    for s in (d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] != "swapserve-control"):
        assert all(p["port"] != 8003 and p["targetPort"] != "control" for p in s["spec"]["ports"]), s["metadata"]
    token = env_of(c)["SWAPSERVE_CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["name"] and token["key"]
    assert env_of(c)["SWAPSERVE_TOKEN"]["valueFrom"]["secretKeyRef"] == token
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (control_rule,) = [r for r in policy["spec"]["ingress"] if {"port": "control", "protocol": "TCP"} in r["ports"]]
    assert control_rule["from"], "the control port must not be open to every pod"
    # No other rule opens the control port.
    assert all(r is control_rule or all(p["port"] != "control" for p in r["ports"]) for r in policy["spec"]["ingress"])


@pytest.mark.parametrize("render", list(RENDERS))
def test_secret_refs_exist(rendered, render: str) -> None:  # type: ignore[no-untyped-def]
    docs, values = rendered[render], RENDERS[render]
    made = {d["metadata"]["name"]: set(d.get("data", {})) for d in docs if d["kind"] == "Secret"}
    external = {values.get(k, {}).get("existingSecret") for k in ("registry", "control")} - {None, ""}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    refs = [e["valueFrom"]["secretKeyRef"] for c in pod.get("initContainers", []) + pod["containers"]
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs
    for ref in refs:
        assert ref["name"] in external or ref["key"] in made.get(ref["name"], set()), (ref, made, external)
    registry = [r for r in refs if r["key"] == "url"]
    if render in ("default", "tls"):
        assert not registry, "one SQLite replica by default: no registry Secret"
    else:
        assert registry and "SWAPSERVE_REGISTRY" in env_of(server_container(docs))


def test_fleet_gpu_pdb_and_servicemonitor(rendered) -> None:  # type: ignore[no-untyped-def]
    docs = rendered["fleet-gpu"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = server_container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    metrics_svc = one(docs, "Service", "swapserve-metrics")
    monitor = one(docs, "ServiceMonitor")
    labels = metrics_svc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in metrics_svc["spec"]["ports"]]
    headless = one(docs, "Service", "swapserve-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["ports"][0]["port"] == 8001
    assert not any(d["kind"] == "ServiceMonitor" for d in rendered["default"])


@pytest.mark.parametrize("render", list(RENDERS))
def test_runs_as_non_root_on_a_read_only_root(rendered, render: str) -> None:  # type: ignore[no-untyped-def]
    pod = one(rendered[render], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
    c = server_container(rendered[render])
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True
    # Everything the server writes: $SWAPSERVE_HOME and $HOME/temp files, on volumes.
    assert {"/var/lib/swapserve", "/tmp"} <= set(mounts)
    assert env_of(c)["SWAPSERVE_HOME"]["value"] == "/var/lib/swapserve" and env_of(c)["HOME"]["value"] == "/tmp"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_probes_against_a_running_server(rendered, make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The chart's liveness command and the kubelet's gRPC readiness check, against a real server."""
    empty = tmp_path / "repo"
    empty.mkdir()
    srv = make_server(empty)
    c = server_container(rendered["default"])
    command = [sys.executable if a == "python" else a.replace("127.0.0.1:8001", f"127.0.0.1:{srv.server.grpc_port}")
               for a in c["livenessProbe"]["exec"]["command"]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run(command, check=False, env=env, timeout=60).returncode == 0, "ServerLive probe failed on a live server"
    health = health_pb2_grpc.HealthStub(srv.channel)
    probe = c["readinessProbe"]["grpc"]
    assert health.Check(health_pb2.HealthCheckRequest(service=probe["service"]), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    srv.call(srv.server.stop(1))  # SIGTERM's path: both probes must now fail
    srv.server = None
    assert subprocess.run(command, check=False, env=env, timeout=60, capture_output=True).returncode != 0
