"""The load generator's event loop, shared by every client flavour (raw protobuf bytes, tritonclient).

This module imports neither ``swapserve._proto`` nor ``tritonclient``: each worker module
(``worker_raw``, ``worker_triton``) supplies a ``call`` coroutine and imports the protocol
library it needs, so each flavour lives in its own process (see ``swapserve.server``).

Worker protocol (one subprocess per worker, started by ``swapserve.bench.runner``)::

    python -m swapserve.bench.worker_raw SPEC.pkl OUT.npz
      -> connects, makes one untimed call, prints "ready"
      <- reads one line from stdin: the start time (time.monotonic_ns(), shared by all
         processes on Linux) or "abort"
      -> every second prints "progress COMPLETED ERRORS"; at the end writes OUT.npz
         and prints "done"

The native worker (``swapserve-loadgen``, see ``swapserve.bench.native``) speaks the same
protocol with its own input and output files.

Guarantees: every request that is scheduled is recorded exactly once, as completed
(status 0) or failed (its gRPC status code), so completed + errors = sent; requests
in flight at the end are awaited (bounded by the per-request timeout).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from swapserve.tls import ClientTls

#: gRPC status code recorded for a client-side failure that carries no gRPC status.
CLIENT_ERROR = 2  # UNKNOWN

#: (status code, model_version or "") for one finished request.
Outcome = tuple[int, str]
#: Sends payload i and returns its outcome; never raises for a failed request.
Call = Callable[[int], Awaitable[Outcome]]


@dataclass
class WorkerSpec:
    """What one worker process does. Times are relative to the start time sent on stdin."""

    url: str
    model: str
    payloads: list[bytes]          # pre-serialised ModelInferRequest messages, used round-robin
    duration_s: float              # scheduling stops this long after start (warm-up included)
    timeout_s: float
    concurrency: int = 0           # closed loop: concurrent users in this process
    rate: float = 0.0              # open loop: total arrival rate of all processes (req/s)
    slot: int = 0                  # open loop: this process takes arrivals slot, slot+P, ...
    slots: int = 1                 # open loop: P
    first_payload: int = 0         # so processes do not all send the same payload first
    tls: ClientTls | None = None   # the channel's TLS (files read in the worker); None: plaintext
    token: str = ""                # inference bearer token sent on every request; "": none
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The call metadata every request carries: the bearer token, or None (no metadata at all)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


#: Builds a worker's call and the coroutine function that closes its channel.
MakeCall = Callable[[WorkerSpec], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]]


class Recorder:
    """Columnar per-request records: cheap appends on the hot path, numpy at the end."""

    def __init__(self) -> None:
        self.sched = array("q")
        self.sent = array("q")
        self.done = array("q")
        self.status = array("b")
        self.version = array("h")
        self.versions: dict[str, int] = {}
        self.errors = 0

    def add(self, sched: int, sent: int, done: int, outcome: Outcome) -> None:
        status, version = outcome
        self.sched.append(sched)
        self.sent.append(sent)
        self.done.append(done)
        self.status.append(status)
        if status:
            self.errors += 1
            self.version.append(-1)
            return
        idx = self.versions.get(version)
        if idx is None:
            idx = self.versions[version] = len(self.versions)
        self.version.append(idx)

    def save(self, path: str, cpu_s: float) -> None:
        table = sorted(self.versions, key=self.versions.__getitem__)
        np.savez(path, sched=np.frombuffer(self.sched, np.int64), sent=np.frombuffer(self.sent, np.int64),
                 done=np.frombuffer(self.done, np.int64), status=np.frombuffer(self.status, np.int8),
                 version=np.frombuffer(self.version, np.int16), version_table=np.array(table, dtype=str),
                 cpu_s=np.float64(cpu_s))


async def _closed(spec: WorkerSpec, call: Call, rec: Recorder, start: int) -> None:
    end = start + int(spec.duration_s * 1e9)
    n = len(spec.payloads)
    now_ns = time.monotonic_ns

    sends = itertools.count(spec.first_payload)  # one sequence for all users: payloads go round-robin

    async def user() -> None:
        while (t := now_ns()) < end:
            outcome = await call(next(sends) % n)
            rec.add(t, t, now_ns(), outcome)

    await asyncio.gather(*(user() for _ in range(spec.concurrency)))


async def _open(spec: WorkerSpec, call: Call, rec: Recorder, start: int) -> None:
    """Arrival k of this process is due at start + (slot + k*slots)/rate, whatever is in flight."""
    end = start + int(spec.duration_s * 1e9)
    n = len(spec.payloads)
    now_ns = time.monotonic_ns
    interval = 1e9 / spec.rate
    pending: set[asyncio.Task[None]] = set()

    async def one(sched: int, i: int) -> None:
        sent = now_ns()
        outcome = await call(i % n)
        rec.add(sched, sent, now_ns(), outcome)

    k = 0
    while True:
        sched = start + int((spec.slot + k * spec.slots) * interval)
        if sched >= end:
            break
        delay = sched - now_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        task = asyncio.ensure_future(one(sched, spec.first_payload + k))
        pending.add(task)
        task.add_done_callback(pending.discard)
        k += 1
    while pending:
        await asyncio.gather(*list(pending))


async def _progress(rec: Recorder) -> None:
    while True:
        await asyncio.sleep(1.0)
        print(f"progress {len(rec.status) - rec.errors} {rec.errors}", flush=True)


async def _main(spec: WorkerSpec, out: str, make_call: MakeCall) -> int:
    call, close = await make_call(spec)
    try:
        await call(spec.first_payload % len(spec.payloads))  # connect + first-call costs stay out of the run
        print("ready", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if not line.strip() or line.strip() == "abort":
            return 1
        start = int(line)
        rec = Recorder()
        delay = start - time.monotonic_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        progress = asyncio.ensure_future(_progress(rec))
        c0 = os.times()
        if spec.rate > 0:
            await _open(spec, call, rec, start)
        else:
            await _closed(spec, call, rec, start)
        c1 = os.times()
        progress.cancel()
        rec.save(out, (c1.user + c1.system) - (c0.user + c0.system))
        print("done", flush=True)
        return 0
    finally:
        await close()


def worker_main(make_call: MakeCall) -> int:
    """Entry point of a worker module: ``worker_main(make_call)`` with argv SPEC.pkl OUT.npz."""
    spec_path, out = sys.argv[1], sys.argv[2]
    with open(spec_path, "rb") as f:
        spec: WorkerSpec = pickle.load(f)
    return asyncio.run(_main(spec, out, make_call))
