r"""Sequential statistics for rollout gates: confidence sequences valid under continuous monitoring.

The gates look at cumulative counts as often as every second, from the first labelled outcome,
for as long as a stage lasts. A fixed-sample test (z-test, chi-square) checked that often would
eventually "find" a difference between identical models with probability approaching one. This
module instead gives bounds that hold *simultaneously for all times*:

    P( exists t >= 1 :  |Delta_hat_t - Delta| > r_t )  <=  alpha

so a gate may look after every label and stop at any moment without inflating its error rate.

Boundary (normal mixture; Robbins 1970, Howard et al. 2021 "Time-uniform, nonparametric,
nonasymptotic confidence sequences" eq. (14), equivalently the mSPRT of Johari et al. 2017/2022
"Always valid inference"). Let ``Delta_hat`` be an estimate with (estimated) variance ``V``. Mixing
the Gaussian likelihood ratio over a N(0, tau^2) prior on the effect gives a nonnegative
martingale; Ville's inequality turns it into the half-width

    r(V) = sqrt( V * (1 + V / tau^2) * ( 2 * ln(1/alpha) + ln(1 + tau^2 / V) ) )

The gates use it one-sided: they compare the lower bound ``Delta_hat - r`` with a threshold.
For a one-sided bound at level alpha the formula is evaluated at ``alpha_1 = c * alpha`` with
``c = 2 * Phi(sqrt(2 ln(1 / (2 alpha))))`` (just under 2; :func:`one_sided_alpha`). Why this is
valid: the half-normal mixture (lambda >= 0 only) ``M+ = 2 Phi(x) * M`` is itself a nonnegative
martingale, where ``M`` is the two-sided mixture and ``x = S / sqrt(V + rho)``; whenever ``M`` reaches
``1 / (c alpha)`` with S >= 0, ``x >= sqrt(2 ln(1/(2 alpha)))``, so ``M+ >= c M >= 1/alpha``, and Ville's
inequality bounds that by alpha. This keeps the bound closed-form and gains ``ln 2`` over using
the two-sided boundary one-sidedly.

Tuning parameter ``tau`` (the mixture's standard deviation, in the units of Delta): the bound is
tightest, relative to a fixed-sample interval, when ``V`` ~ ``tau^2 / (2 ln(1/alpha))``, i.e.
around the sample size at which effects of size ~tau become detectable. A larger tau detects large
regressions sooner and small ones later. ``swapserve.rollout.gates`` documents its choices.

Assumptions (state them in every report):

- Outcomes are independent given their arm (requests are randomised to champion/challenger by
  the router's hash, and labels are joined per request), and the share of labelled outcomes going
  to each arm is roughly constant within a stage, so that ``Delta_hat`` is asymptotically a
  Brownian motion in information time ``1/V``.
- The Gaussian approximation is asymptotic (as in Waudby-Smith et al. 2021, "Time-uniform central
  limit theory and asymptotic confidence sequences"): the guarantee is exact for Gaussian data and
  approximate for Bernoulli counts. Small counts are handled conservatively by Laplace-smoothing
  the variance of a proportion, ``p~ = (k + 1) / (n + 2)``, which never lets an early all-correct
  or all-wrong run claim zero variance. ``benchmarks/bench_gates.py`` measures the realised
  false-alarm rate under every-second monitoring.

Everything here is pure and allocation-free on the scalar path (``math`` only); the ``*_np``
twins take numpy arrays for the benchmark and agree with the scalar functions to float rounding.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


def mixture_radius(variance: float, alpha: float, tau: float) -> float:
    """Half-width of the normal-mixture confidence sequence at estimated variance ``variance``.

    Guarantee (Gaussian increments): ``P(exists t: |est_t - true| > r(V_t)) <= alpha``.
    Returns ``inf`` when ``variance`` is infinite, 0.0 when it is 0 (no uncertainty).
    Requires 0 < alpha < 1 and tau > 0 (ValueError otherwise).
    """
    if not 0.0 < alpha < 1.0 or not tau > 0.0:
        raise ValueError(f"mixture_radius needs 0 < alpha < 1 and tau > 0, got alpha={alpha}, tau={tau}")
    if variance <= 0.0:
        return 0.0
    if math.isinf(variance):
        return math.inf
    ratio = variance / (tau * tau)
    return math.sqrt(variance * (1.0 + ratio) * (2.0 * math.log(1.0 / alpha) + math.log1p(1.0 / ratio)))


def one_sided_alpha(alpha: float) -> float:
    """The level at which :func:`mixture_radius` gives a one-sided bound of level ``alpha``:
    ``2 * Phi(sqrt(2 ln(1/(2 alpha)))) * alpha`` (see the module docstring). Needs 0 < alpha < 0.5."""
    x = math.sqrt(2.0 * math.log(1.0 / (2.0 * alpha)))
    return (1.0 + math.erf(x / math.sqrt(2.0))) * alpha


def mixture_radius_np(variance: FloatArray, alpha: float | FloatArray, tau: float | FloatArray) -> FloatArray:
    """Vectorised :func:`mixture_radius` (``variance`` > 0 elementwise; arrays broadcast)."""
    ratio = variance / (np.asarray(tau) ** 2)
    out: FloatArray = np.sqrt(variance * (1.0 + ratio) * (-2.0 * np.log(alpha) + np.log1p(1.0 / ratio)))
    return out


def proportion_variance(successes: float, n: float) -> float:
    """Laplace-smoothed variance of a proportion estimate: p~(1-p~)/n with p~ = (k+1)/(n+2).

    Always > 0 for n > 0 (so a run of identical outcomes never claims certainty); ``inf`` for n <= 0.
    """
    if n <= 0:
        return math.inf
    p = (successes + 1.0) / (n + 2.0)
    return p * (1.0 - p) / n


def proportion_variance_np(successes: FloatArray, n: FloatArray) -> FloatArray:
    """Vectorised :func:`proportion_variance` (``n`` > 0 elementwise)."""
    p = (successes + 1.0) / (n + 2.0)
    out: FloatArray = p * (1.0 - p) / n
    return out


def diff_proportions(k_a: float, n_a: float, k_b: float, n_b: float) -> tuple[float, float]:
    """``(p_a - p_b, variance)`` for two independent proportions ``k/n``; needs n_a, n_b > 0.

    The estimate is the raw difference of the observed proportions; the variance is the sum of the
    Laplace-smoothed variances (:func:`proportion_variance`).
    """
    return k_a / n_a - k_b / n_b, proportion_variance(k_a, n_a) + proportion_variance(k_b, n_b)


def mean_with_variance(n: float, total: float, total_sq: float, prior_second_moment: float) -> tuple[float, float]:
    """``(mean, variance of the mean)`` of nonnegative values from their count, sum and sum of squares.

    The per-observation variance is shrunk towards ``prior_second_moment`` with two
    pseudo-observations, ``(sum (x - mean)^2 + 2 * prior) / (n + 1)``, so one or two equal values
    never claim zero variance. For absolute errors the second moment E[e^2] bounds the variance,
    which makes the pooled second moment a conservative prior. Needs n > 0.
    """
    mean = total / n
    ss = max(total_sq - n * mean * mean, 0.0)
    return mean, (ss + 2.0 * prior_second_moment) / (n + 1.0) / n


def lower_bound(estimate: float, variance: float, alpha: float, tau: float) -> float:
    """One-sided anytime-valid lower confidence bound at level ``alpha``:
    ``P(exists t: true < lower_bound_t) <= alpha`` (Gaussian approximation)."""
    return estimate - mixture_radius(variance, one_sided_alpha(alpha), tau)


def fixed_sample_variance_needed(effect: float, alpha: float, power: float) -> float:
    """The variance a one-sided fixed-sample z-test at level ``alpha`` needs to detect ``effect``
    (the distance beyond the threshold) with probability ``power``: ``(effect / (z_a + z_b))^2``.
    Used to compare sequential detection with a fixed-horizon test."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1.0 - alpha) + NormalDist().inv_cdf(power)
    return (effect / z) ** 2


__all__ = [
    "diff_proportions", "fixed_sample_variance_needed", "lower_bound", "mean_with_variance",
    "mixture_radius", "mixture_radius_np", "one_sided_alpha", "proportion_variance", "proportion_variance_np",
]
