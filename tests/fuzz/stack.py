"""The inference servicer in-process, over the example models, without sockets: what the fuzz
targets feed ModelInferRequests to.

It is assembled the way ``swapserve.server.app.create_server`` assembles it (a real ModelManager
with the real backends, native router and batchers, the feedback and monitoring observers, a
SQLite registry) but the servicer is called directly with a fake ``ServicerContext``: a request
goes through exactly the code a gRPC call reaches after the transport has parsed its bytes.
"""
from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from swapserve.backends import backend_class
from swapserve.config import ControlMode
from swapserve.dataplane import DataPlane
from swapserve.feedback.observer import FeedbackObserver
from swapserve.feedback.predictions import PredictionLog
from swapserve.feedback.slices import SliceStats
from swapserve.lifecycle.manager import ModelManager
from swapserve.monitoring.drift_observer import MonitoringObserver
from swapserve.native import Batcher, Router
from swapserve.registry import Registry
from swapserve.repository import ModelRepository
from swapserve.server.inference import InferenceServicer
from swapserve.telemetry.metrics import Metrics
from tests.e2e.serverproc import build_example_repo

#: The example models the fuzzed requests are aimed at (every one in model_repository/).
MODELS = ("simple", "digits", "convnet", "digits_onnx")


class Aborted(Exception):
    """What the fake context's ``abort`` raises (grpc.aio raises AbortError): the call's status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """The part of ``grpc.aio.ServicerContext`` the inference servicer uses: no deadline, no metadata."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = None) -> None:
        raise Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def cancelled(self) -> bool:
        return False

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        pass


def _load_backend(spec: Any, path: Any, device: str) -> Any:
    return backend_class(spec.platform).load(spec, path, device)


def _batcher(max_rows: int, preferred: list[int], delay_us: int, max_queue: int, max_queue_bytes: int,
             name: str) -> Batcher:
    return Batcher(max_rows, preferred, delay_us, max_queue, max_queue_bytes, name=name)


@dataclass
class InferenceStack:
    loop: asyncio.AbstractEventLoop
    manager: ModelManager
    servicer: InferenceServicer
    scratch: tempfile.TemporaryDirectory[str]

    def call(self, coro: Any, timeout: float) -> Any:
        """Run ``coro`` on the stack's loop; ``asyncio.TimeoutError`` past ``timeout`` (a hang)."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self.loop.run_until_complete(self.manager.close())
        self.manager.registry.close()
        self.loop.close()
        self.scratch.cleanup()


def build_stack() -> InferenceStack:
    """Every example model loaded (all versions its policy selects), on a private event loop."""
    scratch = tempfile.TemporaryDirectory(prefix="swapserve-fuzz-")
    tmp = Path(scratch.name)
    repo = build_example_repo(tmp / "examples")
    loop = asyncio.new_event_loop()
    metrics = Metrics(CollectorRegistry())
    registry = Registry(f"sqlite:///{tmp / 'registry.db'}")
    manager = ModelManager(ModelRepository(repo), device="cpu", metrics=metrics, router=Router(), registry=registry,
                           backend_loader=_load_backend, batcher_factory=_batcher, memory_budget=1 << 32)
    slices = SliceStats(metrics.registry)
    monitor = MonitoringObserver(repo, metrics.registry, context_dir=tmp / "retrain")
    manager.on_version_resident = monitor.prepare
    manager.on_version_unloaded = monitor.forget
    dataplane = DataPlane(manager, metrics, observers=[FeedbackObserver(slices, PredictionLog()), monitor])
    servicer = InferenceServicer(dataplane, manager, ControlMode.NONE)
    loop.run_until_complete(manager.load_all(list(MODELS)))
    missing = [m for m in MODELS if not manager.is_ready(m)]
    if missing:
        raise RuntimeError(f"fuzz stack: example models not ready: {missing} (run scripts/dev setup)")
    return InferenceStack(loop, manager, servicer, scratch)
