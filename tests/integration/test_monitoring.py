"""Data quality, drift and the retraining trigger through a real server (issue #7's evidence)."""
from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from swapserve._proto import grpc_service_pb2 as pb
from swapserve._proto import grpc_service_pb2_grpc as pb_grpc
from swapserve.cli.client import ControlClient, ControlError
from tests.e2e.serverproc import ROOT, ServerProcess


def repo_with(tmp_path: Path, monitoring: str) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository" / "digits", repo / "digits")
    (repo / "digits" / "monitoring.yaml").write_text(monitoring)
    return repo


def request(x: np.ndarray) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="digits", model_version="2")
    r.inputs.add(name="pixels", datatype="FP32", shape=list(x.shape))
    r.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    return r


def metric_sum(srv: ServerProcess, prefix: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def shifted(x: np.ndarray) -> np.ndarray:
    """The "camera moved" drift: every 8x8 image one pixel to the right."""
    return np.roll(x.reshape(-1, 8, 8), 1, axis=2).reshape(-1, 64)


def test_reject_policy_names_the_feature_and_keeps_serving(tmp_path: Path) -> None:
    repo = repo_with(tmp_path, "data_quality: {policy: reject, ranges: {pixels: [0, 1]}}\n")
    x = np.load(repo / "digits" / "holdout.npz")["x"][:1].astype(np.float32)
    with ServerProcess(repo) as srv, grpc.insecure_channel(srv.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        bad = x.copy()
        bad[0, 17] = np.nan
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request(bad), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pixels" in err.value.details() and "17" in err.value.details()
        far = x.copy()
        far[0, 3] = 7.5
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request(far), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "7.5" in err.value.details()
        assert stub.ModelInfer(request(x), timeout=30).model_version == "2"
        assert metric_sum(srv, 'swapserve_data_quality_rejected_total{input="pixels",model="digits"') >= 2


def test_count_policy_counts_and_drift_alert_fires_the_trigger_once(tmp_path: Path) -> None:
    out = tmp_path / "context.json"
    monitoring = f"""
windows: [4s]
slots: 4
data_quality: {{policy: count, ranges: {{pixels: [0, 1]}}}}
drift: {{min_samples: 100}}
trigger:
  command: ["{sys.executable}", "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])", "{{context}}", "{out}"]
  min_interval: 1h
"""
    repo = repo_with(tmp_path, monitoring)
    x = np.load(repo / "digits" / "holdout.npz")["x"].astype(np.float32)
    with ServerProcess(repo) as srv, grpc.insecure_channel(srv.url) as ch, ControlClient(srv.control_url) as c:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)

        def send(rows: np.ndarray, seconds: float) -> None:
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                stub.ModelInfer(request(rows[i % len(rows)][None]), timeout=30)
                i += 1
                time.sleep(0.005)

        nan = x[:1].copy()
        nan[0, 5] = np.nan
        for _ in range(5):
            stub.ModelInfer(request(nan), timeout=30)  # counted, not rejected
        send(x, 5.0)
        time.sleep(1.5)
        calm = c.drift("digits")
        assert calm["state"] in ("ok", "warn"), calm["state"]
        assert not out.exists()
        send(shifted(x), 6.0)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and c.drift("digits")["state"] != "alert":
            time.sleep(0.5)
        report = c.drift("digits")
        assert report["state"] == "alert"
        assert report["most_drifted"] and report["most_drifted"][0]["significant"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not out.exists():
            time.sleep(0.2)
        context = json.loads(out.read_text())
        assert context["model"] == "digits" and context["version"] == 2 and "drift" in context["reason"]
        # The alert goes on (same episode, so no second trigger) and `status` shows it.
        for _ in range(12):
            send(shifted(x), 0.5)
            if c.status("digits")["drift"].get("2", {}).get("state") == "alert":
                break
        assert c.status("digits")["drift"]["2"]["state"] == "alert"
        triggers = [a for a in c.audit_log("digits") if a["action"] == "retrain.trigger"]
        assert len(triggers) == 1
        kinds = [e["message"] for e in c.events("digits", limit=1000) if e["kind"] == "drift"]
        assert any("drift alert" in m for m in kinds)
        assert metric_sum(srv, 'swapserve_data_quality_issues_total{input="pixels",kind="nan",model="digits"') >= 5
        assert metric_sum(srv, 'swapserve_drift_alert{model="digits"') >= 1


def test_drift_of_unknown_model_is_not_found(tmp_path: Path) -> None:
    repo = repo_with(tmp_path, "windows: [5s]\n")
    with ServerProcess(repo) as srv, ControlClient(srv.control_url) as c:
        with pytest.raises(ControlError) as err:
            c.drift("nope")
        assert err.value.code == "NOT_FOUND"
