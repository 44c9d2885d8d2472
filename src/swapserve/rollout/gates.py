"""Live rollout gates: challenger vs champion per slice, decided under continuous monitoring.

:func:`evaluate` is pure and fast (tens of microseconds for a few slices, well under 1 ms for 64):
the controller calls it every second per rollout with the cumulative per-(version, slice)
:class:`~swapserve.types.SliceCounts` of the current stage.

Gates (thresholds from :class:`~swapserve.rollout.plan.Gates`):

- **accuracy**, every slice with labelled outcomes on both arms, plus ``overall``: fail when the
  anytime-valid lower bound on ``acc_champion - acc_challenger`` exceeds
  ``max_slice_accuracy_drop``. Mixture scale ``ACCURACY_TAU`` (5 points).
- **error_rate**, the ``overall`` slice: fail when the lower bound on ``err_challenger -
  err_champion`` exceeds ``max_error_rate_increase``. Mixture scale ``ERROR_RATE_TAU``.
- **mae**, every slice with numeric targets on both arms: fail when the lower bound on
  ``mae_challenger - mae_champion`` exceeds ``max_relative_mae_increase * mae_champion``
  (a relative threshold, so it needs no unit; the champion's MAE is plugged in). Mixture scale
  ``MAE_TAU_REL`` times the pooled MAE.
- **latency**, the ``overall`` slice: fail when the challenger's p99 exceeds ``p99_ms`` once it
  served at least ``p99_min_requests`` (default 100) requests. An SLA check on the observed
  p99, not a statistical test: it uses no error budget and reports ``confidence`` 1.0.

Error budget: the statistical tests of one evaluation share ``alpha = 1 - confidence`` by
Bonferroni, ``alpha / m`` each, where ``m`` = accuracy slices + MAE slices + 1 (error rate); so the
family-wise false-rollback rate of a stage is <= alpha. ``m`` counts the slices testable now; pass
``slice_budget`` (e.g. the model's slice cap + 1) to fix it up front for a strict guarantee when
slices may appear late (a slice first tested when m was smaller got a looser level).
See :mod:`swapserve.rollout.stats` for the boundary, its assumptions and tuning.

Verdicts: ``fail`` as soon as any gate fails (minimum durations and samples never hold back a
rollback); ``advance`` when no gate fails and the stage's ``min_duration`` and ``min_samples`` are
met; ``hold`` otherwise. ``advance`` on a stage with ``approve: true`` sets
``Decision.needs_approval``: the controller waits for ``swapserve rollout approve`` (and applies
the rollback-approval window to the final stage) before moving on.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from swapserve.rollout.plan import Gates, Stage
from swapserve.rollout.stats import mean_with_variance, one_sided_alpha
from swapserve.types import SliceCounts

#: The slice that aggregates every request of a version; always evaluated.
OVERALL = "overall"
#: Normal-mixture scale (tau) of the accuracy gate, in accuracy units: tuned for regressions of a
#: few points to ~20 points (see benchmarks/bench_gates.py for the trade-off).
ACCURACY_TAU = 0.05
#: Normal-mixture scale of the error-rate gate (error rates are small; regressions of ~1-5 points).
ERROR_RATE_TAU = 0.02
#: Normal-mixture scale of the MAE gate, as a fraction of the pooled MAE.
MAE_TAU_REL = 0.25

Verdict = Literal["fail", "hold", "advance"]
_EMPTY = SliceCounts()


@dataclass(frozen=True, init=False)
class GateResult:
    """One gate on one slice. ``bound`` is the anytime-valid lower bound on the degradation
    (challenger worse is positive) at the per-test level; the gate fails when ``bound > threshold``.
    ``champion``/``challenger`` are the observed values (None: no data); ``samples`` is
    (champion, challenger) labelled outcomes (requests for error_rate and latency)."""

    gate: str
    slice: str
    passed: bool
    champion: float | None
    challenger: float | None
    bound: float | None
    threshold: float
    confidence: float
    samples: tuple[int, int]
    message: str

    # NOTE: a hand-written __init__ because the generated frozen one makes ten
    # object.__setattr__ calls (~4 us), and evaluate() builds one result per slice every second.
    def __init__(self, gate: str, slice: str, passed: bool, champion: float | None, challenger: float | None,
                 bound: float | None, threshold: float, confidence: float, samples: tuple[int, int],
                 message: str) -> None:
        self.__dict__.update(gate=gate, slice=slice, passed=passed, champion=champion, challenger=challenger,
                             bound=bound, threshold=threshold, confidence=confidence, samples=samples,
                             message=message)


@dataclass(frozen=True)
class Decision:
    """What the controller should do now. ``reason`` names the slice, numbers and confidence of
    the deciding failure, or what a hold waits for. ``needs_approval`` is only ever True with
    ``advance``."""

    verdict: Verdict
    results: tuple[GateResult, ...]
    reason: str
    needs_approval: bool = False

    @property
    def failures(self) -> tuple[GateResult, ...]:
        """The failed gates, the deciding one (the one ``reason`` names) first."""
        failed = [r for r in self.results if not r.passed]
        return tuple(sorted(failed, key=_excess, reverse=True)) if failed else ()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _pts(x: float) -> str:
    return f"{100 * x:.2f} points"


def _radius(var: float, two_log: float, tau: float) -> float:
    """:func:`~swapserve.rollout.stats.mixture_radius` with ``two_log = 2 ln(1/alpha)`` precomputed
    (evaluate() runs it per slice every second; the tests check the two agree)."""
    ratio = var / (tau * tau)
    return math.sqrt(var * (1.0 + ratio) * (two_log + math.log1p(1.0 / ratio)))


def _pvar(k: int, n: int) -> float:
    p = (k + 1.0) / (n + 2.0)  # Laplace-smoothed, as stats.proportion_variance
    return p * (1.0 - p) / n


def _accuracy(name: str, a: SliceCounts, b: SliceCounts, threshold: float, two_log: float, conf: float) -> GateResult:
    n0, n1 = a.labelled, b.labelled
    if not n0 or not n1:
        return GateResult("accuracy", name, True, a.accuracy, b.accuracy, None, threshold, conf, (n0, n1),
                          "no labelled outcomes on both arms yet")
    p0, p1 = a.correct / n0, b.correct / n1
    bound = (p0 - p1) - _radius(_pvar(a.correct, n0) + _pvar(b.correct, n1), two_log, ACCURACY_TAU)
    if bound > threshold:
        msg = (f"slice '{name}': challenger accuracy {_pct(p1)} (n={n1}) vs champion {_pct(p0)} (n={n0}); "
               f"the drop is at least {_pts(bound)} with {conf:.2%} confidence (anytime-valid), "
               f"above the {_pts(threshold)} limit")
        return GateResult("accuracy", name, False, p0, p1, bound, threshold, conf, (n0, n1), msg)
    return GateResult("accuracy", name, True, p0, p1, bound, threshold, conf, (n0, n1), "ok")


def _error_rate(a: SliceCounts, b: SliceCounts, threshold: float, two_log: float, conf: float) -> GateResult:
    n0, n1 = a.requests, b.requests
    if not n0 or not n1:
        return GateResult("error_rate", OVERALL, True, a.error_rate, b.error_rate, None, threshold, conf, (n0, n1),
                          "no requests on both arms yet")
    e0, e1 = a.errors / n0, b.errors / n1
    bound = (e1 - e0) - _radius(_pvar(a.errors, n0) + _pvar(b.errors, n1), two_log, ERROR_RATE_TAU)
    if bound > threshold:
        msg = (f"slice '{OVERALL}': challenger error rate {_pct(e1)} (n={n1}) vs champion {_pct(e0)} (n={n0}); "
               f"the increase is at least {_pts(bound)} with {conf:.2%} confidence (anytime-valid), "
               f"above the {_pts(threshold)} limit")
        return GateResult("error_rate", OVERALL, False, e0, e1, bound, threshold, conf, (n0, n1), msg)
    return GateResult("error_rate", OVERALL, True, e0, e1, bound, threshold, conf, (n0, n1), "ok")


def _mae(name: str, a: SliceCounts, b: SliceCounts, rel: float, two_log: float, conf: float) -> GateResult:
    n0, n1 = a.numeric, b.numeric
    prior = (a.sq_error_sum + b.sq_error_sum) / (n0 + n1)  # pooled E[e^2] >= Var|e|: conservative
    m0, v0 = mean_with_variance(n0, a.abs_error_sum, a.sq_error_sum, prior)
    m1, v1 = mean_with_variance(n1, b.abs_error_sum, b.sq_error_sum, prior)
    threshold = rel * m0
    pooled = (a.abs_error_sum + b.abs_error_sum) / (n0 + n1)
    tau = MAE_TAU_REL * pooled
    if tau <= 0.0 or v0 + v1 <= 0.0:  # every error exactly 0 on both arms: nothing can be worse
        return GateResult("mae", name, True, m0, m1, None, threshold, conf, (n0, n1), "all errors are zero")
    bound = (m1 - m0) - _radius(v0 + v1, two_log, tau)
    if bound > threshold:
        msg = (f"slice '{name}': challenger mean absolute error {m1:.6g} (n={n1}) vs champion {m0:.6g} (n={n0}); "
               f"the increase is at least {bound:.6g} with {conf:.2%} confidence (anytime-valid), above the "
               f"{rel:.1%} limit ({threshold:.6g})")
        return GateResult("mae", name, False, m0, m1, bound, threshold, conf, (n0, n1), msg)
    return GateResult("mae", name, True, m0, m1, bound, threshold, conf, (n0, n1), "ok")


def _latency(a: SliceCounts, b: SliceCounts, gates: Gates) -> GateResult:
    limit = gates.p99_ms
    assert limit is not None
    p0 = None if a.latency_p99_s is None else 1000.0 * a.latency_p99_s
    p1 = None if b.latency_p99_s is None else 1000.0 * b.latency_p99_s
    samples = (a.requests, b.requests)
    if p1 is None or b.requests < gates.p99_min_requests:
        return GateResult("latency", OVERALL, True, p0, p1, None, limit, 1.0, samples,
                          f"waiting for {gates.p99_min_requests} challenger requests")
    if p1 > limit:
        base = "" if p0 is None else f" (champion {p0:.1f} ms)"
        msg = (f"slice '{OVERALL}': challenger p99 latency {p1:.1f} ms over {b.requests} requests{base} "
               f"exceeds the {limit:g} ms limit")
        return GateResult("latency", OVERALL, False, p0, p1, p1, limit, 1.0, samples, msg)
    return GateResult("latency", OVERALL, True, p0, p1, p1, limit, 1.0, samples, "ok")


def _fmt_s(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else (f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h")


def evaluate(
    gates: Gates,
    champion: Mapping[str, SliceCounts],
    challenger: Mapping[str, SliceCounts],
    *,
    stage: Stage,
    stage_elapsed_s: float,
    challenger_labelled: int,
    slice_budget: int | None = None,
) -> Decision:
    """Decide fail / hold / advance for one stage from cumulative per-slice counts.

    Guarantees:

    - ``fail`` whenever any gate fails, whatever the stage's elapsed time or sample count.
    - ``advance`` only when no gate fails, ``stage_elapsed_s >= stage.min_duration_s``,
      ``challenger_labelled >= stage.min_samples`` and the champion has a baseline (requests, and
      labelled outcomes when the challenger has any); ``needs_approval`` is then ``stage.approve``.
    - ``hold`` otherwise; the reason says what it waits for.
    - Slices with no labelled outcomes (and no numeric targets) on one of the arms are skipped;
      the ``overall`` slice always has an accuracy and an error-rate result (passing while empty).
    - With the counts of a stage fed after every label, the probability that identical models
      ever produce ``fail`` is <= ``1 - gates.confidence`` (under the assumptions of
      :mod:`swapserve.rollout.stats`; strictly so when ``slice_budget`` bounds the slices).
    - Pure: no I/O, no clock; results are ordered overall first, then slices by name.
    """
    names = sorted(set(champion) | set(challenger) | {OVERALL}, key=lambda s: (s != OVERALL, s))
    acc_slices: list[tuple[str, SliceCounts, SliceCounts]] = []
    mae_slices: list[tuple[str, SliceCounts, SliceCounts]] = []
    for name in names:
        a, b = champion.get(name, _EMPTY), challenger.get(name, _EMPTY)
        if (a.labelled and b.labelled) or name == OVERALL:
            acc_slices.append((name, a, b))
        if a.numeric and b.numeric:
            mae_slices.append((name, a, b))
    n_acc = sum(1 for _, a, b in acc_slices if a.labelled and b.labelled)
    n_mae = len(mae_slices)
    if slice_budget is not None:
        n_acc = max(n_acc, slice_budget) if n_acc else 0
        n_mae = max(n_mae, slice_budget) if n_mae else 0
    alpha = gates.alpha / (n_acc + n_mae + 1)  # per test (Bonferroni)
    conf = gates.confidence
    # the level mixture_radius() needs for a one-sided bound at alpha, as 2 ln(1/level)
    two_log = -2.0 * math.log(one_sided_alpha(alpha))

    results: list[GateResult] = []
    for name, a, b in acc_slices:
        results.append(_accuracy(name, a, b, gates.max_slice_accuracy_drop, two_log, conf))
    a_all, b_all = champion.get(OVERALL, _EMPTY), challenger.get(OVERALL, _EMPTY)
    results.append(_error_rate(a_all, b_all, gates.max_error_rate_increase, two_log, conf))
    for name, a, b in mae_slices:
        results.append(_mae(name, a, b, gates.max_relative_mae_increase, two_log, conf))
    if gates.p99_ms is not None:
        results.append(_latency(a_all, b_all, gates))

    failed = [r for r in results if not r.passed]
    if failed:
        worst = max(failed, key=_excess)  # what ``Decision.failures`` lists first
        more = f" (and {len(failed) - 1} more failing gate(s))" if len(failed) > 1 else ""
        per_test = f"; per-test level {alpha:.2g} after Bonferroni over {n_acc + n_mae + 1} tests" \
            if worst.gate != "latency" else ""
        return Decision("fail", tuple(results), f"{worst.gate} gate failed: {worst.message}{per_test}{more}")

    waiting = []
    # No data is "hold", never "pass": an empty champion side (e.g. counts lost in a restart)
    # cannot vouch for the challenger.
    if not a_all.requests:
        waiting.append("requests on the champion (no baseline yet)")
    elif b_all.labelled and not a_all.labelled:
        waiting.append("labelled outcomes on the champion (no accuracy baseline yet)")
    if stage_elapsed_s < stage.min_duration_s:
        waiting.append(f"{_fmt_s(stage_elapsed_s)} of {_fmt_s(stage.min_duration_s)} min_duration")
    if challenger_labelled < stage.min_samples:
        waiting.append(f"{challenger_labelled} of {stage.min_samples} labelled outcomes on the challenger")
    if waiting:
        return Decision("hold", tuple(results), f"stage '{stage.name}': gates pass; waiting for " + " and ".join(waiting))
    approval = " (needs approval: swapserve rollout approve)" if stage.approve else ""
    return Decision("advance", tuple(results),
                    f"stage '{stage.name}': all gates pass and min_duration/min_samples are met{approval}",
                    needs_approval=stage.approve)


def _excess(r: GateResult) -> float:
    """How far past its threshold a failed gate is, relative to the threshold (for the reason)."""
    if r.bound is None:
        return 0.0
    return (r.bound - r.threshold) / r.threshold if r.threshold > 0 else math.inf


__all__ = ["ACCURACY_TAU", "ERROR_RATE_TAU", "MAE_TAU_REL", "OVERALL", "Decision", "GateResult", "Verdict", "evaluate"]
