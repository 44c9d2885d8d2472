"""Live quality per (model, version, slice): requests, errors, joined outcomes, latency.

The rollout controller reads it through ``snapshot`` and ``subscribe``; Prometheus reads it
through a custom collector on the injected ``CollectorRegistry``.

Slices
------
A request's slice is the value of its slice parameter (``slice`` unless the model's
config.pbtxt sets ``swapserve.slice_parameter``); absent or empty -> ``unlabelled``. A model that
declares its slices (config.pbtxt parameter ``swapserve.slices``, a comma-separated allowlist)
has exactly those; any other name counts as ``other`` and can never displace a declared one.
Without a declaration each model has at most ``max_slices`` (default 64) distinct named slices,
first come first served. Either way, names longer than ``MAX_SLICE_CHARS`` and the reserved
names ``overall`` and ``other`` count as ``other``, and every request folded into ``other`` that
way is counted (``undeclared_slice``). ``overall`` always holds every counted request of the
version. So a model has at most ``max_slices + 3`` series per version, and metric cardinality
stays bounded.

Evidence and what is excluded from it
-------------------------------------
The counters (requests, errors, outcomes, latency) are *gate evidence*: requests the router
assigned (hash of the routing key or request id) and labels from an admitted reporter. What the
client chose or cannot vouch for is counted apart, per reason, and never reaches ``snapshot``:
``EXCLUDED`` lists the (kind, reason) pairs (requests that pinned a version or matched a cohort
rule, client errors, labels of such requests, labels over a reporter's cap, repeated labels,
predictions evicted before any label). ``exclusions`` reads them; Prometheus exports them as
``swapserve_evidence_excluded_total{model, version, kind, reason}``.

Reporters
---------
Every joined label names its reporter (the feedback credential's name, or ``anonymous``).
``limit_reporters(model, share)`` (the rollout controller, at the start of each stage) starts a
fresh per-reporter budget: from then on a reporter's label on a (version, slice) counts only
while the reporter's counted labels there stay within ``share`` of all counted labels there,
plus one (``admit``: ``mine <= share * (all + 1)``; so the first label of a stage counts, and
the excess over the share is at most one label per slice). Per slice, so that a reporter cannot
concentrate its whole share on a small slice. Every label can count only when at least
``1 / share`` reporters share the work; with fewer, each reporter stalls at its share and the
rest is excluded (counted as ``reporter_cap``). ``reporters`` reads the book per version.

Counting "since"
----------------
Counters are cumulative per series. ``snapshot(model, version, since)`` subtracts a
checkpoint of those counters (latency is a fixed-bucket histogram, so it subtracts too):

- ``mark(model)`` takes a checkpoint now and returns its time: ``snapshot(..., since=that)``
  is then exact. The last ``max_marks`` (64) marks per model are kept whatever their age.
  This is what the rollout controller should use at the start of a stage.
- Besides, a checkpoint is taken automatically every ``resolution_s`` (1 s, kept for
  ``fine_horizon_s`` = 60 s) and every ``coarse_s`` (60 s, kept for ``horizon_s`` = 6 h),
  lazily on the first event after each boundary (no timer). Any other ``since`` uses the latest
  checkpoint at or before it: counts may include up to 1 s (60 s beyond the last minute) of
  traffic before ``since``, never miss any after it. A ``since`` older than every kept checkpoint
  counts from the oldest one (``horizon_s`` ago, or the first request).
- Times are ``clock()`` values, wall-clock seconds by default (``time.time``), so a restarted
  controller can pass a stage start it read from the registry (counts start at process start).

Memory: per model, one row of ``COLUMNS`` numbers per series (~800 bytes as a checkpoint) times
at most ``60 + 360 + 64`` checkpoints: ~4 MB for 2 versions x 3 slices, ~65 MB worst case for
3 versions x 67 slices. Latency p99 uses ``LATENCY_BOUNDS`` (10 us .. 60 s, 4 buckets per
octave, interpolated within the bucket: within ~9 %); only successful requests count. The
``swapserve_slice_latency_p99_seconds`` gauge covers about the last minute (the checkpoint at or
before now - ``fine_horizon_s``; up to two minutes when traffic is sparse); the other gauges
(accuracy, MAE) are cumulative since the server started, like the counters.

Threading: writes come from the event loop; ``collect`` (the metrics HTTP thread) and any
reader elsewhere take the same lock, so they see consistent rows.
"""
from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swapserve.types import ParamValue, SliceCounts

log = logging.getLogger(__name__)

OVERALL = "overall"
OTHER = "other"


class _Folded(str):
    """``resolve_slice``'s ``other`` for a name that is not a slice (undeclared, over the cap,
    reserved or too long): compares equal to ``other``; ``record_request`` counts it apart."""


#: The one instance ``resolve_slice`` returns for a folded name (recognised by identity).
_FOLDED = _Folded(OTHER)
UNLABELLED = "unlabelled"
DEFAULT_MAX_SLICES = 64
MAX_SLICE_CHARS = 128
#: Feedback outcome results, the ``result`` label of ``swapserve_feedback_outcomes_total``: joined and
#: counted as evidence, joined but excluded from gates, a repeated report, no such id, too old, malformed.
RESULTS = ("joined", "excluded", "duplicate", "unknown", "expired", "invalid")
#: Reporter of a label sent without a feedback credential (open or loopback feedback).
ANONYMOUS = "anonymous"

#: What is kept out of gate evidence, as (kind, reason): ``request`` reasons are requests not
#: counted (``undeclared_slice``: counted, but in ``other``); ``outcome`` reasons are labels not counted.
EXCLUDED: tuple[tuple[str, str], ...] = (
    ("request", "pinned"),  # the request named model_version
    ("request", "cohort"),  # a cohort rule matched a parameter the client set
    ("request", "client_error"),  # the client's own bad request (INVALID_ARGUMENT, ALREADY_EXISTS)
    ("request", "undeclared_slice"),  # counted, in ``other``: the slice name is not declared
    ("outcome", "pinned"),  # a label for a pinned request
    ("outcome", "cohort"),  # a label for a cohort-routed request
    ("outcome", "reporter_cap"),  # over the plan's max_reporter_share for its reporter
    ("outcome", "duplicate"),  # a second label for the same request row
    ("outcome", "evicted"),  # a prediction pushed out of the full log before any label
)

#: Upper bounds of the latency buckets in seconds: 10 us * 2^(i/4), up to ~60 s; plus +Inf.
LATENCY_BOUNDS: tuple[float, ...] = tuple(1e-5 * 2 ** (i / 4) for i in range(91))

# Columns of a series row: the evidence, then one counter per EXCLUDED pair, then latency buckets.
REQUESTS, ERRORS, LABELLED, CORRECT, NUMERIC, ABS_SUM, SQ_SUM = range(7)
EXCLUDED_COL = {pair: 7 + i for i, pair in enumerate(EXCLUDED)}
HIST = 7 + len(EXCLUDED)
_UNDECLARED = EXCLUDED_COL[("request", "undeclared_slice")]
COLUMNS = HIST + len(LATENCY_BOUNDS) + 1

#: ``callback(model, version, slice, kind)`` after an outcome is joined; kind: label | correct | value.
OutcomeCallback = Callable[[str, int, str, str], None]


def p99_from_histogram(counts: np.ndarray | list[float], quantile: float = 0.99) -> float | None:
    """The ``quantile`` of latencies counted in ``LATENCY_BOUNDS`` buckets (linear within a bucket)."""
    total = float(sum(counts))
    if total <= 0:
        return None
    rank = quantile * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        if seen + c >= rank:
            if i >= len(LATENCY_BOUNDS):
                return LATENCY_BOUNDS[-1]
            lo = LATENCY_BOUNDS[i - 1] if i else 0.0
            return lo + (LATENCY_BOUNDS[i] - lo) * (rank - seen) / c
        seen += c
    return LATENCY_BOUNDS[-1]


def _counts(row: np.ndarray | list[float], latency_p99: bool = True) -> SliceCounts:
    return SliceCounts(
        requests=int(row[REQUESTS]), errors=int(row[ERRORS]), labelled=int(row[LABELLED]),
        correct=int(row[CORRECT]), numeric=int(row[NUMERIC]), abs_error_sum=float(row[ABS_SUM]),
        sq_error_sum=float(row[SQ_SUM]), latency_p99_s=p99_from_histogram(row[HIST:]) if latency_p99 else None)


@dataclass
class _Checkpoint:
    time: float  # the counters held these values from ``time`` (the event before it) ...
    at: float  # ... until at least ``at`` (when it was taken: a resolution boundary or a mark)
    keys: int  # rows[:keys] existed then; later rows were zero
    data: np.ndarray


@dataclass
class _ModelState:
    """One model: its slice table, its series rows (append-only) and their checkpoints."""

    name: str
    max_slices: int
    slices: dict[str, str] = field(default_factory=dict)  # raw parameter text -> canonical name
    index: dict[tuple[int, str], int] = field(default_factory=dict)  # (version, slice) -> row
    rows: list[list[float]] = field(default_factory=list)
    fine: collections.deque[_Checkpoint] = field(default_factory=collections.deque)
    coarse: collections.deque[_Checkpoint] = field(default_factory=collections.deque)
    marks: collections.deque[_Checkpoint] = field(default_factory=collections.deque)
    last_tick: float = -math.inf
    last_event: float = -math.inf
    outcomes: list[int] = field(default_factory=lambda: [0] * len(RESULTS))
    #: The reporter budget of the current rollout stage: None = no cap.
    max_reporter_share: float | None = None
    #: (version, reporter, result) -> labels since the last ``limit_reporters``; result is
    #: ``counted`` or an outcome reason of EXCLUDED. Bounded: reporters are credentials.
    book: dict[tuple[int, str, str], int] = field(default_factory=dict)
    #: (version, slice) -> labels counted since the last ``limit_reporters`` (the budget's denominator).
    counted: dict[tuple[int, str], int] = field(default_factory=dict)
    #: (version, slice, reporter) -> that reporter's labels counted since then (the numerator).
    mine: dict[tuple[int, str, str], int] = field(default_factory=dict)
    #: (reporter, result) -> labels since the server started (Prometheus).
    by_reporter: dict[tuple[str, str], int] = field(default_factory=dict)
    #: False once a rollout ended (``limit_reporters(freeze=True)``): the book keeps its last stage.
    booking: bool = True

    def counted_in(self, version: int, slice_: str) -> tuple[list[float], ...]:
        """The rows one event counts in: its slice (``other`` for a folded one) and ``overall``."""
        if slice_ is _FOLDED:
            slice_ = OTHER
        if slice_ == OVERALL:
            return (self.row(version, OVERALL),)
        return self.row(version, slice_), self.row(version, OVERALL)

    def row(self, version: int, slice_: str) -> list[float]:
        i = self.index.get((version, slice_))
        if i is None:
            i = self.index[(version, slice_)] = len(self.rows)
            self.rows.append([0] * COLUMNS)
        return self.rows[i]

    def checkpoint(self, valid_from: float, at: float) -> _Checkpoint:
        data = np.array(self.rows, dtype=np.float64) if self.rows else np.zeros((0, COLUMNS))
        return _Checkpoint(valid_from, at, len(self.rows), data)


class SliceStats:
    """Per (model, version, slice) counters; see the module docstring for slices, ``since`` and memory."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_slices: int = DEFAULT_MAX_SLICES,
                 clock: Callable[[], float] = time.time, resolution_s: float = 1.0, fine_horizon_s: float = 60.0,
                 coarse_s: float = 60.0, horizon_s: float = 6 * 3600.0, max_marks: int = 64) -> None:
        self.max_slices = max_slices
        self.clock = clock
        self.resolution_s = resolution_s
        self.fine_horizon_s = fine_horizon_s
        self.coarse_s = coarse_s
        self.horizon_s = horizon_s
        self.max_marks = max_marks
        self._models: dict[str, _ModelState] = {}
        self._lock = threading.Lock()
        self._subscribers: list[OutcomeCallback] = []
        if registry is not None:
            registry.register(_SliceCollector(self))

    # -- the request path ---------------------------------------------------------------------

    def _model(self, model: str) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            with self._lock:
                state = self._models.setdefault(model, _ModelState(model, self.max_slices))
        return state

    def resolve_slice(self, model: str, value: ParamValue | None, declared: frozenset[str] | None = None) -> str:
        """The canonical slice name for a request's slice parameter value (bounded per model).

        With ``declared`` (the model's allowlist) only those names are slices; anything else is
        ``other``. Without, the first ``max_slices`` names are. A name folded into ``other`` is
        counted as ``undeclared_slice`` when the request is (``record_request``).
        """
        if value is None or value == "":
            return UNLABELLED
        text = value if isinstance(value, str) else str(value)
        if declared is not None:
            return text if text in declared else (UNLABELLED if text == UNLABELLED else _FOLDED)
        state = self._model(model)
        name = state.slices.get(text)
        if name is not None:
            return name
        if text in (OVERALL, OTHER) or len(text) > MAX_SLICE_CHARS:
            return _FOLDED
        if text == UNLABELLED:
            return UNLABELLED
        if len(state.slices) >= state.max_slices:
            return _FOLDED
        with self._lock:
            return state.slices.setdefault(text, text)

    def _tick(self, state: _ModelState, now: float) -> None:
        """Take the automatic checkpoint(s) due before applying an event at ``now``."""
        boundary = math.floor(now / self.resolution_s) * self.resolution_s
        if boundary > state.last_tick:
            # Nothing happened between the last event and now: the counters now are the counters
            # at every instant since that event, boundary included.
            with self._lock:
                cp = state.checkpoint(state.last_event, boundary)
                fine, coarse = state.fine, state.coarse
                fine.append(cp)
                while fine and fine[0].at < now - self.fine_horizon_s:
                    fine.popleft()
                if not coarse or boundary - coarse[-1].at >= self.coarse_s:
                    coarse.append(cp)
                while len(coarse) > 1 and coarse[0].at < now - self.horizon_s:
                    coarse.popleft()
            state.last_tick = boundary
        state.last_event = now

    def record_request(self, model: str, version: int, slice_: str, latency_s: float, error: bool = False) -> None:
        """Count one request (and its latency when it succeeded) in its slice and in ``overall``.

        ``slice_`` is what ``resolve_slice`` returned: a request folded into ``other`` is counted
        there and as ``undeclared_slice``."""
        state = self._model(model)
        self._tick(state, self.clock())
        bucket = HIST + bisect.bisect_left(LATENCY_BOUNDS, latency_s)
        folded = slice_ is _FOLDED
        for row in state.counted_in(version, slice_):
            row[REQUESTS] += 1
            if error:
                row[ERRORS] += 1
            else:
                row[bucket] += 1
            if folded:
                row[_UNDECLARED] += 1

    def exclude(self, model: str, version: int, slice_: str, kind: str, reason: str) -> None:
        """Count one request or outcome kept out of gate evidence, as the (kind, reason) of EXCLUDED."""
        col = EXCLUDED_COL[(kind, reason)]
        state = self._model(model)
        self._tick(state, self.clock())
        for row in state.counted_in(version, slice_):
            row[col] += 1

    # -- outcomes -----------------------------------------------------------------------------

    def record_outcome(self, model: str, version: int, slice_: str, kind: str, *, correct: bool | None = None,
                       error: float | None = None) -> None:
        """Count one joined outcome: ``correct`` for a label or flag, ``error`` (prediction - truth) for a value."""
        state = self._model(model)
        self._tick(state, self.clock())
        for row in state.counted_in(version, slice_):
            if correct is not None:
                row[LABELLED] += 1
                if correct:
                    row[CORRECT] += 1
            if error is not None:
                row[NUMERIC] += 1
                row[ABS_SUM] += abs(error)
                row[SQ_SUM] += error * error
        for callback in list(self._subscribers):
            try:
                callback(model, version, slice_, kind)
            except Exception:  # noqa: BLE001 - a subscriber must not break the feedback RPC
                log.exception("slice-stats subscriber %r failed", callback)

    def count_result(self, model: str, result: str, n: int = 1) -> None:
        """Count feedback results (``RESULTS``) for a model that has served requests here."""
        state = self._models.get(model)
        if state is not None:
            state.outcomes[RESULTS.index(result)] += n

    # -- reporters ----------------------------------------------------------------------------

    def limit_reporters(self, model: str, max_share: float | None, *, freeze: bool = False) -> None:
        """Start a fresh reporter book for ``model`` (a new rollout stage) with this cap (None: none).

        From now on ``admit`` counts a reporter's label on a (version, slice) only while that
        reporter's counted labels there stay within ``max_share`` of all counted there, plus one.
        ``freeze`` (a rollout ended): no cap, and the book keeps what it holds (``reporters``
        shows the last stage's) and books nothing more until the next call."""
        if max_share is not None and not 0.0 < max_share <= 1.0:
            raise ValueError(f"max_reporter_share must be in (0, 1], got {max_share}")
        state = self._model(model)
        with self._lock:
            state.max_reporter_share = max_share
            state.booking = not freeze
            if not freeze:
                state.book = {}
                state.counted = {}
                state.mine = {}

    def admit(self, model: str, version: int, slice_: str, reporter: str) -> bool:
        """Whether ``reporter``'s next label on (``version``, ``slice_``) counts as evidence under the
        current cap. Pure check: ``note_label`` records what happened to the label."""
        state = self._model(model)
        share = state.max_reporter_share
        if share is None:
            return True
        mine = state.mine.get((version, slice_, reporter), 0)
        return mine <= share * (state.counted.get((version, slice_), 0) + 1)

    def note_label(self, model: str, version: int, slice_: str, reporter: str, result: str) -> None:
        """Record one label of ``reporter`` on (``version``, ``slice_``): ``counted`` or an outcome
        reason of EXCLUDED."""
        state = self._model(model)
        with self._lock:
            rk = (reporter, result)
            state.by_reporter[rk] = state.by_reporter.get(rk, 0) + 1
            if not state.booking:
                return
            key = (version, reporter, result)
            state.book[key] = state.book.get(key, 0) + 1
            if result == "counted":
                vs = (version, slice_)
                state.counted[vs] = state.counted.get(vs, 0) + 1
                mk = (version, slice_, reporter)
                state.mine[mk] = state.mine.get(mk, 0) + 1

    def reporters(self, model: str) -> dict[str, dict[str, dict[str, int]]]:
        """Labels per reporter since the current book started: reporter -> version -> result -> n."""
        state = self._models.get(model)
        out: dict[str, dict[str, dict[str, int]]] = {}
        if state is None:
            return out
        with self._lock:
            for (version, reporter, result), n in sorted(state.book.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                out.setdefault(reporter, {}).setdefault(str(version), {})[result] = n
        return out

    def reporter_cap(self, model: str) -> float | None:
        """The cap of the current book (None: none)."""
        state = self._models.get(model)
        return state.max_reporter_share if state is not None else None

    def subscribe(self, callback: OutcomeCallback) -> Callable[[], None]:
        """Call ``callback(model, version, slice, kind)`` on the event loop after each joined outcome
        (once, with the request's own slice; ``overall`` is implied). Returns an unsubscribe function.
        Keep callbacks cheap (set a flag, wake a task): a report of 1,000 outcomes calls 1,000 times."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # -- reading ------------------------------------------------------------------------------

    def mark(self, model: str) -> float:
        """Checkpoint ``model``'s counters now; ``snapshot(model, v, since=<returned time>)`` is then exact."""
        state = self._model(model)
        now = self.clock()
        with self._lock:
            state.marks.append(state.checkpoint(now, now))
            while len(state.marks) > self.max_marks:
                state.marks.popleft()
        return now

    def _base(self, state: _ModelState, since: float) -> _Checkpoint | None:
        """The latest checkpoint at or before ``since``; else the oldest kept (None: no checkpoint yet).

        The first checkpoint of a model is taken before its first event (all zeros), so a ``since``
        before any traffic counts everything until that checkpoint ages out of ``horizon_s``.
        """
        best: _Checkpoint | None = None
        oldest: _Checkpoint | None = None
        for ring in (state.marks, state.fine, state.coarse):
            for cp in ring:
                if oldest is None or cp.at < oldest.at:
                    oldest = cp
                if cp.time <= since and (best is None or (cp.time, cp.at) > (best.time, best.at)):
                    best = cp
        return best if best is not None else oldest

    def snapshot(self, model: str, version: int, since: float | None = None) -> dict[str, SliceCounts]:
        """Counts per slice of one version (``overall`` always present), since ``since`` (None: all).

        Slices this version has not seen are absent (except ``overall``, then all zero).
        """
        state = self._models.get(model)
        if state is None:
            return {OVERALL: SliceCounts()}
        with self._lock:
            keys = {s: i for (v, s), i in state.index.items() if v == version}
            current = {s: np.array(state.rows[i], dtype=np.float64) for s, i in keys.items()}
            base = self._base(state, since) if since is not None else None
        out: dict[str, SliceCounts] = {}
        for s, row in current.items():
            i = keys[s]
            if base is not None and i < base.keys:
                row = row - base.data[i]
            out[s] = _counts(row)
        out.setdefault(OVERALL, SliceCounts())
        return out

    def exclusions(self, model: str, version: int, since: float | None = None,
                   until: float | None = None) -> dict[str, dict[str, int]]:
        """What was kept out of ``version``'s evidence since ``since`` (None: all), up to ``until``
        (None: now; else the checkpoint at or before it, within ``resolution_s``, ``coarse_s`` past
        the last minute), from ``overall``: ``{"request": {reason: n}, "outcome": {reason: n}}``
        with the nonzero reasons of EXCLUDED."""
        state = self._models.get(model)
        out: dict[str, dict[str, int]] = {"request": {}, "outcome": {}}
        if state is None:
            return out
        with self._lock:
            i = state.index.get((version, OVERALL))
            if i is None:
                return out
            row = np.array(state.rows[i], dtype=np.float64)
            end = self._base(state, until) if until is not None else None
            if end is not None:
                row = end.data[i].copy() if i < end.keys else np.zeros(COLUMNS)
            base = self._base(state, since) if since is not None else None
            if base is not None and i < base.keys:
                row = row - base.data[i]
        for (kind, reason), col in EXCLUDED_COL.items():
            if row[col]:
                out[kind][reason] = int(row[col])
        return out

    def models(self) -> list[str]:
        return sorted(self._models)

    def versions(self, model: str) -> list[int]:
        state = self._models.get(model)
        return sorted({v for v, _ in state.index}) if state else []

    # -- for the collector --------------------------------------------------------------------

    def _export(self) -> list[tuple[str, int, str, list[float], list[float] | None]]:
        """(model, version, slice, cumulative row, row about a minute ago or None) for every series."""
        now = self.clock()
        items = []
        with self._lock:
            for state in self._models.values():
                base = self._base(state, now - self.fine_horizon_s)
                for (v, s), i in state.index.items():
                    old = base.data[i].tolist() if base is not None and i < base.keys else None
                    items.append((state.name, v, s, list(state.rows[i]), old))
        return items

    def _results(self) -> list[tuple[str, list[int]]]:
        with self._lock:
            return [(s.name, list(s.outcomes)) for s in self._models.values()]

    def _reporter_results(self) -> list[tuple[str, str, str, int]]:
        with self._lock:
            return [(s.name, r, res, n) for s in self._models.values() for (r, res), n in s.by_reporter.items()]


class _SliceCollector(Collector):
    """Reads the live counters at scrape time: one series per (model, version, slice), bounded."""

    def __init__(self, stats: SliceStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version", "slice"]
        requests = CounterMetricFamily("swapserve_slice_requests", "Requests per model, version and slice", labels=labels)
        errors = CounterMetricFamily("swapserve_slice_errors", "Failed requests per model, version and slice",
                                     labels=labels)
        labelled = CounterMetricFamily("swapserve_slice_labelled",
                                       "Outcomes (labels, correct flags) joined to predictions", labels=labels)
        accuracy = GaugeMetricFamily("swapserve_slice_accuracy", "Correct / labelled since the server started",
                                     labels=labels)
        mae = GaugeMetricFamily("swapserve_slice_mae", "Mean absolute error of joined numeric targets", labels=labels)
        p99 = GaugeMetricFamily("swapserve_slice_latency_p99_seconds",
                                "p99 latency of successful requests over about the last minute", labels=labels)
        exported = self._stats._export()
        for model, version, slice_, row, old in exported:
            lv = [model, str(version), slice_]
            requests.add_metric(lv, row[REQUESTS])
            errors.add_metric(lv, row[ERRORS])
            labelled.add_metric(lv, row[LABELLED])
            if row[LABELLED]:
                accuracy.add_metric(lv, row[CORRECT] / row[LABELLED])
            if row[NUMERIC]:
                mae.add_metric(lv, row[ABS_SUM] / row[NUMERIC])
            hist = row[HIST:] if old is None else [a - b for a, b in zip(row[HIST:], old[HIST:])]
            value = p99_from_histogram(hist)
            if value is not None:
                p99.add_metric(lv, value)
        yield from (requests, errors, labelled, accuracy, mae, p99)
        excluded = CounterMetricFamily(
            "swapserve_evidence_excluded",
            "Requests and outcomes kept out of rollout-gate evidence (or folded into 'other'), by reason",
            labels=["model", "version", "kind", "reason"])
        totals: dict[tuple[str, str, str, str], float] = {}
        for model, version, slice_, row, _ in exported:
            if slice_ != OVERALL:
                continue
            for (kind, reason), col in EXCLUDED_COL.items():
                totals[(model, str(version), kind, reason)] = row[col]
        for lv, n in sorted(totals.items()):
            excluded.add_metric(list(lv), n)
        yield excluded
        outcomes = CounterMetricFamily("swapserve_feedback_outcomes",
                                       "Reported outcomes by result (joined, excluded, duplicate, unknown, expired, "
                                       "invalid)", labels=["model", "result"])
        for model, counts in self._stats._results():
            for result, n in zip(RESULTS, counts):
                outcomes.add_metric([model, result], n)
        yield outcomes
        reporters = CounterMetricFamily("swapserve_feedback_reporter_labels",
                                        "Joined labels per reporter (feedback credential) by what became of them: "
                                        "counted, or the reason it was excluded", labels=["model", "reporter", "result"])
        for model, reporter, result, n in self._stats._reporter_results():
            reporters.add_metric([model, reporter, result], n)
        yield reporters
