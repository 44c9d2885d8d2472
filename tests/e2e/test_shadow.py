"""Shadow traffic never changes a response; its copies are compared and counted."""
from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient

from tests.e2e.serverproc import ROOT, SWAPSERVE, ServerProcess, copy_models, wait_until


def metric(srv: ServerProcess, prefix: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_shadow_never_changes_a_response(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["digits"])
    data = np.load(example_repo / "digits" / "holdout.npz")
    x = data["x"][:200].astype(np.float32)
    v2 = torch.jit.load(str(example_repo / "digits" / "2" / "model.pt"))
    v1 = torch.jit.load(str(example_repo / "digits" / "1" / "model.pt"))
    with torch.inference_mode():
        expected = v2(torch.from_numpy(x)).numpy()
        disagree = int((v1(torch.from_numpy(x)).argmax(1) != torch.from_numpy(expected).argmax(1)).sum())
    with ServerProcess(repo) as srv:
        out = subprocess.run([*SWAPSERVE, "traffic", "digits", "2=100", "--shadow", "1",
                              "--url", srv.control_url, "--json", "--reason", "shadow v1"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["shadows"] == [1]
        c = grpcclient.InferenceServerClient(srv.url)
        for i in range(len(x)):
            inp = grpcclient.InferInput("pixels", [1, 64], "FP32")
            inp.set_data_from_numpy(x[i:i + 1])
            r = c.infer("digits", [inp])
            assert r.get_response().model_version == "2"
            np.testing.assert_allclose(r.as_numpy("probabilities")[0], expected[i], rtol=1e-4, atol=1e-6)
        prefix = 'swapserve_shadow_requests_total{model="digits",result='
        wait_until(lambda: metric(srv, prefix + '"agree",version="1"}')
                   + metric(srv, prefix + '"diverge",version="1"}')
                   + metric(srv, prefix + '"shed",version="1"}') >= len(x), timeout=30)
        compared = metric(srv, prefix + '"agree",version="1"}') + metric(srv, prefix + '"diverge",version="1"}')
        assert compared > 0
        # v1 is the weaker model: copies it answered differently are counted as divergences.
        assert disagree > 0 and metric(srv, prefix + '"diverge",version="1"}') > 0
        # Shadow copies did not count as served requests of v1 for clients.
        stats = c.get_inference_statistics("digits", "2", as_json=True)["model_stats"][0]
        assert int(stats["inference_stats"]["success"]["count"]) >= len(x)
