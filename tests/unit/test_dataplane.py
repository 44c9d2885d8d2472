"""DataPlane: route, validate, run, answer (naming the version), record; shadows never reach the client."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from swapserve.dataplane import DataPlane
from swapserve.errors import InvalidInput, ModelExecutionError
from swapserve.routing.policy import RoutingPolicy
from swapserve.types import InferRequest, Tensor
from tests.fakes import RecordingObserver, scaled_model
from tests.unit.stack import Stack, make_stack, run

ALL_VERSIONS = "version_policy: { all: {} }\n"


def request(x: np.ndarray, key: str = "", version: str = "", id: str = "", **params: str) -> InferRequest:
    p: dict[str, str | int | float | bool] = dict(params)
    if key:
        p["routing_key"] = key
    return InferRequest("m", version, id, p, [Tensor("x", "FP32", tuple(x.shape), x)])


def x(rows: int = 1, start: float = 1.0) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + start


async def serving(stack: Stack, policy: RoutingPolicy | None = None) -> None:
    """Load every version of model m and publish ``policy`` (default: the highest version)."""
    await stack.manager.load("m")
    if policy is not None:
        model = stack.manager.models["m"]
        async with model.lock:
            await stack.manager.apply_locked(model, policy)


def failures(stack: Stack, version: str, reason: str) -> float | None:
    return stack.sample("nv_inference_request_failure", {"model": "m", "version": version, "reason": reason})


def test_every_response_names_the_version_that_ran_it(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2), extra_config=ALL_VERSIONS)
    stack.loader.behave(1, fn=scaled_model(1.0))
    stack.loader.behave(2, fn=scaled_model(2.0))
    dp = DataPlane(stack.manager, stack.metrics)

    async def scenario() -> None:
        await serving(stack, RoutingPolicy(champion=1, traffic=((1, 5000), (2, 5000))))
        seen = set()
        for i in range(100):
            resp = await dp.infer(request(x(), key=f"user-{i}"))
            (out,) = resp.outputs
            assert (resp.model_name, out.name, out.datatype, out.shape) == ("m", "y", "FP32", (1, 4))
            np.testing.assert_array_equal(out.data, x() * int(resp.model_version))  # who answered is who is named
            seen.add(resp.model_version)
        assert seen == {"1", "2"}
        pinned = await dp.infer(request(x(), key="user-0", version="1"))
        assert pinned.model_version == "1"
        assert stack.sample("nv_inference_request_success", {"model": "m", "version": "1"}) + \
            stack.sample("nv_inference_request_success", {"model": "m", "version": "2"}) == 101
        await stack.manager.close()

    run(scenario())


def test_a_request_without_an_id_gets_a_unique_one_and_a_given_id_is_kept(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))
    dp = DataPlane(stack.manager, stack.metrics)

    async def scenario() -> None:
        await serving(stack)
        ids = {(await dp.infer(request(x()))).id for _ in range(50)}
        assert len(ids) == 50 and "" not in ids
        assert (await dp.infer(request(x(), id="req-7"))).id == "req-7"
        await stack.manager.close()

    run(scenario())


def test_bad_input_gets_a_precise_error_never_reaches_the_model_and_spoils_nothing(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))
    observer = RecordingObserver()
    dp = DataPlane(stack.manager, stack.metrics, observers=[observer])

    async def scenario() -> None:
        await serving(stack)
        backend = stack.loader.backends(1)[-1]
        ran = len(backend.batches)
        bad = np.zeros((1, 3), np.float32)
        with pytest.raises(InvalidInput, match=r"model 'm' version 1: input 'x' has shape \[1, 3\], expected \[batch, 4\]"):
            await dp.infer(request(bad))
        with pytest.raises(InvalidInput, match=r"unknown requested output\(s\) \['z'\]"):
            await dp.infer(InferRequest("m", inputs=[Tensor("x", "FP32", (1, 4), x())], outputs=["z"]))
        assert len(backend.batches) == ran
        assert failures(stack, "1", "REJECTED") == 2
        assert ("on_error", 1) in observer.calls
        assert (await dp.infer(request(x()))).model_version == "1"  # the next request is fine
        await stack.manager.close()

    run(scenario())


def test_a_model_failure_fails_the_request_and_is_counted_as_backend(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))
    stack.loader.behave(1, fail=lambda inputs: bool((inputs["x"] < 0).any()))
    dp = DataPlane(stack.manager, stack.metrics)

    async def scenario() -> None:
        await serving(stack)
        with pytest.raises(ModelExecutionError, match="model 'm' version 1 failed: fake model failure"):
            await dp.infer(request(-x()))
        assert failures(stack, "1", "BACKEND") == 1
        assert (await dp.infer(request(x()))).model_version == "1"
        await stack.manager.close()

    run(scenario())


def test_an_observer_may_reject_a_request_but_a_broken_one_never_fails_it(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))
    strict = DataPlane(stack.manager, stack.metrics,
                       observers=[RecordingObserver(reject=InvalidInput("model 'm': input 'x' is out of range"))])
    broken = RecordingObserver(broken=True)
    careless = DataPlane(stack.manager, stack.metrics, observers=[broken])

    async def scenario() -> None:
        await serving(stack)
        with pytest.raises(InvalidInput, match="out of range"):
            await strict.infer(request(x()))
        assert (await careless.infer(request(x()))).model_version == "1"
        assert broken.calls == [("on_request", 1), ("on_response", 1)]
        await stack.manager.close()

    run(scenario())


@pytest.mark.parametrize(("shadow_factor", "result"), [(2.0, "agree"), (-1.0, "diverge")])
def test_a_shadow_gets_a_copy_that_is_compared_never_returned(tmp_path: Path, shadow_factor: float,
                                                               result: str) -> None:
    stack = make_stack(tmp_path, (1, 2), extra_config=ALL_VERSIONS)
    stack.loader.behave(1, fn=scaled_model(1.0))
    stack.loader.behave(2, fn=scaled_model(shadow_factor))
    observer = RecordingObserver()
    dp = DataPlane(stack.manager, stack.metrics, observers=[observer])
    labels = {"model": "m", "version": "2", "result": result}

    async def scenario() -> None:
        await serving(stack, RoutingPolicy(champion=1, traffic=((1, 10_000),), shadows=(2,)))
        resp = await dp.infer(request(x(), id="r1"))
        assert resp.model_version == "1"
        np.testing.assert_array_equal(resp.outputs[0].data, x())
        while stack.sample("swapserve_shadow_requests_total", labels) is None:
            await asyncio.sleep(0.001)
        assert stack.sample("swapserve_shadow_requests_total", labels) == 1
        assert ("on_shadow", 2) in observer.calls
        assert stack.sample("nv_inference_request_success", {"model": "m", "version": "2"}) in (None, 0)
        await stack.manager.close()

    run(scenario())
