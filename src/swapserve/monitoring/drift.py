"""Streaming drift sketches (hot path) and drift scoring (off it).

**Sketch.** Each scored window (e.g. 5 min) is a ring of ``slots`` time slots (default 10,
so a 5-minute window slides in 30 s steps). A slot holds, per feature, the count of live
values in each reference bin (plus a missing column) and the feature's min and max. A
request's cost is one copy of its monitored values into the observer's pending buffer;
binning runs vectorised per block of buffered rows (see ``Sketch``). Memory is fixed when
the version's profile is built: ``windows x slots x features x (edges + 2)`` int64 counts
plus ``windows x slots x features x 2`` float64 min/max plus the pending buffer
(``PENDING_ROWS x features``) - for digits (64 + 1 features, <= 13 bins, 2 windows, 10
slots) about 200 KB. A window's live distribution is the sum of the
slots younger than the window, i.e. it covers between ``(slots - 1) / slots`` of the window
and the whole window.

**Scores** (per window, per feature, against the reference bin counts):

- PSI = sum_b (p_live - p_ref) ln(p_live / p_ref), with both distributions smoothed by half a
  count per bin (so an empty bin is never log(0)); NaNs are excluded (they are a data-quality
  issue, reported as missing rates).
- A two-sample test: Kolmogorov-Smirnov on the *binned* CDFs for continuous features (D is the
  largest CDF gap at the reference bin edges, p from the asymptotic Kolmogorov distribution
  with n_eff = n m / (n + m); evaluating only at the edges makes it conservative: it can miss
  drift inside one bin, never invents any), Pearson chi-square on the 2 x bins contingency
  table for categorical features (predicted classes).
- A feature is *significant* when p < ``p_value`` / (number of scored features)
  (Bonferroni: the family-wise false-alarm rate per scoring stays under ``p_value``).
- The input score of a window is the largest PSI among significant input features (0 if none);
  the prediction score likewise over the output features. Requiring both a large effect
  (PSI) and significance keeps small windows from alarming on noise and huge windows from
  alarming on negligible shifts.
- State: ``insufficient`` below ``min_samples`` rows; ``alert`` when the input score >=
  ``psi.alert`` or the prediction score >= ``prediction_psi.alert``; ``warn`` likewise with
  the warn levels; else ``ok``. Features that are constant in the window although they vary
  in the reference are listed (stuck sensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from swapserve.monitoring.monitor_config import DriftConfig
from swapserve.monitoring.profile import FeatureProfile

STATES = ("insufficient", "ok", "warn", "alert")
_SMOOTH = 0.5


class WindowRing:
    """A ring of time slots for one window of one feature set. Not thread-safe (callers lock)."""

    def __init__(self, window_s: float, slots: int, width: int, columns: int) -> None:
        self.window_s = window_s
        self.slot_s = window_s / slots
        self.slots = slots
        self.counts = np.zeros((slots, width * columns), dtype=np.int64)
        self.rows = np.zeros(slots, dtype=np.int64)
        self.minimum = np.full((slots, width), np.inf)
        self.maximum = np.full((slots, width), -np.inf)
        self.ids = np.full(slots, -1, dtype=np.int64)
        self.newest = -1
        self.width, self.columns = width, columns

    def add(self, t: float, flat_counts: np.ndarray, rows: int, lo: np.ndarray, hi: np.ndarray) -> None:
        """Add a block of counts observed at time ``t`` (older than the window: dropped)."""
        sid = int(t // self.slot_s)
        if sid <= self.newest - self.slots:
            return
        self.newest = max(self.newest, sid)
        pos = sid % self.slots
        if self.ids[pos] != sid:  # the slot is a whole window old: recycle it
            self.ids[pos] = sid
            self.counts[pos] = 0
            self.rows[pos] = 0
            self.minimum[pos] = np.inf
            self.maximum[pos] = -np.inf
        row = self.counts[pos]
        np.add(row, flat_counts, out=row)
        self.rows[pos] += rows
        mn, mx = self.minimum[pos], self.maximum[pos]
        np.fmin(mn, lo, out=mn)
        np.fmax(mx, hi, out=mx)

    def aggregate(self, now: float) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """(counts [F, C], rows, min [F], max [F]) over the slots inside the window ending now."""
        sid = int(now // self.slot_s)
        live = (self.ids > sid - self.slots) & (self.ids <= sid)
        counts = self.counts[live].sum(axis=0).reshape(self.width, self.columns)
        mn = self.minimum[live].min(axis=0) if live.any() else np.full(self.width, np.inf)
        mx = self.maximum[live].max(axis=0) if live.any() else np.full(self.width, -np.inf)
        return counts, int(self.rows[live].sum()), mn, mx

    def nbytes(self) -> int:
        return self.counts.nbytes + self.rows.nbytes + self.minimum.nbytes + self.maximum.nbytes + self.ids.nbytes


class Sketch:
    """Live sketches of one feature set (inputs or outputs) over every configured window.

    ``add`` bins a block of rows vectorised (compare against the reference edges,
    ``bincount``, per-slot min/max) and adds it to every window's ring. The observer calls it
    with blocks of up to 256 buffered rows, never per request (see drift_observer). Rows are
    placed in slots by their own time stamps, so binning late changes nothing.
    """

    def __init__(self, profile: FeatureProfile, windows_s: tuple[float, ...], slots: int) -> None:
        self.profile = profile
        self.columns = profile.columns
        width = profile.width
        self.offsets = np.arange(width, dtype=np.int64) * self.columns
        self.rings = [WindowRing(w, slots, width, self.columns) for w in windows_s]
        self.base_s = min(windows_s) / slots

    def add(self, t: np.ndarray | float, x: np.ndarray) -> None:
        """Add a [rows, F] block observed at times ``t`` (one per row, or one for all)."""
        self._ingest(np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],)), x)

    def _ingest(self, t: np.ndarray, x: np.ndarray) -> None:
        if x.shape[1] == 0:
            return
        bins = self.profile.bin_indices(x) + self.offsets
        bid = np.floor_divide(t, self.base_s)
        for b in np.unique(bid):  # one or two base slots per flush in practice
            sel = bid == b
            xs, bs = (x, bins) if sel.all() else (x[sel], bins[sel])
            counts = np.bincount(bs.ravel(), minlength=self.offsets.size * self.columns)
            with np.errstate(invalid="ignore"):
                lo, hi = np.fmin.reduce(xs, axis=0), np.fmax.reduce(xs, axis=0)
            for ring in self.rings:
                ring.add(float(b) * self.base_s, counts, len(xs), lo, hi)

    def aggregate(self, now: float) -> list[tuple[np.ndarray, int, np.ndarray, np.ndarray]]:
        """Per window: (counts [F, C], rows, min [F], max [F]) of the window ending at ``now``."""
        return [r.aggregate(now) for r in self.rings]

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.rings)


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class FeatureScore:
    name: str
    psi: float
    p_value: float
    test: str  # "ks" | "chi2"
    significant: bool
    live_missing_rate: float
    reference_missing_rate: float

    def to_dict(self) -> dict[str, object]:
        return {"feature": self.name, "psi": round(self.psi, 6), "p_value": float(f"{self.p_value:.6g}"),
                "test": self.test, "significant": self.significant,
                "live_missing_rate": round(self.live_missing_rate, 6),
                "reference_missing_rate": round(self.reference_missing_rate, 6)}


@dataclass(frozen=True)
class WindowReport:
    """Drift of one version over one window; ``features``/``predictions`` most drifted first."""

    window: str
    seconds: float
    samples: int
    state: str
    input_score: float
    prediction_score: float
    features: tuple[FeatureScore, ...] = ()
    predictions: tuple[FeatureScore, ...] = ()
    constant_features: tuple[str, ...] = ()

    @property
    def score(self) -> float:
        return max(self.input_score, self.prediction_score)

    def to_dict(self, top: int | None = 10) -> dict[str, object]:
        feats = self.features if top is None else self.features[:top]
        return {"window": self.window, "seconds": self.seconds, "samples": self.samples, "state": self.state,
                "score": round(self.score, 6), "input_score": round(self.input_score, 6),
                "prediction_score": round(self.prediction_score, 6),
                "features": [f.to_dict() for f in feats], "predictions": [f.to_dict() for f in self.predictions],
                "constant_features": list(self.constant_features)}


@dataclass(frozen=True)
class DriftReport:
    """What ``swapserve drift MODEL`` shows: per window scores and the most drifted features."""

    model: str
    version: int
    profile_source: str
    windows: tuple[WindowReport, ...] = ()
    quality: dict[str, object] = field(default_factory=dict)
    error: str = ""  # e.g. a broken monitoring.yaml or reference file

    @property
    def state(self) -> str:
        """The worst window state ("insufficient" only when no window could be scored)."""
        if not self.windows:
            return "insufficient"
        return max((w.state for w in self.windows), key=STATES.index)

    @property
    def alert(self) -> bool:
        return self.state == "alert"

    def most_drifted(self, k: int = 10) -> list[tuple[str, str, FeatureScore]]:
        """(window, feature, score) across windows and outputs, by PSI (significant ones first)."""
        rows = [(w.window, f.name, f) for w in self.windows for f in (*w.features, *w.predictions)]
        rows.sort(key=lambda r: (not r[2].significant, -r[2].psi, r[0], r[1]))
        return rows[:k]

    def to_dict(self, top: int | None = 10) -> dict[str, object]:
        return {"model": self.model, "version": self.version, "state": self.state,
                "profile": self.profile_source, "error": self.error,
                "windows": [w.to_dict(top) for w in self.windows],
                "most_drifted": [{"window": w, **f.to_dict()} for w, _, f in self.most_drifted(top or 10)],
                "data_quality": self.quality}


def _psi_and_test(ref: FeatureProfile, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised over features: (psi [F], p [F], live rows per feature [F], live missing rate [F])."""
    width, cols = live.shape
    nb = cols - 2 + 1  # bins 0..E (the column before the missing one included)
    mask = np.arange(nb)[None, :] < ref.n_bins[:, None]
    r = ref.counts[:, :nb] * mask
    lv = live[:, :nb] * mask
    m = r.sum(axis=1).astype(np.float64)
    n = lv.sum(axis=1).astype(np.float64)
    k = ref.n_bins.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pr = np.where(mask, (r + _SMOOTH) / (m + _SMOOTH * k)[:, None], 1.0)
        pl = np.where(mask, (lv + _SMOOTH) / (n + _SMOOTH * k)[:, None], 1.0)
        psi = np.sum((pl - pr) * np.log(pl / pr), axis=1)
        # KS on binned CDFs (continuous features)
        cr = np.cumsum(r, axis=1) / np.maximum(m, 1)[:, None]
        cl = np.cumsum(lv, axis=1) / np.maximum(n, 1)[:, None]
        d = np.max(np.abs(cr - cl), axis=1)
        ne = np.where((n > 0) & (m > 0), n * m / np.maximum(n + m, 1), 0.0)
        sq = np.sqrt(ne)
        p_ks = np.where(ne > 0, stats.kstwobign.sf(d * (sq + 0.12 + 0.11 / np.maximum(sq, 1e-12))), 1.0)
        # Pearson chi-square on the 2 x bins table (categorical features)
        tot = r + lv
        used = tot > 0
        exp_r = tot * (m / np.maximum(m + n, 1))[:, None]
        exp_l = tot * (n / np.maximum(m + n, 1))[:, None]
        chi = np.where(used, (r - exp_r) ** 2 / np.where(used, exp_r, 1) + (lv - exp_l) ** 2 / np.where(used, exp_l, 1), 0)
        stat = np.where(np.isfinite(chi), chi, 0).sum(axis=1)
        dof = used.sum(axis=1) - 1
        p_chi = np.where((dof > 0) & (n > 0) & (m > 0), stats.chi2.sf(stat, np.maximum(dof, 1)), 1.0)
    p = np.where(ref.categorical, p_chi, p_ks)
    p = np.where(n > 0, p, 1.0)
    psi = np.where(n > 0, psi, 0.0)
    total = live.sum(axis=1)
    missing = np.where(total > 0, live[:, -1] / np.maximum(total, 1), 0.0)
    return psi, p, n, missing


def score_window(label: str, seconds: float, rows: int, ref_in: FeatureProfile | None, live_in: np.ndarray | None,
                 ref_out: FeatureProfile | None, live_out: np.ndarray | None, config: DriftConfig,
                 live_min: np.ndarray | None = None, live_max: np.ndarray | None = None) -> WindowReport:
    """Score one window of aggregated live counts against the reference (see the module doc)."""
    if rows < config.min_samples:
        return WindowReport(label, seconds, rows, "insufficient", 0.0, 0.0)
    parts = []
    if ref_in is not None and live_in is not None:
        parts.append((ref_in, live_in))
    if ref_out is not None and live_out is not None:
        parts.append((ref_out, live_out))
    n_tests = max(1, sum(p[0].width for p in parts))
    alpha = config.p_value / n_tests
    scored: list[list[FeatureScore]] = []
    for ref, live in parts:
        psi, p, _, miss = _psi_and_test(ref, live)
        feats = [FeatureScore(ref.names[f], float(psi[f]), float(p[f]), "chi2" if ref.categorical[f] else "ks",
                              bool(p[f] < alpha), float(miss[f]), float(ref.missing_rate[f]))
                 for f in range(ref.width)]
        feats.sort(key=lambda s: (not s.significant, -s.psi, s.name))
        scored.append(feats)
    feats_in = scored[0] if ref_in is not None and live_in is not None else []
    feats_out = scored[-1] if ref_out is not None and live_out is not None else []
    in_score = max([f.psi for f in feats_in if f.significant], default=0.0)
    out_score = max([f.psi for f in feats_out if f.significant], default=0.0)
    if in_score >= config.psi.alert or out_score >= config.prediction_psi.alert:
        state = "alert"
    elif in_score >= config.psi.warn or out_score >= config.prediction_psi.warn:
        state = "warn"
    else:
        state = "ok"
    constant: tuple[str, ...] = ()
    if ref_in is not None and live_min is not None and live_max is not None:
        stuck = (live_min == live_max) & (ref_in.maximum > ref_in.minimum)
        constant = tuple(ref_in.names[f] for f in np.nonzero(stuck)[0])
    return WindowReport(label, seconds, rows, state, in_score, out_score, tuple(feats_in), tuple(feats_out), constant)

