"""Retraining jobs through a real server (issue 16): a job started by the trigger sees none of the
server's secrets, and one that hangs past its timeout is killed with its children; a monitoring.yaml
with ``min_interval: 0`` is refused."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from swapserve._proto import grpc_service_pb2_grpc as pb_grpc
from swapserve.cli.client import ControlClient
from tests.e2e.serverproc import ServerProcess
from tests.integration.test_monitoring import repo_with, request

SECRETS = {"SWAPSERVE_TOKEN": "control-secret", "SWAPSERVE_FEEDBACK_TOKEN": "feedback-secret-0123456789",
           "SWAPSERVE_WEBHOOK_SECRET": "hook-secret", "AWS_SECRET_ACCESS_KEY": "aws-secret"}

JOB = """
import json, os, signal, subprocess, sys, time
out = sys.argv[1]
json.dump(dict(os.environ), open(out + "/env.json", "w"))
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
open(out + "/child.tmp", "w").write(str(child.pid))
os.rename(out + "/child.tmp", out + "/child.pid")
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_job_gets_no_secret_and_is_killed_with_its_children_at_its_timeout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    registry = f"sqlite:///{tmp_path / 'reg.db'}"
    repo = repo_with(tmp_path, f"""
trigger:
  command: [{json.dumps(sys.executable)}, -c, {json.dumps(JOB)}, {json.dumps(str(out))}]
  schedule: 1s
  min_interval: 1h
  timeout: 2s
  kill_grace: 1s
  pass_env: [PASSED_ON]
""")
    env = {**SECRETS, "SWAPSERVE_REGISTRY": registry, "PASSED_ON": "yes"}
    x = np.load(repo / "digits" / "holdout.npz")["x"].astype(np.float32)
    with ServerProcess(repo, env=env) as srv, grpc.insecure_channel(srv.url) as ch, \
            ControlClient(srv.control_url) as c:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        deadline = time.monotonic() + 60
        while not (out / "child.pid").exists() and time.monotonic() < deadline:
            stub.ModelInfer(request(x[:1]), timeout=30)
            time.sleep(0.1)
        child = int((out / "child.pid").read_text())
        job_env = json.loads((out / "env.json").read_text())
        assert not set(SECRETS) & set(job_env) and "SWAPSERVE_REGISTRY" not in job_env
        assert not [k for k, v in job_env.items() if registry in v or any(s in v for s in SECRETS.values())]
        assert job_env["PASSED_ON"] == "yes" and job_env["SWAPSERVE_MODEL"] == "digits"
        deadline = time.monotonic() + 30
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child), f"the timed-out job's child {child} still runs"
        finished: list[dict] = []  # type: ignore[type-arg]
        while not finished and time.monotonic() < deadline:
            finished = [e for e in c.events("digits", limit=1000) if "retraining finished" in e["message"]]
            time.sleep(0.2)
        assert finished and finished[0]["data"]["timed_out"] and finished[0]["data"]["status"] == "failed"
        assert "SIGKILL" in finished[0]["message"]
        assert os.environ.get("SWAPSERVE_TOKEN") != "control-secret"  # the test's own env untouched
