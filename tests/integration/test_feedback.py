"""Ground-truth feedback through a real server: infer with slices, report labels (RPC and CLI), join.

Per-slice accuracy in the Prometheus metrics must equal the accuracy computed offline from
the responses the client received; unknown ids are reported per outcome, never fatal.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from swapserve._proto import feedback_pb2 as fpb
from swapserve._proto import feedback_pb2_grpc as fpb_grpc
from swapserve._proto import grpc_service_pb2 as pb
from tests.e2e.serverproc import ROOT, copy_models
from tests.integration.conftest import InProcessServer


def infer(srv: InProcessServer, x: np.ndarray, slice_: str, rid: str = "") -> pb.ModelInferResponse:
    req = pb.ModelInferRequest(model_name="digits", id=rid)
    req.inputs.add(name="pixels", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype(np.float32).tobytes())
    req.parameters["slice"].string_param = slice_
    return srv.stub.ModelInfer(req, timeout=30)


def predicted(resp: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(-1, 10).argmax(axis=1)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "swapserve.cli", "feedback", *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture()
def served(example_repo: Path, tmp_path: Path, make_server: Any) -> Any:
    """A server with digits; the Feedback service answers on its inference port."""
    srv = make_server(copy_models(example_repo, tmp_path / "repo", ["digits"]))
    return srv, f"127.0.0.1:{srv.server.grpc_port}"


def test_labels_join_and_per_slice_accuracy_matches_offline(served: Any, example_repo: Path, tmp_path: Path) -> None:
    srv, address = served
    holdout = np.load(example_repo / "digits" / "holdout.npz")
    x, y, slices = holdout["x"][:240], holdout["y"][:240], holdout["slice"][:240]

    # (id, row, true label, slice, predicted class, version) for every row the client saw.
    seen: list[tuple[str, int, int, str, int, str]] = []
    for i in range(200):  # single-row requests; the server assigns the ids
        r = infer(srv, x[i:i + 1], str(slices[i]))
        assert r.id
        seen.append((r.id, 0, int(y[i]), str(slices[i]), int(predicted(r)[0]), r.model_version))
    for j, start in enumerate(range(200, 240, 4)):  # multi-row requests under the client's ids
        r = infer(srv, x[start:start + 4], "batch", rid=f"multi-{j}")
        for row, p in enumerate(predicted(r)):
            seen.append((r.id, row, int(y[start + row]), "batch", int(p), r.model_version))
    versions = {v for *_, v in seen}
    assert len(versions) == 1
    version = int(versions.pop())

    # Half through the RPC, with an unknown id, a duplicate and a missing row mixed in.
    half = len(seen) // 2
    stub = fpb_grpc.FeedbackStub(grpc.insecure_channel(address))
    request = fpb.ReportRequest(model="digits")
    for rid, row, label, *_ in seen[:half]:
        request.outcomes.add(id=rid, label=label, row=row)
    request.outcomes.add(id="no-such-request", label=3)
    request.outcomes.add(id=seen[0][0], label=seen[0][2])  # already reported: counted once
    request.outcomes.add(id="multi-0", label=1, row=9)
    response = stub.Report(request, timeout=30)
    assert (response.joined, response.unknown, response.expired, response.invalid, response.duplicate) == \
        (half, 1, 0, 1, 1)
    assert [r.status for r in response.results[-3:]] == ["unknown", "duplicate", "invalid"]
    assert "no-such-request" in response.results[-3].message

    # The other half through the CLI, with an unknown id again.
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "row", "label"])
        for rid, row, label, *_ in seen[half:]:
            w.writerow([rid, row, label])
        w.writerow(["never-seen", 0, 1])
    done = run_cli("digits", "--file", str(labels), "--url", address, "--json", "--batch", "50")
    assert done.returncode == 0, done.stderr
    totals = json.loads(done.stdout)
    assert totals["joined"] == len(seen) - half and totals["unknown"] == 1 and totals["sent"] == len(seen) - half + 1
    assert totals["not_joined"][0]["id"] == "never-seen"

    # Per-slice accuracy equals what the responses say offline.
    expected: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _, _, label, slice_, pred, _ in seen:
        for key in (slice_, "overall"):
            expected[key][0] += 1
            expected[key][1] += int(pred == label)
    value = srv.server.metrics.registry.get_sample_value
    for key, (n, correct) in expected.items():
        labels = {"model": "digits", "version": str(version), "slice": key}
        assert value("swapserve_slice_labelled_total", labels) == n, key
        assert value("swapserve_slice_accuracy", labels) == pytest.approx(correct / n), key
    assert value("swapserve_slice_requests_total", {"model": "digits", "version": str(version),
                                                    "slice": "overall"}) == 210
    assert value("swapserve_slice_requests_total", {"model": "digits", "version": str(version),
                                                    "slice": "batch"}) == 10
    assert value("swapserve_slice_errors_total", {"model": "digits", "version": str(version),
                                                  "slice": "overall"}) == 0
    assert value("swapserve_feedback_outcomes_total", {"model": "digits", "result": "joined"}) == len(seen)
    assert value("swapserve_feedback_outcomes_total", {"model": "digits", "result": "unknown"}) == 2
    assert value("swapserve_feedback_outcomes_total", {"model": "digits", "result": "invalid"}) == 1
    assert value("swapserve_feedback_outcomes_total", {"model": "digits", "result": "duplicate"}) == 1
    assert value("swapserve_feedback_reporter_labels_total", {"model": "digits", "reporter": "anonymous",
                                                              "result": "counted"}) == len(seen)


def test_cli_exit_codes(served: Any, tmp_path: Path) -> None:
    srv, address = served
    bad = tmp_path / "bad.csv"
    bad.write_text("id,correct\nabc,true\ndef,maybe\n")
    done = run_cli("digits", "--file", str(bad), "--url", address)
    assert done.returncode == 2 and "bad.csv:3" in done.stderr and "maybe" in done.stderr
    good = tmp_path / "good.csv"
    good.write_text("id,correct\nabc,true\n")
    done = run_cli("digits", "--file", str(good), "--url", "127.0.0.1:1")
    assert done.returncode == 3 and "cannot reach" in done.stderr
    done = run_cli("", "--file", str(good), "--url", address)  # the server refuses a report without a model
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr
    done = run_cli("digits", "--file", str(good), "--url", address)
    assert done.returncode == 0 and "unknown" in done.stderr  # not joined: listed, not fatal


@pytest.mark.parametrize("frontend", ["native", "python"])
def test_a_configured_feedback_token_is_required_and_names_the_reporter(
        example_repo: Path, tmp_path: Path, make_server: Any, frontend: str) -> None:
    from swapserve.server.transport import native as native_frontend

    if frontend == "native" and not native_frontend.available():
        pytest.skip("the native front end is not built")
    tokens = tmp_path / "tokens"
    tokens.write_text("labeller 0123456789abcdef0123\n")
    srv = make_server(copy_models(example_repo, tmp_path / "repo", ["digits"]), feedback_token_file=tokens,
                      frontend=frontend)
    x = np.load(example_repo / "digits" / "holdout.npz")["x"][:2]
    ids = [infer(srv, x[i:i + 1], "round").id for i in range(2)]
    stub = fpb_grpc.FeedbackStub(grpc.insecure_channel(f"127.0.0.1:{srv.server.grpc_port}"))
    request = fpb.ReportRequest(model="digits", outcomes=[fpb.Outcome(id=ids[0], correct=True)])
    for metadata in ((), (("authorization", "Bearer wrong-token-000000"),)):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Report(request, timeout=30, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = stub.Report(request, timeout=30, metadata=(("authorization", "Bearer 0123456789abcdef0123"),))
    assert ok.joined == 1
    ok = stub.Report(fpb.ReportRequest(model="digits", outcomes=[fpb.Outcome(id=ids[1], correct=True)]), timeout=30,
                     metadata=(("x-swapserve-feedback-token", "0123456789abcdef0123"),))
    assert ok.joined == 1
    value = srv.server.metrics.registry.get_sample_value
    assert value("swapserve_feedback_reporter_labels_total", {"model": "digits", "reporter": "labeller",
                                                              "result": "counted"}) == 2
    # Re-sending a logged id is refused, and the first prediction stays joinable only once.
    with pytest.raises(grpc.RpcError) as again:
        infer(srv, x[:1], "round", rid=ids[0])
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS and "already used" in again.value.details()
