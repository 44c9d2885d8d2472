"""``swapserve bench`` against a real ``swapserve serve`` subprocess.

This process may import swapserve._proto but never tritonclient (the tritonclient client
mode runs in its own worker subprocess). Nothing here asserts an absolute time: only
counts, agreement with reference computations and relations between two runs.

The main scenarios run with the raw Python client and with the native one
(swapserve-loadgen); without its binary the native cases skip, except under CI=1, where
they fail (the set-up installs grpc++ and builds it).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from swapserve.bench import native, report, workload
from swapserve.bench.runner import BenchConfig, BenchError, BenchResult, run_bench
from swapserve.bench.swap import control_cli_available
from swapserve.bench.worker_raw import response_version
from tests.e2e.serverproc import ROOT, ServerProcess, copy_models

#: Top-level keys of the JSON document (schema swapserve.bench/1). Changing them is a schema change.
SUMMARY_KEYS = {"schema", "started_at", "config", "duration_s", "sent", "completed", "errors", "errors_by_status",
                "throughput_rps", "latency_ms", "percentile_method", "send_lag_ms", "versions", "swaps", "client",
                "server", "timeseries"}
CONFIG_KEYS = {"url", "model", "mode", "concurrency", "rate", "duration", "warmup", "timeout", "model_version",
               "input_data", "params", "client", "processes", "server_pids", "swap_every", "versions", "control_url",
               "swap_command", "distinct_requests", "seed"}
SERIES_KEYS = {"t", "sent", "completed", "errors", "p50_ms", "p99_ms", "max_ms", "versions"}

SLOW_TARGET_S = 0.02


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


#: The load generators every main scenario runs with.
CLIENTS = ["raw", pytest.param("native", marks=pytest.mark.skipif(
    native.find_binary() is None and not _ci(),
    reason=f"{native.missing_message()} (under CI=1 this fails instead)"))]


class Slow(torch.nn.Module):
    """~20 ms of single-threaded matmuls per request: a model that cannot keep up with a modest rate."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        self.rounds = rounds
        self.w = torch.nn.Parameter(torch.randn(192, 192) / 14.0, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.w
        for _ in range(self.rounds):
            a = torch.tanh(a @ self.w)
        return x + a.sum() * 0.0


def _build_slow(repo: Path) -> None:
    torch.set_num_threads(1)
    probe = torch.jit.script(Slow(4))
    x = torch.zeros(1, 4)
    probe(x)
    t0 = time.perf_counter()
    for _ in range(5):
        probe(x)
    per_round = (time.perf_counter() - t0) / 20
    rounds = max(1, min(2000, int(SLOW_TARGET_S / per_round)))
    (repo / "slow" / "1").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Slow(rounds)), str(repo / "slow" / "1" / "model.pt"))
    (repo / "slow" / "config.pbtxt").write_text(
        'name: "slow"\nplatform: "pytorch_libtorch"\nmax_batch_size: 1\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    src = ROOT / "model_repository"
    if not all(any((src / m).glob("[0-9]*/model.pt")) for m in ("digits", "simple")):
        src = tmp_path_factory.mktemp("examples")
        subprocess.run([sys.executable, "-m", "swapserve.cli", "examples", str(src), "--models", "simple,digits"],
                       check=True)
    repo = copy_models(src, tmp_path_factory.mktemp("repo"), ["digits", "simple"])
    _build_slow(repo)
    with ServerProcess(repo) as proc:
        yield proc


def _run(server: ServerProcess, **kw: object) -> BenchResult:
    kw.setdefault("duration", 1.5)
    kw.setdefault("warmup", 0.3)
    return run_bench(BenchConfig(url=server.url, server_pids=[server.proc.pid], **kw))  # type: ignore[arg-type, union-attr]


def _check_accounting(s: dict, rec: report.Records) -> None:  # type: ignore[type-arg]
    assert s["sent"] == len(rec.status) > 0
    assert s["completed"] + s["errors"] == s["sent"]
    assert sum(s["errors_by_status"].values()) == s["errors"]
    assert sum(s["versions"].values()) == s["completed"]
    assert sum(p["completed"] for p in s["timeseries"]) == s["completed"]
    assert sum(p["errors"] for p in s["timeseries"]) == s["errors"]
    assert sum(p["sent"] for p in s["timeseries"]) == s["sent"]


def test_response_version_scanner_matches_protobuf() -> None:
    from swapserve._proto import grpc_service_pb2 as pb

    resp = pb.ModelInferResponse(model_name="digits", model_version="17", id="x" * 300)
    resp.parameters["k"].int64_param = 5
    resp.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
    resp.raw_output_contents.append(np.arange(10, dtype=np.float32).tobytes())
    assert response_version(resp.SerializeToString()) == "17"
    assert response_version(pb.ModelInferResponse(model_name="m").SerializeToString()) == ""


@pytest.mark.parametrize("client", CLIENTS)
def test_closed_loop_counts_and_percentiles(server: ServerProcess, client: str) -> None:
    res = _run(server, model="digits", concurrency=4, params={"slice": "a"}, client=client)
    s, rec = res.summary, res.records
    _check_accounting(s, rec)
    assert s["config"]["client"] == client
    assert s["errors"] == 0 and s["versions"]
    ref = np.percentile((rec.done - rec.sched) / 1e6, [50, 90, 99, 99.9], method="linear")
    got = [s["latency_ms"][k] for k in ("p50", "p90", "p99", "p99.9")]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-3)
    assert s["latency_ms"]["max"] == pytest.approx(float(rec.latency_ms.max()), abs=1e-3)
    assert set(s) == SUMMARY_KEYS and CONFIG_KEYS <= set(s["config"])
    assert all(set(p) == SERIES_KEYS for p in s["timeseries"])
    assert s["config"]["mode"] == "closed" and s["send_lag_ms"]["max"] == 0
    assert s["client"]["cpu_us_per_request"] > 0 and s["server"]["cpu_us_per_request"] > 0


def test_errors_are_counted_by_status(server: ServerProcess, tmp_path: Path) -> None:
    """Every third request pins a version that does not exist: errors, counted, never lost."""
    requests = [{"inputs": {"pixels": np.full((1, 64), i / 10, np.float32).tolist()},
                 "model_version": "99" if i % 3 == 0 else ""} for i in range(9)]
    data = tmp_path / "inputs.json"
    data.write_text(json.dumps({"requests": requests}))
    res = _run(server, model="digits", concurrency=3, input_data=data)
    s = res.summary
    _check_accounting(s, res.records)
    assert s["errors"] > 0 and s["completed"] > 0
    assert set(s["errors_by_status"]) <= {"NOT_FOUND", "UNAVAILABLE", "INVALID_ARGUMENT"}


@pytest.mark.parametrize("client", CLIENTS)
def test_cli_json_plot_records_and_version_attribution(server: ServerProcess, tmp_path: Path, client: str) -> None:
    """Per-request pinned versions from an npz input file: both versions answer and are told apart.

    Native runs without --client: it is the default whenever it is built.
    """
    n = 8
    data = tmp_path / "inputs.npz"
    np.savez(data, pixels=np.random.default_rng(0).random((n, 64), dtype=np.float32),
             model_version=np.array(["1", "2"] * (n // 2)), **{"parameters.routing_key": np.arange(n)})
    out_json, out_png, out_rec = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "swapserve.cli", "bench", "--url", server.url, "--model", "digits",
         "--concurrency", "4", "--duration", "1.5", "--warmup", "0.3", "--input-data", str(data),
         "--param", "slice=night", "--server-pid", str(server.proc.pid),  # type: ignore[union-attr]
         "--json", str(out_json), "--plot", str(out_png), "--records", str(out_rec),
         *(["--client", client] if client != "native" else [])],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "throughput" in proc.stdout  # the human summary
    s = json.loads(out_json.read_text())
    assert set(s) == SUMMARY_KEYS and s["schema"] == report.SCHEMA
    assert s["config"]["client"] == client
    assert set(s["versions"]) == {"1", "2"} and s["errors"] == 0
    # Payloads go round-robin over alternating pins: each version serves about half.
    assert min(s["versions"].values()) >= s["completed"] // 4
    assert s["config"]["params"] == {"slice": "night"}
    with np.load(out_rec) as r:
        assert len(r["status"]) == s["sent"]
        lat = (r["done"] - r["sched"])[r["status"] == 0] / 1e6
    assert s["latency_ms"]["p99"] == pytest.approx(float(np.percentile(lat, 99)), abs=1e-3)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = plt.imread(out_png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("client", CLIENTS)
def test_open_loop_reports_queueing(server: ServerProcess, client: str) -> None:
    """Above capacity, open-loop latency includes the wait in the queue; closed loop never sees it."""
    closed = _run(server, model="slow", concurrency=1, duration=1.5, client=client)
    capacity = closed.summary["throughput_rps"]
    assert capacity > 0
    opened = _run(server, model="slow", rate=max(4.0, 2.5 * capacity), duration=1.5, warmup=0.0, client=client)
    s = opened.summary
    _check_accounting(s, opened.records)
    assert s["config"]["mode"] == "open" and s["errors"] == 0
    assert s["latency_ms"]["p99"] > 3 * closed.summary["latency_ms"]["p99"]
    # Latency grows through the run as the queue builds: late arrivals wait longer than early ones
    # (at 2.5x capacity from an empty queue, about 5x longer in theory; records are in schedule order).
    lat = opened.records.latency_ms
    third = len(lat) // 3
    assert np.median(lat[-third:]) > 1.5 * np.median(lat[:third])


def test_tritonclient_mode_in_its_own_process(server: ServerProcess) -> None:
    assert "tritonclient" not in sys.modules
    res = _run(server, model="simple", concurrency=2, duration=1.0, client="tritonclient")
    _check_accounting(res.summary, res.records)
    assert res.summary["errors"] == 0 and res.summary["versions"] == {"1": res.summary["completed"]}
    assert "tritonclient" not in sys.modules


def _control_url(server: ServerProcess) -> str | None:
    for line in server.lines:
        m = re.search(r"control=(\S+:\d+)", line)
        if m:
            return m[1]
    return None


@pytest.mark.skipif(not control_cli_available(), reason="`swapserve promote --help` fails: the control service "
                                                        "CLI (issue #4) is not in this tree yet")
@pytest.mark.parametrize("client", CLIENTS)
def test_swap_scenario_attributes_both_versions(server: ServerProcess, tmp_path: Path, client: str) -> None:
    url = _control_url(server)
    assert url, "the ready line should name the control endpoint: " + "\n".join(server.lines[-5:])
    res = _run(server, model="digits", concurrency=4, duration=3.0, swap_every=1.0, versions=["1", "2"],
               control_url=url, client=client)
    s = res.summary
    _check_accounting(s, res.records)
    assert s["swaps"] and all(e["ok"] for e in s["swaps"]), s["swaps"]
    assert set(s["versions"]) == {"1", "2"} and s["errors"] == 0
    png = tmp_path / "swap.png"
    report.plot(res.records, s, res.window_start, png)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture()
def canned_payloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests without asking the server for metadata: these tests aim the harness at servers that do not answer."""
    payload = workload.encode_request("digits", {"pixels": (np.zeros((1, 64), np.float32), "FP32")}, {})
    monkeypatch.setattr(workload, "build_payloads", lambda *a, **kw: ([payload], {}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.usefixtures("canned_payloads")
@pytest.mark.parametrize("client", CLIENTS)
def test_unreachable_server_counts_errors_without_hanging(client: str) -> None:
    """Nothing listening (refused: UNAVAILABLE) or a peer that never answers (DEADLINE_EXCEEDED)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes connections; nobody ever reads or answers
        for url, codes in ((f"127.0.0.1:{_free_port()}", {"UNAVAILABLE"}),
                           (f"127.0.0.1:{silent.getsockname()[1]}", {"DEADLINE_EXCEEDED", "UNAVAILABLE"})):
            began = time.monotonic()
            s = run_bench(BenchConfig(url=url, model="digits", concurrency=2, duration=1.0, warmup=0.0, timeout=0.5,
                                      client=client)).summary
            assert time.monotonic() - began < 30, url
            assert s["config"]["client"] == client
            assert s["sent"] > 0 and s["completed"] == 0 and s["errors"] == s["sent"], url
            assert set(s["errors_by_status"]) <= codes, (url, s["errors_by_status"])


@pytest.mark.usefixtures("canned_payloads")
def test_native_client_without_its_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--client native fails before starting anything, saying how to build it; the default falls back to raw."""
    monkeypatch.setenv(native.BINARY_ENV, str(tmp_path / "no-such-loadgen"))
    with pytest.raises(BenchError, match=r"--client native: the native client is not built .*ensure-build-deps"):
        run_bench(BenchConfig(url=f"127.0.0.1:{_free_port()}", model="digits", client="native"))
    s = run_bench(BenchConfig(url=f"127.0.0.1:{_free_port()}", model="digits", concurrency=1, duration=0.3,
                              warmup=0.0, timeout=0.5)).summary
    assert s["config"]["client"] == "raw" and s["errors"] == s["sent"] > 0
