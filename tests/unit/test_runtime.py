"""VersionRuntime: warm before traffic, batch what arrives together, answer every request exactly once."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from swapserve.errors import DeadlineExceeded, InvalidInput, ModelExecutionError, ResourceExhausted, VersionNotReady
from swapserve.lifecycle.runtime import ARRIVALS, BatcherFactory, VersionRuntime
from swapserve.native import Batcher
from swapserve.telemetry.metrics import Metrics
from swapserve.types import DynamicBatching, ModelSpec, TensorSpec, WarmupSample
from tests.fakes import FakeBackend, FakeBatcher, scaled_model

MODES = ("inline", "thread")


def spec(execution: str = "thread", *, max_batch_size: int = 8, warmup: tuple[WarmupSample, ...] = (),
         batching: DynamicBatching | None = DynamicBatching(), **params: str) -> ModelSpec:
    return ModelSpec("m", "pytorch_libtorch", max_batch_size, (TensorSpec("x", "FP32", (4,)),),
                     (TensorSpec("y", "FP32", (4,)),), dynamic_batching=batching, warmup=warmup,
                     parameters={"swapserve.execution": execution, **params})


def native_batcher(max_rows: int, preferred: list[int], delay_us: int, max_queue: int, max_queue_bytes: int,
                   name: str) -> Batcher:
    return Batcher(max_rows, preferred, delay_us, max_queue, max_queue_bytes, name=name)


def runtime(s: ModelSpec, backend: FakeBackend | None = None, batcher: BatcherFactory = native_batcher,
            metrics: Metrics | None = None) -> VersionRuntime:
    rt = VersionRuntime(s, 1, Path("/nonexistent/1/model.pt"), backend or FakeBackend(s), batcher,
                        metrics or Metrics(CollectorRegistry()))
    rt.start()
    return rt


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def rows(n: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(n * 4, dtype=np.float32).reshape(n, 4) + start)


async def infer_all(rt: VersionRuntime, *requests: np.ndarray) -> list[Any]:
    """Send ``requests`` in one turn of the loop; each result or the exception it raised."""
    return await asyncio.gather(*(rt.infer([x], x.shape[0]) for x in requests), return_exceptions=True)


# -- warmup (promise 3: no cold start) ------------------------------------------------------------


def test_start_warms_up_at_batch_one_preferred_and_max_before_any_request() -> None:
    s = spec(batching=DynamicBatching(preferred_batch_sizes=(4,)))
    backend = FakeBackend(s)
    rt = runtime(s, backend)
    try:
        assert backend.batches == [1, 4, 8]
    finally:
        rt.close()


def test_config_warmup_samples_replace_generated_inputs() -> None:
    s = spec(warmup=(WarmupSample("w", 2, {"x": np.zeros((2, 4), np.float32)}, count=3),))
    backend = FakeBackend(s)
    rt = runtime(s, backend)
    rt.close()
    assert backend.batches == [2, 2, 2]


def test_warmup_false_skips_warmup_and_runs_on_worker_threads() -> None:
    s = spec("auto", **{"swapserve.warmup": "false"})
    backend = FakeBackend(s)
    rt = runtime(s, backend)
    try:
        assert backend.batches == []
        assert rt.execution == "thread"  # an unwarmed model's cost is unknown: never on the loop
    finally:
        rt.close()


def test_auto_runs_a_fast_cpu_model_inline_and_a_slow_one_on_threads() -> None:
    fast, slow = spec("auto"), spec("auto")
    a, b = runtime(fast, FakeBackend(fast)), runtime(slow, FakeBackend(slow, latency_s=0.002))
    try:
        assert (a.execution, b.execution) == ("inline", "thread")
    finally:
        a.close()
        b.close()


# -- the request path ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_requests_of_one_turn_share_a_batch_and_each_gets_its_own_rows(mode: str) -> None:
    s = spec(mode)
    backend = FakeBackend(s, fn=scaled_model(2.0))
    metrics = Metrics(CollectorRegistry())
    rt = runtime(s, backend, metrics=metrics)
    warm = len(backend.batches)
    try:
        inputs = [rows(1), rows(2, 100), rows(1, 200)]
        results = run(infer_all(rt, *inputs))
    finally:
        rt.close()
    for x, (out, queue_ns) in zip(inputs, results):
        np.testing.assert_array_equal(out["y"], 2 * x)
        assert queue_ns >= 0
    if mode == "inline":  # all three were queued before the loop's flush: one batch of 4 rows
        assert backend.batches[warm:] == [4]
    assert sum(n or 0 for n in backend.batches[warm:]) == 4
    labels = {"model": "m", "version": "1"}
    assert metrics.registry.get_sample_value("nv_inference_count", labels) == 4  # warmup is not counted
    if mode == "inline":
        assert metrics.registry.get_sample_value("nv_inference_exec_count", labels) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_batch_fails_only_the_guilty_request(mode: str) -> None:
    s = spec(mode)
    backend = FakeBackend(s, fn=scaled_model(1.0))
    rt = runtime(s, backend)
    backend.fail = lambda inputs: bool((inputs["x"] < 0).any())  # poisoned rows are negative
    try:
        good, bad, also_good = rows(1), -rows(2) - 1, rows(1, 50)
        results = run(infer_all(rt, good, bad, also_good))
    finally:
        rt.close()
    np.testing.assert_array_equal(results[0][0]["y"], good)
    np.testing.assert_array_equal(results[2][0]["y"], also_good)
    assert isinstance(results[1], ModelExecutionError)
    assert "model 'm' version 1 failed: fake model failure" in results[1].message


def test_a_model_returning_the_wrong_number_of_rows_fails_its_batch_precisely() -> None:
    s = spec("inline")
    backend = FakeBackend(s)
    rt = runtime(s, backend)
    backend.rows = 1
    try:
        results = run(infer_all(rt, rows(1), rows(1)))
    finally:
        rt.close()
    assert all(isinstance(r, InvalidInput) for r in results)
    assert "batch output has 1 rows but the batch's requests sum to 2" in results[0].message


def test_a_lone_request_on_an_idle_inline_version_runs_without_queueing() -> None:
    s = spec("inline")
    made: list[FakeBatcher] = []

    def factory(*args: Any) -> FakeBatcher:
        made.append(FakeBatcher(*args))
        return made[-1]

    backend = FakeBackend(s, fn=scaled_model(3.0))
    rt = runtime(s, backend, factory)

    async def alone() -> Any:
        ARRIVALS.set(1)  # what the native front end says about a call that arrived by itself
        return await rt.infer([rows(1)], 1)

    try:
        out, queue_ns = run(alone())
    finally:
        rt.close()
    np.testing.assert_array_equal(out["y"], 3 * rows(1))
    assert queue_ns == 0 and made[0].submitted == []


def test_a_full_queue_refuses_the_request_that_does_not_fit() -> None:
    s = spec("inline", batching=DynamicBatching(max_queue_size=2))
    rt = runtime(s)
    try:
        results = run(infer_all(rt, rows(1), rows(1), rows(1)))
    finally:
        rt.close()
    assert [type(r) for r in results[:2]] == [tuple, tuple]
    assert isinstance(results[2], ResourceExhausted)


@pytest.mark.parametrize("where", ["config", "server"])
def test_the_byte_bound_refuses_the_request_that_does_not_fit(where: str) -> None:
    """The model's parameter swapserve.max_queue_bytes (parsed into the spec) wins over the server's bound."""
    s = spec("thread")
    if where == "config":
        s = dataclasses.replace(s, max_queue_bytes=40)
    made: list[FakeBatcher] = []

    def factory(*args: Any) -> FakeBatcher:
        made.append(FakeBatcher(*args))
        return made[-1]

    rt = VersionRuntime(s, 1, Path("/nonexistent/1/model.pt"), FakeBackend(s), factory, Metrics(CollectorRegistry()),
                        max_queue_bytes=40 if where == "server" else 1 << 20)
    rt.close()
    assert made[0].max_queue_bytes == 40
    s2 = dataclasses.replace(spec("inline"), max_queue_bytes=40)
    rt = runtime(s2)
    try:
        results = run(infer_all(rt, rows(1), rows(1), rows(1)))  # 16 bytes each: two fit in 40
    finally:
        rt.close()
    assert [type(r) for r in results[:2]] == [tuple, tuple]
    assert isinstance(results[2], ResourceExhausted) and "max_queue_bytes" in results[2].message


def test_a_request_whose_deadline_passed_in_the_queue_is_not_run() -> None:
    s = spec("inline")
    backend = FakeBackend(s)
    rt = runtime(s, backend)
    warm = len(backend.batches)

    async def late() -> Any:
        past = time.monotonic_ns() - 1_000_000
        return await asyncio.gather(rt.infer([rows(1)], 1, past), rt.infer([rows(1)], 1), return_exceptions=True)

    try:
        expired, ok = run(late())
    finally:
        rt.close()
    assert isinstance(expired, DeadlineExceeded) and "deadline passed while it waited in the queue" in expired.message
    assert isinstance(ok, tuple)
    assert backend.batches[warm:] == [1]  # only the live one ran


# -- drain and close ------------------------------------------------------------------------------


def test_drain_waits_for_in_flight_requests() -> None:
    s = spec("thread")
    backend = FakeBackend(s)
    rt = runtime(s, backend)
    backend.gate = threading.Event()  # the next batch blocks in the model

    async def scenario() -> tuple[bool, bool]:
        task = asyncio.ensure_future(rt.infer([rows(1)], 1))
        while rt.in_flight == 0:
            await asyncio.sleep(0)
        busy = await rt.drain(timeout_s=0.05)
        assert backend.gate is not None
        backend.gate.set()
        await task
        return busy, await rt.drain(timeout_s=5)

    try:
        assert run(scenario()) == (False, True)
    finally:
        rt.close()


def test_close_answers_requests_still_queued_and_refuses_new_ones() -> None:
    s = spec("thread")
    stuck: list[FakeBatcher] = []

    def factory(*args: Any) -> FakeBatcher:
        stuck.append(FakeBatcher(*args))  # never releases: the requests stay queued
        return stuck[-1]

    backend = FakeBackend(s)
    rt = runtime(s, backend, factory)

    async def scenario() -> tuple[list[Any], Exception | None]:
        tasks = [asyncio.ensure_future(rt.infer([rows(1)], 1)) for _ in range(2)]
        while stuck[0].pending() < 2:
            await asyncio.sleep(0)
        await asyncio.to_thread(rt.close)
        answered = await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await rt.infer([rows(1)], 1)
        except VersionNotReady as exc:
            return answered, exc
        return answered, None

    answered, after = run(scenario())
    assert [type(a) for a in answered] == [VersionNotReady, VersionNotReady]
    assert "was unloaded before the request ran; retry" in answered[0].message
    assert after is not None and "is unloading; retry" in after.message
    assert backend.closed
