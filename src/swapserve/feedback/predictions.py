"""The prediction log: what each request predicted, kept long enough to join late ground truth.

Every successful response leaves an ``Entry`` (model, version, slice, prediction, time) under
its request id; the feedback service looks it up when the client reports the true outcome.

Guarantees
----------
- ``record`` is O(1) amortised (one dict insert, one deque append, and at most as many
  evictions as it made room for), does no I/O and allocates only the entry itself.
- Memory is bounded under any traffic. ``capacity`` counts *rows* (a request of n rows takes
  n). The capacity is shared fairly between (model, version) pairs: when the log is full, the
  oldest entry of the pair holding the most rows is evicted (an entry already past the join
  window goes first), so a flood of requests to one version, or of large requests, cannot push
  out another version's pending predictions. ``on_evict`` is told of every entry evicted for
  room before any of its rows was labelled (the feedback observer counts it as ``evicted``).
  Entries older than the join ``window`` (default 1 h) are dropped as newer ones arrive. Ids longer than
  ``MAX_ID_CHARS`` are not logged (a client cannot grow an entry without bound), nor are
  requests with more rows than ``capacity``.
- Measured on CPython 3.11 (``tracemalloc``, server-style ids, single-row classification
  entries; ``tests/unit/test_predictions.py`` re-checks it): about 250 bytes per logged
  request (entry, time, dict slot, deque slot and the id string the log keeps alive; 250-290
  depending on how full the dict is), plus the eviction filter's 4 bytes per unit of capacity.
  A server id is 40 characters (the replica's 8-character tag + 32 random hex, see
  ``dataplane.RequestIds``): 8 bytes more than the untagged 32 it used to be. With the
  default capacity of 1,000,000 rows the log stays under ~295 MB (~260 MB typical). Numeric
  (regression) predictions add 24 bytes per row, multi-row requests ~8 bytes per extra row
  (32 for numbers). Size ``capacity`` as
  ``labelled requests/s x join window``.
- ``join`` tells *unknown* ids from *expired* ones: an id that is still logged but older than
  the window, or that was evicted (by age or because the log was full), is ``expired``. Evicted
  ids are remembered in a generational Bloom filter covering the last 1-2x ``capacity``
  evictions (no false negatives there; about 0.5 % of never-seen ids are reported ``expired``
  instead of ``unknown``). Ids evicted longer ago than that are ``unknown``.
- Duplicate request ids: an id already in the log is never re-recorded (``record`` returns
  False and the first prediction stays joinable); ``__contains__`` lets the request path refuse
  such a request before it runs.

Threading: designed for one thread, the server's event loop, where both the request path
(``record``) and the feedback RPC (``join``) run; it takes no locks.
"""
from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np

from swapserve.types import ModelSpec

#: Longer request ids are not logged: memory per entry must stay bounded.
MAX_ID_CHARS = 128
DEFAULT_CAPACITY = 1_000_000
DEFAULT_WINDOW_S = 3600.0

#: A row's prediction: a class id (classification), a number (regression) or None (no
#: prediction could be derived from the output; only ``correct`` flags can be joined).
Prediction = Union[int, float, None]

# -- parameters in config.pbtxt that steer feedback --------------------------------------------
PARAM_OUTPUT = "swapserve.prediction_output"
PARAM_TASK = "swapserve.task"
PARAM_SLICE = "swapserve.slice_parameter"
#: The model's declared slices: a comma-separated allowlist (any other name counts as ``other``).
PARAM_SLICES = "swapserve.slices"
DEFAULT_SLICE_PARAMETER = "slice"


class Task(str, enum.Enum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class Entry(NamedTuple):
    """One logged request. ``prediction`` is one value for a single-row request, a tuple of
    one value per row otherwise. ``labelled`` is a bit mask of the rows already joined.

    A tuple of atomic values on purpose: the garbage collector stops tracking it after its
    first pass, so a million logged entries never lengthen the full collections (an object
    with ``__slots__`` would stay tracked and make every full GC walk the whole log).
    """

    id: str
    model: str
    version: int
    slice: str
    prediction: Prediction | tuple[Prediction, ...]
    time: float
    labelled: int = 0
    #: Why the request's labels are not gate evidence ("" = they are): pinned | cohort.
    exclude: str = ""

    @property
    def rows(self) -> int:
        return len(self.prediction) if isinstance(self.prediction, tuple) else 1

    def row(self, i: int) -> Prediction:
        """The prediction of row ``i`` (IndexError when the request had fewer rows)."""
        if isinstance(self.prediction, tuple):
            return self.prediction[i]
        if i != 0:
            raise IndexError(i)
        return self.prediction


_new_entry = tuple.__new__  # skips NamedTuple's Python-level __new__ on the hot path


class Lookup(NamedTuple):
    """``status`` is "found" (``entry`` set), "unknown" or "expired" (``entry`` None)."""

    status: str
    entry: Entry | None = None


class _EvictedIds:
    """Remembers recently evicted ids in two Bloom filter generations of ``per_generation`` ids.

    An id evicted in the current or previous generation is always reported; others are
    reported with a small false-positive probability (4 hashes, >= 16 bits per id: ~0.2 %
    per full generation, ~0.5 % measured over both).
    """

    K = 4

    def __init__(self, per_generation: int) -> None:
        self.per_generation = max(1, per_generation)
        bits = 1 << max(10, (16 * self.per_generation - 1).bit_length())
        self._mask = bits - 1
        self._current = bytearray(bits >> 3)
        self._previous = bytearray(bits >> 3)
        self._added = 0

    @property
    def nbytes(self) -> int:
        return len(self._current) + len(self._previous)

    def _indices(self, key: str) -> tuple[int, int, int, int]:
        h = hash(key)
        h1, h2, mask = h & 0xFFFF_FFFF, ((h >> 32) & 0xFFFF_FFFF) | 1, self._mask
        return h1 & mask, (h1 + h2) & mask, (h1 + 2 * h2) & mask, (h1 + 3 * h2) & mask

    def add(self, key: str) -> None:
        if self._added >= self.per_generation:
            self._previous, self._current = self._current, bytearray(len(self._current))
            self._added = 0
        cur = self._current
        a, b, c, d = self._indices(key)
        cur[a >> 3] |= 1 << (a & 7)
        cur[b >> 3] |= 1 << (b & 7)
        cur[c >> 3] |= 1 << (c & 7)
        cur[d >> 3] |= 1 << (d & 7)
        self._added += 1

    def __contains__(self, key: str) -> bool:
        idx = self._indices(key)
        return any(all(bits[i >> 3] & (1 << (i & 7)) for i in idx) for bits in (self._current, self._previous))


class PredictionLog:
    """Bounded map request id -> ``Entry`` (see the module docstring for the guarantees)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, window_s: float = DEFAULT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[Entry], None] | None = None) -> None:
        if capacity <= 0 or window_s <= 0:
            raise ValueError("PredictionLog needs a positive capacity and join window")
        self.capacity = capacity
        self.window_s = window_s
        self.clock = clock
        self.on_evict = on_evict
        self._entries: dict[str, Entry] = {}
        # Ids of each (model, version) in arrival order, oldest first, and the rows they hold.
        self._queues: dict[tuple[str, int], collections.deque[str]] = {}
        self._queue_rows: dict[tuple[str, int], int] = {}
        self._rows = 0
        self._evicted = _EvictedIds(capacity)
        self._next_sweep = -float("inf")

    def __len__(self) -> int:
        """Requests currently logged (including some already past the window, dropped lazily)."""
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        """Whether ``request_id`` is logged (joinable or past the window but not yet dropped)."""
        return request_id in self._entries

    @property
    def rows(self) -> int:
        """Rows currently held; never more than ``capacity``."""
        return self._rows

    def rows_of(self, model: str, version: int) -> int:
        """Rows held for one version."""
        return self._queue_rows.get((model, version), 0)

    def record(self, request_id: str, model: str, version: int, slice: str,
               prediction: Prediction | tuple[Prediction, ...], exclude: str = "") -> bool:
        """Log a prediction; False when it is not joinable (empty/oversized id, too many rows) or
        the id is already logged (the first prediction stays)."""
        n = max(1, len(prediction) if isinstance(prediction, tuple) else 1)
        if not request_id or len(request_id) > MAX_ID_CHARS or n > self.capacity or request_id in self._entries:
            return False
        now = self.clock()
        cutoff = now - self.window_s
        key = (model, version)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
            self._queue_rows[key] = 0
        entries = self._entries
        while queue and entries[queue[0]].time < cutoff:  # this version's expired head, first
            self._evict(key, queue, False)
        if now >= self._next_sweep:  # other versions' expired heads, at most once a second
            self._next_sweep = now + 1.0
            for other_key, other in self._queues.items():
                while other and entries[other[0]].time < cutoff:
                    self._evict(other_key, other, False)
        while self._rows + n > self.capacity:
            self._evict_fairly(cutoff)
        entries[request_id] = _new_entry(Entry, (request_id, model, version, slice, prediction, now, 0, exclude))
        queue.append(request_id)
        self._queue_rows[key] += n
        self._rows += n
        return True

    def _evict_fairly(self, cutoff: float) -> None:
        """Evict one entry for room: an expired head of any version, else the oldest entry of the
        version holding the most rows."""
        victim = None
        most = -1
        for key, queue in self._queues.items():
            if not queue:
                continue
            if self._entries[queue[0]].time < cutoff:
                self._evict(key, queue, False)
                return
            rows = self._queue_rows[key]
            if rows > most:
                victim, most = key, rows
        assert victim is not None  # rows > 0 means some queue holds them
        self._evict(victim, self._queues[victim], True)

    def _evict(self, key: tuple[str, int], queue: collections.deque[str], for_room: bool) -> None:
        entry = self._entries.pop(queue.popleft())
        rows = max(1, entry.rows)
        self._rows -= rows
        self._queue_rows[key] -= rows
        self._evicted.add(entry.id)
        if for_room and not entry.labelled and self.on_evict is not None:
            self.on_evict(entry)

    def mark_labelled(self, entry: Entry, row: int) -> Entry:
        """Record that ``row`` of ``entry`` has been joined (so it joins once); returns the updated entry."""
        updated = entry._replace(labelled=entry.labelled | (1 << row))
        if self._entries.get(entry.id) is entry:
            self._entries[entry.id] = updated
        return updated

    def join(self, request_id: str) -> Lookup:
        """The logged entry of ``request_id`` if it is within the join window."""
        entry = self._entries.get(request_id)
        if entry is not None:
            if self.clock() - entry.time <= self.window_s:
                return Lookup("found", entry)
            return Lookup("expired")
        if request_id in self._evicted:
            return Lookup("expired")
        return Lookup("unknown")


# -- predictions from model outputs ------------------------------------------------------------


@dataclass(frozen=True)
class PredictionRule:
    """How one model's outputs become per-row predictions and where its slice comes from.

    - ``output``: ``swapserve.prediction_output`` in config.pbtxt parameters, else the first output.
    - ``task``: ``swapserve.task`` (classification | regression), else inferred: an output whose
      last dimension is 1 (or that is a scalar per row) is a regression, anything else a
      classification.
    - classification: argmax over the row's values (the last axis for the usual [batch, classes]
      output; outputs with more dimensions are flattened per row). A classification output with
      one value per row is read as the class id itself.
    - regression: the row's single value; a row with several values has no prediction (None).
    - ``slice_parameter``: ``swapserve.slice_parameter``, default ``slice``.
    - ``slices``: ``swapserve.slices`` (e.g. ``"round,straight,curved"``), the declared slices;
      None when the model declares none (then the first names seen are slices, up to a cap).
    """

    output: str
    task: Task
    slice_parameter: str = DEFAULT_SLICE_PARAMETER
    slices: frozenset[str] | None = None

    @classmethod
    def for_spec(cls, spec: ModelSpec) -> PredictionRule:
        params: Mapping[str, str] = spec.parameters
        name = params.get(PARAM_OUTPUT) or (spec.outputs[0].name if spec.outputs else "")
        out = spec.output(name)
        task_text = params.get(PARAM_TASK, "").strip().lower()
        if task_text in (Task.CLASSIFICATION.value, Task.REGRESSION.value):
            task = Task(task_text)
        else:
            dims = out.reshape if out is not None and out.reshape is not None else (out.dims if out else ())
            per_row = int(np.prod([d for d in dims])) if dims and all(d > 0 for d in dims) else None
            task = Task.REGRESSION if per_row == 1 or dims == () else Task.CLASSIFICATION
        slice_parameter = params.get(PARAM_SLICE) or DEFAULT_SLICE_PARAMETER
        declared = params.get(PARAM_SLICES)
        slices = None
        if declared is not None:
            names = {n.strip() for n in declared.split(",")} - {"", "overall", "other", "unlabelled"}
            slices = frozenset(n for n in names if len(n) <= 128)
        return cls(name, task, slice_parameter, slices)

    def predictions(self, outputs: Mapping[str, np.ndarray], batching: bool) -> Prediction | tuple[Prediction, ...]:
        """One prediction for an unbatched or single-row request, else a tuple of one per row.

        Returns None when the configured output is missing from ``outputs``.
        """
        arr = outputs.get(self.output)
        if arr is None:
            return None
        rows = arr.shape[0] if batching and arr.ndim > 0 else 1
        if rows == 1 and arr.size > 1 and self.task is Task.CLASSIFICATION:  # the common case, fast
            return int(arr.argmax())
        flat = arr.reshape(rows, -1)
        width = flat.shape[1]
        values: list[Prediction]
        if width == 0:
            values = [None] * rows
        elif self.task is Task.CLASSIFICATION:
            values = flat[:, 0].astype(np.int64).tolist() if width == 1 else flat.argmax(axis=1).tolist()
        elif width == 1:
            values = flat[:, 0].astype(np.float64).tolist()
        else:
            values = [None] * rows
        return values[0] if rows == 1 else tuple(values)
