"""Fakes shared by the unit tests: a clock, a backend and its loader, a batcher, a native front end.

Each fake keeps the contract of what it stands in for (the docstrings say which) and records
what was done to it, so that tests can assert behaviour without reading private attributes.
None of them opens a socket or starts a thread of its own.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from swapserve import dtypes, errors
from swapserve.backends.base import Backend, batch_size, check_model_file
from swapserve.types import ModelSpec

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NS = 1_000_000_000


class FakeClock:
    """Time that moves only when a test moves it: ``clock.t += 5`` or ``clock.advance(5)``.

    ``clock()`` returns seconds as a float, like ``time.time`` (what ``SliceStats``,
    ``PredictionLog``, the monitors and the rollout controller take). ``step`` seconds are added
    after every reading, so that consecutive readings are distinct and ordered. ``clock.utc``
    reads the same time as an aware ``datetime`` (what ``Registry(clock=...)`` takes), so one
    clock can drive the registry and the controller together.

    Time is kept in integer nanoseconds, so steps add up exactly. Thread-safe: the registry
    reads it from worker threads.
    """

    def __init__(self, t: float = 1000.0, step: float = 0.0) -> None:
        self._ns = round(t * _NS)
        self._step_ns = round(step * _NS)
        self._lock = threading.Lock()

    @property
    def t(self) -> float:
        """The current time in seconds (reading it does not step)."""
        return self._ns / _NS

    @t.setter
    def t(self, value: float) -> None:
        with self._lock:
            self._ns = round(value * _NS)

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds``; returns the new time."""
        with self._lock:
            self._ns += round(seconds * _NS)
            return self._ns / _NS

    def __call__(self) -> float:
        with self._lock:
            now = self._ns
            self._ns += self._step_ns
        return now / _NS

    def utc(self) -> datetime:
        """``self()`` as an aware UTC datetime (steps like a float reading)."""
        with self._lock:
            now = self._ns
            self._ns += self._step_ns
        return _EPOCH + timedelta(microseconds=now // 1000)


# --------------------------------------------------------------------------- backends

#: A fake model: inputs (config names -> arrays, batch first when the model batches) -> outputs.
ModelFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
#: Decides whether a batch fails: True -> the model raises (``FakeBackend`` docs).
FailFn = Callable[[Mapping[str, np.ndarray]], bool]


def scaled_model(factor: float, output: str = "y") -> ModelFn:
    """A model answering ``output = factor * first input``: versions tell themselves apart by it."""

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = next(iter(inputs.values()))
        return {output: (first * factor).astype(first.dtype)}

    return run


class FakeBackend(Backend):
    """A ``Backend`` (swapserve.backends.base) whose model is a Python function.

    - ``fn``: computes outputs from the inputs (``scaled_model(k)``: ``y = k * x``); outputs it
      leaves out are zeros of the config's shape.
    - ``fail``: ``True`` fails every batch; a callable fails the batches it returns True for
      (e.g. those that contain a poisoned row). A failure raises ``RuntimeError`` as a real
      model would, with the message ``fake model failure``.
    - ``latency_s``: each batch sleeps that long (real time: use it for worker threads only).
    - ``rows``: outputs are cut to this many rows (a model that returns the wrong batch size).
    - ``memory``: what ``memory_bytes`` reports (default: the model file's size, which is
      what the lifecycle's budget estimates before a load).
    - ``gate``: a ``threading.Event`` every batch waits on (block a worker thread at will).

    Records ``batches`` (the rows of every call, warmup included) and ``closed``.
    Thread-safe like a real backend: ``infer`` may run on several threads at once.
    """

    platform: ClassVar[str] = "pytorch_libtorch"
    backend_name: ClassVar[str] = "pytorch"
    default_filename: ClassVar[str] = "model.pt"

    def __init__(self, spec: ModelSpec, *, fn: ModelFn | None = None, fail: bool | FailFn = False,
                 latency_s: float = 0.0, rows: int | None = None, memory: int = 1 << 20,
                 gate: threading.Event | None = None, model_file: Path | None = None) -> None:
        self.spec = spec
        self.fn = fn
        self.fail = fail
        self.latency_s = latency_s
        self.rows = rows
        self.memory = memory
        self.gate = gate
        self.model_file = model_file
        self.batches: list[int | None] = []
        self.closed = False
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: ModelSpec, model_file: Path, device: str) -> FakeBackend:
        path = check_model_file(spec, model_file)
        return cls(spec, memory=path.stat().st_size, model_file=path)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.closed:
            raise errors.VersionNotReady(f"model '{self.spec.name}' is closed")
        n = batch_size(self.spec, inputs)
        with self._lock:
            self.batches.append(n)
        if self.gate is not None:
            self.gate.wait(30)
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.fail is True or (callable(self.fail) and self.fail(inputs)):
            raise RuntimeError("fake model failure")
        out = dict(self.fn(inputs)) if self.fn is not None else {}
        for o in self.spec.outputs:
            if o.name not in out:
                lead = (n,) if n is not None else ()
                dims = tuple(1 if d < 0 else d for d in o.dims)
                out[o.name] = np.zeros(lead + dims, dtype=dtypes.numpy_dtype(o.datatype))
        if self.rows is not None:
            out = {k: v[: self.rows] for k, v in out.items()}
        return out

    def memory_bytes(self) -> int:
        return self.memory

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeModelBehaviour:
    """How the backends a ``FakeLoader`` builds for one version behave (see ``FakeBackend``)."""

    fn: ModelFn | None = None
    fail: bool | FailFn = False
    latency_s: float = 0.0
    memory: int | None = None
    #: Raised by the load itself (a file that is not a model, a config that disagrees).
    load_error: Exception | None = None
    #: The load waits for this event (to observe what serves while a version loads).
    load_gate: threading.Event | None = None


class FakeLoader:
    """A ``BackendLoader`` for ``ModelManager``: every load returns a new ``FakeBackend``.

    Behaviour is set per version number (the name of the version directory) through
    ``behave(version, ...)``; ``loaded`` lists every backend built, in order.
    """

    def __init__(self) -> None:
        self.behaviour: dict[int, FakeModelBehaviour] = {}
        self.loaded: list[FakeBackend] = []
        self.loads: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def behave(self, version: int, **kw: Any) -> FakeModelBehaviour:
        b = self.behaviour[version] = FakeModelBehaviour(**kw)
        return b

    def __call__(self, spec: ModelSpec, model_file: Path, device: str) -> FakeBackend:
        version = int(Path(model_file).parent.name)
        b = self.behaviour.get(version, FakeModelBehaviour())
        with self._lock:
            self.loads.append((spec.name, version))
        if b.load_gate is not None:
            b.load_gate.wait(30)
        if b.load_error is not None:
            raise b.load_error
        backend = FakeBackend.load(spec, model_file, device)
        backend.fn, backend.fail, backend.latency_s = b.fn, b.fail, b.latency_s
        if b.memory is not None:
            backend.memory = b.memory
        with self._lock:
            self.loaded.append(backend)
        return backend

    def backends(self, version: int) -> list[FakeBackend]:
        """Every backend built for ``version`` (the last one is the live one)."""
        return [b for b in self.loaded if b.model_file is not None and int(b.model_file.parent.name) == version]


def write_model(repo: Path, name: str = "m", versions: tuple[int, ...] = (1,), *, max_batch_size: int = 8,
                dims: int = 4, extra: str = "", size: int = 1000) -> Path:
    """A Triton-style model directory for the fake backend: input ``x`` and output ``y``, FP32 ``[dims]``.

    Each version directory holds a ``model.pt`` of ``size`` bytes whose content differs per
    version (the registry hashes it). ``extra`` is appended to config.pbtxt.
    """
    model = repo / name
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(
        f'name: "{name}"\nplatform: "pytorch_libtorch"\nmax_batch_size: {max_batch_size}\n'
        f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n'
        f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n' + extra)
    for v in versions:
        d = model / str(v)
        d.mkdir(exist_ok=True)
        body = f"fake model {name} v{v}\n".encode()
        (d / "model.pt").write_bytes(body + b"\0" * max(0, size - len(body)))
    return model


# --------------------------------------------------------------------------- batcher


@dataclass
class FakeBatch:
    """A ``BatchLike``: what ``Batcher.next_batch`` hands the runtime."""

    tickets: list[int]
    rows: list[int]
    inputs: list[np.ndarray]
    queue_ns: list[int]
    expired: list[int]


class FakeBatcher:
    """A ``BatcherLike`` that keeps requests until the test releases them.

    ``submit`` queues (``ResourceExhausted`` beyond ``max_queue``, ``VersionNotReady`` once
    closed). ``next_batch`` returns None until ``release()``; then one batch of everything
    queued, inputs concatenated per input as ``uint8`` as the native batcher does. ``close``
    wakes consumers but hands out nothing unreleased: a batcher whose requests are stuck, to
    check that their callers are still answered.
    """

    def __init__(self, max_rows: int = 0, preferred: list[int] | None = None, delay_us: int = 0,
                 max_queue: int = 0, max_queue_bytes: int = 0, name: str = "") -> None:
        self.name = name
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes  # recorded, not enforced (the native batcher's tests do)
        self.closed = False
        #: (ticket, rows) of every accepted submit, in order.
        self.submitted: list[tuple[int, int]] = []
        self._queue: list[tuple[int, int, list[np.ndarray]]] = []
        self._released = False
        self._wake = threading.Condition()

    def submit(self, ticket: int, rows: int, inputs: list[Any], deadline_ns: int) -> None:
        with self._wake:
            if self.closed:
                raise errors.VersionNotReady(f"{self.name} is closed")
            if self.max_queue and len(self._queue) >= self.max_queue:
                raise errors.ResourceExhausted(f"{self.name}: queue full ({self.max_queue})")
            self._queue.append((ticket, rows, [np.ascontiguousarray(a).view(np.uint8).ravel().copy()
                                               for a in inputs]))
            self.submitted.append((ticket, rows))
            self._wake.notify_all()

    def release(self) -> None:
        """Let the next ``next_batch`` return what is queued."""
        with self._wake:
            self._released = True
            self._wake.notify_all()

    def next_batch(self, timeout_us: int) -> FakeBatch | None:
        with self._wake:
            self._wake.wait_for(lambda: self.closed or (self._released and bool(self._queue)),
                                None if timeout_us < 0 else timeout_us / 1e6)
            if not self._released or not self._queue:
                return None
            queue, self._queue, self._released = self._queue, [], False
        inputs = [np.concatenate([q[2][i] for q in queue]) for i in range(len(queue[0][2]))]
        return FakeBatch([q[0] for q in queue], [q[1] for q in queue], inputs, [0] * len(queue), [])

    def close(self) -> None:
        with self._wake:
            self.closed = True
            self._wake.notify_all()

    def pending(self) -> int:
        with self._wake:
            return len(self._queue)


# --------------------------------------------------------------------------- native front end


@dataclass
class Finished:
    """How a fake front end saw a call end."""

    code: int
    details: str
    last: bytes | None


class FakeFrontend:
    """Stands in for ``swapserve._frontend.Frontend`` (the grpc++ front end) without a socket.

    The test plays the client: ``message``/``half_close``/``cancel`` queue events and wake the
    event loop through a pipe (where the real one uses an eventfd), so ``NativeServer`` reads
    them with ``drain`` exactly as it reads grpc++'s. What the server answers is recorded:
    ``finished[call_id]``, ``written[call_id]`` (streamed messages), ``reads[call_id]`` (how many
    further messages it asked for). ``hold(call_id)`` makes writes to a call answer FULL (a
    client that does not read) until ``writable(call_id)`` sends WRITABLE. ``start`` returns
    ``port``; the front end is never polled.
    """

    MESSAGE: ClassVar[int] = 0
    HALF_CLOSE: ClassVar[int] = 1
    CANCELLED: ClassVar[int] = 2
    WRITABLE: ClassVar[int] = 3
    WRITE_QUEUED: ClassVar[int] = 1
    WRITE_FULL: ClassVar[int] = 2

    def __init__(self, address: str, max_message_bytes: int, port: int = 50051) -> None:
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.port = port
        self.started = False
        self.stopped_with: float | None = None
        self.finished: dict[int, Finished] = {}
        self.written: dict[int, list[bytes]] = {}
        self.reads: dict[int, int] = {}
        self.held: set[int] = set()
        self._events: list[tuple[int, int, str, bytes, int]] = []
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)

    # -- what NativeServer calls ---------------------------------------------------------------

    def start(self, polled: bool = False) -> int:
        if polled:
            raise RuntimeError("the fake front end is never polled; run the server on a plain event loop")
        self.started = True
        return self.port

    def fileno(self) -> int:
        return self._read

    def drain(self) -> list[tuple[int, int, str, bytes, int]]:
        try:
            os.read(self._read, 4096)
        except BlockingIOError:
            pass
        events, self._events = self._events, []
        return events

    def finish(self, call_id: int, code: int, details: str, last: bytes | None = None) -> None:
        if call_id in self.finished:
            raise AssertionError(f"call {call_id} finished twice: {self.finished[call_id]} then {code} {details!r}")
        self.finished[call_id] = Finished(code, details, last)

    def write(self, call_id: int, message: bytes) -> int:
        self.written.setdefault(call_id, []).append(message)
        return self.WRITE_FULL if call_id in self.held else self.WRITE_QUEUED

    def read(self, call_id: int) -> bool:
        self.reads[call_id] = self.reads.get(call_id, 0) + 1
        return True

    def stop(self, grace: float) -> None:
        self.stopped_with = grace

    def watch(self, fd: int) -> bool:  # pragma: no cover - only a polled front end watches
        return False

    def poll(self, timeout: float) -> int:  # pragma: no cover - only a polled front end polls
        raise AssertionError("the fake front end is never polled")

    # -- what the test calls ---------------------------------------------------------------------

    def send(self, *events: tuple[int, int, str, bytes, int]) -> None:
        """Queue ``(call_id, kind, method, payload, deadline_ns)`` events as one burst."""
        self._events.extend(events)
        os.write(self._write, b"x")

    def message(self, call_id: int, method: str, payload: bytes, deadline_ns: int = 0) -> None:
        self.send((call_id, self.MESSAGE, method, payload, deadline_ns))

    def half_close(self, call_id: int, method: str) -> None:
        self.send((call_id, self.HALF_CLOSE, method, b"", 0))

    def cancel(self, call_id: int, method: str = "") -> None:
        self.send((call_id, self.CANCELLED, method, b"", 0))

    def hold(self, call_id: int) -> None:
        """From now on writes to ``call_id`` answer FULL, as for a client that stopped reading."""
        self.held.add(call_id)

    def writable(self, call_id: int, method: str = "") -> None:
        """The held call's client read again: writes are queued, and WRITABLE is sent."""
        self.held.discard(call_id)
        self.send((call_id, self.WRITABLE, method, b"", 0))

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


class FakeFrontendModule:
    """Stands in for the ``swapserve._frontend`` module: its constants, and a ``Frontend``
    factory that records the front ends it made (``created``)."""

    MESSAGE = FakeFrontend.MESSAGE
    HALF_CLOSE = FakeFrontend.HALF_CLOSE
    CANCELLED = FakeFrontend.CANCELLED
    WRITABLE = FakeFrontend.WRITABLE
    POLL_OFF, POLL_IDLE, POLL_PENDING = 0, 1, 2

    def __init__(self) -> None:
        self.created: list[FakeFrontend] = []

    def Frontend(self, address: str, max_message_bytes: int) -> FakeFrontend:  # noqa: N802 - the module's name
        self.created.append(FakeFrontend(address, max_message_bytes))
        return self.created[-1]

    def close(self) -> None:
        for f in self.created:
            f.close()


@dataclass
class RecordingObserver:
    """A ``RequestObserver`` that records every call (``calls``: (method, version) pairs).

    ``reject``: ``on_request`` raises it (a data-quality policy refusing a request);
    ``broken``: every other hook raises ``RuntimeError`` (a buggy monitor).
    """

    reject: Exception | None = None
    broken: bool = False
    calls: list[tuple[str, int]] = field(default_factory=list)

    def on_request(self, req: Any, spec: ModelSpec, version: int, arrays: Any) -> None:
        self.calls.append(("on_request", version))
        if self.reject is not None:
            raise self.reject

    def _hook(self, name: str, version: int) -> None:
        self.calls.append((name, version))
        if self.broken:
            raise RuntimeError(f"broken observer: {name}")

    def on_response(self, req: Any, spec: ModelSpec, version: int, *rest: Any) -> None:
        self._hook("on_response", version)

    def on_error(self, req: Any, spec: ModelSpec, version: int, *rest: Any) -> None:
        self._hook("on_error", version)

    def on_shadow(self, req: Any, spec: ModelSpec, version: int, *rest: Any) -> None:
        self._hook("on_shadow", version)


__all__ = [
    "FakeBackend", "FakeBatch", "FakeBatcher", "FakeClock", "FakeFrontend", "FakeFrontendModule", "FakeLoader",
    "FakeModelBehaviour", "Finished", "RecordingObserver", "scaled_model", "write_model",
]
