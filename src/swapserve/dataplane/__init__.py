"""The protocol-independent request path: route, validate, run, answer, record.

The gRPC servicers convert protobuf to ``InferRequest`` and back; everything in
between happens here, so other front ends (HTTP, in-process) reuse it unchanged.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import weakref
from collections.abc import Sequence

import numpy as np

from swapserve.dataplane.observer import RequestObserver
from swapserve.dataplane.validation import validate
from swapserve.errors import AlreadyExists, DeadlineExceeded, InvalidInput, ModelExecutionError, SwapserveError
from swapserve.feedback.predictions import PredictionRule
from swapserve.lifecycle.manager import ModelManager
from swapserve.lifecycle.runtime import VersionRuntime
from swapserve.telemetry.metrics import Metrics
from swapserve.types import InferRequest, InferResponse, Tensor

log = logging.getLogger(__name__)

#: Random bytes drawn per refill of the id buffer (512 ids).
_ID_BUFFER_BYTES = 8192
#: Hex characters of the replica tag that starts a server-assigned id.
TAG_CHARS = 8
#: Hex characters of an id's random part (128 bits).
RANDOM_CHARS = 32
_HEX = frozenset("0123456789abcdef")


def replica_tag(replica_id: str) -> str:
    """The tag that starts every id a replica assigns: the first ``TAG_CHARS`` hex characters of
    sha256(replica id). Public on purpose (it names the replica, not a secret); computed once per
    server, never per request."""
    return hashlib.sha256(replica_id.encode()).hexdigest()[:TAG_CHARS]


def tag_of(request_id: str) -> str:
    """The replica tag of an id in the server's format (``TAG_CHARS`` + ``RANDOM_CHARS`` lowercase
    hex characters), else "". A client-supplied id may happen to look like one; callers treat a tag
    that names no replica as no tag."""
    if len(request_id) != TAG_CHARS + RANDOM_CHARS or not _HEX.issuperset(request_id):
        return ""
    return request_id[:TAG_CHARS]


class RequestIds:
    """Server-assigned request ids: ``tag`` (the replica's, see ``replica_tag``; "" for none)
    followed by 128 bits from ``os.urandom`` (32 hex characters), so no client can guess another's
    id and label its request, and the id tells which replica of a fleet logged its prediction.

    Drawn from a buffer refilled 512 ids at a time: ~0.45 us per id on CPython 3.11
    (``secrets.token_hex(16)`` is ~1.05 us, a prefix + counter ~0.32 us); the tag adds one
    string concatenation (~0.06 us measured). Event-loop only (no lock); every instance's buffer is
    dropped in a forked child, so parent and child never hand out the same ids."""

    __slots__ = ("_hex", "_pos", "tag", "__weakref__")

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self._hex = ""
        self._pos = 0
        _ALL_IDS.add(self)

    def __call__(self) -> str:
        pos = self._pos
        if pos >= len(self._hex):
            self._hex, pos = os.urandom(_ID_BUFFER_BYTES).hex(), 0
        self._pos = pos + RANDOM_CHARS
        return self.tag + self._hex[pos:pos + RANDOM_CHARS]

    def reset(self) -> None:
        self._hex, self._pos = "", 0


_ALL_IDS: weakref.WeakSet[RequestIds] = weakref.WeakSet()


def _reset_all_ids() -> None:
    for ids in list(_ALL_IDS):
        ids.reset()


#: Untagged ids (a DataPlane made without a replica's ``RequestIds``).
new_request_id = RequestIds()
os.register_at_fork(after_in_child=_reset_all_ids)


def _canonical(value: object) -> str:
    """A parameter value as the router compares it with a cohort rule value (see swapserve.native)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

#: Shadow copies in flight per model beyond which new copies are shed (counted, never queued).
MAX_SHADOW_IN_FLIGHT = 4


def _failure_reason(exc: SwapserveError) -> str:
    if isinstance(exc, InvalidInput | AlreadyExists):
        return "REJECTED"
    if isinstance(exc, ModelExecutionError):
        return "BACKEND"
    if isinstance(exc, DeadlineExceeded):
        return "CANCELED"
    return "OTHER"


class DataPlane:
    def __init__(self, manager: ModelManager, metrics: Metrics, observers: Sequence[RequestObserver] = (),
                 request_ids: RequestIds | None = None) -> None:
        """``request_ids`` assigns the ids of requests that come without one (the server passes its
        replica's, see ``RequestIds``; default: untagged)."""
        self.manager = manager
        self.metrics = metrics
        self.observers = list(observers)
        self.new_request_id = request_ids if request_ids is not None else new_request_id
        self._shadow_in_flight: dict[str, int] = {}
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    def _notify(self, method: str, *args: object) -> None:
        for obs in self.observers:
            fn = getattr(obs, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a broken monitor must never fail a request
                log.exception("observer %s.%s failed", type(obs).__name__, method)

    def check(self, req: InferRequest) -> None:
        """Raise what ``infer`` would raise for ``req``'s model, version and tensor metadata, without
        touching its data (which may be stand-ins: see ``validation.validate(materialize=False)``).

        For requests whose data is costly to decode (typed contents): a request for an unknown
        model or with a wrong shape is refused before any of it is decoded. Assigns ``req.id``
        when missing, so ``infer`` of the decoded request routes the same key; ``infer`` routes
        again (a swap may happen while the data is decoded) and validates everything again.
        A refused request is counted REJECTED, as ``infer`` counts it.
        """
        start = time.perf_counter_ns()
        if not req.id:
            req.id = self.new_request_id()
        runtime, _ = self.manager.route(req.model_name, req.model_version, req.parameters, req.id)
        try:
            validate(runtime.spec, runtime.version, req, materialize=False)
        except SwapserveError as exc:
            elapsed = time.perf_counter_ns() - start
            runtime.stats.request_done(False, elapsed, reason=_failure_reason(exc))
            if self.observers:
                self._notify("on_error", req, runtime.spec, runtime.version, exc, elapsed / 1e9)
            raise

    async def infer(self, req: InferRequest, deadline_ns: int = 0) -> InferResponse:
        """Run one request. The response names the version that ran it (promise 2).

        A request without an id gets an unguessable one that names this replica, so its
        prediction can later be joined with feedback, whichever replica the label is sent to.
        ``req.assignment`` tells the observers whether the router chose the version (only then
        is the request rollout evidence) or the client did (pinned, cohort).
        """
        start = time.perf_counter_ns()
        if not req.id:
            req.id = self.new_request_id()
        runtime, shadows = self.manager.route(req.model_name, req.model_version, req.parameters, req.id)
        if req.model_version:
            req.assignment = "pinned"
        elif req.parameters:
            req.assignment = self._cohort_chosen(req)
        spec = runtime.spec
        arrays: list = []  # type: ignore[type-arg]
        try:
            arrays, rows = validate(spec, runtime.version, req)
            for obs in self.observers:  # may reject (data-quality policy); see monitoring.observer
                obs.on_request(req, spec, runtime.version, arrays)
            outputs, queue_ns = await runtime.infer(arrays, rows, deadline_ns)
        except SwapserveError as exc:
            elapsed = time.perf_counter_ns() - start
            runtime.stats.request_done(False, elapsed, reason=_failure_reason(exc))
            if self.observers:
                self._notify("on_error", req, spec, runtime.version, exc, elapsed / 1e9)
            raise
        except asyncio.CancelledError:  # the client went away (deadline, cancel): counted, not run if queued
            elapsed = time.perf_counter_ns() - start
            runtime.stats.request_done(False, elapsed, reason="CANCELED")
            raise
        wanted = req.outputs if req.outputs is not None else [o.name for o in spec.outputs]
        tensors = []
        for name in wanted:
            ospec = spec.output(name)
            assert ospec is not None  # validate() checked requested names
            arr = outputs[name]
            tensors.append(Tensor(name, ospec.datatype, tuple(arr.shape), arr))
        elapsed = time.perf_counter_ns() - start
        runtime.stats.request_done(True, elapsed, queue_ns)
        if self.observers:
            self._notify("on_response", req, spec, runtime.version, arrays, outputs, elapsed / 1e9)
        for shadow in shadows:
            self._start_shadow(req, runtime, shadow, outputs)
        return InferResponse(spec.name, runtime.label, req.id, tensors)

    def _cohort_chosen(self, req: InferRequest) -> str:
        """"cohort" when one of the policy's cohort rules matches a parameter of ``req`` (the client
        chose its version by setting it), else "". Only models with cohort rules pay for the check.
        Reads the serving table's policy (never the control path's slots)."""
        table = self.manager.tables.get(req.model_name)
        policy = table.policy if table is not None else None
        if policy is None or not policy.cohorts:
            return ""
        params = req.parameters
        for attribute, value, _ in policy.cohorts:
            if attribute in params and _canonical(params[attribute]) == value:
                return "cohort"
        return ""

    # -- shadow traffic ----------------------------------------------------------------------

    def _start_shadow(self, req: InferRequest, primary: VersionRuntime, shadow: VersionRuntime,
                      outputs: dict[str, np.ndarray]) -> None:
        """Send a copy to a shadow version after the client's answer is ready; never delays it.

        Shed (counted) when the serving version has a queue (the server is busy) or too many
        copies are already in flight, so shadowing never competes with live traffic for long.
        """
        name = shadow.spec.name
        busy = primary.batcher.pending() > 0 or self._shadow_in_flight.get(name, 0) >= MAX_SHADOW_IN_FLIGHT
        if busy:
            self.metrics.shadow_requests.labels(name, shadow.label, "shed").inc()
            return
        self._shadow_in_flight[name] = self._shadow_in_flight.get(name, 0) + 1
        task = asyncio.get_running_loop().create_task(self._shadow(req, shadow, outputs))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, req: InferRequest, shadow: VersionRuntime, served: dict[str, np.ndarray]) -> None:
        name = shadow.spec.name
        start = time.perf_counter_ns()
        try:
            # A shadow with another config may not accept the request, or want its inputs in another order.
            shadow_arrays, shadow_rows = validate(shadow.spec, shadow.version, req)
            outputs, _ = await shadow.infer(shadow_arrays, shadow_rows)
        except SwapserveError as exc:
            self.metrics.shadow_requests.labels(name, shadow.label, "error").inc()
            log.debug("shadow %s v%d: %s", name, shadow.version, exc.message)
            return
        finally:
            self._shadow_in_flight[name] -= 1
        # Compared on what the feedback join scores: the model's PredictionRule (argmax of the
        # prediction output for classes, the value for regression).
        rule = PredictionRule.for_spec(shadow.spec)
        same = rule.predictions(outputs, shadow.spec.batching) == rule.predictions(served, shadow.spec.batching)
        self.metrics.shadow_requests.labels(name, shadow.label, "agree" if same else "diverge").inc()
        if self.observers:
            # The shadow's answer is logged under the same request id for its own version, so late
            # labels score it too; it is never returned to the client.
            self._notify("on_shadow", req, shadow.spec, shadow.version, shadow_arrays, outputs,
                         (time.perf_counter_ns() - start) / 1e9)
