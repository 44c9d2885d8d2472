"""Per-slice counters (bounded slices, since, accuracy/MAE, p99, Prometheus) and the FeedbackObserver."""
from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from swapserve.errors import InvalidInput, ModelExecutionError
from swapserve.feedback.observer import MAX_OUTCOMES_PER_REPORT, FeedbackObserver, Outcome
from swapserve.feedback.predictions import PredictionLog
from swapserve.feedback.slices import LATENCY_BOUNDS, SliceStats, p99_from_histogram
from swapserve.types import InferRequest, ModelSpec, SliceCounts, TensorSpec
from tests.fakes import FakeClock

T0 = 1_000_000.0


def test_slices_are_capped_per_model_and_the_rest_is_other() -> None:
    stats = SliceStats(max_slices=64, clock=FakeClock(T0))
    names = [stats.resolve_slice("m", f"s{i}") for i in range(100)]
    assert names[:64] == [f"s{i}" for i in range(64)]
    assert set(names[64:]) == {"other"}
    assert stats.resolve_slice("m", "s3") == "s3"  # known names stay themselves
    assert stats.resolve_slice("m", None) == "unlabelled"
    assert stats.resolve_slice("m", "") == "unlabelled"
    assert stats.resolve_slice("m", "overall") == "other"  # reserved: must not double-count into overall
    assert stats.resolve_slice("m", "x" * 500) == "other"
    assert stats.resolve_slice("other-model", "s99") == "s99"  # the cap is per model
    assert stats.resolve_slice("m", 7) == "other"
    for name in names:
        stats.record_request("m", 1, name, 0.001)
    snap = stats.snapshot("m", 1)
    assert len(snap) == 64 + 2  # 64 named, other, overall
    assert snap["other"].requests == 36
    assert snap["overall"].requests == 100


def test_accuracy_error_rate_and_mae() -> None:
    stats = SliceStats(clock=FakeClock(T0))
    for i in range(10):
        stats.record_request("m", 2, "a", 0.01, error=(i == 0))
    for ok in (True, True, True, False):
        stats.record_outcome("m", 2, "a", "label", correct=ok)
    stats.record_outcome("m", 2, "b", "value", error=-2.0)
    stats.record_outcome("m", 2, "b", "value", error=1.0)
    snap = stats.snapshot("m", 2)
    assert snap["a"].accuracy == 0.75 and snap["a"].error_rate == 0.1
    assert snap["b"].numeric == 2 and snap["b"].abs_error_sum == 3.0 and snap["b"].sq_error_sum == 5.0
    assert snap["overall"] == SliceCounts(requests=10, errors=1, labelled=4, correct=3, numeric=2, abs_error_sum=3.0,
                                          sq_error_sum=5.0, latency_p99_s=snap["overall"].latency_p99_s)
    assert stats.snapshot("m", 1) == {"overall": SliceCounts()}  # another version: nothing
    assert stats.snapshot("nobody", 1) == {"overall": SliceCounts()}


def test_p99_from_the_histogram_is_within_a_bucket() -> None:
    stats = SliceStats(clock=FakeClock(T0))
    rng = np.random.default_rng(0)
    latencies = rng.lognormal(mean=np.log(0.005), sigma=0.6, size=20_000)
    for lat in latencies:
        stats.record_request("m", 1, "s", float(lat))
    p99 = stats.snapshot("m", 1)["s"].latency_p99_s
    exact = float(np.quantile(latencies, 0.99))
    assert p99 is not None and abs(p99 - exact) / exact < 0.1
    assert p99_from_histogram([0] * (len(LATENCY_BOUNDS) + 1)) is None
    assert stats.snapshot("m", 1)["s"].latency_p99_s == p99  # errors do not count in latency


def test_since_counts_only_what_happened_after() -> None:
    clock = FakeClock(T0)
    stats = SliceStats(clock=clock)
    for _ in range(5):
        stats.record_request("m", 1, "a", 0.002)
        stats.record_outcome("m", 1, "a", "label", correct=False)
    clock.t += 10.5
    started = stats.mark("m")  # what a rollout controller does at a stage start: exact
    for _ in range(3):
        stats.record_request("m", 1, "a", 0.002)
        stats.record_outcome("m", 1, "a", "label", correct=True)
    assert stats.snapshot("m", 1, since=started)["a"] == SliceCounts(
        requests=3, labelled=3, correct=3, latency_p99_s=stats.snapshot("m", 1, since=started)["a"].latency_p99_s)
    assert stats.snapshot("m", 1, since=started)["a"].accuracy == 1.0
    assert stats.snapshot("m", 1)["a"].requests == 8
    # Without a mark: the latest automatic checkpoint at or before `since` (1 s resolution).
    clock.t += 5.0
    cut = clock.t
    clock.t += 0.25
    stats.record_request("m", 1, "a", 0.002)
    assert stats.snapshot("m", 1, since=cut)["a"].requests == 1
    assert stats.snapshot("m", 1, since=cut - 100)["a"].requests == 9  # before any traffic: everything
    # A new slice after the checkpoint counts from zero.
    stats.record_request("m", 1, "late", 0.002)
    assert stats.snapshot("m", 1, since=started)["late"].requests == 1


def test_since_far_back_is_clamped_to_the_horizon() -> None:
    clock = FakeClock(T0)
    stats = SliceStats(clock=clock, horizon_s=3600)
    stats.record_request("m", 1, "a", 0.002)
    for _ in range(200):  # 200 min of traffic, one request a minute
        clock.t += 60
        stats.record_request("m", 1, "a", 0.002)
    counted = stats.snapshot("m", 1, since=0)["a"].requests
    assert 59 <= counted <= 62  # about the last hour, not all 201


def test_subscribers_hear_every_joined_outcome() -> None:
    stats = SliceStats(clock=FakeClock(T0))
    heard: list[tuple[str, int, str, str]] = []
    unsubscribe = stats.subscribe(lambda *a: heard.append(a))
    stats.subscribe(lambda *a: 1 / 0)  # a broken subscriber does not stop the others
    stats.record_outcome("m", 3, "a", "label", correct=True)
    unsubscribe()
    stats.record_outcome("m", 3, "a", "label", correct=True)
    assert heard == [("m", 3, "a", "label")]


def test_prometheus_series_per_slice_read_live() -> None:
    registry = CollectorRegistry()
    clock = FakeClock(T0)
    stats = SliceStats(registry, clock=clock)
    for _ in range(4):
        stats.record_request("digits", 2, "round", 0.003)
    stats.record_request("digits", 2, "round", 0.003, error=True)
    stats.record_outcome("digits", 2, "round", "label", correct=True)
    stats.record_outcome("digits", 2, "round", "label", correct=False)
    stats.count_result("digits", "joined", 2)
    stats.count_result("digits", "unknown")
    stats.count_result("never-served", "unknown")  # no series for models this server never served
    labels = {"model": "digits", "version": "2", "slice": "round"}
    value = registry.get_sample_value
    assert value("swapserve_slice_requests_total", labels) == 5
    assert value("swapserve_slice_errors_total", labels) == 1
    assert value("swapserve_slice_labelled_total", labels) == 2
    assert value("swapserve_slice_accuracy", labels) == 0.5
    assert value("swapserve_slice_requests_total", {**labels, "slice": "overall"}) == 5
    p99 = value("swapserve_slice_latency_p99_seconds", labels)
    assert p99 is not None and 0.0025 < p99 <= 0.0035
    assert value("swapserve_feedback_outcomes_total", {"model": "digits", "result": "joined"}) == 2
    assert value("swapserve_feedback_outcomes_total", {"model": "digits", "result": "unknown"}) == 1
    assert value("swapserve_feedback_outcomes_total", {"model": "never-served", "result": "unknown"}) is None
    assert value("swapserve_slice_mae", labels) is None  # no numeric targets yet
    clock.t += 300
    stats.record_outcome("digits", 2, "round", "label", correct=True)
    assert value("swapserve_slice_latency_p99_seconds", labels) is None  # no requests in the last minute


# -- the observer -------------------------------------------------------------------------------


DIGITS = ModelSpec("digits", "pytorch_libtorch", 64, (TensorSpec("pixels", "FP32", (64,)),),
                   (TensorSpec("probabilities", "FP32", (10,)),))
REGRESSOR = ModelSpec("price", "pytorch_libtorch", 0, (TensorSpec("x", "FP32", (4,)),),
                      (TensorSpec("y", "FP32", (1,)),), parameters={"swapserve.slice_parameter": "region"})


def probs(*classes: int) -> dict[str, np.ndarray]:
    out = np.full((len(classes), 10), 0.01, dtype=np.float32)
    out[np.arange(len(classes)), classes] = 0.9
    return {"probabilities": out}


def observer() -> FeedbackObserver:
    return FeedbackObserver(SliceStats(clock=FakeClock(T0)), PredictionLog(capacity=1000, clock=FakeClock(T0)))


def respond(fb: FeedbackObserver, spec: ModelSpec, rid: str, version: int, outputs: dict[str, np.ndarray],
            **params: str) -> None:
    fb.on_response(InferRequest(spec.name, id=rid, parameters=dict(params)), spec, version, [], outputs, 0.002)


def test_observer_joins_labels_flags_and_rows() -> None:
    fb = observer()
    respond(fb, DIGITS, "a", 2, probs(3), slice="round")
    respond(fb, DIGITS, "b", 2, probs(5, 7), slice="curved")
    respond(fb, DIGITS, "c", 1, probs(1))
    fb.on_error(InferRequest("digits", id="d", parameters={"slice": "round"}), DIGITS, 2,
                ModelExecutionError("boom"), 0.1)
    summary = fb.report("digits", [
        Outcome("a", "label", 3), Outcome("b", "label", 5, row=0), Outcome("b", "label", 1, row=1),
        Outcome("c", "correct", False), Outcome("zzz", "label", 1), Outcome("a", "label", 3),
        Outcome("b", "label", 1, row=2), Outcome("a", "value", 1.0), Outcome("", "label", 1), Outcome("c", "", None)])
    # A row labelled once is a duplicate whatever the second outcome carries: the first report stands.
    assert [r.status for r in summary.results] == ["joined", "joined", "joined", "joined", "unknown", "duplicate",
                                                   "invalid", "duplicate", "invalid", "invalid"]
    assert (summary.joined, summary.unknown, summary.expired, summary.invalid, summary.duplicate) == (4, 1, 0, 3, 2)
    assert "already reported" in summary.results[5].message
    assert "row 2" in summary.results[6].message
    v2 = fb.slices.snapshot("digits", 2)
    assert v2["round"].requests == 2 and v2["round"].errors == 1 and v2["round"].accuracy == 1.0
    assert v2["curved"].labelled == 2 and v2["curved"].correct == 1
    assert v2["overall"].labelled == 3 and v2["overall"].correct == 2
    v1 = fb.slices.snapshot("digits", 1)
    assert v1["unlabelled"].labelled == 1 and v1["unlabelled"].accuracy == 0.0
    wrong_model = fb.report("price", [Outcome("a", "label", 3)])
    assert wrong_model.results[0].status == "invalid" and "'digits'" in wrong_model.results[0].message


def test_observer_regression_values_and_expiry() -> None:
    clock = FakeClock(T0)
    fb = FeedbackObserver(SliceStats(clock=clock), PredictionLog(capacity=10, window_s=60, clock=clock))
    fb.on_response(InferRequest("price", id="p", parameters={"region": "eu"}), REGRESSOR, 1, [],
                   {"y": np.array([10.0], dtype=np.float32)}, 0.001)
    fb.on_response(InferRequest("price", id="q"), REGRESSOR, 1, [], {"y": np.array([4.0])}, 0.001)
    summary = fb.report("price", [Outcome("p", "value", 12.5), Outcome("p", "label", 1), Outcome("q", "value", float("nan"))])
    assert [r.status for r in summary.results] == ["joined", "duplicate", "invalid"]
    eu = fb.slices.snapshot("price", 1)["eu"]
    assert eu.numeric == 1 and eu.abs_error_sum == 2.5
    clock.t += 61
    assert fb.report("price", [Outcome("q", "value", 4.0)]).expired == 1


def test_report_limits_are_whole_request_errors() -> None:
    fb = observer()
    with pytest.raises(InvalidInput):
        fb.report("", [])
    with pytest.raises(InvalidInput):
        fb.report("digits", [Outcome("a", "label", 1)] * (MAX_OUTCOMES_PER_REPORT + 1))


def test_observer_hot_path_cost() -> None:
    """on_response (log + slice counters) costs a few microseconds per request; printed for the record."""
    fb = FeedbackObserver(SliceStats(), PredictionLog(capacity=100_000))
    outputs = probs(4)
    reqs = [InferRequest("digits", id=f"{i:032x}", parameters={"slice": ("round", "straight", "curved")[i % 3]})
            for i in range(200_000)]
    for r in reqs[:100_000]:  # warm up and fill the log, so the timed part also evicts
        fb.on_response(r, DIGITS, 2, [], outputs, 0.002)
    start = time.perf_counter()
    for r in reqs[100_000:]:
        fb.on_response(r, DIGITS, 2, [], outputs, 0.002)
    per_request_us = (time.perf_counter() - start) / 100_000 * 1e6
    print(f"FeedbackObserver.on_response: {per_request_us:.2f} us/request")
    assert fb.slices.snapshot("digits", 2)["overall"].requests == 200_000
    assert per_request_us < 50  # generous for slow CI machines; typically ~5 us
