"""Which versions are resident, which serve, and how they load, swap and unload safely.

Order of operations on every change (promise 1: no request fails because of a model
change): a new version is registered, loaded and warmed in a worker thread while the
current ones keep serving; one routing-snapshot publish then moves traffic; only
afterwards are versions that left the snapshot drained (every in-flight request
finishes) and closed. A version is never routed to before it is warm (promise 3).

All mutations run on the event loop and are serialised per model by
``ManagedModel.lock``; callers of the ``*_locked`` methods must hold it. Blocking
work (backend loads, warmup, hashing, registry I/O) runs in worker threads so that
requests keep flowing during control actions.
"""
from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from swapserve.config import DEFAULT_MAX_QUEUE_BYTES
from swapserve.errors import ConfigError, FailedPrecondition, ModelNotFound, SwapserveError, VersionNotReady
from swapserve.lifecycle.budget import Resident, plan_eviction
from swapserve.lifecycle.runtime import BackendLike, BatcherFactory, VersionRuntime
from swapserve.lifecycle.table import Refusal, ServingTable
from swapserve.registry import Registry
from swapserve.repository import ModelEntry, ModelRepository
from swapserve.routing.policy import RoutingPolicy
from swapserve.telemetry.metrics import Metrics
from swapserve.types import ModelSpec
from swapserve.units import BASIS_POINTS

log = logging.getLogger(__name__)

#: (spec, model file, device) -> a loaded backend; raises SwapserveError with the reason.
BackendLoader = Callable[[ModelSpec, Path, str], BackendLike]

HASH_CHUNK = 1 << 20


class VersionState(str, enum.Enum):
    """The version lifecycle (each transition is a registry event)."""

    REGISTERED = "registered"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"  # resident and warm, no traffic
    SERVING = "serving"  # in the routing snapshot (weight > 0, shadow or cohort)
    DRAINING = "draining"
    UNLOADED = "unloaded"
    FAILED = "failed"

    @property
    def index_state(self) -> str:
        """The state name RepositoryIndex reports (Triton's vocabulary)."""
        return _INDEX_STATE[self]


_INDEX_STATE = {
    VersionState.REGISTERED: "UNAVAILABLE", VersionState.LOADING: "LOADING", VersionState.WARMING: "LOADING",
    VersionState.READY: "READY", VersionState.SERVING: "READY", VersionState.DRAINING: "UNLOADING",
    VersionState.UNLOADED: "UNAVAILABLE", VersionState.FAILED: "UNAVAILABLE",
}


@dataclass
class VersionSlot:
    version: int
    state: VersionState
    reason: str = ""
    runtime: VersionRuntime | None = None
    loaded_at: float = 0.0
    memory_bytes: int = 0

    @property
    def resident(self) -> bool:
        return self.runtime is not None and self.state in (VersionState.READY, VersionState.SERVING)

    @property
    def last_used(self) -> float:
        used = self.runtime.stats.last_inference_ms / 1000 if self.runtime is not None else 0.0
        return max(used, self.loaded_at)


@dataclass
class ManagedModel:
    """A model the server knows. ``policy`` decides where unpinned requests go (None: nowhere)."""

    name: str
    entry: ModelEntry
    slots: dict[int, VersionSlot] = field(default_factory=dict)
    policy: RoutingPolicy | None = None
    #: True while the control mode, an operator or the registry wants this model served.
    wanted: bool = False
    #: Versions an active rollout relies on (never evicted).
    rollout_versions: frozenset[int] = frozenset()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def serving(self) -> int | None:
        return self.policy.champion if self.policy else None

    def resident_versions(self) -> list[int]:
        return sorted(v for v, s in self.slots.items() if s.resident)

    def protected(self) -> dict[int, str]:
        """Versions that must stay resident, with the reason."""
        out: dict[int, str] = {}
        for v in self.rollout_versions:
            out[v] = "rollout"
        if self.policy is not None:
            for v in self.policy.previous_champions[-1:]:
                out[v] = "previous champion"
            for v in self.policy.serving_versions():
                out[v] = "serving"
            out[self.policy.champion] = "champion"
        return out


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ModelManager:
    """Owns every ``VersionRuntime`` and the routing snapshot of every model."""

    def __init__(self, repository: ModelRepository, *, device: str, metrics: Metrics, router: Any,
                 registry: Registry, backend_loader: BackendLoader, batcher_factory: BatcherFactory,
                 memory_budget: int, max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES) -> None:
        """``max_queue_bytes``: the bound on queued input bytes of a version whose config sets none."""
        self.repository = repository
        self.device = device
        self.metrics = metrics
        self.router = router
        self.registry = registry
        self.memory_budget = memory_budget
        self._load_backend = backend_loader
        self._batcher_factory = batcher_factory
        self._max_queue_bytes = max_queue_bytes
        self.models: dict[str, ManagedModel] = {}
        #: The request path's only view of a model: replaced whole, never changed in place.
        self.tables: dict[str, ServingTable] = {}
        self._router_generation = 0
        #: Registry copies of version states written after a publish (kept so they are not collected).
        self._background: set[asyncio.Task[None]] = set()
        #: ServerReady also needs this (the fleet sync's "caught up with the registry"); cheap, no I/O.
        self.ready_gate: Callable[[], bool] = lambda: True
        #: Called after every routing publish (health refresh, rollout bookkeeping).
        self.on_change: Callable[[str], None] = lambda name: None
        #: Called on the load worker thread (never the event loop) once a version is resident and
        #: warm, before it can take a request; again when a new config replaces its runtime.
        #: Monitoring builds its per-version state here (monitoring.yaml, reference.npz).
        self.on_version_resident: Callable[[ModelSpec, int], None] = lambda spec, version: None
        #: Called on the unload worker thread after a version's runtime closed (not when replaced).
        self.on_version_unloaded: Callable[[str, int], None] = lambda name, version: None

    # -- queries (hot path) ----------------------------------------------------------------

    def model(self, name: str) -> ManagedModel:
        m = self.models.get(name)
        if m is None:
            if self.repository.listed(name):  # the last listing: the request path never lists the directory
                raise VersionNotReady(f"model '{name}' is in the repository but not loaded; load it with "
                                      "RepositoryModelLoad (explicit mode) or `swapserve load`")
            raise ModelNotFound(f"model '{name}' is not in the model repository; RepositoryIndex lists the models")
        return m

    def runtime(self, name: str, version: str = "", attributes: Mapping[str, Any] | None = None,
                request_id: str = "") -> VersionRuntime:
        """The runtime that should serve a request: the pinned version, else the routed one.

        Raises ModelNotFound for an unknown model or version, VersionNotReady when it cannot serve.
        """
        return self.route(name, version, attributes, request_id)[0]

    def route(self, name: str, version: str = "", attributes: Mapping[str, Any] | None = None,
              request_id: str = "") -> tuple[VersionRuntime, tuple[VersionRuntime, ...]]:
        """Like ``runtime`` plus the resident shadow versions that get a copy (none when pinned).

        One look-up of the model's serving table, which the request then holds: it never reads
        the control path's version slots.
        """
        table = self.tables.get(name)
        if table is None:
            self.model(name)  # raises: not in the repository, or not loaded
            raise VersionNotReady(f"model '{name}' has no serving version; retry")
        if version:
            return table.pinned(version), ()
        if table.policy is None:
            raise table.unrouted()
        route = self.router.route(name, attributes, request_id)
        runtime = table.routed(route.version)
        if not route.shadows:
            return runtime, ()
        return runtime, tuple(rt for v in route.shadows if (rt := table.runtimes.get(v)) is not None)

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            m = self.model(name)
        except SwapserveError:
            return False
        table = self.tables.get(m.name)
        if table is None:
            return False
        if version:
            return version.isdigit() and int(version) in table.resident
        return table.policy is not None

    def server_ready(self) -> bool:
        """Every model that should be served has a serving version, and ``ready_gate`` agrees (the
        fleet sync: this replica has applied the registry's current generation of its models)."""
        return self.ready_gate() and all(m.policy is not None for m in self.models.values() if m.wanted)

    def memory_used(self) -> int:
        return sum(s.memory_bytes for m in self.models.values() for s in m.slots.values() if s.runtime is not None)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        out: list[IndexEntry] = []
        for name in sorted(set(self.models) | set(self.repository.names())):
            m = self.models.get(name)
            shown = {v: s for v, s in (m.slots.items() if m else ()) if s.state is not VersionState.UNLOADED}
            if m is None or not shown:
                if not ready_only:
                    reason = (m.entry.error if m is not None and m.entry.error else "") or "unloaded"
                    out.append(IndexEntry(name, "", "UNAVAILABLE", reason))
                continue
            for v, slot in sorted(shown.items()):
                state = slot.state.index_state
                if ready_only and state != "READY":
                    continue
                out.append(IndexEntry(name, str(v), state, slot.reason))
        return out

    # -- building blocks (callers hold m.lock) ---------------------------------------------

    def entry_model(self, name: str) -> ManagedModel:
        """The ManagedModel for a repository model, created on first use (ModelNotFound if not in the repo)."""
        m = self.models.get(name)
        if m is None:
            entry = self.repository.entry(name)
            m = self.models[name] = ManagedModel(name, entry)
            self._publish_table(m)
        return m

    def _publish_table(self, m: ManagedModel, policy: RoutingPolicy | None = None,
                       generation: int | None = None) -> None:
        """Publish ``m``'s serving table from its slots (one reference store). Called after every
        change of a slot's state or runtime, of the entry or of the policy; ``policy`` and
        ``generation`` let ``apply_locked`` publish the table of a snapshot before the snapshot."""
        policy = policy if policy is not None else m.policy
        reachable = (VersionState.READY, VersionState.SERVING, VersionState.DRAINING)
        runtimes = {v: s.runtime for v, s in m.slots.items() if s.runtime is not None and s.state in reachable}
        resident = tuple(m.resident_versions())
        refusals: dict[int, Refusal] = {}
        for v in sorted(set(m.slots) | set(m.entry.versions)):
            slot = m.slots.get(v)
            if v in runtimes:
                continue
            if slot is None or slot.state in (VersionState.UNLOADED, VersionState.REGISTERED):
                if v in m.entry.versions:
                    refusals[v] = (VersionNotReady, f"model '{m.name}' version {v} is not loaded; resident "
                                                    f"versions: {list(resident)}")
                continue  # ModelNotFound, worded by the table
            refusals[v] = (VersionNotReady, f"model '{m.name}' version {v} is {slot.state.value}"
                           + (f": {slot.reason}" if slot.reason else "") + "; retry or pick a resident version")
        no_route: Refusal | None = None
        if policy is None:
            no_route = ((VersionNotReady, f"model '{m.name}' is unavailable: {m.entry.error}") if m.entry.error else
                        (VersionNotReady, f"model '{m.name}' has no serving version; load it or check "
                                          "RepositoryIndex for the reason"))
        previous = self.tables.get(m.name)
        if generation is None:
            generation = previous.generation if previous is not None and policy is not None else 0
        self.tables[m.name] = ServingTable(m.name, generation, m.entry.spec, policy, MappingProxyType(runtimes),
                                           resident, MappingProxyType(refusals), no_route)

    async def _set_state(self, m: ManagedModel, slot: VersionSlot, state: VersionState, reason: str = "",
                         wait: bool = True) -> None:
        """Set the slot's state now and copy it to the registry (awaited, or in the background with
        ``wait=False``, so that publishing routing never waits on the registry)."""
        slot.state = state
        slot.reason = reason
        if m.slots.get(slot.version) is slot:
            self._publish_table(m)

        async def record() -> None:
            try:
                # The slot's state when the write runs, not when it was queued: background writes may
                # run out of order, and the last one must hold the current state.
                await self.registry.call(lambda: self.registry.set_state(m.name, slot.version, slot.state.value,
                                                                         slot.reason))
            except SwapserveError as exc:  # unregistered, or the registry is down: log, keep serving
                log.warning("registry: %s", exc.message)
            except RuntimeError:  # the registry's executor is shut down (server stopping)
                pass

        if wait:
            await record()
        else:
            task = asyncio.get_running_loop().create_task(record())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def ensure_registered(self, m: ManagedModel, version: int, *, actor: str = "system",
                                reason: str = "found in the model repository", **extra: Any) -> Any:
        """The version's registry record, registering it (sha256 of its model file) if new.

        Raises ModelNotFound when the version directory or its model file is missing, and
        AlreadyExists when the files differ from what was registered under that number.
        """
        record = await self.registry.call(self.registry.get_version, m.name, version)
        if record is not None:
            return record
        entry = self.repository.entry(m.name)
        if entry.spec is None:
            raise ConfigError(entry.error or f"model '{m.name}' has an invalid config.pbtxt")
        if version not in entry.versions:
            raise ModelNotFound(f"model '{m.name}' has no version directory {version} in {entry.path}; "
                                f"found {sorted(entry.versions)}")
        path = entry.model_file(version)
        if not path.exists():
            raise ModelNotFound(f"model '{m.name}' version {version}: {path} is missing")
        digest = await asyncio.to_thread(sha256_of, path)
        return await self.registry.call(lambda: self.registry.register_version(
            m.name, version, source_path=str(path), sha256=digest, actor=actor, reason=reason, **extra))

    def _residents(self, loading: ManagedModel) -> list[Resident]:
        """Every resident version with why it must stay. Versions of other models that are in the
        middle of a control action (their lock is held) are not evicted: waiting for that lock while
        holding ``loading``'s could deadlock two loads that each want the other's memory."""
        out = []
        for m in self.models.values():
            protected = m.protected()
            busy = m is not loading and m.lock.locked()
            for v, s in m.slots.items():
                if s.runtime is not None:
                    why = protected.get(v, "") or ("busy with another control action" if busy else "")
                    out.append(Resident(m.name, v, s.memory_bytes, s.last_used, why))
        return out

    async def ensure_resident_locked(self, m: ManagedModel, version: int, *, spec: ModelSpec | None = None,
                                     replace: bool = False, actor: str = "system") -> list[str]:
        """Make ``version`` resident and warm (no traffic). Idempotent. Returns warnings.

        Registers the version first if needed and refuses files whose sha256 changed since
        registration. Evicts least-recently-used unprotected versions when the memory budget
        requires; raises ResourceExhausted (nothing evicted) when even that would not fit.
        On failure the slot is FAILED with the reason and the error is raised.
        """
        warnings: list[str] = []
        slot = m.slots.get(version)
        if slot is not None and slot.resident and not replace:
            return warnings
        entry = self.repository.entry(m.name)
        spec = spec or entry.spec
        if spec is None:
            raise ConfigError(entry.error or f"model '{m.name}' has an invalid config.pbtxt")
        record = await self.ensure_registered(m, version, actor=actor)
        path = entry.model_file(version) if version in entry.versions else Path(record.source_path)
        if not path.exists():
            raise ModelNotFound(f"model '{m.name}' version {version}: {path} is missing (registered from "
                                f"{record.source_path})")
        digest = await asyncio.to_thread(sha256_of, path)
        if digest != record.sha256:
            raise FailedPrecondition(
                f"model '{m.name}' version {version}: {path} changed since it was registered (sha256 {record.sha256[:12]}… "
                f"then, {digest[:12]}… now); versions are immutable: put the new files in a new version directory")
        need = path.stat().st_size
        for victim in plan_eviction(self.device, self.memory_budget, need, self._residents(m), m.name, version):
            vm = self.models[victim.model]
            warnings.append(f"evicted {victim.model} version {victim.version} (least recently used) to make room")
            log.warning("memory budget: %s", warnings[-1])
            if vm is m:
                await self.retire_locked(vm, victim.version)
            else:
                async with vm.lock:
                    await self.retire_locked(vm, victim.version)
        new = VersionSlot(version, VersionState.LOADING)
        if slot is None or not slot.resident:
            m.slots[version] = new
        await self._set_state(m, new, VersionState.LOADING)
        log.info("loading model '%s' version %d from %s", m.name, version, path)
        try:
            backend = await asyncio.to_thread(self._load_backend, spec, path, self.device)
            try:
                runtime = VersionRuntime(spec, version, path, backend, self._batcher_factory, self.metrics,
                                         device=self.device, max_queue_bytes=self._max_queue_bytes)
                await self._set_state(m, new, VersionState.WARMING)
                await asyncio.to_thread(self._start_runtime, runtime)
            except BaseException:
                backend.close()
                raise
        except Exception as exc:
            message = exc.message if isinstance(exc, SwapserveError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, SwapserveError):
                log.exception("model '%s' version %d failed to load", m.name, version)
            else:
                log.error("model '%s' version %d failed to load: %s", m.name, version, message)
            if m.slots.get(version) is new:
                await self._set_state(m, new, VersionState.FAILED, message)
            self.metrics.version_ready.labels(m.name, str(version)).set(0)
            if isinstance(exc, SwapserveError):
                raise
            raise VersionNotReady(f"model '{m.name}' version {version} failed to load: {message}") from exc
        new.runtime = runtime
        new.loaded_at = time.time()
        new.memory_bytes = runtime.memory_bytes()
        old = m.slots.get(version)
        m.slots[version] = new  # a replaced runtime (new config) takes over here; the old one drains below
        serving = m.policy is not None and version in m.policy.serving_versions()
        await self._set_state(m, new, VersionState.SERVING if serving else VersionState.READY)
        self.metrics.version_ready.labels(m.name, str(version)).set(1)
        log.info("model '%s' version %d is resident and warm (%.1f MiB)", m.name, version, new.memory_bytes / 2**20)
        if old is not None and old is not new and old.runtime is not None:
            await self._close_runtime(m, old, replaced=True)
        return warnings

    def _start_runtime(self, runtime: VersionRuntime) -> None:
        """Load worker thread: warm the runtime, then let the version's hooks prepare for it."""
        runtime.start()
        self._version_hook(self.on_version_resident, runtime.spec, runtime.version)

    def _close(self, runtime: VersionRuntime, replaced: bool) -> None:
        """Unload worker thread: close the runtime, then let the hooks forget it (unless replaced)."""
        runtime.close()
        if not replaced:
            self._version_hook(self.on_version_unloaded, runtime.spec.name, runtime.version)

    @staticmethod
    def _version_hook(hook: Callable[..., None], model: str | ModelSpec, version: int) -> None:
        """A hook's failure is logged, never a failed load or unload (monitoring must not stop serving)."""
        try:
            hook(model, version)
        except SwapserveError as exc:
            log.error("model '%s' version %d: %s", getattr(model, "name", model), version, exc.message)
        except Exception:  # noqa: BLE001
            log.exception("model '%s' version %d: version hook failed", getattr(model, "name", model), version)

    async def _close_runtime(self, m: ManagedModel, slot: VersionSlot, replaced: bool = False) -> None:
        rt = slot.runtime
        assert rt is not None
        if not await rt.drain():
            log.warning("model '%s' version %d: in-flight requests did not finish in time", m.name, slot.version)
        await asyncio.to_thread(self._close, rt, replaced)
        slot.runtime = None
        if m.slots.get(slot.version) is slot:
            self._publish_table(m)

    async def retire_locked(self, m: ManagedModel, version: int) -> None:
        """Drain then unload a version that takes no traffic (raises FailedPrecondition if it does)."""
        slot = m.slots.get(version)
        if slot is None or slot.runtime is None:
            return
        if m.policy is not None and version in m.policy.serving_versions():
            raise FailedPrecondition(f"model '{m.name}' version {version} is serving; move traffic away first")
        await self._set_state(m, slot, VersionState.DRAINING)
        await self._close_runtime(m, slot)
        await self._set_state(m, slot, VersionState.UNLOADED)
        self.metrics.version_ready.labels(m.name, str(version)).set(0)
        log.info("model '%s' version %d unloaded", m.name, version)

    async def apply_locked(self, m: ManagedModel, policy: RoutingPolicy, *, background: bool = False) -> None:
        """Publish ``policy`` as the model's routing snapshot (one atomic store), then update states.

        Raises InvalidInput when the policy names a version that is not resident. The states'
        registry copies are awaited, or written in the background with ``background`` (a
        fail-safe publish: returns without waiting on the registry).
        """
        policy.validate(m.name, m.resident_versions())
        self._router_generation += 1
        # The table first: every version the new snapshot names is resident, so already in it.
        self._publish_table(m, policy, self._router_generation)
        self.router.publish(m.name, policy.compile(self._router_generation))
        m.policy = policy
        self._publish_table(m)
        serving = policy.serving_versions()
        self.metrics.serving_version.labels(m.name).set(policy.champion)
        weights = dict(policy.traffic)
        for v in m.slots:
            self.metrics.traffic_share.labels(m.name, str(v)).set(weights.get(v, 0) / BASIS_POINTS)
        for v, slot in sorted(m.slots.items()):
            if slot.resident:
                want = VersionState.SERVING if v in serving else VersionState.READY
                if slot.state is not want:
                    await self._set_state(m, slot, want, wait=not background)
        self.on_change(m.name)

    async def _unpublish_locked(self, m: ManagedModel) -> None:
        self.router.remove(m.name)
        m.policy = None
        self._publish_table(m)
        self.on_change(m.name)

    # -- model-level operations (Triton RPCs, start-up, poll) ------------------------------

    async def load(self, name: str, *, tentative: bool = False) -> ManagedModel:
        """Load (or reload) a model per its config and version policy; hot: current versions serve meanwhile.

        An operator's routing (a registry deployment) is kept; otherwise unpinned requests go to the
        highest resident version, as in Triton. Raises ModelNotFound, ConfigError (invalid config) or
        VersionNotReady (no version could load); a failed extra version is reported in the index only.
        See :meth:`load_locked` for ``tentative``.
        """
        m = self.entry_model(name)
        async with m.lock:
            return await self.load_locked(m, tentative=tentative)

    async def load_locked(self, m: ManagedModel, *, tentative: bool = False) -> ManagedModel:
        """:meth:`load` for a caller that holds ``m.lock``.

        ``tentative`` (a load someone asked for: RepositoryModelLoad): when it raises, the model's
        serving state is as it was: it is wanted only if it was before (so a failed request never
        makes ServerReady false) and a model that was serving keeps its previous config. Otherwise
        (start-up, poll: the control mode wants every model) the model stays wanted and its entry
        shows why it is not served, so ServerReady and RepositoryIndex report the failure.
        """
        was_wanted, old_entry = m.wanted, m.entry
        try:
            return await self._load_locked(m)
        except BaseException:
            if tentative:
                m.wanted = was_wanted
                if old_entry.spec is not None and m.policy is not None:
                    m.entry = old_entry  # the serving versions keep the config they loaded with
                    self._publish_table(m)
            raise

    async def _load_locked(self, m: ManagedModel) -> ManagedModel:
        name = m.name
        m.wanted = True
        entry = self.repository.entry(name)
        old_spec = m.entry.spec
        m.entry = entry
        self._publish_table(m)
        if entry.error or entry.spec is None:
            message = entry.error or f"model '{name}' has an invalid config.pbtxt"
            if m.policy is not None:
                message += " (the versions loaded with the previous config keep serving)"
            raise ConfigError(message)
        wanted = entry.policy_versions()
        pinned = m.policy is not None and m.policy.pinned
        if not wanted and not pinned:
            raise VersionNotReady(f"model '{name}' has no version directory that its version policy selects; "
                                  f"found {sorted(entry.versions)}")
        config_changed = old_spec is not None and old_spec != entry.spec
        keep = set(wanted) | (m.policy.serving_versions() if pinned and m.policy else set())
        for v in sorted(keep):
            slot = m.slots.get(v)
            if slot is not None and slot.resident and not config_changed:
                continue
            if v not in entry.versions:
                continue
            try:
                await self.ensure_resident_locked(m, v, spec=entry.spec, replace=config_changed)
            except SwapserveError as exc:
                log.error("model '%s' version %d: %s", name, v, exc.message)
            except Exception as exc:  # noqa: BLE001 - one version's files (unreadable, vanished) fail only it
                log.exception("model '%s' version %d failed to load", name, v)
                slot = m.slots.get(v)
                if slot is not None and not slot.resident:
                    await self._set_state(m, slot, VersionState.FAILED, f"{type(exc).__name__}: {exc}")
        if pinned and m.policy is not None:
            if self.router.snapshot(name) is None:
                await self.apply_locked(m, m.policy)
        else:
            resident = [v for v in m.resident_versions() if v in wanted]
            if resident and (m.policy is None or m.policy.champion != resident[-1]):
                await self.apply_locked(m, RoutingPolicy.single(resident[-1]))
        protected = m.protected()
        for v in [v for v in m.resident_versions() if v not in keep and v not in protected]:
            await self.retire_locked(m, v)
        if m.policy is None:
            reasons = "; ".join(f"version {v}: {s.reason}" for v, s in sorted(m.slots.items()) if s.reason)
            raise VersionNotReady(f"model '{name}' failed to load: {reasons or 'no version became ready'}")
        return m

    async def unload(self, name: str) -> None:
        """Stop serving a model: route nothing to it, let in-flight requests finish, free it."""
        m = self.model(name) if name in self.models else self.entry_model(name)
        async with m.lock:
            await self.unload_locked(m)

    async def unload_locked(self, m: ManagedModel) -> None:
        """:meth:`unload` for a caller that holds ``m.lock``."""
        m.wanted = False
        await self._unpublish_locked(m)
        for v in list(m.slots):
            await self.retire_locked(m, v)

    async def load_all(self, names: list[str]) -> None:
        """Load several models; failures are logged and visible in the index, never raised."""
        for name in names:
            try:
                await self.load(name)
            except SwapserveError as exc:
                log.error("model '%s' not loaded: %s", name, exc.message)
            except Exception:  # noqa: BLE001 - one bad model never stops the others (or the server)
                log.exception("model '%s' not loaded", name)

    async def apply_deployment_locked(self, m: ManagedModel, policy: RoutingPolicy) -> None:
        """Make a recorded deployment (``policy`` from the registry) this server's routing. Caller
        holds ``m.lock``. In this order: preload and warm every version it routes to (evicting idle
        ones within the memory budget), publish it (one atomic store), then preload the rollback
        target, best effort. Raises SwapserveError (a version that cannot load, the memory budget)
        before anything is published: the routing that was live stays live.
        """
        m.wanted = True
        for v in sorted(policy.serving_versions() | {policy.champion}):
            await self.ensure_resident_locked(m, v)
        await self.apply_locked(m, policy)
        for v in policy.previous_champions[-1:]:  # the rollback target stays warm, best effort
            if v in policy.serving_versions() or v == policy.champion:
                continue
            try:
                await self.ensure_resident_locked(m, v)
            except SwapserveError as exc:
                log.warning("model '%s': previous champion %d not preloaded: %s", m.name, v, exc.message)

    async def restore(self) -> list[str]:
        """Bring back what the registry says is live (champion, split, shadows, cohorts), preloading
        what it needs before it is published. Returns the models restored."""
        restored = []
        names = set(self.repository.names())
        for name in await self.registry.call(self.registry.live_models):
            if name not in names:
                log.error("registry: model '%s' is live but no longer in the repository; not restored", name)
                continue
            deployment = await self.registry.call(self.registry.current_deployment, name)
            if deployment is None:
                continue
            policy = RoutingPolicy.from_deployment(deployment)
            m = self.entry_model(name)
            async with m.lock:
                try:
                    await self.apply_deployment_locked(m, policy)
                except SwapserveError as exc:
                    m.wanted = True
                    log.error("model '%s': could not restore deployment generation %d: %s", name,
                              policy.generation, exc.message)
                    continue
                except Exception:  # noqa: BLE001 - one model's files never stop the restore of the others
                    m.wanted = True
                    log.exception("model '%s': could not restore deployment generation %d", name, policy.generation)
                    continue
            log.info("model '%s': restored deployment generation %d (champion %d)", name, policy.generation,
                     policy.champion)
            restored.append(name)
        return restored

    async def poll_once(self) -> None:
        """Poll mode: register new version directories, load what the policy selects, reload changed
        configs, unload models whose directory disappeared."""
        names = set(self.repository.names())
        for name in sorted(names):
            m = self.models.get(name)
            try:
                entry = self.repository.entry(name)
                unchanged = (m is not None and m.wanted and entry.stamp == m.entry.stamp
                             and set(entry.versions) == set(m.entry.versions))
                if unchanged:
                    continue
                if entry.spec is not None:
                    mm = self.entry_model(name)
                    for v in sorted(set(entry.versions) - set(mm.entry.versions if m else ())):
                        await self.ensure_registered(mm, v, reason="new version directory (poll)")
                await self.load(name)
            except SwapserveError as exc:
                log.error("poll: model '%s': %s", name, exc.message)
            except Exception:  # noqa: BLE001 - the poll goes on with the next model
                log.exception("poll: model '%s' failed", name)
        for name in [n for n in self.models if n not in names and self.models[n].wanted]:
            await self.unload(name)
            self.models.pop(name, None)
            self.tables.pop(name, None)

    async def close(self) -> None:
        """Unload everything (graceful shutdown). Registry state is left as is: restart restores it."""
        for m in list(self.models.values()):
            async with m.lock:
                self.router.remove(m.name)
                self.tables.pop(m.name, None)  # requests now get UNAVAILABLE: the server is stopping
                for slot in list(m.slots.values()):
                    if slot.runtime is not None:
                        await self._close_runtime(m, slot)
