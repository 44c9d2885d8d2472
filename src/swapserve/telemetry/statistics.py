"""Per-version inference statistics: the one tally behind ModelStatistics and the Prometheus metrics.

Counts are exact; durations are cumulative nanoseconds (Triton semantics). The request path
only adds numbers here (no label lookups, no per-metric locks); ``swapserve.telemetry.metrics``
turns a snapshot into Triton's counters and our histograms when Prometheus scrapes. Updated
from worker threads and the event loop, so every update takes the lock (a few hundred ns).
One ``VersionStats`` lives as long as the server, across unloads and reloads of its version,
so counters never go backwards.
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Latency buckets in seconds: 100 µs .. 10 s (upper bounds; +Inf is implied).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
#: Rows per executed batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_NS = tuple(int(b * 1e9) for b in LATENCY_BUCKETS)


class Buckets:
    """A histogram's counts per bucket (not cumulative; the last is +Inf) and its sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound falls in that bucket (Prometheus' le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def copy(self) -> Buckets:
        out = Buckets(self.bounds)
        out.counts, out.total = list(self.counts), self.total
        return out


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    batch_size: int
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class StatsSnapshot:
    """A consistent copy of one version's statistics."""

    model: str
    version: str
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: list[BatchStats]
    fail_by_reason: dict[str, int] = field(default_factory=dict)
    #: Histograms, durations in ns: end-to-end of successful requests, queue wait, compute per batch.
    request_ns: Buckets | None = None
    queue_ns: Buckets | None = None
    compute_ns: Buckets | None = None
    batch_rows: Buckets | None = None


class VersionStats:
    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self._lock = threading.Lock()
        self._last_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success = Duration()
        self._fail = Duration()
        self._queue = Duration()
        self._input = Duration()
        self._infer = Duration()
        self._output = Duration()
        self._batches: dict[int, BatchStats] = {}
        self._fail_by_reason: dict[str, int] = {}
        self._request_hist = Buckets(_LATENCY_NS)
        self._queue_hist = Buckets(_LATENCY_NS)
        self._compute_hist = Buckets(_LATENCY_NS)
        self._batch_hist = Buckets(BATCH_BUCKETS)

    @property
    def last_inference_ms(self) -> int:
        """Wall-clock ms of the last finished request (0: never used)."""
        return self._last_ms

    def request_done(self, ok: bool, total_ns: int, queue_ns: int = 0, reason: str = "") -> None:
        """One finished request. A failure names its ``reason``: REJECTED (invalid request),
        BACKEND (the model raised), CANCELED (client gone or deadline passed), OTHER."""
        with self._lock:
            if ok:
                self._success.add(total_ns)
                self._queue.add(queue_ns)
                self._request_hist.observe(total_ns)
                self._queue_hist.observe(queue_ns)
            else:
                self._fail.add(total_ns)
                self._fail_by_reason[reason or "OTHER"] = self._fail_by_reason.get(reason or "OTHER", 0) + 1
            self._last_ms = int(time.time() * 1000)

    def execution(self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One executed batch of ``rows`` rows from ``requests`` requests."""
        with self._lock:
            self._inference_count += rows
            self._execution_count += 1
            # Triton attributes compute time to every request of the batch.
            self._input.add(input_ns, requests)
            self._infer.add(infer_ns, requests)
            self._output.add(output_ns, requests)
            b = self._batches.setdefault(rows, BatchStats(rows))
            b.compute_input.add(input_ns)
            b.compute_infer.add(infer_ns)
            b.compute_output.add(output_ns)
            self._compute_hist.observe(infer_ns)
            self._batch_hist.observe(rows)

    def snapshot(self) -> StatsSnapshot:
        def cp(d: Duration) -> Duration:
            return Duration(d.count, d.ns)

        with self._lock:
            return StatsSnapshot(
                self.model, self.version, self._last_ms, self._inference_count, self._execution_count,
                cp(self._success), cp(self._fail), cp(self._queue), cp(self._input), cp(self._infer), cp(self._output),
                [BatchStats(b.batch_size, cp(b.compute_input), cp(b.compute_infer), cp(b.compute_output))
                 for _, b in sorted(self._batches.items())],
                dict(self._fail_by_reason), self._request_hist.copy(), self._queue_hist.copy(),
                self._compute_hist.copy(), self._batch_hist.copy(),
            )
