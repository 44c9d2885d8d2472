"""Which versions are loaded, which one serves, and how models load and unload safely.

Order of operations on every change (promise 1: no request fails because of a
model change): new versions are loaded and warmed in a worker thread while the old
ones keep serving; then one routing-snapshot publish moves traffic; only then are
versions that left the snapshot drained (every in-flight request finishes) and closed.
"""
from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swapserve.errors import ConfigError, ModelNotFound, SwapserveError, VersionNotReady
from swapserve.lifecycle.runtime import BackendLike, BatcherFactory, VersionRuntime
from swapserve.monitoring.metrics import Metrics
from swapserve.repository import ModelEntry, ModelRepository
from swapserve.types import ModelSpec

log = logging.getLogger(__name__)

#: (spec, model file, device) -> a loaded backend; raises SwapserveError with the reason.
BackendLoader = Callable[[ModelSpec, Path, str], BackendLike]


class VersionState(str, enum.Enum):
    """States as RepositoryIndex reports them (Triton's names)."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class VersionSlot:
    version: int
    state: VersionState
    reason: str = ""
    runtime: VersionRuntime | None = None


@dataclass
class ManagedModel:
    """A model the server knows. ``serving`` is the version unpinned requests go to."""

    name: str
    entry: ModelEntry
    slots: dict[int, VersionSlot] = field(default_factory=dict)
    serving: int | None = None
    #: True while the operator or the control mode wants this model loaded.
    wanted: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def ready_versions(self) -> list[int]:
        return sorted(v for v, s in self.slots.items() if s.state is VersionState.READY)


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class ModelManager:
    """Owns every ``VersionRuntime``. All mutations run on the event loop, serialised per model."""

    def __init__(self, repository: ModelRepository, *, device: str, metrics: Metrics, router: Any,
                 backend_loader: BackendLoader, batcher_factory: BatcherFactory) -> None:
        self.repository = repository
        self.device = device
        self.metrics = metrics
        self.router = router
        self._load_backend = backend_loader
        self._batcher_factory = batcher_factory
        self.models: dict[str, ManagedModel] = {}
        self._generation = 0

    # -- queries (hot path) ----------------------------------------------------------------

    def model(self, name: str) -> ManagedModel:
        m = self.models.get(name)
        if m is None:
            if name in self.repository.names():
                raise VersionNotReady(f"model '{name}' is in the repository but not loaded; load it with "
                                      "RepositoryModelLoad (explicit mode) or the control service")
            raise ModelNotFound(f"model '{name}' is not in the model repository; RepositoryIndex lists the models")
        return m

    def runtime(self, name: str, version: str = "", attributes: Mapping[str, Any] | None = None,
                request_id: str = "") -> VersionRuntime:
        """The runtime that should serve a request: the pinned version, else the routed one.

        Raises ModelNotFound for an unknown model or version, VersionNotReady when it cannot serve.
        """
        m = self.model(name)
        if version:
            try:
                v = int(version)
            except ValueError:
                raise ModelNotFound(f"model '{name}' has no version '{version}'; versions are positive integers") from None
            slot = m.slots.get(v)
            if slot is None:
                if v in m.entry.versions:
                    raise VersionNotReady(f"model '{name}' version {v} is not loaded; ready versions: {m.ready_versions()}")
                raise ModelNotFound(f"model '{name}' has no version {v}; ready versions: {m.ready_versions()}")
            if slot.state is not VersionState.READY or slot.runtime is None:
                raise VersionNotReady(f"model '{name}' version {v} is {slot.state.value.lower()}"
                                      + (f": {slot.reason}" if slot.reason else "") + "; retry or pick a ready version")
            return slot.runtime
        if m.serving is None:
            if m.entry.error:
                raise VersionNotReady(f"model '{name}' is unavailable: {m.entry.error}")
            raise VersionNotReady(f"model '{name}' has no ready version; load it (RepositoryModelLoad) or check "
                                  "RepositoryIndex for the reason")
        route = self.router.route(name, attributes or {}, request_id)
        slot = m.slots.get(route.version)
        if slot is None or slot.runtime is None:
            raise VersionNotReady(f"model '{name}' version {route.version} is not resident; retry")
        return slot.runtime

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            m = self.model(name)
        except SwapserveError:
            return False
        if version:
            slot = m.slots.get(int(version)) if version.isdigit() else None
            return slot is not None and slot.state is VersionState.READY
        return m.serving is not None

    def server_ready(self) -> bool:
        """Every model that should be loaded has a ready serving version."""
        return all(m.serving is not None for m in self.models.values() if m.wanted)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        out: list[IndexEntry] = []
        for name in sorted(set(self.models) | set(self.repository.names())):
            m = self.models.get(name)
            if m is None or not m.slots:
                reason = (m.entry.error if m and m.entry.error else "unloaded") if m else "unloaded"
                if not ready_only:
                    out.append(IndexEntry(name, "", VersionState.UNAVAILABLE.value, reason or "unloaded"))
                continue
            for v, slot in sorted(m.slots.items()):
                if ready_only and slot.state is not VersionState.READY:
                    continue
                out.append(IndexEntry(name, str(v), slot.state.value, slot.reason))
        return out

    # -- mutations -------------------------------------------------------------------------

    def _entry(self, name: str) -> ManagedModel:
        entry = self.repository.entry(name)
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = ManagedModel(name, entry)
        return m

    async def load(self, name: str) -> ManagedModel:
        """Load (or reload) a model per its config and version policy; hot: old versions serve meanwhile.

        Raises ModelNotFound for a model not in the repository and the config error (ConfigError)
        when config.pbtxt is invalid; a version that fails to load is marked UNAVAILABLE with its
        reason and does not fail the call while another version serves.
        """
        m = self._entry(name)
        async with m.lock:
            m.wanted = True
            entry = self.repository.entry(name)
            old_spec = m.entry.spec
            m.entry = entry
            if entry.error or entry.spec is None:
                log.error("model '%s' cannot load: %s", name, entry.error)
                message = entry.error or f"model '{name}' has an invalid config.pbtxt"
                if m.slots:  # keep serving the versions loaded with the last good config
                    message += " (the previously loaded versions keep serving)"
                raise ConfigError(message)
            spec = entry.spec
            wanted = entry.policy_versions()
            if not wanted:
                raise VersionNotReady(f"model '{name}' has no version directory that its version policy selects; "
                                      f"found {sorted(entry.versions)}")
            config_changed = old_spec is not None and old_spec != spec
            to_load = [v for v in wanted if config_changed or v not in m.slots
                       or m.slots[v].state is not VersionState.READY]
            fresh: dict[int, VersionSlot] = {}
            for v in to_load:
                fresh[v] = await self._load_version(spec, entry, v, m)
            # Swap: the new set is the union of kept ready versions and freshly loaded ones.
            retired = [s for v, s in m.slots.items() if v not in wanted or v in fresh]
            new_slots = {v: s for v, s in m.slots.items() if v in wanted and v not in fresh}
            new_slots.update(fresh)
            m.slots = new_slots
            self._publish(m)
            for s in retired:
                if s.runtime is not None:
                    await self._retire(m, s)
            if m.serving is None:
                reasons = "; ".join(f"version {v}: {s.reason}" for v, s in sorted(m.slots.items()) if s.reason)
                raise VersionNotReady(f"model '{name}' failed to load: {reasons or 'no version became ready'}")
            return m

    async def _load_version(self, spec: ModelSpec, entry: ModelEntry, v: int, m: ManagedModel) -> VersionSlot:
        path = entry.model_file(v)
        log.info("loading model '%s' version %d from %s", spec.name, v, path)

        def build() -> VersionRuntime:
            backend = self._load_backend(spec, path, self.device)
            try:
                rt = VersionRuntime(spec, v, path, backend, self._batcher_factory, self.metrics)
                rt.start()
            except BaseException:
                backend.close()
                raise
            return rt

        try:
            runtime = await asyncio.to_thread(build)
        except SwapserveError as exc:
            log.error("model '%s' version %d failed to load: %s", spec.name, v, exc.message)
            self.metrics.version_ready.labels(spec.name, str(v)).set(0)
            return VersionSlot(v, VersionState.UNAVAILABLE, exc.message)
        except Exception as exc:  # noqa: BLE001 - a broken model must not take the server down
            log.exception("model '%s' version %d failed to load", spec.name, v)
            self.metrics.version_ready.labels(spec.name, str(v)).set(0)
            return VersionSlot(v, VersionState.UNAVAILABLE, f"{type(exc).__name__}: {exc}")
        self.metrics.version_ready.labels(spec.name, str(v)).set(1)
        log.info("model '%s' version %d is ready", spec.name, v)
        return VersionSlot(v, VersionState.READY, "", runtime)

    def _publish(self, m: ManagedModel) -> None:
        """Route unpinned traffic to the highest ready version (Triton's default) with one publish."""
        from swapserve.native import RoutingSpec  # local: native is optional for repository-only tools

        ready = m.ready_versions()
        serving = ready[-1] if ready else None
        if serving is None:
            self.router.remove(m.name)
        elif serving != m.serving or self.router.snapshot(m.name) is None:
            self._generation += 1
            self.router.publish(m.name, RoutingSpec(generation=self._generation, versions=(serving,),
                                                    weights_bp=(10_000,)))
        m.serving = serving
        if serving is not None:
            self.metrics.serving_version.labels(m.name).set(serving)

    async def _retire(self, m: ManagedModel, slot: VersionSlot) -> None:
        """Drain then close a version that no longer takes traffic."""
        rt = slot.runtime
        assert rt is not None
        slot.state = VersionState.UNLOADING
        drained = await rt.drain()
        if not drained:
            log.warning("model '%s' version %d: in-flight requests did not finish in time", m.name, slot.version)
        await asyncio.to_thread(rt.close)
        self.metrics.version_ready.labels(m.name, str(slot.version)).set(0)
        log.info("model '%s' version %d unloaded", m.name, slot.version)

    async def unload(self, name: str) -> None:
        """Stop serving a model: route nothing to it, let in-flight requests finish, free it."""
        m = self.model(name) if name in self.models else self._entry(name)
        async with m.lock:
            m.wanted = False
            slots = list(m.slots.values())
            m.slots = {}
            self._publish(m)
            for s in slots:
                if s.runtime is not None:
                    await self._retire(m, s)

    async def load_all(self, names: list[str]) -> None:
        """Load several models; failures are logged and visible in the index, never raised."""
        for name in names:
            try:
                await self.load(name)
            except SwapserveError as exc:
                log.error("model '%s' not loaded: %s", name, exc.message)

    async def poll_once(self) -> None:
        """Poll mode: load new models and versions, reload changed configs, unload removed ones."""
        names = set(self.repository.names())
        for name in sorted(names):
            m = self.models.get(name)
            entry = self.repository.entry(name)
            unchanged = (m is not None and m.wanted and entry.stamp == m.entry.stamp
                         and set(entry.versions) == set(m.entry.versions))
            if unchanged:
                continue
            try:
                await self.load(name)
            except SwapserveError as exc:
                log.error("poll: model '%s': %s", name, exc.message)
        for name in [n for n in self.models if n not in names and self.models[n].wanted]:
            await self.unload(name)
            self.models.pop(name, None)

    async def close(self) -> None:
        for name in list(self.models):
            await self.unload(name)
