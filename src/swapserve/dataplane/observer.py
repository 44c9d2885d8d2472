"""Hooks on the request path for monitors (prediction log, per-slice metrics, data quality, drift).

Observers run on the event loop for every request, so each call must be cheap (a few
microseconds: append to a bounded buffer, bump counters) and never do I/O; scoring and
aggregation happen off the request path. ``on_request`` may raise ``InvalidInput`` to
reject a request (data-quality policy "reject"); nothing else an observer raises reaches
the client: the dataplane logs it and carries on (a broken monitor must not fail requests).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from swapserve.errors import SwapserveError
from swapserve.types import InferRequest, ModelSpec


class RequestObserver(Protocol):
    def on_request(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray]) -> None:
        """Before the request is queued; ``inputs`` are in config order as ``swapserve.dataplane.validation.validate``
        returned them (None for an optional input the request left out). Raise InvalidInput to reject."""

    def on_response(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray],
                    outputs: dict[str, np.ndarray], latency_s: float) -> None:
        """After a successful response was built (``req.id`` is always set)."""

    def on_error(self, req: InferRequest, spec: ModelSpec, version: int, error: SwapserveError,
                 latency_s: float) -> None:
        """After a request that reached a version failed."""

    # Optional: ``on_shadow(req, spec, version, inputs, outputs, latency_s)`` is called, when an
    # observer defines it, after a shadow version answered a copy of ``req`` (same id); that
    # answer was never returned to the client.
