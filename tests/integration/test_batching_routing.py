"""The native router and batcher inside the real server, under concurrency (issue #3's evidence)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import numpy as np
import torch

from swapserve.native import RoutingSpec
from swapserve.routing.reference import ReferenceRouter
from swapserve._proto import grpc_service_pb2 as pb
from tests.e2e.serverproc import copy_models

SLOW_CONFIG = """
name: "slow"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 8 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 8 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 1000 default_queue_policy {{ max_queue_size: {queue} }} }}
"""


class Slow(torch.nn.Module):
    """~10-20 ms per batch whatever its size: a loop of matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(256, 256) / 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.ones(256, 256)
        for _ in range(60):
            h = torch.tanh(h @ self.w)
        return x + h.mean() * 0


def make_slow(repo: Path, queue: int) -> None:
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(SLOW_CONFIG.format(queue=queue))
    torch.jit.script(Slow()).save(str(repo / "slow" / "1" / "model.pt"))


def slow_request() -> pb.ModelInferRequest:
    """One row of ones for the ``slow`` model of ``make_slow``."""
    r = pb.ModelInferRequest(model_name="slow")
    r.inputs.add(name="x", datatype="FP32", shape=[1, 8])
    r.raw_input_contents.append(np.ones((1, 8), np.float32).tobytes())
    return r


def digits_request(x: np.ndarray, key: int | None = None, rid: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="digits", id=rid)
    req.inputs.add(name="pixels", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype(np.float32).tobytes())
    if key is not None:
        req.parameters["routing_key"].int64_param = key
    return req


def test_requests_follow_snapshots_published_hundreds_of_times_a_second(example_repo: Path, tmp_path: Path,
                                                                         make_server) -> None:  # type: ignore[no-untyped-def]
    repo = copy_models(example_repo, tmp_path / "repo", ["digits"])
    srv = make_server(repo)
    router = srv.server.manager.router
    x = np.load(example_repo / "digits" / "holdout.npz")["x"][:1]
    # Alternate between splits; record when each was published (monotonic clock).
    specs = [RoutingSpec(generation=0, versions=(2, 1), weights_bp=(w, 10_000 - w)) for w in (10_000, 7_000, 2_500, 0)]
    published: list[tuple[float, int]] = []
    stop = threading.Event()

    def publisher() -> None:
        gen = 10_000
        i = 0
        while not stop.is_set():
            gen += 1
            spec = specs[i % len(specs)]
            router.publish("digits", RoutingSpec(gen, spec.versions, spec.weights_bp))
            published.append((time.monotonic(), i % len(specs)))
            i += 1
            time.sleep(0.002)

    refs = []
    for spec in specs:  # one pure-Python reference router per split: the expected answer for any key
        ref = ReferenceRouter()
        ref.publish("m", RoutingSpec(1, spec.versions, spec.weights_bp))
        refs.append(ref)

    def version_of(key: int, spec_index: int) -> int:
        return refs[spec_index].route("m", {"routing_key": key}, "").version

    results: list[tuple[float, float, int, str, grpc.StatusCode | None]] = []

    def client(worker: int) -> None:
        for n in range(60):
            key = worker * 1000 + n
            sent = time.monotonic()
            try:
                r = srv.stub.ModelInfer(digits_request(x, key), timeout=30)
                results.append((sent, time.monotonic(), key, r.model_version, None))
            except grpc.RpcError as exc:
                results.append((sent, time.monotonic(), key, "", exc.code()))

    t = threading.Thread(target=publisher)
    t.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(client, range(16)))
    finally:
        stop.set()
        t.join()
    span = published[-1][0] - published[0][0]
    assert len(published) / span > 100  # hundreds of snapshots a second
    assert all(code is None for *_, code in results), [r for r in results if r[-1] is not None][:3]
    assert len(results) == 16 * 60
    times = [p[0] for p in published]
    for sent, received, key, version, _ in results:
        # Snapshots in force while the request was in the server: the last one before it was sent
        # and every one published until it was answered.
        lo = max(0, np.searchsorted(times, sent) - 1)
        hi = np.searchsorted(times, received)
        allowed = {version_of(key, published[j][1]) for j in range(lo, max(hi, lo + 1))}
        assert int(version) in allowed, (key, version, allowed)


def test_batch_sizes_respect_config_and_batching_happens(example_repo: Path, tmp_path: Path,
                                                          make_server) -> None:  # type: ignore[no-untyped-def]
    repo = copy_models(example_repo, tmp_path / "repo", ["digits"])
    srv = make_server(repo)
    x = np.load(example_repo / "digits" / "holdout.npz")["x"]

    def one(i: int) -> None:
        rows = 1 + i % 5
        r = srv.stub.ModelInfer(digits_request(x[:rows], rid=str(i)), timeout=30)
        assert r.id == str(i) and r.model_version == "2"
        assert len(r.raw_output_contents[0]) == rows * 10 * 4

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(400)))
    stats = srv.stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits", version="2"))
    sizes = {b.batch_size: b.compute_infer.count for b in stats.model_stats[0].batch_stats}
    assert max(sizes) <= 64  # max_batch_size of digits
    assert max(sizes) > 5  # requests were really combined (a single request has at most 5 rows)
    assert stats.model_stats[0].inference_count == sum((1 + i % 5) for i in range(400))
    assert stats.model_stats[0].execution_count < 400


def test_backpressure_and_deadlines(example_repo: Path, tmp_path: Path, make_server) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    make_slow(repo, queue=4)
    srv = make_server(repo)
    codes: list[grpc.StatusCode] = []
    messages: list[str] = []

    def call(timeout: float) -> None:
        try:
            srv.stub.ModelInfer(slow_request(), timeout=timeout)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            messages.append(exc.details() or "")

    with ThreadPoolExecutor(48) as pool:
        list(pool.map(call, [30.0] * 40))
    assert codes.count(grpc.StatusCode.OK) >= 4
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # the queue bound (4) answered, not grew
    assert any("slow" in m and "queue" in m for m in messages)

    codes.clear()
    time.sleep(0.5)  # let the first burst drain
    start = srv.stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow")).model_stats[0]
    with ThreadPoolExecutor(8) as pool:
        # Four patient requests occupy the worker (one batch of 10-20 ms); the impatient ones,
        # sent once that batch has started, queue behind it and expire there.
        patient = [pool.submit(call, 30.0) for _ in range(4)]
        time.sleep(0.005)
        impatient = [pool.submit(call, 0.008) for _ in range(4)]
        for f in patient + impatient:
            f.result()
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    time.sleep(1.0)
    end = srv.stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow")).model_stats[0]
    # Expired requests were answered without running: fewer than 8 rows executed, failures counted.
    assert end.inference_count - start.inference_count < 8
    assert codes.count(grpc.StatusCode.OK) >= 4
    assert end.inference_stats.fail.count > start.inference_stats.fail.count
    # The server is healthy and serves normally afterwards.
    srv.stub.ModelInfer(slow_request(), timeout=30)
    after = srv.stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow")).model_stats[0]
    assert after.inference_count == end.inference_count + 1


FAULTY_CONFIG = """
name: "faulty"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
{parameters}
"""


class Faulty(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("negative input is not allowed")
        return x * 2


@pytest.mark.parametrize("mode", ["auto", "inline", "thread"])
def test_inline_and_threaded_execution_answer_alike(mode: str, example_repo: Path, tmp_path: Path,
                                                    make_server) -> None:  # type: ignore[no-untyped-def]
    """Tiny models run on the event loop by default; both executors batch, isolate failures, answer each once."""
    repo = copy_models(example_repo, tmp_path / "repo", ["digits"])
    params = "" if mode == "auto" else f'parameters {{ key: "swapserve.execution" value: {{ string_value: "{mode}" }} }}'
    (repo / "faulty" / "1").mkdir(parents=True)
    (repo / "faulty" / "config.pbtxt").write_text(FAULTY_CONFIG.format(parameters=params))
    torch.jit.script(Faulty()).save(str(repo / "faulty" / "1" / "model.pt"))
    srv = make_server(repo)
    runtime = srv.server.manager.runtime("faulty")
    assert runtime.execution == ("inline" if mode == "auto" else mode)
    # digits (an MLP of microseconds) is inline under auto; a queue delay would need a waiting worker.
    assert srv.server.manager.runtime("digits").execution == "inline"

    def call(i: int) -> tuple[int, object]:
        x = np.full((1 + i % 3, 4), -1.0 if i % 10 == 3 else float(i), np.float32)
        r = pb.ModelInferRequest(model_name="faulty", id=str(i))
        r.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        r.raw_input_contents.append(x.tobytes())
        try:
            out = srv.stub.ModelInfer(r, timeout=30)
        except grpc.RpcError as exc:
            return i, (exc.code(), exc.details())
        assert out.id == str(i)
        return i, np.frombuffer(out.raw_output_contents[0], np.float32).reshape(x.shape)

    with ThreadPoolExecutor(16) as pool:
        results = dict(pool.map(call, range(120)))
    for i, got in results.items():
        if i % 10 == 3:  # only the guilty requests fail, whoever shared their batch
            assert isinstance(got, tuple) and got[0] == grpc.StatusCode.INTERNAL
            assert "negative input is not allowed" in got[1]
        else:
            np.testing.assert_array_equal(got, np.full((1 + i % 3, 4), 2.0 * i, np.float32))
    stats = srv.stub.ModelStatistics(pb.ModelStatisticsRequest(name="faulty", version="1")).model_stats[0]
    assert stats.inference_stats.success.count == 108 and stats.inference_stats.fail.count == 12
