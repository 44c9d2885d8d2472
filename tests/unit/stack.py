"""The control-path stack with fakes underneath: a real ModelManager, ControlPlane and rollout
controller over a temporary repository, a SQLite registry, the native router and batcher, and
FakeBackends instead of models. No sockets, no server."""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from swapserve.controlplane import ControlPlane
from swapserve.feedback.slices import SliceStats
from swapserve.lifecycle.manager import ModelManager
from swapserve.native import Batcher, Router
from swapserve.registry import Registry
from swapserve.repository import ModelRepository
from swapserve.telemetry.metrics import Metrics
from tests.fakes import FakeClock, FakeLoader, write_model

#: Every fake model file is this big; ``memory_budget`` is counted in these.
MODEL_BYTES = 1000


def native_batcher(max_rows: int, preferred: list[int], delay_us: int, max_queue: int, max_queue_bytes: int,
                   name: str) -> Batcher:
    return Batcher(max_rows, preferred, delay_us, max_queue, max_queue_bytes, name=name)


@dataclass
class Stack:
    repo: Path
    registry: Registry
    loader: FakeLoader
    metrics: Metrics
    router: Router
    manager: ModelManager
    clock: FakeClock
    slices: SliceStats
    control: ControlPlane = field(init=False)

    def __post_init__(self) -> None:
        self.control = ControlPlane(self.manager, self.registry, self.slices)

    def sample(self, name: str, labels: dict[str, str]) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def restarted(self) -> Stack:
        """A second server over the same repository and registry (a restart), nothing resident."""
        return make_stack(self.repo.parent, registry=self.registry, clock=self.clock,
                          budget=self.manager.memory_budget, write=False)


def make_stack(tmp: Path, versions: tuple[int, ...] = (1, 2), *, name: str = "m", budget: int = 1 << 30,
               registry: Registry | None = None, clock: FakeClock | None = None, write: bool = True,
               extra_config: str = "") -> Stack:
    """A stack over ``tmp/repo`` holding model ``name`` with ``versions`` (see ``write_model``)."""
    repo = tmp / "repo"
    if write:
        write_model(repo, name, versions, extra=extra_config, size=MODEL_BYTES)
    clock = clock or FakeClock(1_700_000_000.0)
    if registry is None:
        registry = Registry(f"sqlite:///{tmp}/registry.db", clock=clock.utc)
    metrics = Metrics(CollectorRegistry())
    loader = FakeLoader()
    router = Router()
    manager = ModelManager(ModelRepository(repo), device="cpu", metrics=metrics, router=router, registry=registry,
                           backend_loader=loader, batcher_factory=native_batcher, memory_budget=budget)
    return Stack(repo, registry, loader, metrics, router, manager, clock, SliceStats(clock=clock))


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
    """Run one test scenario on a fresh event loop (no pytest-asyncio here)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
