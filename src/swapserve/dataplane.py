"""The protocol-independent request path: route, validate, run, answer, record.

The gRPC servicers convert protobuf to ``InferRequest`` and back; everything in
between happens here, so other front ends (HTTP, in-process) reuse it unchanged.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence

from swapserve.errors import DeadlineExceeded, InvalidInput, ModelExecutionError, SwapserveError
from swapserve.lifecycle.manager import ModelManager
from swapserve.monitoring.metrics import Metrics
from swapserve.monitoring.observer import RequestObserver
from swapserve.types import InferRequest, InferResponse, Tensor
from swapserve.validation import validate

log = logging.getLogger(__name__)


def _failure_reason(exc: SwapserveError) -> str:
    if isinstance(exc, InvalidInput):
        return "REJECTED"
    if isinstance(exc, ModelExecutionError):
        return "BACKEND"
    if isinstance(exc, DeadlineExceeded):
        return "CANCELED"
    return "OTHER"


class DataPlane:
    def __init__(self, manager: ModelManager, metrics: Metrics, observers: Sequence[RequestObserver] = ()) -> None:
        self.manager = manager
        self.metrics = metrics
        self.observers = list(observers)

    def _notify(self, method: str, *args: object) -> None:
        for obs in self.observers:
            try:
                getattr(obs, method)(*args)
            except Exception:  # noqa: BLE001 - a broken monitor must never fail a request
                log.exception("observer %s.%s failed", type(obs).__name__, method)

    async def infer(self, req: InferRequest, deadline_ns: int = 0) -> InferResponse:
        """Run one request. The response names the version that ran it (promise 2).

        A request without an id gets one, so its prediction can later be joined with feedback.
        """
        start = time.perf_counter_ns()
        if not req.id:
            req.id = uuid.uuid4().hex
        runtime = self.manager.runtime(req.model_name, req.model_version, req.parameters, req.id)
        spec = runtime.spec
        arrays: list = []  # type: ignore[type-arg]
        try:
            arrays, rows = validate(spec, runtime.version, req)
            for obs in self.observers:  # may reject (data-quality policy); see monitoring.observer
                obs.on_request(req, spec, runtime.version, arrays)
            outputs, queue_ns = await runtime.infer(arrays, rows, deadline_ns)
        except SwapserveError as exc:
            elapsed = time.perf_counter_ns() - start
            runtime.stats.request_done(False, elapsed)
            self.metrics.request_failure(spec.name, runtime.label, _failure_reason(exc), elapsed / 1e9)
            if self.observers:
                self._notify("on_error", req, spec, runtime.version, exc, elapsed / 1e9)
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
        self.metrics.request_success(spec.name, runtime.label, elapsed / 1e9, queue_ns / 1e9)
        if self.observers:
            self._notify("on_response", req, spec, runtime.version, arrays, outputs, elapsed / 1e9)
        return InferResponse(spec.name, runtime.label, req.id, tensors)
