"""The whole loop on digits: shifted inputs -> drift alert -> retraining trigger -> a new version
directory -> the poll-mode watcher registers and preloads it (not served: the champion is pinned)
-> a rollout with labels takes it through the gates to promotion."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from swapserve._proto import feedback_pb2 as fpb
from swapserve._proto import feedback_pb2_grpc as fpb_grpc
from swapserve._proto import grpc_service_pb2 as pb
from swapserve._proto import grpc_service_pb2_grpc as pb_grpc
from swapserve.cli.client import ControlClient
from tests.e2e.serverproc import ROOT, ServerProcess

PLAN = """
stages:
  - {name: canary, traffic: 50, min_duration: 3s, min_samples: 100}
  - {name: full, traffic: 100, min_duration: 1s}
watch: 2s
"""


def shifted(x: np.ndarray) -> np.ndarray:
    return np.roll(x.reshape(-1, 8, 8), 1, axis=2).reshape(-1, 64).astype(np.float32)


def test_drift_retrain_register_rollout(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository" / "digits", repo / "digits")
    (repo / "digits" / "monitoring.yaml").write_text(f"""
windows: [4s]
slots: 4
drift: {{min_samples: 100}}
trigger:
  command: ["{sys.executable}", "{ROOT / 'examples' / 'retrain_digits.py'}", "--context", "{{context}}"]
  min_interval: 1h
""")
    data = np.load(repo / "digits" / "holdout.npz")
    xs, y = shifted(data["x"]), data["y"]
    with ServerProcess(repo, "--model-control-mode", "poll", "--repository-poll-secs", "1") as srv, \
            ControlClient(srv.control_url) as c, grpc.insecure_channel(srv.url) as ch:
        c.promote("digits", 2, reason="pin the champion")
        infer = pb_grpc.GRPCInferenceServiceStub(ch)
        feedback = fpb_grpc.FeedbackStub(ch)
        counter = iter(range(10**9))

        def traffic(seconds: float, label: bool = False) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                i = next(counter) % len(xs)
                req = pb.ModelInferRequest(model_name="digits", id=f"r{next(counter)}")
                req.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
                req.raw_input_contents.append(xs[i:i + 1].tobytes())
                req.parameters["routing_key"].string_param = req.id
                resp = infer.ModelInfer(req, timeout=30)
                if label:
                    feedback.Report(fpb.ReportRequest(model="digits", outcomes=[
                        fpb.Outcome(id=resp.id, label=int(y[i]))]), timeout=30)

        traffic(6)
        deadline = time.monotonic() + 240  # drift alert -> ~25 s of retraining -> the watcher
        versions: dict[int, dict] = {}  # type: ignore[type-arg]
        while time.monotonic() < deadline:
            versions = {v["version"]: v for v in c.status("digits")["versions"]}
            if versions.get(3, {}).get("resident"):
                break
            traffic(0.5)
        assert 3 in versions and versions[3]["resident"], versions.keys()
        status = c.status("digits")
        assert status["champion"] == 2 and status["traffic"] == {"2": 100.0}  # registered, not deployed
        assert any(a["action"] == "retrain.trigger" for a in c.audit_log("digits"))
        c.start_rollout("digits", 3, plan=PLAN, reason="retrained on shifted inputs")
        deadline = time.monotonic() + 120
        state = ""
        while time.monotonic() < deadline:
            traffic(0.5, label=True)
            r = c.rollout("digits")["rollout"]
            state = r["state"]
            if state not in ("running", "paused", "awaiting_approval"):
                break
        assert state == "promoted", r["evidence"].get("rollback")
        assert c.status("digits")["champion"] == 3
