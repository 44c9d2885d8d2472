"""ModelManager: what serves, loading and swapping without a failed request, the memory budget, restore."""
from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from swapserve.errors import (ConfigError, FailedPrecondition, InvalidInput, ModelNotFound, ResourceExhausted,
                              VersionNotReady)
from swapserve.lifecycle.manager import IndexEntry, ModelManager
from swapserve.routing.policy import RoutingPolicy
from tests.fakes import scaled_model, write_model
from tests.unit.stack import MODEL_BYTES, Stack, make_stack, run

ALL_VERSIONS = "version_policy: { all: {} }\n"
THREADS = 'parameters { key: "swapserve.execution" value: { string_value: "thread" } }\n'


def served_by(manager: ModelManager, n: int = 200) -> Counter[int]:
    """Which version unpinned requests with ``n`` different routing keys go to."""
    return Counter(manager.route("m", "", {"routing_key": f"user-{i}"})[0].version for i in range(n))


async def shutdown(stack: Stack) -> None:
    await stack.manager.close()


def test_load_serves_the_highest_version_the_policy_selects(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))

    async def scenario() -> None:
        m = stack.manager
        with pytest.raises(VersionNotReady, match="in the repository but not loaded"):
            m.route("m")
        await m.load("m")
        assert served_by(m) == {2: 200}
        assert m.index() == [IndexEntry("m", "2", "READY", "")]
        assert m.is_ready("m") and m.is_ready("m", "2") and not m.is_ready("m", "1")
        assert m.server_ready()
        with pytest.raises(VersionNotReady, match="version 1 is not loaded"):
            m.route("m", "1")
        with pytest.raises(ModelNotFound, match="has no version 7"):
            m.route("m", "7")
        with pytest.raises(ModelNotFound, match="not in the model repository"):
            m.route("nope")
        assert stack.sample("swapserve_version_ready", {"model": "m", "version": "2"}) == 1
        assert stack.sample("swapserve_serving_version", {"model": "m"}) == 2
        await shutdown(stack)

    run(scenario())


def test_a_new_version_takes_no_traffic_until_it_is_warm_and_in_flight_requests_finish(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,), extra_config=THREADS)
    stack.loader.behave(1, fn=scaled_model(1.0))
    gate = threading.Event()
    stack.loader.behave(2, fn=scaled_model(2.0), load_gate=gate)

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")
        v1 = stack.loader.backends(1)[-1]
        v1.gate = threading.Event()  # the next request on v1 stays in the model until released
        x = np.ones((1, 4), np.float32)
        in_flight = asyncio.ensure_future(m.route("m")[0].infer([x], 1))
        write_model(stack.repo, "m", (2,), extra=THREADS)
        reload = asyncio.ensure_future(m.load("m"))
        while ("m", 2) not in stack.loader.loads:
            await asyncio.sleep(0.001)
        assert served_by(m) == {1: 200}  # v2 is loading: every request still goes to v1
        assert ("m", "2", "LOADING") in [(e.name, e.version, e.state) for e in m.index()]
        gate.set()
        while served_by(m, 1) != {2: 1}:  # published once warm; v1 now drains
            await asyncio.sleep(0.001)
        assert not v1.closed  # not while its request runs
        v1.gate.set()
        out, _ = await in_flight
        np.testing.assert_array_equal(out["y"], x)  # answered by v1, the version it was sent to
        await reload
        assert v1.closed
        assert stack.loader.backends(2)[-1].batches[:2] == [1, 8]  # warmed (batch 1 and max) before it served
        assert served_by(m) == {2: 200}
        assert [(e.version, e.state) for e in m.index()] == [("2", "READY")]  # unloaded versions are not listed
        await shutdown(stack)

    run(scenario())


def test_a_version_that_fails_to_load_is_failed_with_its_reason_and_the_old_one_keeps_serving(
        tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))
    stack.loader.behave(2, load_error=RuntimeError("weights are garbage"))

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")
        write_model(stack.repo, "m", (2,))
        await m.load("m")
        assert served_by(m) == {1: 200}
        failed = [e for e in m.index() if e.version == "2"]
        assert failed == [IndexEntry("m", "2", "UNAVAILABLE", "RuntimeError: weights are garbage")]
        assert stack.registry.get_version("m", 2).state == "failed"
        assert stack.sample("swapserve_version_ready", {"model": "m", "version": "2"}) == 0
        await shutdown(stack)

    run(scenario())


def test_a_model_whose_only_version_fails_is_not_ready_and_says_why(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))
    stack.loader.behave(1, load_error=RuntimeError("no such op"))

    async def scenario() -> None:
        m = stack.manager
        with pytest.raises(VersionNotReady, match="failed to load: version 1: RuntimeError: no such op"):
            await m.load("m")
        assert not m.server_ready() and not m.is_ready("m")
        with pytest.raises(VersionNotReady, match="no serving version"):
            m.route("m")
        await shutdown(stack)

    run(scenario())


def test_files_changed_since_registration_are_refused(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2), extra_config=ALL_VERSIONS)

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")
        model = m.models["m"]
        async with model.lock:
            await m.retire_locked(model, 1)
        (stack.repo / "m" / "1" / "model.pt").write_bytes(b"other weights")
        with pytest.raises(FailedPrecondition, match="changed since it was registered"):
            async with model.lock:
                await m.ensure_resident_locked(model, 1)
        assert served_by(m) == {2: 200}
        await shutdown(stack)

    run(scenario())


def test_the_memory_budget_evicts_the_least_recently_used_idle_version(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2, 3), budget=int(2.5 * MODEL_BYTES))

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")  # v3 serves
        model = m.models["m"]
        async with model.lock:
            assert await m.ensure_resident_locked(model, 1) == []
            warnings = await m.ensure_resident_locked(model, 2)
        assert warnings == ["evicted m version 1 (least recently used) to make room"]
        assert model.resident_versions() == [2, 3]
        assert stack.loader.backends(1)[-1].closed
        assert m.memory_used() == 2 * MODEL_BYTES
        await shutdown(stack)

    run(scenario())


def test_a_version_that_cannot_fit_evicts_nothing_protected(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2), budget=int(1.5 * MODEL_BYTES))

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")  # v2 serves: the champion is never evicted
        model = m.models["m"]
        with pytest.raises(ResourceExhausted, match=r"m:2 \(0.0 MiB, champion\)"):
            async with model.lock:
                await m.ensure_resident_locked(model, 1)
        assert model.resident_versions() == [2] and served_by(m) == {2: 200}
        await shutdown(stack)

    run(scenario())


def test_a_policy_naming_a_version_that_is_not_resident_is_refused(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")
        model = m.models["m"]
        with pytest.raises(InvalidInput, match=r"version\(s\) \[1\] are not resident"):
            async with model.lock:
                await m.apply_locked(model, RoutingPolicy(champion=2, traffic=((2, 5000), (1, 5000))))
        with pytest.raises(FailedPrecondition, match="is serving; move traffic away first"):
            async with model.lock:
                await m.retire_locked(model, 2)
        assert served_by(m) == {2: 200}
        await shutdown(stack)

    run(scenario())


def test_a_split_routes_keys_deterministically_and_marks_both_serving(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2), extra_config=ALL_VERSIONS)

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")
        model = m.models["m"]
        async with model.lock:
            await m.apply_locked(model, RoutingPolicy(champion=1, traffic=((1, 7000), (2, 3000))))
        first, again = served_by(m, 2000), served_by(m, 2000)
        assert first == again and set(first) == {1, 2}
        assert 0.25 < first[2] / 2000 < 0.35
        assert stack.sample("swapserve_traffic_share", {"model": "m", "version": "2"}) == 0.3
        assert stack.registry.get_version("m", 2).state == "serving"
        await shutdown(stack)

    run(scenario())


def test_unload_stops_routing_and_frees_every_version(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")
        await m.unload("m")
        with pytest.raises(VersionNotReady):
            m.route("m")
        assert stack.loader.backends(1)[-1].closed
        assert m.index() == [IndexEntry("m", "", "UNAVAILABLE", "unloaded")]
        assert m.server_ready()  # nothing is wanted any more
        await shutdown(stack)

    run(scenario())


def test_restore_brings_back_the_recorded_split_after_a_restart(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2), extra_config=ALL_VERSIONS)

    async def scenario() -> None:
        await stack.manager.load("m")
        stack.registry.publish_deployment("m", champion=1, traffic=[(1, 8000), (2, 2000)], action="traffic",
                                          actor="test")
        await stack.manager.close()
        again = stack.restarted()
        assert await again.manager.restore() == ["m"]
        counts = served_by(again.manager, 2000)
        assert set(counts) == {1, 2} and 0.15 < counts[2] / 2000 < 0.25
        spec = again.router.snapshot("m")
        assert spec is not None and (spec.versions, spec.weights_bp) == ((1, 2), (8000, 2000))
        await again.manager.close()

    run(scenario())


def test_each_snapshot_is_published_after_a_serving_table_that_holds_every_version_it_routes_to(
        tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2), extra_config=ALL_VERSIONS)
    seen: list[tuple[int, tuple[int, ...], frozenset[int]]] = []

    class Watching:  # the real router, watched at each publish: which table was out at that instant
        def __init__(self, router: object) -> None:
            self._router = router

        def __getattr__(self, name: str) -> object:
            return getattr(self._router, name)

        def publish(self, model: str, spec: object) -> None:
            table = stack.manager.tables[model]
            seen.append((spec.generation, spec.versions, frozenset(table.runtimes)))  # type: ignore[attr-defined]
            self._router.publish(model, spec)  # type: ignore[attr-defined]

    stack.manager.router = Watching(stack.manager.router)

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")
        held = m.tables["m"]
        model = m.models["m"]
        async with model.lock:
            await m.apply_locked(model, RoutingPolicy(champion=1, traffic=((1, 5000), (2, 5000))))
        assert all(set(versions) <= runtimes for _, versions, runtimes in seen)
        now = m.tables["m"]
        assert now is not held and now.generation == seen[-1][0] > held.generation
        assert set(now.policy.serving_versions()) == {1, 2}  # type: ignore[union-attr]
        assert held.policy is not None and held.policy.serving_versions() == {2}  # a held table never changes
        with pytest.raises(TypeError):
            now.runtimes[3] = now.runtimes[1]  # type: ignore[index]
        async with model.lock:
            await m.apply_locked(model, RoutingPolicy.single(2))
            await m.retire_locked(model, 1)
        assert set(m.tables["m"].runtimes) == {2}
        with pytest.raises(VersionNotReady, match="version 1 is not loaded; resident versions: \\[2\\]"):
            m.route("m", "1")
        await shutdown(stack)

    run(scenario())


def test_a_failed_load_request_leaves_serving_state_as_it_was(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))
    write_model(stack.repo, "broken", extra="max_batch_size: oops\n")
    write_model(stack.repo, "empty", ())

    async def scenario() -> None:
        m = stack.manager
        await m.load("m")
        assert m.server_ready()
        for name in ("broken", "empty"):
            with pytest.raises((ConfigError, VersionNotReady)):
                await m.load(name, tentative=True)
            assert m.server_ready(), name  # a refused request wants nothing
        # A failed reload of a serving model: it keeps serving with the config it loaded with.
        config = stack.repo / "m" / "config.pbtxt"
        good = config.read_text()
        config.write_text(good + "max_batch_size: oops\n")
        with pytest.raises(ConfigError, match="keep serving"):
            await m.load("m", tentative=True)
        assert m.server_ready() and m.model("m").entry.spec is not None and m.route("m")[0].version == 1
        # Start-up and poll loads are not tentative: the control mode wants the model, so the
        # failure shows in ServerReady and the index.
        await m.load_all(["broken"])
        assert not m.server_ready()
        assert any(e.name == "broken" and "max_batch_size" in e.reason for e in m.index())
        await shutdown(stack)

    run(scenario())


def test_a_bad_model_directory_never_stops_load_all_or_the_poll(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))
    warmup = ('model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value: { data_type: TYPE_FP32 '
              'dims: [ 4 ] input_data_file: "absent.bin" } } } ]\n')
    write_model(stack.repo, "aaa", extra=warmup)  # sorts first
    write_model(stack.repo, "zzz", (1,))

    async def scenario() -> None:
        m = stack.manager
        await m.load_all(["aaa", "m", "zzz"])
        assert m.is_ready("m") and m.is_ready("zzz") and not m.is_ready("aaa")
        assert any(e.name == "aaa" and "absent.bin" in e.reason for e in m.index())
        write_model(stack.repo, "m", (1, 2))
        (stack.repo / "aaa" / "config.pbtxt").write_text("garbage {")  # changed, still bad
        await m.poll_once()
        assert m.route("m")[0].version == 2  # the poll went past the bad model
        await shutdown(stack)

    run(scenario())
