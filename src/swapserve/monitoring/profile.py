"""Reference profiles: what a version's inputs and outputs looked like when it was built.

**Features.** A feature is one flattened element of a numeric input tensor (digits: the 64
pixels of ``pixels``, named ``pixels[0]`` .. ``pixels[63]``). BYTES inputs and inputs with a
variable (-1) dimension are not monitored. At most ``profile.max_features`` elements are
monitored across all inputs (default 256): an input with more elements than its share
(shares are proportional to element counts) is subsampled at evenly spaced flat indices, so
a 1x32x32 image keeps every 4th pixel. The names keep the original flat index. BF16 inputs
are widened to float32 first.

**Outputs.** An output whose elements form one vector of K >= 2 floats (``dims: [K]``) is a
classifier head: its feature is the predicted class (argmax), categorical with K classes,
named ``probabilities:class``. Any other numeric output contributes up to 16 continuous
elements (``name[i]``), so a regressor's prediction quantiles are profiled the same way
inputs are.

**Reference file format** (``<version dir>/reference.npz``, the file name is configurable):
one array per config input name, shaped ``[n, *dims]`` (n reference rows, the batch
dimension first also for models without batching), a sample of the *training inputs* of
that version; optionally one array per config output name, shaped ``[n, *dims]``, holding
the model's outputs on those rows (without them the output distribution is captured from
the first ``profile.capture`` responses). Files with fewer than ``profile.min_reference_rows``
rows (e.g. the 8-row smoke samples of older builds) are ignored and the profile is captured
from live traffic instead. A file with the right names but wrong shapes is a ConfigError.

**Profile contents** per feature: quantile bin edges (``profile.bins`` quantile bins,
duplicates merged; a feature with at most ``bins`` distinct values gets one bin per value; a
classifier output one bin per class), plus an edge at the reference max and one just below
the min, so values outside the reference range fall in bins of their own; the reference
count per bin, min/max, and the missing (NaN) rate; per input, the share of constant rows.
Everything is float64/int64 arrays of ``features x (bins + 4)``: a few KB per version.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swapserve.errors import ConfigError
from swapserve.types import ModelSpec, TensorSpec

#: Continuous elements monitored per non-classifier output.
MAX_OUTPUT_ELEMENTS = 16
_NUMERIC = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64", "BF16"}


def _as_float(arr: np.ndarray, datatype: str) -> np.ndarray:
    if datatype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


@dataclass(frozen=True)
class TensorSelection:
    """The monitored elements of one tensor: ``index`` into its flattened elements (None: all)."""

    position: int  # index in the config's input (or output) list
    name: str
    datatype: str
    elements: int
    index: np.ndarray | None
    classifier: bool = False  # outputs only: the feature is argmax over the elements

    @property
    def width(self) -> int:
        if self.classifier:
            return 1
        return self.elements if self.index is None else len(self.index)

    def feature_names(self) -> list[str]:
        if self.classifier:
            return [f"{self.name}:class"]
        idx = range(self.elements) if self.index is None else self.index.tolist()
        return [f"{self.name}[{i}]" for i in idx]


def _elements(t: TensorSpec) -> int | None:
    if any(d < 0 for d in t.dims):  # the wire shape (dims), not reshape, is what clients send
        return None
    return math.prod(t.dims) if t.dims else 1


def _subsample(n: int, k: int) -> np.ndarray | None:
    if k >= n:
        return None
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


@dataclass(frozen=True)
class FeatureLayout:
    """How to turn request tensors into a [rows, features] float matrix (inputs or outputs)."""

    tensors: tuple[TensorSelection, ...]
    names: tuple[str, ...]
    categorical: np.ndarray  # bool [F]: classifier outputs
    n_classes: tuple[int, ...]  # per feature: K for categorical, 0 otherwise

    @property
    def width(self) -> int:
        return len(self.names)

    @staticmethod
    def for_inputs(spec: ModelSpec, max_features: int) -> FeatureLayout:
        candidates = [(i, t, _elements(t)) for i, t in enumerate(spec.inputs) if t.datatype in _NUMERIC]
        candidates = [(i, t, n) for i, t, n in candidates if n]
        total = sum(n for _, _, n in candidates)
        sels = []
        for i, t, n in candidates:
            assert n is not None
            share = n if total <= max_features else max(1, (max_features * n) // total)
            sels.append(TensorSelection(i, t.name, t.datatype, n, _subsample(n, share)))
        return FeatureLayout._make(sels, {})

    @staticmethod
    def for_outputs(spec: ModelSpec) -> FeatureLayout:
        sels = []
        classes: dict[str, int] = {}
        for i, t in enumerate(spec.outputs):
            n = _elements(t)
            if t.datatype not in _NUMERIC or not n:
                continue
            vector = [d for d in t.dims if d != 1]
            if t.datatype.startswith(("FP", "BF")) and len(vector) == 1 and vector[0] >= 2:
                sels.append(TensorSelection(i, t.name, t.datatype, n, None, classifier=True))
                classes[t.name] = n
            else:
                sels.append(TensorSelection(i, t.name, t.datatype, n, _subsample(n, MAX_OUTPUT_ELEMENTS)))
        return FeatureLayout._make(sels, classes)

    @staticmethod
    def _make(sels: list[TensorSelection], classes: dict[str, int]) -> FeatureLayout:
        names: list[str] = []
        cat: list[bool] = []
        ncls: list[int] = []
        for s in sels:
            names += s.feature_names()
            cat += [s.classifier] * s.width
            ncls += [classes.get(s.name, 0) if s.classifier else 0] * s.width
        return FeatureLayout(tuple(sels), tuple(names), np.array(cat, dtype=bool), tuple(ncls))

    def extract(self, arrays: list[np.ndarray], rows: int) -> np.ndarray:
        """[rows, F] matrix of the monitored elements (a view when possible; never modified)."""
        parts = []
        for s in self.tensors:
            a = _as_float(arrays[s.position], s.datatype).reshape(rows, -1)
            if s.classifier:
                parts.append(a.argmax(axis=1)[:, None])
            elif s.index is None:
                parts.append(a)
            else:
                parts.append(a[:, s.index])
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.zeros((rows, 0), dtype=np.float32)
        return np.concatenate([p.astype(np.float64, copy=False) for p in parts], axis=1)

    def extract_outputs(self, outputs: dict[str, np.ndarray], rows: int) -> np.ndarray:
        """Like ``extract`` for a name -> array mapping (the dataplane's outputs)."""
        parts = []
        for s in self.tensors:
            a = _as_float(outputs[s.name], s.datatype).reshape(rows, -1)
            if s.classifier:
                parts.append(a.argmax(axis=1)[:, None])
            else:
                parts.append(a if s.index is None else a[:, s.index])
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p.astype(np.float64, copy=False) for p in parts], axis=1)

    def extract_by_name(self, by_name: dict[str, np.ndarray], rows: int) -> np.ndarray:
        arrays: list[np.ndarray] = []
        positions = {}
        for s in self.tensors:
            if s.name not in by_name:
                raise KeyError(s.name)
            positions[s.name] = len(arrays)
            arrays.append(by_name[s.name])
        remapped = FeatureLayout(
            tuple(TensorSelection(positions[s.name], s.name, s.datatype, s.elements, s.index, s.classifier)
                  for s in self.tensors), self.names, self.categorical, self.n_classes)
        return remapped.extract(arrays, rows)


@dataclass
class FeatureProfile:
    """Reference distribution of one feature set (inputs or outputs).

    ``edges`` is [F, E] (padded with +inf); a value x falls in bin ``#(edges < x)``, so bin i
    holds ``edges[i-1] < x <= edges[i]`` and values above the last edge share the last bin.
    ``counts`` is [F, E + 2]: bins 0..E, then the missing (NaN) column.
    """

    names: tuple[str, ...]
    categorical: np.ndarray
    edges: np.ndarray
    n_bins: np.ndarray  # int [F]: usable bins of each feature
    counts: np.ndarray  # int64 [F, E + 2]
    rows: int
    minimum: np.ndarray
    maximum: np.ndarray
    missing_rate: np.ndarray

    @property
    def width(self) -> int:
        return len(self.names)

    @property
    def columns(self) -> int:
        return int(self.counts.shape[1])

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.edges, self.n_bins, self.counts, self.minimum, self.maximum,
                                      self.missing_rate, self.categorical))

    def bin_indices(self, x: np.ndarray) -> np.ndarray:
        """int [rows, F] bin of each value; NaN -> the missing column."""
        bins = (x[:, :, None] > self.edges).sum(axis=2)
        # NaN compares false (bin 0): move it to the missing column. One reduction tells whether
        # there is any NaN (a NaN or +-Inf makes the sum non-finite); only then look closer. Finite
        # values near the dtype's limit overflow the sum too: expected, so numpy is not to warn
        # (a client's inputs must not print RuntimeWarnings in the server's log).
        with np.errstate(over="ignore", invalid="ignore"):
            total = x.sum()
        if x.dtype.kind == "f" and not math.isfinite(total):
            nan = np.isnan(x)
            if nan.any():
                bins[nan] = self.columns - 1
        return bins

    def to_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "features": [
            {"name": n, "categorical": bool(c), "min": float(lo), "max": float(hi), "missing_rate": float(m),
             "edges": [float(e) for e in edges[: nb - 1]]}
            for n, c, lo, hi, m, edges, nb in zip(self.names, self.categorical, self.minimum, self.maximum,
                                                   self.missing_rate, self.edges, self.n_bins)]}


def build_profile(x: np.ndarray, layout: FeatureLayout, bins: int) -> FeatureProfile:
    """Profile a [rows, F] reference matrix (NaN = missing; +-Inf are treated as missing too)."""
    x = np.asarray(x, dtype=np.float64)
    rows, width = x.shape
    x = np.where(np.isfinite(x), x, np.nan)
    q = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edge_lists: list[np.ndarray] = []
    for f in range(width):
        col = x[:, f]
        col = col[~np.isnan(col)]
        if layout.n_classes[f]:
            e = np.arange(layout.n_classes[f] - 1, dtype=np.float64)  # class c -> bin c
        elif col.size == 0:
            e = np.zeros(0)
        else:
            # One bin per value when there are few; else quantile bins. The reference max is
            # always an edge and a sliver below the min is too, so values outside the reference
            # range land in bins of their own (empty in the reference).
            distinct = np.unique(col)
            inner = distinct if distinct.size <= bins else np.unique(np.append(np.quantile(col, q), distinct[-1]))
            e = np.concatenate([[np.nextafter(distinct[0], -np.inf)], inner])
        edge_lists.append(e)
    width_e = max([len(e) for e in edge_lists] + [1])
    edges = np.full((width, width_e), np.inf)
    for f, e in enumerate(edge_lists):
        edges[f, : len(e)] = e
    n_bins = np.array([len(e) + 1 for e in edge_lists], dtype=np.int64)
    prof = FeatureProfile(
        names=layout.names, categorical=layout.categorical.copy(), edges=edges, n_bins=n_bins,
        counts=np.zeros((width, width_e + 2), dtype=np.int64), rows=rows,
        minimum=np.full(width, np.nan), maximum=np.full(width, np.nan), missing_rate=np.zeros(width))
    if rows:
        finite_any = ~np.all(np.isnan(x), axis=0)
        prof.minimum[finite_any] = np.nanmin(x[:, finite_any], axis=0)
        prof.maximum[finite_any] = np.nanmax(x[:, finite_any], axis=0)
        prof.missing_rate = np.isnan(x).mean(axis=0)
        b = prof.bin_indices(x)
        flat = (b + np.arange(width)[None, :] * prof.columns).ravel()
        prof.counts = np.bincount(flat, minlength=width * prof.columns).reshape(width, prof.columns)
    return prof


@dataclass
class Profile:
    """A version's reference: input features, output features, and where they came from."""

    inputs: FeatureProfile | None = None
    outputs: FeatureProfile | None = None
    source: str = ""  # "reference.npz (1257 rows)" | "captured (first 1000 requests)" | ...
    constant_row_rate: dict[str, float] = field(default_factory=dict)  # per input name

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in (self.inputs, self.outputs) if p is not None)


@dataclass
class ReferenceSample:
    """The arrays of a reference file, validated against the model config."""

    inputs: list[np.ndarray] | None
    outputs: dict[str, np.ndarray] | None
    rows: int
    path: Path


def _check_shape(where: str, name: str, arr: np.ndarray, t: TensorSpec) -> None:
    dims = tuple(arr.shape[1:])
    ok = len(dims) == len(t.dims) and all(e == -1 or e == g for e, g in zip(t.dims, dims))
    if arr.ndim < 1 or not ok:
        raise ConfigError(f"{where}: array '{name}' has shape {list(arr.shape)}, expected "
                          f"[n, {', '.join(map(str, t.dims))}] (n reference rows first)")


def load_reference(path: Path, spec: ModelSpec, version: int) -> ReferenceSample | None:
    """Read a reference file; None when it does not exist.

    Input arrays are all-or-nothing (a file missing one input name has no usable inputs);
    outputs are optional. Raises ConfigError for unreadable files, wrong shapes and arrays
    that disagree on the number of rows.
    """
    if not path.is_file():
        return None
    where = f"model '{spec.name}' version {version}: {path}"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - zip/npy errors have many types
        raise ConfigError(f"{where} is not a readable .npz file: {exc}") from None
    rows: set[int] = set()
    inputs: list[np.ndarray] | None = []
    for t in spec.inputs:
        if t.name not in arrays:
            inputs = None
            break
        _check_shape(where, t.name, arrays[t.name], t)
        rows.add(int(arrays[t.name].shape[0]))
        assert inputs is not None
        inputs.append(arrays[t.name])
    outputs: dict[str, np.ndarray] = {}
    for t in spec.outputs:
        if t.name in arrays:
            _check_shape(where, t.name, arrays[t.name], t)
            rows.add(int(arrays[t.name].shape[0]))
            outputs[t.name] = arrays[t.name]
    if len(rows) > 1:
        raise ConfigError(f"{where}: arrays disagree on the number of rows {sorted(rows)}; "
                          f"every array needs the same first dimension")
    return ReferenceSample(inputs, outputs or None, rows.pop() if rows else 0, path)


def constant_row_rate(arrays: list[np.ndarray], layout: FeatureLayout, rows: int) -> dict[str, float]:
    """Per monitored input: the share of rows whose monitored elements are all equal."""
    out: dict[str, float] = {}
    for s in layout.tensors:
        if s.width < 2 or rows == 0:
            out[s.name] = 0.0
            continue
        a = FeatureLayout((s,), (), np.zeros(0, bool), ()).extract(arrays, rows)
        out[s.name] = float(np.mean(a.max(axis=1) == a.min(axis=1)))  # NaN rows compare unequal
    return out
