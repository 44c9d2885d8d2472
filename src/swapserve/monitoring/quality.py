"""Data-quality checks on the request path: NaN/Inf, out-of-range and constant rows.

Runs in ``on_request`` for every request, so the common case (nothing wrong) is a handful of
vectorised numpy calls over the request's elements; finding *which* element is wrong only
happens when something is. Kinds:

- ``nan`` / ``inf``: non-finite values anywhere in a floating-point input (every element, not
  only the monitored ones); per-feature counts for the monitored elements.
- ``out_of_range``: a monitored element outside the version's reference [min, max] (widened
  by ``range_margin`` x (max - min)), or outside a ``ranges`` override. Before the version has a
  profile only the overrides apply.
- ``constant``: a row in which every monitored element of an input is the same value (a
  blank image, an all-zero vector), counted only when such rows are rare (< 1%) in the
  reference; never checked before the profile exists.

Policy ``reject`` checks each request in ``on_request`` (``check``) and raises InvalidInput
for the kinds in ``reject_kinds`` (default nan, inf, out_of_range), naming the model,
version, input, flat element index, row and value; the rejected request is counted too.
Policy ``count`` only counts, and does so off the request path: the observer buffers the
monitored values of successful requests and ``check_block`` counts a whole block at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from swapserve.errors import InvalidInput
from swapserve.monitoring.monitor_config import QualityConfig
from swapserve.monitoring.profile import FeatureLayout, Profile, _as_float

KINDS = ("nan", "inf", "out_of_range", "constant")
#: A reference with fewer constant rows than this makes constant rows an issue.
CONSTANT_ROW_REFERENCE_MAX = 0.01


@dataclass
class InputCounts:
    """Cumulative data-quality counts of one input of one version."""

    rows: int = 0
    values: int = 0
    nan: int = 0
    inf: int = 0
    out_of_range: int = 0
    constant: int = 0
    rejected: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class QualitySnapshot:
    """A copy of the counts: per input, and per monitored feature (name -> kind -> count)."""

    inputs: dict[str, InputCounts]
    features: dict[str, dict[str, int]] = field(default_factory=dict)

    def top_features(self, k: int) -> list[tuple[str, str, int]]:
        """(feature, kind, count) with the largest counts first, at most k."""
        rows = [(f, kind, n) for f, kinds in self.features.items() for kind, n in kinds.items() if n]
        return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))[:k]

    def to_dict(self) -> dict[str, object]:
        return {"inputs": {k: v.as_dict() for k, v in self.inputs.items()},
                "top_features": [{"feature": f, "kind": k, "count": n} for f, k, n in self.top_features(20)]}


class QualityChecker:
    """Per-version checker. Not thread-safe by itself: the observer serialises calls."""

    def __init__(self, model: str, version: int, layout: FeatureLayout, config: QualityConfig) -> None:
        self.model, self.version, self.layout, self.config = model, version, layout, config
        width = layout.width
        self.lo = np.full(width, -np.inf)
        self.hi = np.full(width, np.inf)
        self._check_constant: dict[str, bool] = {s.name: False for s in layout.tensors}
        self._offsets: list[int] = []
        off = 0
        for s in layout.tensors:
            self._offsets.append(off)
            off += s.width
        self._apply_overrides()
        self.counts = {s.name: InputCounts() for s in layout.tensors}
        self.feature_counts = np.zeros((len(KINDS), width), dtype=np.int64)
        self._update_bounds()

    def _update_bounds(self) -> None:
        self._any_range = bool(np.isfinite(self.lo).any() or np.isfinite(self.hi).any())
        self._finite_bounds = [bool(np.isfinite(self.lo[o: o + s.width]).all() and np.isfinite(self.hi[o: o + s.width]).all())
                               for s, o in zip(self.layout.tensors, self._offsets)]

    # -- configuration ------------------------------------------------------------------------

    def _apply_overrides(self) -> None:
        for key, (lo, hi) in self.config.ranges.items():
            m = re.fullmatch(r"(.+?)(?:\[(\d+)\])?", key)
            assert m is not None
            name, element = m.group(1), m.group(2)
            for s, off in zip(self.layout.tensors, self._offsets):
                if s.name != name:
                    continue
                if element is None:
                    self.lo[off: off + s.width], self.hi[off: off + s.width] = lo, hi
                else:
                    idx = np.arange(s.elements) if s.index is None else s.index
                    hit = np.nonzero(idx == int(element))[0]
                    if hit.size:  # an element that is not monitored (subsampled away) is not range-checked
                        self.lo[off + hit[0]], self.hi[off + hit[0]] = lo, hi

    def set_profile(self, profile: Profile) -> None:
        """Use the version's reference ranges (overrides still win)."""
        ref = profile.inputs
        if ref is not None:
            span = np.nan_to_num(ref.maximum - ref.minimum)
            margin = self.config.range_margin * span
            self.lo = np.where(np.isnan(ref.minimum), -np.inf, ref.minimum - margin)
            self.hi = np.where(np.isnan(ref.maximum), np.inf, ref.maximum + margin)
            self._apply_overrides()
            self._update_bounds()
        for s in self.layout.tensors:
            rate = profile.constant_row_rate.get(s.name)
            self._check_constant[s.name] = s.width >= 2 and rate is not None and rate < CONSTANT_ROW_REFERENCE_MAX

    # -- hot path -----------------------------------------------------------------------------

    def check(self, arrays: list[np.ndarray], rows: int) -> None:
        """Count issues of one request; raise InvalidInput when the policy rejects one.

        Fast path: one ``lo <= x <= hi`` test per input, which is also false for NaN (and for
        +-Inf when both bounds are finite); only a failing test looks for what is wrong.
        """
        for i, s in enumerate(self.layout.tensors):
            off = self._offsets[i]
            a = arrays[s.position]
            c = self.counts[s.name]
            c.rows += rows
            c.values += a.size
            is_float = a.dtype.kind == "f" or s.datatype == "BF16"
            single = len(self.layout.tensors) == 1
            x = self.layout.extract(arrays, rows) if single else \
                FeatureLayout((s,), (), self.layout.categorical, ()).extract(arrays, rows)
            finite_checked = False
            if self._any_range:
                lo, hi = self.lo[off: off + s.width], self.hi[off: off + s.width]
                if not ((x >= lo) & (x <= hi)).all():
                    if is_float:
                        af = _as_float(a, s.datatype)
                        finite_checked = True
                        if not np.isfinite(af).all():
                            self._non_finite(s.name, af.reshape(rows, -1), s.index, off, c)
                    bad = (x < lo) | (x > hi)
                    if is_float:
                        bad &= np.isfinite(x)  # +-Inf counts as inf, not also as out of range
                    if bad.any():
                        self._out_of_range(s.name, x, bad, s.index, off, lo, hi, c)
                elif s.index is None and self._finite_bounds[i]:
                    finite_checked = True  # every element was inside finite bounds: all finite
            if is_float and not finite_checked:
                af = _as_float(a, s.datatype)
                if not np.isfinite(af).all():
                    self._non_finite(s.name, af.reshape(rows, -1), s.index, off, c)
            if self._check_constant[s.name]:
                if (x.max() == x.min()) if rows == 1 else (x.max(axis=1) == x.min(axis=1)).any():
                    self._constant(s.name, x, c)

    def check_block(self, x: np.ndarray) -> None:
        """Count the issues of a block of buffered rows ([rows, F] monitored values); never raises.

        The ``count`` policy uses this off the request path (the observer buffers rows and
        calls it per block), so counting costs the request nothing but a copy. It sees the
        monitored elements only (all of them unless an input exceeds ``max_features``).
        """
        rows = x.shape[0]
        if rows == 0:
            return
        for i, s in enumerate(self.layout.tensors):
            off = self._offsets[i]
            xs = x[:, off: off + s.width]
            c = self.counts[s.name]
            c.rows += rows
            c.values += xs.size
            lo, hi = self.lo[off: off + s.width], self.hi[off: off + s.width]
            if xs.dtype.kind == "f":
                finite = np.isfinite(xs)
                if not finite.all():
                    nan = np.isnan(xs)
                    inf = ~finite & ~nan
                    c.nan += int(nan.sum())
                    c.inf += int(inf.sum())
                    self.feature_counts[0, off: off + s.width] += nan.sum(axis=0)
                    self.feature_counts[1, off: off + s.width] += inf.sum(axis=0)
                    with np.errstate(invalid="ignore"):
                        bad = ((xs < lo) | (xs > hi)) & finite
                else:
                    bad = (xs < lo) | (xs > hi)
            else:
                bad = (xs < lo) | (xs > hi)
            if self._any_range and bad.any():
                c.out_of_range += int(bad.sum())
                self.feature_counts[2, off: off + s.width] += bad.sum(axis=0)
            if self._check_constant[s.name]:
                c.constant += int((xs.max(axis=1) == xs.min(axis=1)).sum())

    # -- slow paths: something is wrong -------------------------------------------------------

    def _where(self) -> str:
        return f"model '{self.model}' version {self.version}"

    def _reject(self, kind: str, c: InputCounts, message: str) -> None:
        if self.config.rejects(kind):
            c.rejected += 1
            raise InvalidInput(f"{message}; data-quality policy is reject")

    def _non_finite(self, name: str, a: np.ndarray, index: np.ndarray | None, off: int, c: InputCounts) -> None:
        nan = np.isnan(a)
        inf = np.isinf(a)
        c.nan += int(nan.sum())
        c.inf += int(inf.sum())
        sel = slice(None) if index is None else index
        width = a.shape[1] if index is None else len(index)
        self.feature_counts[0, off: off + width] += nan[:, sel].sum(axis=0)
        self.feature_counts[1, off: off + width] += inf[:, sel].sum(axis=0)
        for kind, mask in (("nan", nan), ("inf", inf)):
            if mask.any() and self.config.rejects(kind):
                row, element = (int(v) for v in np.argwhere(mask)[0])
                value = "NaN" if kind == "nan" else repr(float(a[row, element]))
                self._reject(kind, c, f"{self._where()}: input '{name}' feature {element} is {value}"
                                      f"{self._row(row, a.shape[0])}")

    def _out_of_range(self, name: str, x: np.ndarray, bad: np.ndarray, index: np.ndarray | None, off: int,
                      lo: np.ndarray, hi: np.ndarray, c: InputCounts) -> None:
        c.out_of_range += int(bad.sum())
        self.feature_counts[2, off: off + x.shape[1]] += bad.sum(axis=0)
        if self.config.rejects("out_of_range"):
            row, f = (int(v) for v in np.argwhere(bad)[0])
            element = f if index is None else int(index[f])
            self._reject("out_of_range", c,
                         f"{self._where()}: input '{name}' feature {element} is {float(x[row, f]):g}"
                         f"{self._row(row, x.shape[0])}, outside the reference range "
                         f"[{float(lo[f]):g}, {float(hi[f]):g}]")

    def _constant(self, name: str, x: np.ndarray, c: InputCounts) -> None:
        const = x.max(axis=1) == x.min(axis=1)
        c.constant += int(const.sum())
        if self.config.rejects("constant"):
            row = int(np.argmax(const))
            self._reject("constant", c, f"{self._where()}: input '{name}' is constant "
                                        f"(every element is {float(x[row, 0]):g}){self._row(row, x.shape[0])}; "
                                        f"the reference has no such rows")

    @staticmethod
    def _row(row: int, rows: int) -> str:
        return f" (row {row})" if rows > 1 else ""

    # -- control path -------------------------------------------------------------------------

    def snapshot(self) -> QualitySnapshot:
        counts = {k: InputCounts(**v.as_dict()) for k, v in self.counts.items()}
        fc = self.feature_counts.copy()
        features: dict[str, dict[str, int]] = {}
        for f in np.nonzero(fc.any(axis=0))[0]:
            features[self.layout.names[f]] = {k: int(fc[i, f]) for i, k in enumerate(KINDS) if fc[i, f]}
        return QualitySnapshot(counts, features)

    def nbytes(self) -> int:
        return self.lo.nbytes + self.hi.nbytes + self.feature_counts.nbytes
