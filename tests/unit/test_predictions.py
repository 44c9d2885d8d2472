"""The prediction log (bounded, expiring, unknown vs expired) and predictions read from outputs."""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from swapserve.dataplane import RequestIds, replica_tag
from swapserve.feedback.predictions import MAX_ID_CHARS, PredictionLog, PredictionRule, Task
from swapserve.types import ModelSpec, TensorSpec
from tests.fakes import FakeClock


def test_capacity_holds_under_a_flood_of_ids_oldest_evicted_first() -> None:
    log = PredictionLog(capacity=1000, clock=FakeClock())
    for i in range(50_000):
        assert log.record(f"r{i}", "m", 1, "s", i % 10)
        assert log.rows <= 1000
    assert len(log) == 1000
    assert log.join("r49999").entry is not None
    assert log.join("r49000").entry is not None
    assert log.join("r48999").status == "expired"  # pushed out by capacity: reported as expired
    # Never-sent ids are "unknown", up to the eviction filter's small false-positive rate.
    assert sum(log.join(f"never-{i}").status == "unknown" for i in range(1000)) > 980


def test_capacity_counts_rows_of_multi_row_requests() -> None:
    log = PredictionLog(capacity=10, clock=FakeClock())
    log.record("a", "m", 1, "s", (1, 2, 3, 4))
    log.record("b", "m", 1, "s", (1, 2, 3, 4))
    log.record("c", "m", 1, "s", (5, 6, 7))  # 11 rows would not fit: "a" goes
    assert log.rows == 7
    assert log.join("a").status == "expired"
    entry = log.join("c").entry
    assert entry is not None and entry.rows == 3 and entry.row(2) == 7
    assert not log.record("huge", "m", 1, "s", tuple(range(11)))  # more rows than the log holds


def test_entries_expire_after_the_join_window() -> None:
    clock = FakeClock()
    log = PredictionLog(capacity=100, window_s=3600, clock=clock)
    log.record("old", "m", 1, "s", 3)
    clock.t += 1800
    log.record("mid", "m", 2, "s", 4)
    clock.t += 1800
    found = log.join("old")
    assert found.status == "found" and found.entry is not None and found.entry.version == 1  # exactly 1 h: still in
    clock.t += 1
    assert log.join("old").status == "expired"  # logged but too old
    assert log.join("mid").status == "found"
    log.record("new", "m", 2, "s", 5)  # new traffic drops what is past the window
    assert len(log) == 2
    assert log.join("old").status == "expired"  # evicted by age: still "expired", not "unknown"
    assert log.join("nope").status == "unknown"  # one id in the filter: a false positive is ~1e-10


def test_unknown_ids_are_rarely_mistaken_for_expired() -> None:
    log = PredictionLog(capacity=2000, clock=FakeClock())
    for i in range(10_000):
        log.record(f"req-{i}", "m", 1, "s", 0)
    evicted = [f"req-{i}" for i in range(6000, 8000)]  # evicted within the last 1-2x capacity
    assert all(log.join(r).status == "expired" for r in evicted)
    never = [f"other-{i}" for i in range(5000)]
    false_expired = sum(log.join(r).status == "expired" for r in never)
    assert false_expired / len(never) < 0.01


def test_a_logged_id_is_never_re_recorded_and_oversized_ids_are_not_logged() -> None:
    log = PredictionLog(capacity=3, clock=FakeClock())
    assert log.record("x", "m", 1, "s", 1)
    assert "x" in log
    assert not log.record("x", "m", 2, "s", 2)  # refused: the first prediction stays joinable
    entry = log.join("x").entry
    assert entry is not None and entry.version == 1 and entry.prediction == 1
    assert not log.record("i" * (MAX_ID_CHARS + 1), "m", 1, "s", 1)
    assert not log.record("", "m", 1, "s", 1)


def test_capacity_is_shared_fairly_per_version_and_evictions_before_a_label_are_reported() -> None:
    evicted: list[str] = []
    log = PredictionLog(capacity=100, clock=FakeClock(), on_evict=lambda e: evicted.append(e.id))
    for i in range(10):
        log.record(f"canary-{i}", "m", 2, "s", 1)
    log.mark_labelled(log.join("canary-0").entry, 0)  # type: ignore[arg-type]
    for i in range(10_000):  # a flood of large requests on the champion
        log.record(f"flood-{i}", "m", 1, "s", (0,) * 8)
    assert log.rows <= 100
    assert all(log.join(f"canary-{i}").status == "found" for i in range(10))  # the small version kept its share
    assert evicted and all(e.startswith("flood-") for e in evicted)
    for i in range(100):  # once the canary holds the most rows, it gives way first
        log.record(f"canary-more-{i}", "m", 2, "s", 1)
    assert log.join("canary-0").status == "expired"
    assert "canary-0" not in evicted  # it had its label: not reported as lost
    assert "canary-1" in evicted
    assert 40 <= log.rows_of("m", 2) <= 60 and 40 <= log.rows_of("m", 1) <= 60


def test_memory_per_entry_is_bounded() -> None:
    """The bound the module docstring states: under 300 bytes per single-row entry, ids included."""
    n = 100_000
    new_id = RequestIds(replica_tag("replica-0"))
    ids = [new_id() for _ in range(n)]  # the server's ids (40 characters); the log keeps them alive
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        log = PredictionLog(capacity=n)
        filter_bytes = tracemalloc.get_traced_memory()[0] - before
        for i, rid in enumerate(ids):
            log.record(rid, "digits", 2, "round", i % 10)
        ids_bytes = sum(len(r) + 49 for r in ids)  # str objects counted here, allocated before tracing
        per_entry = (tracemalloc.get_traced_memory()[0] - before - filter_bytes + ids_bytes) / n
    finally:
        tracemalloc.stop()
    assert len(log) == n
    print(f"prediction log: {per_entry:.0f} bytes per entry (+{filter_bytes / n:.1f} filter)")
    assert per_entry < 300


# -- predictions from outputs -------------------------------------------------------------------


def spec(dims: tuple[int, ...], batch: int = 8, **params: str) -> ModelSpec:
    return ModelSpec("m", "pytorch_libtorch", batch, (TensorSpec("x", "FP32", (4,)),),
                     (TensorSpec("y", "FP32", dims), TensorSpec("aux", "FP32", (1,))), parameters=params)


def test_classification_is_argmax_per_row() -> None:
    rule = PredictionRule.for_spec(spec((3,)))
    assert rule == PredictionRule("y", Task.CLASSIFICATION, "slice")
    out = {"y": np.array([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05]], dtype=np.float32)}
    assert rule.predictions(out, batching=True) == (1, 0)
    assert rule.predictions({"y": out["y"][:1]}, batching=True) == 1
    assert rule.predictions({"y": np.array([0.1, 0.2, 0.7])}, batching=False) == 2


def test_regression_is_the_value_and_config_parameters_override() -> None:
    rule = PredictionRule.for_spec(spec((1,)))
    assert rule.task is Task.REGRESSION
    assert rule.predictions({"y": np.array([[2.5], [-1.0]])}, batching=True) == (2.5, -1.0)
    rule = PredictionRule.for_spec(spec((3,), **{"swapserve.prediction_output": "aux", "swapserve.task": "regression",
                                                "swapserve.slice_parameter": "segment"}))
    assert rule == PredictionRule("aux", Task.REGRESSION, "segment")
    assert rule.predictions({"y": np.zeros((1, 3)), "aux": np.array([[4.0]])}, batching=True) == 4.0
    # A classification output with one value per row holds the class id itself.
    rule = PredictionRule.for_spec(spec((1,), **{"swapserve.task": "classification"}))
    assert rule.predictions({"y": np.array([[7], [3]], dtype=np.int64)}, batching=True) == (7, 3)
    # Several values per row for a regression: no prediction (only `correct` flags can join).
    rule = PredictionRule.for_spec(spec((3,), **{"swapserve.task": "regression"}))
    assert rule.predictions({"y": np.zeros((1, 3))}, batching=True) is None


@pytest.mark.parametrize("bad", [0, -1])
def test_log_rejects_nonsense_bounds(bad: int) -> None:
    with pytest.raises(ValueError):
        PredictionLog(capacity=bad)
