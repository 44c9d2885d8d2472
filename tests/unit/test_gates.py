"""Rollout gates: sequential bounds and the fail / hold / advance decision (pure, no sockets)."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import pytest

from swapserve.rollout import OVERALL, Gates, Stage, evaluate
from swapserve.rollout.stats import (
    diff_proportions,
    lower_bound,
    mixture_radius,
    mixture_radius_np,
    one_sided_alpha,
    proportion_variance,
)
from swapserve.types import SliceCounts

GATES = Gates()
CANARY = Stage(name="canary", traffic_bp=500, min_duration_s=600, min_samples=1000)


def counts(labelled: int, correct: int, requests: int = 0, errors: int = 0, p99_s: float | None = None) -> SliceCounts:
    return SliceCounts(requests=requests or labelled, errors=errors, labelled=labelled, correct=correct,
                       latency_p99_s=p99_s)


def with_overall(slices: dict[str, SliceCounts], **overall: Any) -> dict[str, SliceCounts]:
    total = SliceCounts(
        requests=sum(s.requests for s in slices.values()), errors=sum(s.errors for s in slices.values()),
        labelled=sum(s.labelled for s in slices.values()), correct=sum(s.correct for s in slices.values()))
    if overall:
        total = dataclasses.replace(total, **overall)
    return {**slices, OVERALL: total}


# -- bounds ---------------------------------------------------------------------------------


def test_bound_tightens_with_more_data() -> None:
    """Same proportions, more data: the radius shrinks and the lower bound rises towards the estimate."""
    prev_r, prev_lb = math.inf, -math.inf
    for n in (10, 100, 1_000, 10_000, 100_000, 1_000_000):
        est, var = diff_proportions(0.9 * n, n, 0.85 * n, n)
        r = mixture_radius(var, 1e-3, 0.05)
        lb = lower_bound(est, var, 1e-3, 0.05)
        assert r < prev_r and lb > prev_lb and lb < est
        prev_r, prev_lb = r, lb
    assert prev_lb == pytest.approx(0.05, abs=0.005)


def test_bound_widens_with_confidence_and_scalar_matches_numpy() -> None:
    assert mixture_radius(1e-3, 1e-4, 0.05) > mixture_radius(1e-3, 1e-2, 0.05)
    v = np.array([1e-6, 1e-4, 1e-2, 1.0])
    np.testing.assert_allclose(mixture_radius_np(v, 1e-3, 0.05), [mixture_radius(float(x), 1e-3, 0.05) for x in v])
    assert mixture_radius(0.0, 0.01, 0.05) == 0.0 and mixture_radius(math.inf, 0.01, 0.05) == math.inf
    with pytest.raises(ValueError):
        mixture_radius(1e-3, 0.0, 0.05)


def test_one_sided_level_is_just_under_twice_alpha() -> None:
    for alpha in (0.05, 0.01, 1e-3, 1e-5):
        assert alpha < one_sided_alpha(alpha) < 2 * alpha


def test_proportion_variance_never_claims_certainty() -> None:
    assert proportion_variance(5, 5) > 0 and proportion_variance(0, 5) > 0
    assert proportion_variance(0, 0) == math.inf


def test_sequential_bound_holds_uniformly_on_gaussian_paths() -> None:
    """Brownian paths in information time: the one-sided bound is crossed at most ~alpha of the time."""
    rng = np.random.default_rng(7)
    alpha, paths, steps = 0.05, 2000, 2000
    s = np.cumsum(rng.standard_normal((paths, steps)), axis=1)  # sum of N(0,1): mean estimate s/t, variance 1/t
    t = np.arange(1, steps + 1)
    r = mixture_radius_np(1.0 / t, one_sided_alpha(alpha), 0.1)
    crossed = ((s / t) - r > 0).any(axis=1).mean()
    assert crossed <= alpha


# -- decisions -------------------------------------------------------------------------------


def test_clear_regression_fails_fast_naming_the_slice() -> None:
    """10 points worse on 'eu' (one of five slices), 10 challenger labels/s on it: fails within a minute."""
    names = ["us", "eu", "apac", "latam", "other"]
    for second in range(1, 600):
        champ = with_overall({n: counts(90 * second, 81 * second) for n in names})
        chall = with_overall({n: counts(10 * second, (8 if n == "eu" else 9) * second) for n in names})
        d = evaluate(GATES, champ, chall, stage=CANARY, stage_elapsed_s=second, challenger_labelled=50 * second)
        if d.verdict == "fail":
            break
    assert d.verdict == "fail" and second <= 60
    (bad,) = d.failures
    assert (bad.gate, bad.slice) == ("accuracy", "eu")
    assert bad.champion == pytest.approx(0.9) and bad.challenger == pytest.approx(0.8)
    assert bad.bound is not None and bad.bound > GATES.max_slice_accuracy_drop and bad.confidence == 0.99
    assert "'eu'" in d.reason and "80.00%" in d.reason and "90.00%" in d.reason and "99.00% confidence" in d.reason


def test_the_deciding_failure_is_listed_first_and_is_the_one_the_reason_names() -> None:
    """Overall and one slice both fail: ``failures[0]`` is the worse of the two, the one in
    ``reason`` (what the rollback record names as its gate and slice)."""
    champ = with_overall({"a": counts(5000, 4500), "c": counts(5000, 4500)})
    chall = with_overall({"a": counts(5000, 4300), "c": counts(5000, 1500)})
    d = evaluate(GATES, champ, chall, stage=CANARY, stage_elapsed_s=60, challenger_labelled=10_000)
    assert d.verdict == "fail" and {r.slice for r in d.failures} >= {"c", OVERALL}
    assert d.failures[0].slice == "c" and "slice 'c'" in d.reason


def test_a_a_streams_checked_every_second_rarely_fail() -> None:
    """A small version of benchmarks/bench_gates.py through evaluate() itself: identical models,
    5 slices, 100 streams x 300 checks (one per second). Expected rate <= 1%; bound generous."""
    rng = np.random.default_rng(20240611)
    mix, acc = np.array([0.4, 0.25, 0.15, 0.12, 0.08]), np.array([0.93, 0.9, 0.88, 0.85, 0.8])
    streams, seconds = 100, 300
    r0, r1 = 90 * mix, 10 * mix
    names = [f"s{i}" for i in range(5)]
    failed = 0
    for _ in range(streams):
        n0 = np.cumsum(rng.poisson(r0, (seconds, 5)), axis=0)
        n1 = np.cumsum(rng.poisson(r1, (seconds, 5)), axis=0)
        c0 = np.cumsum(rng.binomial(np.diff(n0, axis=0, prepend=0), acc), axis=0)
        c1 = np.cumsum(rng.binomial(np.diff(n1, axis=0, prepend=0), acc), axis=0)
        for t in range(seconds):
            champ = with_overall({names[j]: counts(int(n0[t, j]), int(c0[t, j])) for j in range(5)})
            chall = with_overall({names[j]: counts(int(n1[t, j]), int(c1[t, j])) for j in range(5)})
            d = evaluate(GATES, champ, chall, stage=CANARY, stage_elapsed_s=t, challenger_labelled=int(n1[t].sum()))
            if d.verdict == "fail":
                failed += 1
                break
    assert failed / streams <= 0.04


def test_min_samples_and_duration_hold_advancing_but_never_a_fail() -> None:
    champ = with_overall({"eu": counts(5000, 4500)})
    good = with_overall({"eu": counts(500, 452)})
    d = evaluate(GATES, champ, good, stage=CANARY, stage_elapsed_s=3600, challenger_labelled=500)
    assert d.verdict == "hold" and "500 of 1000 labelled" in d.reason
    d = evaluate(GATES, champ, good, stage=CANARY, stage_elapsed_s=60, challenger_labelled=5000)
    assert d.verdict == "hold" and "min_duration" in d.reason
    d = evaluate(GATES, champ, good, stage=CANARY, stage_elapsed_s=600, challenger_labelled=1000)
    assert d.verdict == "advance" and not d.needs_approval
    gated = Stage(name="half", traffic_bp=5000, approve=True)
    d = evaluate(GATES, champ, good, stage=gated, stage_elapsed_s=0, challenger_labelled=0)
    assert d.verdict == "advance" and d.needs_approval and "approve" in d.reason
    bad = with_overall({"eu": counts(500, 300)})
    d = evaluate(GATES, champ, bad, stage=CANARY, stage_elapsed_s=1, challenger_labelled=500)
    assert d.verdict == "fail"


def test_small_differences_within_threshold_pass() -> None:
    """0.5 points worse with huge samples: real but within the 1-point limit."""
    champ = with_overall({"eu": counts(10**7, 9 * 10**6)})
    chall = with_overall({"eu": counts(10**6, 895_000)})
    d = evaluate(GATES, champ, chall, stage=CANARY, stage_elapsed_s=600, challenger_labelled=10**6)
    assert d.verdict == "advance"


def test_error_rate_gate() -> None:
    champ = with_overall({"eu": counts(1000, 900)}, requests=100_000, errors=100)
    chall = with_overall({"eu": counts(100, 90)}, requests=5_000, errors=250)  # 5% vs 0.1%
    d = evaluate(GATES, champ, chall, stage=CANARY, stage_elapsed_s=1, challenger_labelled=100)
    assert d.verdict == "fail" and [(r.gate, r.slice) for r in d.failures] == [("error_rate", OVERALL)]
    assert "error rate 5.00%" in d.reason
    ok = with_overall({"eu": counts(100, 90)}, requests=1_000_000, errors=4_000)  # 0.4%: within 0.5 points
    big = with_overall({"eu": counts(1000, 900)}, requests=10_000_000, errors=10_000)
    assert evaluate(GATES, big, ok, stage=CANARY, stage_elapsed_s=1, challenger_labelled=100).verdict == "hold"


def test_p99_gate() -> None:
    gates = Gates(p99_ms=50)
    champ = with_overall({"eu": counts(100, 90)}, requests=10_000, latency_p99_s=0.020)
    slow = with_overall({"eu": counts(100, 90)}, requests=500, latency_p99_s=0.080)
    d = evaluate(gates, champ, slow, stage=CANARY, stage_elapsed_s=1, challenger_labelled=100)
    assert d.verdict == "fail" and d.failures[0].gate == "latency" and "80.0 ms" in d.reason and "50 ms" in d.reason
    few = with_overall({"eu": counts(10, 9)}, requests=50, latency_p99_s=0.080)
    d = evaluate(gates, champ, few, stage=CANARY, stage_elapsed_s=1, challenger_labelled=10)
    assert d.verdict == "hold"
    fast = with_overall({"eu": counts(100, 90)}, requests=500, latency_p99_s=0.030)
    assert evaluate(gates, champ, fast, stage=CANARY, stage_elapsed_s=1, challenger_labelled=100).verdict == "hold"
    d = evaluate(GATES, champ, slow, stage=CANARY, stage_elapsed_s=1, challenger_labelled=100)
    assert d.verdict == "hold" and all(r.gate != "latency" for r in d.results)


def test_numeric_targets_compare_mean_absolute_error() -> None:
    def num(n: int, mae: float) -> SliceCounts:  # |error| ~ exponential: E|e| = mae, E e^2 = 2 mae^2
        return SliceCounts(requests=n, numeric=n, abs_error_sum=n * mae, sq_error_sum=n * 2 * mae * mae)

    champ = {OVERALL: num(20_000, 1.0)}
    worse = {OVERALL: num(2_000, 1.3)}
    d = evaluate(GATES, champ, worse, stage=CANARY, stage_elapsed_s=1, challenger_labelled=0)
    assert d.verdict == "fail" and d.failures[0].gate == "mae" and "mean absolute error 1.3" in d.reason
    same = {OVERALL: num(2_000, 1.01)}
    assert evaluate(GATES, champ, same, stage=CANARY, stage_elapsed_s=1, challenger_labelled=0).verdict == "hold"


def test_slices_without_labels_on_both_arms_are_skipped_and_overall_always_reported() -> None:
    champ = {"eu": counts(100, 90), "us": counts(100, 90)}
    chall = {"eu": counts(10, 9), "apac": counts(10, 2)}  # apac: challenger only (a cohort), not comparable
    d = evaluate(GATES, champ, chall, stage=CANARY, stage_elapsed_s=1, challenger_labelled=20)
    assert {(r.gate, r.slice) for r in d.results} == {("accuracy", OVERALL), ("accuracy", "eu"), ("error_rate", OVERALL)}
    empty = evaluate(GATES, {}, {}, stage=CANARY, stage_elapsed_s=0, challenger_labelled=0)
    assert empty.verdict == "hold" and {r.slice for r in empty.results} == {OVERALL}
    assert all(r.passed and r.bound is None for r in empty.results)


def test_reported_bound_is_the_stats_lower_bound() -> None:
    """evaluate() inlines the boundary for speed; it must equal stats.lower_bound at alpha/m."""
    champ = with_overall({"eu": counts(5000, 4500), "us": counts(3000, 2800)})
    chall = with_overall({"eu": counts(500, 430), "us": counts(300, 281)})
    d = evaluate(GATES, champ, chall, stage=CANARY, stage_elapsed_s=1, challenger_labelled=800)
    alpha = GATES.alpha / 4  # overall, eu, us accuracy + error rate
    for r in d.results:
        if r.gate == "accuracy":
            a, b = champ[r.slice], chall[r.slice]
            est, var = diff_proportions(a.correct, a.labelled, b.correct, b.labelled)
            assert r.bound == pytest.approx(lower_bound(est, var, alpha, 0.05), rel=1e-12)


def test_slice_budget_makes_bounds_more_conservative() -> None:
    champ = with_overall({"eu": counts(5000, 4500)})
    chall = with_overall({"eu": counts(500, 420)})
    free = evaluate(GATES, champ, chall, stage=CANARY, stage_elapsed_s=1, challenger_labelled=500)
    fixed = evaluate(GATES, champ, chall, stage=CANARY, stage_elapsed_s=1, challenger_labelled=500, slice_budget=65)
    b_free = next(r.bound for r in free.results if r.slice == "eu")
    b_fixed = next(r.bound for r in fixed.results if r.slice == "eu")
    assert b_free is not None and b_fixed is not None and b_fixed < b_free


def test_evaluate_is_fast_for_64_slices() -> None:
    champ = with_overall({f"s{i}": counts(10_000, 9_000) for i in range(63)}, latency_p99_s=0.01)
    chall = with_overall({f"s{i}": counts(1_000, 899) for i in range(63)}, latency_p99_s=0.01)
    gates = Gates(p99_ms=50)
    timings = []
    for _ in range(50):
        t = time.perf_counter()
        evaluate(gates, champ, chall, stage=CANARY, stage_elapsed_s=1, challenger_labelled=63_000)
        timings.append(time.perf_counter() - t)
    assert min(timings) < 1e-3  # min: robust to a busy CI box; typical is ~0.1-0.2 ms
