"""Operator actions: register, load, unload, promote, rollback, traffic — validated, serialised, audited.

The control servicer converts protobuf and calls this; the rollout controller (#6)
calls it too. :meth:`ControlPlane.publish` is the only way a model's recorded routing
changes; the new policy itself always comes from a transition of
:class:`~swapserve.routing.policy.RoutingPolicy` (``promoted``, ``rolled_back``,
``with_split``, ``for_stage``). Guarantees for every mutating call:

* it runs under the model's lock, so calls on one model never interleave;
* it is validated before anything changes (unknown or non-resident versions, weights
  that do not sum to 100%, a running rollout without ``force``) with a precise error;
* a routing change is written to the registry (deployment + audit row, one transaction)
  *before* the snapshot is published, so a crash never loses an acknowledged change and
  a restart restores exactly what was last acknowledged;
* it returns the model's new state.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from swapserve.errors import FailedPrecondition, InvalidInput, ModelNotFound
from swapserve.feedback.slices import SliceStats
from swapserve.lifecycle.manager import ManagedModel, ModelManager, VersionState
from swapserve.registry import Registry
from swapserve.registry.records import AuditEntry, Event
from swapserve.routing.policy import RoutingPolicy, check_split
from swapserve.types import ModelSummaryView, ModelView, VersionView

log = logging.getLogger(__name__)

#: How often ``follow_events`` polls the registry (it is shared by replicas, so it is the source).
EVENT_POLL_S = 0.2


def _iso(ts: float | datetime | None) -> str:
    if ts is None or ts == 0:
        return ""
    if isinstance(ts, datetime):
        return ts.astimezone(timezone.utc).isoformat()
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


class ControlPlane:
    def __init__(self, manager: ModelManager, registry: Registry, slices: SliceStats | None = None,
                 drift_summary: Callable[[str], dict[str, dict[str, Any]]] | None = None) -> None:
        self.manager = manager
        self.registry = registry
        self.slices = slices
        #: model -> {version: drift summary}; None when drift monitoring is off.
        self.drift_summary = drift_summary

    # -- helpers -------------------------------------------------------------------------

    async def _db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.registry.call(fn, *args, **kwargs)

    def _model(self, name: str) -> ManagedModel:
        try:
            return self.manager.entry_model(name)
        except ModelNotFound:
            raise ModelNotFound(f"model '{name}' is not in the model repository "
                                f"{self.manager.repository.root}; `swapserve models` lists the models") from None

    async def _check_rollout(self, model: str, action: str, force: bool, version: int | None = None) -> str:
        """Refuse an action that conflicts with a running rollout unless forced. Returns an audit note."""
        rollout = await self._db(self.registry.active_rollout, model)
        if rollout is None:
            return ""
        if version is not None and action == "load":
            return ""
        if not force:
            raise FailedPrecondition(
                f"model '{model}' has a running rollout (id {rollout.id}, challenger {rollout.challenger}, "
                f"state {rollout.state}); `swapserve rollout pause|abort {model}` first, or pass --force "
                f"to {action} anyway (audited)")
        return f"[forced over rollout {rollout.id}] "

    def _resident_ready(self, m: ManagedModel, version: int, action: str) -> None:
        slot = m.slots.get(version)
        if slot is None or not slot.resident:
            state = slot.state.value if slot else "not loaded"
            raise FailedPrecondition(
                f"model '{m.name}' version {version} is {state}; it must be resident before it can be "
                f"{action}d: run `swapserve load {m.name} {version}` first")

    async def _publish_locked(self, m: ManagedModel, policy: RoutingPolicy, *, action: str, actor: str,
                              reason: str) -> RoutingPolicy:
        """Make ``policy`` the model's routing. Caller holds ``m.lock``. In this order:

        1. validate: InvalidInput (nothing written) unless the policy is well formed and every
           version it routes to is resident;
        2. write the deployment and its audit row in one registry transaction, conditional on the
           generation this replica last applied (FailedPrecondition, nothing written, when another
           writer got there first);
        3. publish the recorded policy as the routing snapshot (one atomic store) and mark its
           versions deployed.

        So a crash between 2 and 3 loses nothing acknowledged (a restart applies the record), and
        the snapshot never shows a policy the registry does not hold. Returns the recorded policy.
        """
        policy.validate(m.name, m.resident_versions())
        expected = m.policy.generation if m.policy is not None and m.policy.pinned else None
        if expected is None:  # not yet pinned here: another replica may have recorded one meanwhile
            current = await self._db(self.registry.current_deployment, m.name)
            expected = current.generation if current is not None else None
        deployment = await self._db(
            lambda: self.registry.publish_deployment(
                m.name, champion=policy.champion, traffic=list(policy.traffic), shadows=list(policy.shadows),
                cohorts=list(policy.cohorts), key_attribute=policy.key_attribute,
                previous_champions=list(policy.previous_champions), action=action, actor=actor, reason=reason,
                expected_generation=expected))
        recorded = RoutingPolicy.from_deployment(deployment)
        await self.manager.apply_locked(m, recorded)
        for v in recorded.serving_versions():
            await self._db(self.registry.mark_deployed, m.name, v)
        return recorded

    async def publish(self, model: str, change: Callable[[RoutingPolicy | None], RoutingPolicy], *, action: str,
                      actor: str, reason: str = "") -> RoutingPolicy:
        """The one way to change a model's routing: ``change(current policy)``, validated, recorded, published.

        ``change`` runs under the model's lock on the policy live at that moment (None when
        nothing routes yet), so concurrent changes never work from a stale policy; it should be
        a :class:`RoutingPolicy` transition. Then the guarantees of :meth:`_publish_locked`, in
        its order. Returns the recorded policy (with its new generation).
        """
        m = self._model(model)
        async with m.lock:
            return await self._publish_locked(m, change(m.policy), action=action, actor=actor, reason=reason)

    # -- queries -------------------------------------------------------------------------

    def policy(self, model: str) -> RoutingPolicy | None:
        """What routes the model's unpinned requests now (None: nothing yet); ModelNotFound outside the repository."""
        return self._model(model).policy

    async def list_models(self) -> list[ModelSummaryView]:
        names = sorted(set(self.manager.repository.names()) | set(self.manager.models))
        out = []
        for name in names:
            m = self.manager.models.get(name)
            rollout = await self._db(self.registry.active_rollout, name)
            policy = m.policy if m else None
            out.append(ModelSummaryView(
                name=name, champion=policy.champion if policy else 0,
                traffic=tuple(policy.traffic) if policy else (),
                resident_versions=tuple(m.resident_versions()) if m else (),
                state="READY" if policy else "UNAVAILABLE",
                rollout_state=rollout.state if rollout else ""))
        return out

    async def status(self, model: str, warnings: Sequence[str] = ()) -> ModelView:
        m = self._model(model)
        records = {r.version: r for r in await self._db(self.registry.list_versions, model)}
        rollout = await self._db(self.registry.active_rollout, model)
        policy = m.policy
        versions = []
        for v in sorted(set(records) | set(m.slots)):
            slot = m.slots.get(v)
            rec = records.get(v)
            state = slot.state.value if slot else (rec.state if rec else VersionState.REGISTERED.value)
            versions.append(VersionView(
                version=v, state=state, reason=slot.reason if slot else (rec.state_reason if rec else ""),
                traffic_bp=policy.weight_of(v) if policy else 0,
                shadow=bool(policy and v in policy.shadows),
                resident=bool(slot and slot.resident), memory_bytes=slot.memory_bytes if slot and slot.runtime else 0,
                sha256=rec.sha256 if rec else "", stage=rec.stage if rec else "",
                source_path=rec.source_path if rec else "", registered_at=_iso(rec.registered_at) if rec else "",
                training_run=(rec.training_run or "") if rec else "", data_ref=(rec.data_ref or "") if rec else "",
                parent_version=(rec.parent_version or 0) if rec else 0,
                last_used_at=_iso(slot.last_used) if slot and slot.runtime else ""))
        return ModelView(
            name=model, champion=policy.champion if policy else 0,
            previous_champions=tuple(policy.previous_champions) if policy else (),
            traffic=tuple(policy.traffic) if policy else (), shadows=tuple(policy.shadows) if policy else (),
            cohorts=tuple(policy.cohorts) if policy else (),
            key_attribute=policy.key_attribute if policy else "routing_key",
            generation=policy.generation if policy else 0, versions=tuple(versions),
            memory_budget_bytes=self.manager.memory_budget, memory_used_bytes=self.manager.memory_used(),
            warnings=tuple(warnings), rollout=rollout.to_dict() if rollout else None, live=self._live(model, m),
            drift=self.drift_summary(model) if self.drift_summary is not None else {})

    def _live(self, model: str, m: ManagedModel) -> dict[str, dict[str, dict[str, Any]]]:
        """Live counts per resident version and slice (since the server started)."""
        if self.slices is None:
            return {}
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for v in sorted(m.slots):
            snap = self.slices.snapshot(model, v)
            if len(snap) == 1 and not snap["overall"].requests:
                continue
            out[str(v)] = {s: {"requests": c.requests, "errors": c.errors, "labelled": c.labelled,
                               "accuracy": c.accuracy, "error_rate": c.error_rate,
                               "mae": (c.abs_error_sum / c.numeric) if c.numeric else None,
                               "latency_p99_ms": c.latency_p99_s * 1e3 if c.latency_p99_s is not None else None}
                           for s, c in sorted(snap.items())}
        return out

    async def events(self, model: str | None = None, after_id: int = 0, limit: int = 100) -> list[Event]:
        return list(await self._db(lambda: self.registry.events(model, after_id=after_id, limit=limit)))

    async def follow_events(self, model: str | None = None, after_id: int = 0) -> AsyncIterator[Event]:
        """New events as they land in the registry, forever (cancel to stop)."""
        last = after_id
        while True:
            batch = await self.events(model, last, 500)
            for e in batch:
                last = max(last, e.id)
                yield e
            if not batch:
                await asyncio.sleep(EVENT_POLL_S)

    async def rollouts(self, model: str, limit: int = 20) -> list[Any]:
        return list(await self._db(self.registry.rollouts, model, limit))

    async def record_metrics(self, model: str, version: int, metrics: dict[str, dict[str, float]], *,
                             source: str = "offline", actor: str, reason: str = "") -> ModelView:
        """Store metrics by slice for a registered version (``swapserve evaluate`` sends offline ones)."""
        self._model(model)
        await self._db(self.registry.require_version, model, version)
        await self._db(lambda: self.registry.record_metrics(model, version, metrics, source=source))
        await self._db(lambda: self.registry.audit(actor=actor, action="metrics", model=model, version=version,
                                                   before=None, after={"source": source, "metrics": metrics},
                                                   reason=reason))
        return await self.status(model)

    async def audit_log(self, model: str | None = None, limit: int = 100) -> list[AuditEntry]:
        return list(await self._db(lambda: self.registry.audit_log(model, limit=limit)))

    # -- mutations -----------------------------------------------------------------------

    async def register(self, model: str, version: int, *, actor: str, reason: str = "",
                       training_run: str | None = None, data_ref: str | None = None,
                       parent_version: int | None = None, metrics: dict[str, dict[str, float]] | None = None,
                       metadata: dict[str, Any] | None = None) -> ModelView:
        """Record a version directory in the registry (sha256 of its model file). Idempotent for the same files."""
        m = self._model(model)
        if version < 1:
            raise InvalidInput(f"model '{model}': version {version} is invalid; versions are positive integers")
        async with m.lock:
            await self.manager.ensure_registered(
                m, version, actor=actor, reason=reason or "registered by operator", training_run=training_run,
                data_ref=data_ref, parent_version=parent_version or None, metadata=metadata)
            if metrics:
                await self._db(lambda: self.registry.record_metrics(model, version, metrics, source="offline"))
        return await self.status(model)

    async def load(self, model: str, version: int, *, actor: str, reason: str = "", force: bool = False) -> ModelView:
        """Preload and warm a version (registering it first if needed). Idempotent when resident."""
        m = self._model(model)
        async with m.lock:
            was_resident = bool(m.slots.get(version) and m.slots[version].resident)
            warnings = await self.manager.ensure_resident_locked(m, version, actor=actor)
            if not was_resident:
                await self._db(lambda: self.registry.audit(actor=actor, action="load", model=model, version=version,
                                                           before=None, after={"resident": True}, reason=reason))
        return await self.status(model, warnings)

    async def unload(self, model: str, version: int, *, actor: str, reason: str = "", force: bool = False) -> ModelView:
        m = self._model(model)
        async with m.lock:
            note = ""
            if version in m.rollout_versions:
                note = await self._check_rollout(model, "unload", force)
            if m.policy is not None and version in m.policy.serving_versions():
                raise FailedPrecondition(
                    f"model '{model}' version {version} is serving ({m.policy.weight_of(version) / 100:g}% of traffic"
                    f"{', shadow' if version in m.policy.shadows else ''}); move traffic away first "
                    f"(swapserve traffic / promote / rollback)")
            slot = m.slots.get(version)
            if slot is None or slot.runtime is None:
                if version not in m.slots and await self._db(self.registry.get_version, model, version) is None:
                    raise ModelNotFound(f"model '{model}' has no version {version}")
                return await self.status(model)
            await self.manager.retire_locked(m, version)
            await self._db(lambda: self.registry.audit(actor=actor, action="unload", model=model, version=version,
                                                       before={"resident": True}, after={"resident": False},
                                                       reason=note + reason))
        return await self.status(model)

    async def promote(self, model: str, version: int, *, actor: str, reason: str = "", force: bool = False) -> ModelView:
        """100% of traffic to ``version``; the old champion goes on the history and stays resident
        (:meth:`RoutingPolicy.promoted`: the split and cohort rules go, the other shadows stay)."""
        m = self._model(model)
        async with m.lock:
            note = await self._check_rollout(model, "promote", force)
            self._resident_ready(m, version, "promote")
            policy = (m.policy or RoutingPolicy.single(version)).promoted(version)
            await self._publish_locked(m, policy, action="promote", actor=actor, reason=note + reason)
        return await self.status(model)

    async def rollback(self, model: str, to_version: int | None = None, *, actor: str, reason: str = "",
                       force: bool = False) -> ModelView:
        """Back to the previous champion (one step down the history), or to a named version.

        A target that was evicted is preloaded first (with a warning); nothing is published until
        it is warm.
        """
        m = self._model(model)
        warnings: list[str] = []
        async with m.lock:
            note = await self._check_rollout(model, "roll back", force)
            old = m.policy
            if to_version is None and (old is None or not old.previous_champions):
                raise FailedPrecondition(f"model '{model}' has no previous champion to roll back to; "
                                         "use `swapserve promote` or `rollback --to VERSION`")
            target = to_version if to_version is not None else old.previous_champions[-1]  # type: ignore[union-attr]
            slot = m.slots.get(target)
            if slot is None or not slot.resident:
                warnings.append(f"version {target} was not resident; preloaded and warmed it before switching")
                warnings += await self.manager.ensure_resident_locked(m, target, actor=actor)
            policy = (old or RoutingPolicy.single(target)).rolled_back(to_version)
            await self._publish_locked(m, policy, action="rollback", actor=actor, reason=note + reason)
        return await self.status(model, warnings)

    async def set_traffic(self, model: str, traffic: Sequence[tuple[int, int]], *, shadows: Sequence[int] = (),
                          cohorts: Sequence[tuple[str, str, int]] = (), key_attribute: str | None = None,
                          actor: str, reason: str = "", force: bool = False) -> ModelView:
        """Set the split (basis points), shadows, cohort rules and routing key in one publish
        (:meth:`RoutingPolicy.with_split`: the champion stays unless it gets no traffic)."""
        m = self._model(model)
        async with m.lock:
            note = await self._check_rollout(model, "change traffic of", force)
            check_split(traffic, model)
            if m.policy is None:
                policy = RoutingPolicy.first_split(traffic, shadows=shadows, cohorts=cohorts,
                                                   key_attribute=key_attribute)
            else:
                policy = m.policy.with_split(traffic, shadows=shadows, cohorts=cohorts, key_attribute=key_attribute)
            await self._publish_locked(m, policy, action="traffic", actor=actor, reason=note + reason)
        return await self.status(model)


__all__ = ["ControlPlane"]
