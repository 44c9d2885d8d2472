"""A resident model version: backend + native batcher + its executor (worker threads or the event loop).

Request path inside a version::

    infer() (event loop) -> Batcher.submit (copies inputs, never blocks)
      -> worker thread: Batcher.next_batch (GIL released while waiting and gathering)
      -> backend.infer(batch) -> scatter rows back -> resolve each request's future

Small models run on the event loop instead (``execution == "inline"``): handing a request
to a worker thread and its answer back costs two thread wake-ups, which on a small CPU
machine cost several times more than an MLP's forward pass. Inline, ``infer()`` submits to
the same batcher and schedules one flush per event-loop turn; the flush takes due batches
with ``next_batch(0)`` and runs them on the loop, so requests that arrive in the same turn
still share a batch, and queue bounds, deadlines and batch limits are the batcher's as
before. Chosen at start: ``swapserve.execution`` ``inline``/``thread`` in the config's
parameters, or by default (``auto``) inline when the device is the CPU, the model asks for
no queue delay, and its warmed forward pass at the largest batch takes at most
``INLINE_MAX_US`` (the loop is blocked that long per batch).

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
from swapserve.config import DEFAULT_MAX_QUEUE_BYTES, DEFAULT_MAX_QUEUE_SIZE, WORKER_POLL_US
from swapserve.errors import DeadlineExceeded, ModelExecutionError, SwapserveError, VersionNotReady
from swapserve.native import split_rows
from swapserve.telemetry.metrics import Metrics
from swapserve.types import ARRIVALS, ModelSpec

log = logging.getLogger(__name__)

#: ``auto`` runs a version on the event loop when its largest warm batch takes at most this long.
INLINE_MAX_US = 200
EXECUTION_MODES = ("auto", "inline", "thread")


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


#: (max_batch_rows, preferred_batch_rows, max_queue_delay_us, max_queue_size, max_queue_bytes, name)
BatcherFactory = Callable[[int, list[int], int, int, int, str], BatcherLike]


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


#: Hands one request its result or error: across threads, or directly on the loop's own thread.
Deliver = Callable[[_Pending, Any, "BaseException | None"], None]


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
                 batcher_factory: BatcherFactory, metrics: Metrics, device: str = "cpu",
                 max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES) -> None:
        """``max_queue_bytes``: the server's bound on queued input bytes, for a config that sets none."""
        self.spec = spec
        self.version = version
        self.label = str(version)
        self.model_file = model_file
        self.backend = backend
        self.device = device
        self.stats = metrics.stats(spec.name, self.label)
        self.execution = "thread"  # decided in start()
        self._flush_scheduled = False
        self._dtypes = [dtypes.numpy_dtype(t.datatype) for t in spec.inputs]
        #: A request may leave out an input (config ``optional``); such requests never share a batch.
        self._optional = any(t.optional for t in spec.inputs)
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
            spec.max_queue_bytes or max_queue_bytes,
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
        """Warm the backend, choose where it runs, start its workers. Blocking; run off the event loop."""
        self.warmup()
        self.execution = self._choose_execution()
        log.info("model '%s' version %d runs %s", self.spec.name, self.version,
                 "on the event loop" if self.execution == "inline" else "on worker threads")
        if self.execution == "inline":
            return
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
        if not self._warms_up:
            return
        if self.spec.warmup:
            for sample in self.spec.warmup:
                for _ in range(sample.count):
                    self.backend.infer(dict(sample.inputs))
            return
        sizes = sorted({1, *(self.spec.dynamic_batching.preferred_batch_sizes if self.spec.dynamic_batching else ()),
                        max(1, self.spec.max_batch_size)}) if self.spec.batching else [0]
        for n in sizes:
            self.backend.infer(self._zeros(n))

    @property
    def _warms_up(self) -> bool:
        return self.spec.parameters.get("swapserve.warmup", "true").strip().lower() != "false"

    def _zeros(self, rows: int) -> dict[str, np.ndarray]:
        """Generated inputs of ``rows`` rows (0: the model does not batch); variable dims are 1."""
        arrays = {}
        for t, dt in zip(self.spec.inputs, self._dtypes):
            dims = tuple(1 if d == -1 else d for d in t.dims)
            arrays[t.name] = np.zeros(((rows,) if rows else ()) + dims, dtype=dt)
        return arrays

    def _choose_execution(self) -> str:
        wanted = self.spec.parameters.get("swapserve.execution", "auto").strip().lower()
        if wanted not in EXECUTION_MODES:
            log.warning("model '%s': swapserve.execution %r is not one of %s; using auto", self.spec.name, wanted,
                        "/".join(EXECUTION_MODES))
            wanted = "auto"
        if wanted != "auto":
            return wanted
        db = self.spec.dynamic_batching
        if self.device != "cpu" or (db is not None and db.max_queue_delay_us > 0) or not self._warms_up:
            return "thread"  # a queue delay needs a waiting consumer; an unwarmed model's cost is unknown
        return "inline" if self._largest_batch_us() <= INLINE_MAX_US else "thread"

    def _largest_batch_us(self) -> float:
        """The fastest of five warm forward passes at the largest batch, in microseconds.

        The minimum, not the median: a busy machine only ever adds time, and the choice is about
        what the model itself costs.
        """
        arrays = self._zeros(max(1, self.spec.max_batch_size) if self.spec.batching else 0)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter_ns()
            try:
                self.backend.infer(arrays)
            except Exception:  # noqa: BLE001 - a model that refuses zeros is timed by its failure; run it off-loop
                return float("inf")
            best = min(best, (time.perf_counter_ns() - t0) / 1e3)
        return best

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

    async def infer(self, inputs: list[np.ndarray | None], rows: int,
                    deadline_ns: int = 0) -> tuple[dict[str, np.ndarray], int]:
        """Queue one request as ``swapserve.dataplane.validation.validate`` returned it (inputs in config order,
        None for an optional input left out); returns (outputs, queue ns).

        Raises ResourceExhausted when the queue is at its bound, DeadlineExceeded when the
        deadline passed while queued, ModelExecutionError when the model raised.
        """
        if self._closing:
            raise VersionNotReady(f"model '{self.spec.name}' version {self.version} is unloading; retry")
        if self._optional and any(a is None for a in inputs):
            return await self._run_alone(inputs, rows, deadline_ns)
        if self.execution == "inline" and self.in_flight == 0 and not self._flush_scheduled \
                and ARRIVALS.get() == 1:
            return self._run_now(inputs, rows, deadline_ns)
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
            if self.execution == "inline" and not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
            return await fut
        finally:
            self.in_flight -= 1

    async def _run_alone(self, inputs: list[np.ndarray | None], rows: int,
                         deadline_ns: int) -> tuple[dict[str, np.ndarray], int]:
        """A request that leaves out an optional input runs by itself (as Triton, which batches only
        requests with the same inputs: a batch holds one buffer per input): on the event loop when
        the version runs inline, else on a thread of the loop's default executor."""
        self.in_flight += 1
        try:
            if self.execution == "inline":
                return self._run_now(inputs, rows, deadline_ns)
            return await asyncio.to_thread(self._run_now, inputs, rows, deadline_ns)
        finally:
            self.in_flight -= 1

    def _run_now(self, inputs: list[np.ndarray | None], rows: int,
                 deadline_ns: int) -> tuple[dict[str, np.ndarray], int]:
        """Inline, idle, and the request arrived alone: there is nothing to batch it with, so run it now.

        Skips the queue, the future and two turns of the event loop; requests that arrive
        together, or while others are in flight, take the batched path.
        """
        if deadline_ns and time.monotonic_ns() >= deadline_ns:
            raise DeadlineExceeded(f"model '{self.spec.name}' version {self.version}: the request's deadline "
                                   "passed before it ran; raise the client timeout")
        t0 = time.perf_counter_ns()
        arrays = {t.name: a for t, a in zip(self.spec.inputs, inputs) if a is not None}
        try:
            outputs = self.backend.infer(arrays)
        except Exception as exc:  # noqa: BLE001 - the model's failure is this request's error
            self._record(rows, 1, 0, time.perf_counter_ns() - t0, 0)
            raise self._error_for(exc) from exc
        self._record(rows, 1, 0, time.perf_counter_ns() - t0, 0)
        return outputs, 0

    # -- executor side: a worker thread, or the event loop for inline versions ---------------

    @staticmethod
    def _deliver_threadsafe(p: _Pending, result: Any, error: BaseException | None) -> None:
        p.loop.call_soon_threadsafe(_resolve, p.future, result, error)

    @staticmethod
    def _deliver_direct(p: _Pending, result: Any, error: BaseException | None) -> None:
        _resolve(p.future, result, error)  # on the loop's own thread

    def _fail(self, ticket: int, error: BaseException, deliver: Deliver | None = None) -> None:
        p = self._pending.pop(ticket, None)
        if p is not None:
            (deliver or self._deliver_threadsafe)(p, None, error)

    def _expired(self, tickets: list[int], deliver: Deliver) -> None:
        for ticket in tickets:
            self._fail(ticket, DeadlineExceeded(
                f"model '{self.spec.name}' version {self.version}: the request's deadline passed while it "
                "waited in the queue; raise the client timeout or add capacity"), deliver)

    def _work(self) -> None:
        while True:
            batch = self.batcher.next_batch(WORKER_POLL_US)
            if batch is None:
                if self._closing:
                    return
                continue
            self._expired(list(batch.expired), self._deliver_threadsafe)
            if batch.tickets:
                self._run(batch, self._deliver_threadsafe)

    def _flush(self) -> None:
        """Inline execution: run every batch that is due now, on the event loop."""
        self._flush_scheduled = False
        while (batch := self.batcher.next_batch(0)) is not None:
            self._expired(list(batch.expired), self._deliver_direct)
            if batch.tickets:
                self._run(batch, self._deliver_direct)

    def _assemble(self, pend: list[_Pending], buffers: list[np.ndarray]) -> dict[str, np.ndarray]:
        total = sum(p.rows for p in pend)
        arrays = {}
        for i, (t, dt) in enumerate(zip(self.spec.inputs, self._dtypes)):
            first = pend[0].shapes[i]
            shape = (total,) + first[1:] if self.spec.batching else first
            arrays[t.name] = buffers[i].view(dt).reshape(shape)
        return arrays

    def _run(self, batch: BatchLike, deliver: Deliver) -> None:
        # A ticket is missing only when close() (another thread) already answered it.
        pend = [p for t in batch.tickets if (p := self._pending.pop(t, None)) is not None]
        if not pend:
            return
        try:
            self._execute(pend, batch, deliver)
        except Exception as exc:  # noqa: BLE001 - a fault of ours: fail this batch, keep the executor alive
            log.exception("model '%s' version %d: batch failed outside the model", self.spec.name, self.version)
            for p in pend:
                deliver(p, None, self._error_for(exc))  # requests already answered are skipped by _resolve

    def _execute(self, pend: list[_Pending], batch: BatchLike, deliver: Deliver) -> None:
        t0 = time.perf_counter_ns()
        arrays = self._assemble(pend, list(batch.inputs))
        t1 = time.perf_counter_ns()
        try:
            outputs = self.backend.infer(arrays)
        except Exception as exc:  # noqa: BLE001 - the model's failure is reported to its requests
            t2 = time.perf_counter_ns()
            self._record(sum(p.rows for p in pend), len(pend), t1 - t0, t2 - t1, 0)
            self._isolate_failure(pend, arrays, exc, list(batch.queue_ns), deliver)
            return
        t2 = time.perf_counter_ns()
        try:
            results = self._scatter(pend, outputs)
        except SwapserveError as exc:  # the model returned a different number of rows than it was given
            self._record(sum(p.rows for p in pend), len(pend), t1 - t0, t2 - t1, 0)
            for p in pend:
                deliver(p, None, exc)
            return
        t3 = time.perf_counter_ns()
        self._record(sum(p.rows for p in pend), len(pend), t1 - t0, t2 - t1, t3 - t2)
        for p, out, q in zip(pend, results, batch.queue_ns):
            deliver(p, (out, q), None)

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

    def _error_for(self, exc: Exception) -> SwapserveError:
        if isinstance(exc, SwapserveError):
            return exc
        return ModelExecutionError(f"model '{self.spec.name}' version {self.version} failed: {exc}")

    def _isolate_failure(self, pend: list[_Pending], arrays: dict[str, np.ndarray], exc: Exception,
                         queue_ns: list[int], deliver: Deliver) -> None:
        """A batch failed: re-run each request alone so only the guilty ones fail."""
        if len(pend) == 1:
            deliver(pend[0], None, self._error_for(exc))
            return
        for p, q, single in zip(pend, queue_ns, self._scatter(pend, arrays)):
            try:
                out = self.backend.infer(single)
            except Exception as one:  # noqa: BLE001
                deliver(p, None, self._error_for(one))
            else:
                deliver(p, (out, q), None)
