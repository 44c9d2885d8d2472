"""Per-version inference statistics, as the ModelStatistics RPC reports them (Triton semantics).

Counts are exact; durations are cumulative nanoseconds. Updated from worker threads
and the event loop, so every update takes the lock (a few hundred ns).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


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

    @property
    def last_inference_ms(self) -> int:
        """Wall-clock ms of the last finished request (0: never used)."""
        return self._last_ms

    def request_done(self, ok: bool, total_ns: int, queue_ns: int = 0) -> None:
        with self._lock:
            (self._success if ok else self._fail).add(total_ns)
            if ok:
                self._queue.add(queue_ns)
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

    def snapshot(self) -> StatsSnapshot:
        def cp(d: Duration) -> Duration:
            return Duration(d.count, d.ns)

        with self._lock:
            return StatsSnapshot(
                self.model, self.version, self._last_ms, self._inference_count, self._execution_count,
                cp(self._success), cp(self._fail), cp(self._queue), cp(self._input), cp(self._infer), cp(self._output),
                [BatchStats(b.batch_size, cp(b.compute_input), cp(b.compute_infer), cp(b.compute_output))
                 for _, b in sorted(self._batches.items())],
            )
