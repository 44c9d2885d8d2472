"""Rollout decision engine alone: false-rollback rate under every-second monitoring, and
detection delay beside a fixed-sample test (the price of continuous monitoring).

    python benchmarks/bench_gates.py [--streams 1000] [--seed 0] [--json out.json]

Simulation (in-process, numpy-vectorised; no server):

- Labelled outcomes arrive as Poisson processes: ``--label-rate`` per second over both arms
  (default 40/s), a ``--canary`` share of them on the challenger (default 10%: 4/s challenger,
  36/s champion). Five slices with shares 40/25/15/12/8% and accuracies 93/90/88/85/80%
  (about 0.9 overall). Each arm also serves ``REQUESTS_PER_LABEL`` (4) requests per labelled
  outcome with a 0.2% request error rate, so the error-rate gate runs too.
- Every second the full default gate set is applied to the cumulative counts, exactly as
  :func:`swapserve.rollout.gates.evaluate` does (accuracy on the five slices and ``overall``,
  error rate on ``overall``, Bonferroni over the testable slices; the vectorised copy is checked
  against ``evaluate`` itself on replayed streams, ``--check``).
- **False-rollback rate**: ``--streams`` A/A streams (identical champion and challenger), each a
  full stage of ``--stage`` seconds (default 1 h = 3600 checks); the fraction that ever fail,
  with a 95% Clopper-Pearson interval. For contrast, the same data under a naive fixed-sample
  z-test at the same per-test level, re-checked every second. A/A data sits a whole threshold
  inside the null (the gates test "drop <= 1 point", not "no difference"), so the same run is
  repeated at the worst case of the null: the challenger exactly 1 point worse on every slice.
- **Detection delay**: the challenger is worse by 2, 5, 10 and 20 points on the 15% slice
  (accuracy 88%), equal elsewhere. For each, ``--delay-streams`` streams run until the sequential
  gates fail (any gate) or 4x the fixed-sample horizon; the table gives the median and 90th
  percentile time to detection. The fixed-sample comparator is a one-sided z-test on that slice
  at the same per-test level alpha/m with power 0.8 at the true regression; it can only decide
  at its horizon ``t_fixed = (p0 q0 / r0 + p1 q1 / r1) / V*`` with
  ``V* = ((drop - threshold) / (z_{1-alpha/m} + z_0.8))^2``.
- **Issue scenario (a)**: 10 points worse on one slice of five (equal shares, accuracy 0.9),
  10% canary at 500 labelled outcomes/s: median and p90 time from canary start to the failing
  evaluation (decision engine only; label delay and publish not included).
- **Adversarial scenario** (issue 14): what a client can still do once the server's evidence rules
  apply. Pinned requests, malformed requests, labels without a credential, guessed ids and
  repeated labels never reach the gates (tests/e2e/test_adversary.py checks that on a real
  server), so those streams are the A/A streams above. What remains is a *credentialed liar*
  labelling its own router-assigned requests: against the challenger (its answers wrong, the
  champion's right) on every slice, as much as the plan's ``max_reporter_share`` admits (the
  server's rule: a reporter's label on a (version, slice) counts while ``mine <= share x (all +
  1)``, so the liar holds ``floor(share (H + 1) / (1 - share)) + 1`` of a slice's labels when
  honest reporters gave H). Reported: the A/A false-rollback rate with that liar at
  ``--liar-share`` (default 0.01, the accuracy threshold) and at 5x it, and with no cap at all
  (the liar's share is its traffic share, here 20%: what the issue measured before the rules);
  and the detection delay of the 10-point regression when the liar vouches for the challenger
  (its answers right, the champion's wrong), beside the fixed-sample horizon.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import beta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from swapserve.rollout.gates import ACCURACY_TAU, ERROR_RATE_TAU, OVERALL, evaluate  # noqa: E402
from swapserve.rollout.plan import Gates, Stage  # noqa: E402
from swapserve.rollout.stats import fixed_sample_variance_needed, mixture_radius_np, one_sided_alpha  # noqa: E402
from swapserve.types import SliceCounts  # noqa: E402

MIX = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
ACC = np.array([0.93, 0.90, 0.88, 0.85, 0.80])
REGRESSED = 2  # the 15% slice
REQUESTS_PER_LABEL = 4.0
ERROR_RATE = 0.002
REGRESSIONS = (0.02, 0.05, 0.10, 0.20)

IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class Scenario:
    mix: NDArray[np.float64]
    acc_champion: NDArray[np.float64]
    acc_challenger: NDArray[np.float64]
    label_rate: float  # labelled outcomes per second, both arms
    canary: float  # challenger share, 0..1

    def rates(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Per-slice labelled outcomes per second: (champion, challenger)."""
        return self.label_rate * (1 - self.canary) * self.mix, self.label_rate * self.canary * self.mix


def _z(alpha: float) -> float:
    return statistics.NormalDist().inv_cdf(1 - alpha)


def liar_labels(honest: NDArray[np.int64], share: float) -> NDArray[np.int64]:
    """Labels a greedy liar holds on a (version, slice) under the server's cap, given the honest
    labels counted there: ``mine <= share * (honest + mine + 1)`` before each admitted label
    (swapserve.feedback.slices.SliceStats.admit). ``share`` >= 1: no cap (the liar's own volume
    decides; callers pass it as a traffic share through ``liar_volume``)."""
    return np.floor(share * (honest + 1) / (1 - share)).astype(np.int64) + 1


def first_failures(rng: np.random.Generator, sc: Scenario, gates: Gates, streams: int, horizon: int, *,
                   acc_tau: float = ACCURACY_TAU, err_tau: float = ERROR_RATE_TAU, block: int = 3600,
                   record: bool = False, liar: str = "", liar_share: float = 0.0,
                   liar_volume: float = 0.0) -> tuple[IntArray, IntArray, list[NDArray[np.int64]]]:
    """First failing second (1-based; -1: never) per stream for the sequential gates and for the
    naive every-second z-test. With ``record`` also returns the per-second counts (for --check).

    ``liar`` "against" | "favour" adds one credentialed lying reporter on every slice of both arms:
    capped at ``liar_share`` (``liar_labels``), or uncapped with ``liar_volume`` (its labels as a
    fraction of the honest ones)."""
    r0, r1 = sc.rates()
    k = len(sc.mix)
    seq = np.full(streams, -1, dtype=np.int64)
    naive = np.full(streams, -1, dtype=np.int64)
    # cumulative state: labelled / correct per arm per slice, requests / errors per arm
    n0 = np.zeros((streams, k), np.int64)
    c0 = np.zeros_like(n0)
    n1 = np.zeros_like(n0)
    c1 = np.zeros_like(n0)
    q0 = np.zeros(streams, np.int64)
    e0 = np.zeros_like(q0)
    q1 = np.zeros_like(q0)
    e1 = np.zeros_like(q0)
    recorded: list[NDArray[np.int64]] = []
    ztab = np.array([0.0] + [_z(gates.alpha / mm) for mm in range(1, k + 3)])
    atab = np.array([0.5] + [one_sided_alpha(gates.alpha / mm) for mm in range(1, k + 3)])
    t0 = 0
    while t0 < horizon:
        active = np.flatnonzero(seq < 0) if not record else np.arange(streams)
        if active.size == 0:
            break
        length = min(block, horizon - t0)
        b = active.size
        dn0 = rng.poisson(r0, size=(b, length, k))
        dn1 = rng.poisson(r1, size=(b, length, k))
        dc0 = rng.binomial(dn0, sc.acc_champion)
        dc1 = rng.binomial(dn1, sc.acc_challenger)
        dq0 = rng.poisson(r0.sum() * REQUESTS_PER_LABEL, size=(b, length))
        dq1 = rng.poisson(r1.sum() * REQUESTS_PER_LABEL, size=(b, length))
        de0 = rng.binomial(dq0, ERROR_RATE)
        de1 = rng.binomial(dq1, ERROR_RATE)
        N0 = n0[active, None, :] + np.cumsum(dn0, axis=1)
        C0 = c0[active, None, :] + np.cumsum(dc0, axis=1)
        N1 = n1[active, None, :] + np.cumsum(dn1, axis=1)
        C1 = c1[active, None, :] + np.cumsum(dc1, axis=1)
        Q0 = q0[active, None] + np.cumsum(dq0, axis=1)
        E0 = e0[active, None] + np.cumsum(de0, axis=1)
        Q1 = q1[active, None] + np.cumsum(dq1, axis=1)
        E1 = e1[active, None] + np.cumsum(de1, axis=1)
        if record:
            recorded.append(np.concatenate([N0, C0, N1, C1, Q0[..., None], E0[..., None], Q1[..., None],
                                            E1[..., None]], axis=2))
        n0[active], c0[active], n1[active], c1[active] = N0[:, -1], C0[:, -1], N1[:, -1], C1[:, -1]
        q0[active], e0[active], q1[active], e1[active] = Q0[:, -1], E0[:, -1], Q1[:, -1], E1[:, -1]
        if liar:  # the gates see honest counts plus the liar's admitted labels (state above stays honest)
            if liar_volume:
                L0, L1 = np.floor(liar_volume * N0).astype(np.int64), np.floor(liar_volume * N1).astype(np.int64)
            else:
                L0, L1 = liar_labels(N0, liar_share), liar_labels(N1, liar_share)
            if liar == "against":  # the champion's answers "right", the challenger's "wrong"
                N0, C0, N1 = N0 + L0, C0 + L0, N1 + L1
            else:  # vouching for the challenger
                N0, N1, C1 = N0 + L0, N1 + L1, C1 + L1
        # slices + overall as the last column
        A0 = np.concatenate([N0, N0.sum(-1, keepdims=True)], axis=2).astype(np.float64)
        K0 = np.concatenate([C0, C0.sum(-1, keepdims=True)], axis=2).astype(np.float64)
        A1 = np.concatenate([N1, N1.sum(-1, keepdims=True)], axis=2).astype(np.float64)
        K1 = np.concatenate([C1, C1.sum(-1, keepdims=True)], axis=2).astype(np.float64)
        testable = (A0 > 0) & (A1 > 0)
        m = testable.sum(-1) + 1  # + the error-rate test
        alpha = atab[m][..., None]  # one-sided level for mixture_radius, as evaluate() uses
        s0, s1 = np.maximum(A0, 1), np.maximum(A1, 1)
        p0t, p1t = (K0 + 1) / (A0 + 2), (K1 + 1) / (A1 + 2)
        var = p0t * (1 - p0t) / s0 + p1t * (1 - p1t) / s1
        est = K0 / s0 - K1 / s1
        fail_seq = testable & (est - mixture_radius_np(var, alpha, acc_tau) > gates.max_slice_accuracy_drop)
        zcrit = ztab[m][..., None]
        fail_naive = testable & (est - zcrit * np.sqrt(var) > gates.max_slice_accuracy_drop)
        rq = (Q0 > 0) & (Q1 > 0)
        sq0, sq1 = np.maximum(Q0, 1).astype(np.float64), np.maximum(Q1, 1).astype(np.float64)
        f0, f1 = (E0 + 1) / (sq0 + 2), (E1 + 1) / (sq1 + 2)
        evar = f0 * (1 - f0) / sq0 + f1 * (1 - f1) / sq1
        eest = E1 / sq1 - E0 / sq0
        err_seq = rq & (eest - mixture_radius_np(evar, alpha[..., 0], err_tau) > gates.max_error_rate_increase)
        err_naive = rq & (eest - zcrit[..., 0] * np.sqrt(evar) > gates.max_error_rate_increase)
        for out, fail in ((seq, fail_seq.any(-1) | err_seq), (naive, fail_naive.any(-1) | err_naive)):
            hit = fail.any(1)
            first = t0 + 1 + np.argmax(fail, axis=1)
            idx = active[hit & (out[active] < 0)]
            out[idx] = first[hit & (out[active] < 0)]
        t0 += length
    return seq, naive, recorded


def check_against_evaluate(rng: np.random.Generator, gates: Gates, seconds: int = 600, streams: int = 4) -> int:
    """Replay streams (10-point regression, so that some fail) through evaluate() every second and
    assert it fails at the same second as the vectorised copy. Returns the number of seconds compared."""
    acc1 = ACC.copy()
    acc1[REGRESSED] -= 0.10
    sc = Scenario(MIX, ACC, acc1, label_rate=400, canary=0.1)
    seq, _, rec = first_failures(rng, sc, gates, streams, seconds, record=True)
    data = rec[0]
    k = len(MIX)
    stage = Stage(name="canary", traffic_bp=1000)
    compared = 0
    for s in range(streams):
        got = -1
        for t in range(seconds):
            row = data[s, t]
            N0, C0, N1, C1 = row[:k], row[k:2 * k], row[2 * k:3 * k], row[3 * k:4 * k]
            Q0, E0, Q1, E1 = (int(x) for x in row[4 * k:])
            champ = {f"s{j}": SliceCounts(labelled=int(N0[j]), correct=int(C0[j])) for j in range(k)}
            chall = {f"s{j}": SliceCounts(labelled=int(N1[j]), correct=int(C1[j])) for j in range(k)}
            champ[OVERALL] = SliceCounts(requests=Q0, errors=E0, labelled=int(N0.sum()), correct=int(C0.sum()))
            chall[OVERALL] = SliceCounts(requests=Q1, errors=E1, labelled=int(N1.sum()), correct=int(C1.sum()))
            d = evaluate(gates, champ, chall, stage=stage, stage_elapsed_s=t + 1, challenger_labelled=int(N1.sum()))
            compared += 1
            if d.verdict == "fail":
                got = t + 1
                break
        if got != seq[s]:
            raise AssertionError(f"stream {s}: evaluate() failed at {got}s, vectorised copy at {seq[s]}s")
    return compared


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=1000, help="A/A streams (default 1000)")
    ap.add_argument("--delay-streams", type=int, default=200, help="streams per regression size (default 200)")
    ap.add_argument("--stage", type=int, default=3600, help="A/A stage length in seconds (default 3600)")
    ap.add_argument("--label-rate", type=float, default=40.0, help="labelled outcomes/s over both arms (default 40)")
    ap.add_argument("--canary", type=float, default=10.0, help="challenger percent (default 10)")
    ap.add_argument("--confidence", type=float, default=0.99)
    ap.add_argument("--accuracy-tau", type=float, default=ACCURACY_TAU, help="mixture scale to explore")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", type=int, default=10, help="streams replayed through evaluate() (0: skip)")
    ap.add_argument("--liar-share", type=float, default=0.01,
                    help="max_reporter_share of the adversarial scenario (default 0.01, the accuracy threshold)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    gates = Gates(confidence=args.confidence)
    canary = args.canary / 100
    out: dict[str, Any] = {"seed": args.seed, "label_rate": args.label_rate, "canary_percent": args.canary,
                           "confidence": gates.confidence, "accuracy_tau": args.accuracy_tau,
                           "slices": {"mix": MIX.tolist(), "accuracy": ACC.tolist()}}
    t_start = time.perf_counter()

    if args.check:
        n = check_against_evaluate(np.random.default_rng(args.seed + 1), gates, streams=args.check)
        out["check_evaluate_seconds_compared"] = n

    # -- A/A false-rollback rate ---------------------------------------------------------------
    t = time.perf_counter()
    aa = Scenario(MIX, ACC, ACC, args.label_rate, canary)
    seq, naive, _ = first_failures(rng, aa, gates, args.streams, args.stage, acc_tau=args.accuracy_tau, block=900)
    k_seq, k_naive = int((seq > 0).sum()), int((naive > 0).sum())
    lo, hi = clopper_pearson(k_seq, args.streams)
    out["aa"] = {"streams": args.streams, "stage_s": args.stage, "checks_per_stream": args.stage,
                 "false_rollbacks": k_seq, "rate": k_seq / args.streams, "ci95": [lo, hi],
                 "target": gates.alpha, "naive_ztest_false_rollbacks": k_naive,
                 "naive_ztest_rate": k_naive / args.streams, "seconds": time.perf_counter() - t}

    # the worst case of the null hypothesis: every slice exactly at the threshold (a gate must
    # not fail here either; A/A data sits a full threshold inside the null, so it fails far less)
    t = time.perf_counter()
    edge = Scenario(MIX, ACC, ACC - gates.max_slice_accuracy_drop, args.label_rate, canary)
    eseq, enaive, _ = first_failures(rng, edge, gates, args.streams, args.stage, acc_tau=args.accuracy_tau, block=900)
    ke, ken = int((eseq > 0).sum()), int((enaive > 0).sum())
    elo, ehi = clopper_pearson(ke, args.streams)
    out["at_threshold"] = {"streams": args.streams, "false_rollbacks": ke, "rate": ke / args.streams,
                           "ci95": [elo, ehi], "naive_ztest_rate": ken / args.streams,
                           "seconds": time.perf_counter() - t}

    # -- detection delay -----------------------------------------------------------------------
    r0, r1 = aa.rates()
    m = len(MIX) + 1 + 1
    alpha_test = gates.alpha / m
    rows = []
    for drop in REGRESSIONS:
        t = time.perf_counter()
        acc1 = ACC.copy()
        acc1[REGRESSED] -= drop
        p0, p1 = ACC[REGRESSED], acc1[REGRESSED]
        v_star = fixed_sample_variance_needed(drop - gates.max_slice_accuracy_drop, alpha_test, 0.8)
        t_fixed = (p0 * (1 - p0) / r0[REGRESSED] + p1 * (1 - p1) / r1[REGRESSED]) / v_star
        horizon = int(max(4 * t_fixed, 600))
        sc = Scenario(MIX, ACC, acc1, args.label_rate, canary)
        det, _, _ = first_failures(rng, sc, gates, args.delay_streams, horizon, acc_tau=args.accuracy_tau, block=2048)
        found = det[det > 0]
        frac = found.size / det.size
        med = float(np.median(np.where(det > 0, det, np.inf)))
        p90 = float(np.quantile(np.where(det > 0, det, np.inf), 0.9))
        rows.append({"drop_points": round(100 * drop), "t_fixed_s": t_fixed,
                     "fixed_challenger_labels": t_fixed * r1[REGRESSED],
                     "seq_median_s": med, "seq_p90_s": p90, "seq_median_challenger_labels": med * r1[REGRESSED],
                     "ratio_median_to_fixed": med / t_fixed, "seq_detected_by_t_fixed": float((found <= t_fixed).sum() / det.size),
                     "seq_detected_by_horizon": frac, "horizon_s": horizon, "seconds": time.perf_counter() - t})
    out["delay"] = rows

    # -- issue scenario (a) ----------------------------------------------------------------------
    t = time.perf_counter()
    mix_eq, acc_eq = np.full(5, 0.2), np.full(5, 0.9)
    acc_bad = acc_eq.copy()
    acc_bad[0] -= 0.10
    sa = Scenario(mix_eq, acc_eq, acc_bad, 500.0, 0.10)
    det, _, _ = first_failures(rng, sa, gates, args.delay_streams, 600, acc_tau=args.accuracy_tau, block=600)
    dd = np.where(det > 0, det, np.inf)
    out["scenario_a"] = {"median_s": float(np.median(dd)), "p90_s": float(np.quantile(dd, 0.9)),
                         "max_s": float(dd.max()), "streams": args.delay_streams,
                         "seconds": time.perf_counter() - t}
    # -- adversarial scenario (issue 14) ---------------------------------------------------------
    adv: dict[str, Any] = {"liar_share": args.liar_share, "aa": []}
    for label, kw in ((f"capped at {args.liar_share:g}", {"liar_share": args.liar_share}),
                      (f"capped at {5 * args.liar_share:g}", {"liar_share": 5 * args.liar_share}),
                      ("no cap, 20% of the labels", {"liar_volume": 0.25})):
        t = time.perf_counter()
        aseq, anaive, _ = first_failures(rng, aa, gates, args.streams, args.stage, acc_tau=args.accuracy_tau,
                                         block=900, liar="against", **kw)  # type: ignore[arg-type]
        ka = int((aseq > 0).sum())
        alo, ahi = clopper_pearson(ka, args.streams)
        fails = aseq[aseq > 0]
        adv["aa"].append({"liar": label, **kw, "streams": args.streams, "false_rollbacks": ka,
                          "rate": ka / args.streams, "ci95": [alo, ahi],
                          "median_s_to_false_rollback": float(np.median(fails)) if fails.size else None,
                          "naive_ztest_rate": float((anaive > 0).sum() / args.streams),
                          "seconds": time.perf_counter() - t})
    t = time.perf_counter()
    drop = 0.10
    acc1 = ACC.copy()
    acc1[REGRESSED] -= drop
    sc = Scenario(MIX, ACC, acc1, args.label_rate, canary)
    p0, p1 = ACC[REGRESSED], acc1[REGRESSED]
    v_star = fixed_sample_variance_needed(drop - gates.max_slice_accuracy_drop, alpha_test, 0.8)
    t_fixed = (p0 * (1 - p0) / r0[REGRESSED] + p1 * (1 - p1) / r1[REGRESSED]) / v_star
    horizon = int(max(4 * t_fixed, 600))
    fav, _, _ = first_failures(rng, sc, gates, args.delay_streams, horizon, acc_tau=args.accuracy_tau, block=2048,
                               liar="favour", liar_share=args.liar_share)
    fd = np.where(fav > 0, fav, np.inf)
    honest_row = next(r for r in rows if r["drop_points"] == 10)
    adv["favour"] = {"drop_points": 10, "liar_share": args.liar_share, "t_fixed_s": t_fixed,
                     "seq_median_s": float(np.median(fd)), "seq_p90_s": float(np.quantile(fd, 0.9)),
                     "honest_seq_median_s": honest_row["seq_median_s"],
                     "detected_by_horizon": float((fav > 0).sum() / fav.size), "horizon_s": horizon,
                     "seconds": time.perf_counter() - t}
    out["adversarial"] = adv
    out["total_seconds"] = time.perf_counter() - t_start

    a = out["aa"]
    print(f"## Rollout gates: decision engine (seed {args.seed}, {args.label_rate:g} labelled/s, "
          f"{args.canary:g}% canary, confidence {gates.confidence})\n")
    e = out["at_threshold"]
    print("| null scenario | streams | checks each | false rollbacks | rate (95% CI) | target | "
          "naive z-test every second |")
    print("|---|---|---|---|---|---|---|")
    print(f"| A/A (identical) | {a['streams']} | {a['checks_per_stream']} (1/s) | {k_seq} | {a['rate']:.2%} "
          f"({lo:.2%}..{hi:.2%}) | <= {gates.alpha:.0%} | {a['naive_ztest_rate']:.1%} |")
    print(f"| every slice exactly {100 * gates.max_slice_accuracy_drop:g} pt worse (worst null) | {e['streams']} | "
          f"{a['checks_per_stream']} (1/s) | {ke} | {e['rate']:.2%} ({elo:.2%}..{ehi:.2%}) | "
          f"<= {gates.alpha:.0%} | {e['naive_ztest_rate']:.1%} |\n")
    print(f"Detection delay, regression on the 15% slice (accuracy 88%), challenger "
          f"{r1[REGRESSED]:.2f} labels/s on it; fixed-sample test: one-sided z at alpha/{m}, power 0.8\n")
    print("| drop | fixed-sample horizon | sequential median | sequential p90 | median / fixed | "
          "seq. detected by fixed horizon | seq. detected by 4x |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['drop_points']} pts | {r['t_fixed_s']:.0f} s ({r['fixed_challenger_labels']:.0f} labels) | "
              f"{r['seq_median_s']:.0f} s ({r['seq_median_challenger_labels']:.0f} labels) | {r['seq_p90_s']:.0f} s | "
              f"{r['ratio_median_to_fixed']:.2f} | {r['seq_detected_by_t_fixed']:.0%} | {r['seq_detected_by_horizon']:.0%} |")
    s = out["scenario_a"]
    print(f"\nIssue scenario (a), 10 pts worse on 1 of 5 equal slices, 10% canary, 500 labels/s: "
          f"time to fail median {s['median_s']:.0f} s, p90 {s['p90_s']:.0f} s, max {s['max_s']:.0f} s "
          f"over {s['streams']} streams")
    print(f"\nAdversarial scenario: A/A plus one credentialed liar labelling its own routed requests against "
          f"the challenger on every slice (pinned, malformed, unauthenticated, guessed and repeated labels never "
          f"reach the gates: these streams are the A/A ones)\n")
    print("| liar | streams | false rollbacks | rate (95% CI) | target | median time to the false rollback |")
    print("|---|---|---|---|---|---|")
    for r in adv["aa"]:
        med = "-" if r["median_s_to_false_rollback"] is None else f"{r['median_s_to_false_rollback']:.0f} s"
        print(f"| {r['liar']} | {r['streams']} | {r['false_rollbacks']} | {r['rate']:.2%} "
              f"({r['ci95'][0]:.2%}..{r['ci95'][1]:.2%}) | <= {gates.alpha:.0%} | {med} |")
    f = adv["favour"]
    print(f"\nA 10-pt regression on the 15% slice with the liar (cap {f['liar_share']:g}) vouching for the "
          f"challenger: sequential median {f['seq_median_s']:.0f} s, p90 {f['seq_p90_s']:.0f} s "
          f"(honest labels only: median {f['honest_seq_median_s']:.0f} s; fixed-sample horizon {f['t_fixed_s']:.0f} s); "
          f"detected by 4x that horizon: {f['detected_by_horizon']:.0%}")
    if args.check:
        print(f"\nevaluate() cross-check: {out['check_evaluate_seconds_compared']} per-second decisions identical")
    print(f"\ntotal {out['total_seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float) + "\n")
    return out


if __name__ == "__main__":
    main()
