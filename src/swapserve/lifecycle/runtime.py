"""A resident model version: backend + native batcher + runtime worker threads.

Request path inside a version::

    infer() (event loop) -> Batcher.submit (copies inputs, never blocks)
      -> worker thread: Batcher.next_batch (GIL released while waiting and gathering)
      -> backend.infer(batch) -> scatter rows back -> resolve each request's future

Guarantees: every submitted request is answered exactly once (result, model error,
deadline exceeded, or "version closed"); a model exception fails only the requests
it belongs to (a failing batch is re-run request by request to find them); close()
answers whatever is still queued instead of dropping it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from swapserve import dtypes
from swapserve.config import DEFAULT_MAX_QUEUE_SIZE, WORKER_POLL_US
from swapserve.errors import DeadlineExceeded, ModelExecutionError, SwapserveError, VersionNotReady
from swapserve.monitoring.metrics import Metrics
from swapserve.monitoring.statistics import VersionStats
from swapserve.native import split_rows
from swapserve.types import ModelSpec

log = logging.getLogger(__name__)


class BatchLike(Protocol):
    tickets: list[int]
    rows: list[int]
    inputs: list[np.ndarray]
    queue_ns: list[int]
    expired: list[int]


class BatcherLike(Protocol):
    def submit(self, ticket: int, rows: int, inputs: list[Any], deadline_ns: int) -> None: ...
    def next_batch(self, timeout_us: int) -> BatchLike | None: ...
    def close(self) -> None: ...
    def pending(self) -> int: ...


BatcherFactory = Callable[[int, list[int], int, int, str], BatcherLike]


class BackendLike(Protocol):
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def memory_bytes(self) -> int: ...
    def close(self) -> None: ...


@dataclass
class _Pending:
    future: asyncio.Future[tuple[dict[str, np.ndarray], int]]
    loop: asyncio.AbstractEventLoop
    shapes: list[tuple[int, ...]]
    rows: int


def _resolve(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller gave up (cancelled); nothing to deliver
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class VersionRuntime:
    """One loaded version. Create with ``start()`` (blocking: load + warm), stop with ``close()``."""

    def __init__(self, spec: ModelSpec, version: int, model_file: Path, backend: BackendLike,
                 batcher_factory: BatcherFactory, metrics: Metrics) -> None:
        self.spec = spec
        self.version = version
        self.label = str(version)
        self.model_file = model_file
        self.backend = backend
        self.metrics = metrics
        self.stats = VersionStats(spec.name, self.label)
        self._dtypes = [dtypes.numpy_dtype(t.datatype) for t in spec.inputs]
        db = spec.dynamic_batching
        variable = any(-1 in t.dims for t in spec.inputs)
        # Requests are concatenated only when the model batches and every request has the same
        # per-row shape; variable dims would make rows of different shapes, so those run one by one.
        max_rows = spec.max_batch_size if db is not None and not variable else 0
        self.batcher = batcher_factory(
            max_rows,
            list(db.preferred_batch_sizes) if db else [],
            db.max_queue_delay_us if db else 0,
            (db.max_queue_size if db and db.max_queue_size else DEFAULT_MAX_QUEUE_SIZE),
            f"model '{spec.name}' version {version}",
        )
        self._pending: dict[int, _Pending] = {}
        self._tickets = itertools.count(1)
        self._closing = False
        self._workers: list[threading.Thread] = []
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Warm the backend, then start the runtime workers. Blocking; run off the event loop."""
        self.warmup()
        for i in range(max(1, self.spec.instance_count)):
            t = threading.Thread(target=self._work, name=f"{self.spec.name}:{self.version}:w{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def warmup(self) -> None:
        """Run the config's model_warmup samples, else generated inputs at batch sizes 1 and max.

        A version takes traffic only after this returns, so the first real request never pays
        for lazy initialisation (promise 3: no cold start). A model whose config sets the
        parameter ``swapserve.warmup`` to ``false`` skips it (its first requests then pay).
        """
        if self.spec.parameters.get("swapserve.warmup", "true").strip().lower() == "false":
            return
        if self.spec.warmup:
            for sample in self.spec.warmup:
                for _ in range(sample.count):
                    self.backend.infer(dict(sample.inputs))
            return
        sizes = sorted({1, *(self.spec.dynamic_batching.preferred_batch_sizes if self.spec.dynamic_batching else ()),
                        max(1, self.spec.max_batch_size)}) if self.spec.batching else [0]
        for n in sizes:
            arrays = {}
            for t, dt in zip(self.spec.inputs, self._dtypes):
                dims = tuple(1 if d == -1 else d for d in t.dims)
                arrays[t.name] = np.zeros(((n,) if n else ()) + dims, dtype=dt)
            self.backend.infer(arrays)

    async def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until no request of this version is in flight. True when drained in time."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self.in_flight == 0

    def close(self) -> None:
        """Stop the workers; anything still queued is answered UNAVAILABLE, never dropped."""
        self._closing = True
        self.batcher.close()
        for t in self._workers:
            t.join(timeout=10)
        for ticket in list(self._pending):
            self._fail(ticket, VersionNotReady(
                f"model '{self.spec.name}' version {self.version} was unloaded before the request ran; retry"))
        self.backend.close()

    def memory_bytes(self) -> int:
        return self.backend.memory_bytes()

    # -- request path ----------------------------------------------------------------------

    async def infer(self, inputs: list[np.ndarray], rows: int, deadline_ns: int = 0) -> tuple[dict[str, np.ndarray], int]:
        """Queue one validated request (inputs in config order); returns (outputs, queue ns).

        Raises ResourceExhausted when the queue is at its bound, DeadlineExceeded when the
        deadline passed while queued, ModelExecutionError when the model raised.
        """
        if self._closing:
            raise VersionNotReady(f"model '{self.spec.name}' version {self.version} is unloading; retry")
        loop = asyncio.get_running_loop()
        ticket = next(self._tickets)
        fut: asyncio.Future[tuple[dict[str, np.ndarray], int]] = loop.create_future()
        self._pending[ticket] = _Pending(fut, loop, [a.shape for a in inputs], rows)
        self.in_flight += 1
        try:
            try:
                self.batcher.submit(ticket, rows, inputs, deadline_ns)
            except BaseException:
                self._pending.pop(ticket, None)
                raise
            return await fut
        finally:
            self.in_flight -= 1

    # -- worker side -----------------------------------------------------------------------

    def _fail(self, ticket: int, error: BaseException) -> None:
        p = self._pending.pop(ticket, None)
        if p is not None:
            p.loop.call_soon_threadsafe(_resolve, p.future, None, error)

    def _work(self) -> None:
        while True:
            batch = self.batcher.next_batch(WORKER_POLL_US)
            if batch is None:
                if self._closing:
                    return
                continue
            for ticket in batch.expired:
                self._fail(ticket, DeadlineExceeded(
                    f"model '{self.spec.name}' version {self.version}: the request's deadline passed while it "
                    "waited in the queue; raise the client timeout or add capacity"))
            if batch.tickets:
                self._run(batch)

    def _assemble(self, pend: list[_Pending], buffers: list[np.ndarray]) -> dict[str, np.ndarray]:
        total = sum(p.rows for p in pend)
        arrays = {}
        for i, (t, dt) in enumerate(zip(self.spec.inputs, self._dtypes)):
            first = pend[0].shapes[i]
            shape = (total,) + first[1:] if self.spec.batching else first
            arrays[t.name] = buffers[i].view(dt).reshape(shape)
        return arrays

    def _run(self, batch: BatchLike) -> None:
        t0 = time.perf_counter_ns()
        tickets = list(batch.tickets)
        pend = [self._pending.pop(t) for t in tickets]
        arrays = self._assemble(pend, list(batch.inputs))
        t1 = time.perf_counter_ns()
        try:
            outputs = self.backend.infer(arrays)
        except Exception as exc:  # noqa: BLE001 - the model's failure is reported to its requests
            t2 = time.perf_counter_ns()
            self._record(sum(p.rows for p in pend), len(pend), t1 - t0, t2 - t1, 0)
            self._isolate_failure(pend, arrays, exc, list(batch.queue_ns))
            return
        t2 = time.perf_counter_ns()
        try:
            results = self._scatter(pend, outputs)
        except SwapserveError as exc:  # the model returned a different number of rows than it was given
            self._record(sum(p.rows for p in pend), len(pend), t1 - t0, t2 - t1, 0)
            for p in pend:
                p.loop.call_soon_threadsafe(_resolve, p.future, None, exc)
            return
        t3 = time.perf_counter_ns()
        self._record(sum(p.rows for p in pend), len(pend), t1 - t0, t2 - t1, t3 - t2)
        for p, out, q in zip(pend, results, batch.queue_ns):
            p.loop.call_soon_threadsafe(_resolve, p.future, (out, q), None)

    @staticmethod
    def _scatter(pend: list[_Pending], tensors: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per request, views of its rows of each batched tensor (no copy)."""
        if len(pend) == 1:
            return [tensors]
        rows = [p.rows for p in pend]
        parts = {name: split_rows(arr, rows) for name, arr in tensors.items()}
        return [{name: chunks[i] for name, chunks in parts.items()} for i in range(len(pend))]

    def _record(self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.stats.execution(rows, requests, input_ns, infer_ns, output_ns)
        self.metrics.execution(self.spec.name, self.label, rows, input_ns / 1e9, infer_ns / 1e9, output_ns / 1e9)

    def _error_for(self, exc: Exception) -> SwapserveError:
        if isinstance(exc, SwapserveError):
            return exc
        return ModelExecutionError(f"model '{self.spec.name}' version {self.version} failed: {exc}")

    def _isolate_failure(self, pend: list[_Pending], arrays: dict[str, np.ndarray], exc: Exception,
                         queue_ns: list[int]) -> None:
        """A batch failed: re-run each request alone so only the guilty ones fail."""
        if len(pend) == 1:
            pend[0].loop.call_soon_threadsafe(_resolve, pend[0].future, None, self._error_for(exc))
            return
        for p, q, single in zip(pend, queue_ns, self._scatter(pend, arrays)):
            try:
                out = self.backend.infer(single)
            except Exception as one:  # noqa: BLE001
                p.loop.call_soon_threadsafe(_resolve, p.future, None, self._error_for(one))
            else:
                p.loop.call_soon_threadsafe(_resolve, p.future, (out, q), None)
