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
* except a return to the champion (:meth:`ControlPlane.return_to_champion`: rollback, abort,
  a failed gate), which is fail-safe: journaled in the local outbox (fsynced), published at
  once, and recorded in the registry by the :class:`Reconciler` when it answers — it never
  waits on the registry; ``status`` shows what is still pending;
* registry calls run on the registry's own executor with timeouts; a database failure is
  ``RegistryUnavailable`` (UNAVAILABLE), never a driver exception;
* a registry-first change starts from the registry's current deployment, never from a stale
  view: when another replica wrote a newer generation, this replica applies it first
  (:meth:`ControlPlane.catch_up`, as the fleet sync would) and computes the change from it; a
  writer that gets in between the catch-up and the write makes it catch up and retry
  (``CONFLICT_RETRIES``), so an operator is never refused because this replica lagged;
* it returns the model's new state.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from swapserve.controlplane.reconcile import Reconciler, rollout_from_dict
from swapserve.crashpoints import crash_point
from swapserve.errors import (FailedPrecondition, GenerationConflict, InvalidInput, ModelNotFound,
                              RegistryUnavailable, SwapserveError)
from swapserve.feedback.slices import SliceStats
from swapserve.lifecycle.manager import ManagedModel, ModelManager, VersionState
from swapserve.registry import Registry
from swapserve.registry.outbox import Outbox, OutboxEntry
from swapserve.registry.records import AuditEntry, Deployment, Event, Lease, RolloutRecord, TokenRecord
from swapserve.repository.paths import check_model_name, check_version
from swapserve.routing.policy import RoutingPolicy, check_split
from swapserve.types import ModelSummaryView, ModelView, ReplicaView, VersionView

log = logging.getLogger(__name__)

#: How often ``follow_events`` polls the registry (it is shared by replicas, so it is the source).
EVENT_POLL_S = 0.2
#: How long an operator's rollback waits for its registry write before answering "pending"
#: (routing is already published; the write goes on in the background).
ROLLBACK_RECORD_WAIT_S = 2.0
#: How long a rollback's checks wait on a registry read before going on without it.
FAILSAFE_READ_S = 1.0
#: How often a registry-first change catches up and retries after another replica wrote first.
CONFLICT_RETRIES = 3


def _same_routing(a: RoutingPolicy, b: RoutingPolicy) -> bool:
    return dataclasses.replace(a, generation=0) == dataclasses.replace(b, generation=0)


def deployment_args(policy: RoutingPolicy, *, action: str, actor: str, reason: str) -> dict[str, Any]:
    """``Registry.publish_deployment``'s keyword arguments for ``policy`` (JSON-safe: the outbox keeps them)."""
    return {"champion": policy.champion, "traffic": [list(t) for t in policy.traffic],
            "shadows": list(policy.shadows), "cohorts": [list(c) for c in policy.cohorts],
            "key_attribute": policy.key_attribute, "previous_champions": list(policy.previous_champions),
            "action": action, "actor": actor, "reason": reason}


def _iso(ts: float | datetime | None) -> str:
    if ts is None or ts == 0:
        return ""
    if isinstance(ts, datetime):
        return ts.astimezone(timezone.utc).isoformat()
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


class ControlPlane:
    def __init__(self, manager: ModelManager, registry: Registry, slices: SliceStats | None = None,
                 drift_summary: Callable[[str], dict[str, dict[str, Any]]] | None = None,
                 outbox: Outbox | None = None) -> None:
        self.manager = manager
        self.registry = registry
        self.slices = slices
        #: model -> {version: drift summary}; None when drift monitoring is off.
        self.drift_summary = drift_summary
        #: Decisions (and webhook deliveries) owed to the registry; in memory when not given.
        self.outbox = outbox if outbox is not None else Outbox(None)
        self.reconciler = Reconciler(registry, self.outbox, on_recorded=self._recorded)
        self.outbox.subscribe(self._export_pending)
        self._export_pending()
        #: The fleet sync (set by the server): this replica's id and convergence for ``status``.
        self.fleet: Any = None
        #: Called on a registry thread after this server creates or revokes a token (the
        #: authenticator rereads them then, not only on its timer).
        self.on_tokens_changed: Callable[[], None] | None = None

    def _export_pending(self) -> None:
        self.manager.metrics.registry_pending_writes.set(len(self.outbox.pending("decision")))

    def _recorded(self, entry: OutboxEntry, deployment: Deployment | None, rollout: RolloutRecord | None) -> None:
        """A journaled decision reached the registry: adopt its generation when that routing is
        still live (the next registry-first change is then conditional on the right one)."""
        m = self.manager.models.get(entry.model or "")
        if m is None or m.policy is None:
            return
        if deployment is None:
            if entry.payload.get("deployment") is not None:
                # Not recorded: its rollout had been decided by another replica meanwhile. Serve the
                # registry's routing again, whatever its generation (ours kept the old number).
                asyncio.get_running_loop().create_task(self._resync(m))
            return
        recorded = RoutingPolicy.from_deployment(deployment)
        if _same_routing(m.policy, recorded):
            m.policy = recorded

    async def _resync(self, m: ManagedModel) -> None:
        """Apply the registry's current deployment of ``m`` even at the generation it already
        serves (after a journaled decision the registry did not take). Never raises: the fleet's
        next pass retries what fails here."""
        try:
            async with m.lock:
                current = await self._db(self.registry.current_deployment, m.name)
                if current is None or m.policy is None:
                    return
                recorded = RoutingPolicy.from_deployment(current)
                if _same_routing(m.policy, recorded):
                    m.policy = recorded
                    return
                await self.manager.apply_deployment_locked(m, recorded)
                log.info("model '%s': serving the registry's generation %d again (a decision taken here was "
                         "superseded by another replica's)", m.name, current.generation)
        except SwapserveError as exc:
            log.warning("model '%s': could not re-apply the registry's deployment: %s", m.name, exc.message)

    # -- helpers -------------------------------------------------------------------------

    async def _db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.registry.call(fn, *args, **kwargs)

    def _model(self, name: str) -> ManagedModel:
        try:
            return self.manager.entry_model(name)
        except ModelNotFound:
            raise ModelNotFound(f"model '{name}' is not in the model repository "
                                f"{self.manager.repository.root}; `swapserve models` lists the models") from None

    async def _read_failsafe(self, fn: Any, *args: Any, wait_s: float | None = None) -> tuple[Any, str]:
        """A registry read that gives up (after ``wait_s``, else the registry's own timeout):
        (result, "") or (None, why not)."""
        try:
            if wait_s is None:
                return await self._db(fn, *args), ""
            return await asyncio.wait_for(self._db(fn, *args), wait_s), ""
        except RegistryUnavailable as exc:
            return None, exc.message
        except asyncio.TimeoutError:
            return None, f"the registry did not answer within {wait_s:g}s"

    async def _check_rollout(self, model: str, action: str, force: bool, version: int | None = None,
                             failsafe: bool = False, forceable: bool = True) -> str:
        """Refuse an action that conflicts with a running rollout unless forced. Returns an audit note.

        ``failsafe`` (a rollback): the registry gets FAILSAFE_READ_S to answer; without it, a rollout
        this server is driving (its versions are guarded) counts. Otherwise a registry failure raises.
        ``forceable`` False (the repository API, which has no --force): the message does not offer it."""
        force_hint = ", or pass --force" if forceable else ""
        if failsafe:
            rollout, down = await self._read_failsafe(self.registry.active_rollout, model, wait_s=FAILSAFE_READ_S)
        else:
            rollout, down = await self._db(self.registry.active_rollout, model), ""
        if down:
            m = self._model(model)
            if not m.rollout_versions:
                return ""
            if not force:
                raise FailedPrecondition(
                    f"model '{model}' has a running rollout (the registry is unavailable: {down}); "
                    f"`swapserve rollout abort {model}` first (it does not need the registry){force_hint}")
            return "[forced over a running rollout] "
        if rollout is not None and any((e.payload.get("rollout") or {}).get("id") == rollout.id
                                       for e in self.outbox.pending("decision", model)):
            rollout = None  # it has ended here; the registry has not heard yet
        if rollout is None:
            return ""
        if version is not None and action == "load":
            return ""
        if not force:
            raise FailedPrecondition(
                f"model '{model}' has a running rollout (id {rollout.id}, challenger {rollout.challenger}, "
                f"state {rollout.state}); `swapserve rollout pause|abort {model}` first"
                + (f", or pass --force to {action} anyway (audited)" if forceable else f" to {action} the model"))
        return f"[forced over rollout {rollout.id}] "

    def _resident_ready(self, m: ManagedModel, version: int, action: str) -> None:
        slot = m.slots.get(version)
        if slot is None or not slot.resident:
            state = slot.state.value if slot else "not loaded"
            raise FailedPrecondition(
                f"model '{m.name}' version {version} is {state}; it must be resident before it can be "
                f"{action}d: run `swapserve load {m.name} {version}` first")

    async def _catch_up_locked(self, m: ManagedModel, *, failsafe: bool = False) -> None:
        """Apply the registry's current deployment of ``m`` when it is newer than what this replica
        serves (preload, warm, publish: ``ModelManager.apply_deployment_locked``). Caller holds
        ``m.lock``. Nothing is adopted while one of this replica's own decisions (a rollback) is
        journaled but unrecorded: that decision is newer than anything the registry holds.

        Raises RegistryUnavailable (the registry did not answer) or the SwapserveError of a version
        that cannot be loaded here (nothing published). With ``failsafe`` (a rollback) a registry
        that does not answer within FAILSAFE_READ_S or a deployment that cannot be applied is
        logged and the local view is kept.
        """
        if self.outbox.pending("decision", m.name):
            return
        if failsafe:
            current, down = await self._read_failsafe(self.registry.current_deployment, m.name,
                                                      wait_s=FAILSAFE_READ_S)
            if down:
                return
        else:
            current = await self._db(self.registry.current_deployment, m.name)
        applied = m.policy.generation if m.policy is not None and m.policy.pinned else 0
        if current is None or current.generation <= applied:
            return
        try:
            await self.manager.apply_deployment_locked(m, RoutingPolicy.from_deployment(current))
        except SwapserveError as exc:
            if not failsafe:
                raise type(exc)(f"model '{m.name}': this replica serves generation {applied} and cannot apply the "
                                f"registry's generation {current.generation}: {exc.message}") from exc
            log.warning("model '%s': generation %d not applied before the rollback: %s", m.name,
                        current.generation, exc.message)
            return
        log.info("model '%s': caught up from generation %d to %d (%s by %s)", m.name, applied,
                 current.generation, current.action, current.actor)

    async def catch_up(self, model: str) -> RoutingPolicy | None:
        """Make this replica serve the registry's current deployment of ``model`` (when newer than
        what it serves); returns the policy live afterwards. See :meth:`_catch_up_locked`."""
        m = self._model(model)
        async with m.lock:
            await self._catch_up_locked(m)
            return m.policy

    async def _change_locked(self, m: ManagedModel, change: Callable[[RoutingPolicy | None], RoutingPolicy], *,
                             action: str, actor: str, reason: str, rollout: RolloutRecord | None = None,
                             production: int | None = None, event: dict[str, Any] | None = None,
                             check: Callable[[RoutingPolicy | None], None] | None = None,
                             fence: Lease | None = None) -> tuple[RoutingPolicy, RolloutRecord | None]:
        """Catch up, compute ``change(live policy)`` (after ``check``, which may refuse), record and
        publish it (:meth:`_record_locked`); when another replica wrote in between, catch up and
        try again, up to CONFLICT_RETRIES times. Caller holds ``m.lock``."""
        for attempt in range(CONFLICT_RETRIES):
            await self._catch_up_locked(m)
            if check is not None:
                check(m.policy)
            try:
                return await self._record_locked(m, change(m.policy), action=action, actor=actor, reason=reason,
                                                 rollout=rollout, production=production, event=event, fence=fence)
            except GenerationConflict:
                if attempt == CONFLICT_RETRIES - 1:
                    raise
                log.info("model '%s': another replica changed the deployment meanwhile; catching up and "
                         "retrying %s", m.name, action)
        raise AssertionError("unreachable")

    async def _record_locked(self, m: ManagedModel, policy: RoutingPolicy, *, action: str, actor: str, reason: str,
                             rollout: RolloutRecord | None = None, production: int | None = None,
                             event: dict[str, Any] | None = None,
                             fence: Lease | None = None) -> tuple[RoutingPolicy, RolloutRecord | None]:
        """Make ``policy`` the model's routing. Caller holds ``m.lock``. In this order:

        1. validate: InvalidInput (nothing written) unless the policy is well formed and every
           version it routes to is resident; the model's journaled decisions are recorded first
           (RegistryUnavailable, nothing written, while they cannot be), so this change never
           lands before an older rollback;
        2. write the deployment, its audit row and (when given) the rollout's new state, the
           challenger's production stage and an event in one registry transaction, conditional on
           the generation this replica last applied (GenerationConflict, nothing written, when
           another writer got there first: :meth:`_change_locked` catches up and retries) and,
           with a ``fence``, on the rollout lease still being held (NotLeader, nothing written);
        3. publish the recorded policy as the routing snapshot (one atomic store) and mark its
           versions deployed.

        So a crash between 2 and 3 loses nothing acknowledged (a restart applies the record), a
        crash before 2 leaves the decision untaken, and the snapshot never shows a policy the
        registry does not hold. Returns the recorded policy and the stored rollout.
        """
        policy.validate(m.name, m.resident_versions())
        await self.reconciler.flush(m.name)
        expected = m.policy.generation if m.policy is not None and m.policy.pinned else None
        if expected is None:  # not yet pinned here: another replica may have recorded one meanwhile
            current = await self._db(self.registry.current_deployment, m.name)
            expected = current.generation if current is not None else None
        args = deployment_args(policy, action=action, actor=actor, reason=reason)
        args["expected_generation"] = expected
        staged = rollout is not None
        if staged:
            crash_point("stage.before_commit")
        deployment, stored = await self._db(lambda: self.registry.record_decision(
            m.name, deployment=args, rollout=rollout, production=production, event=event, actor=actor, fence=fence))
        if staged:
            crash_point("stage.after_commit")
        recorded = RoutingPolicy.from_deployment(deployment)
        await self.manager.apply_locked(m, recorded)
        if staged:
            crash_point("stage.after_publish")
        try:
            for v in recorded.serving_versions():
                await self._db(self.registry.mark_deployed, m.name, v)
        except RegistryUnavailable as exc:  # informational; routing is recorded and published
            log.warning("model '%s': %s", m.name, exc.message)
        return recorded, stored

    async def publish_decision(self, model: str, change: Callable[[RoutingPolicy | None], RoutingPolicy], *,
                               action: str, actor: str, reason: str = "", rollout: RolloutRecord | None = None,
                               production: int | None = None, event: dict[str, Any] | None = None,
                               fence: Lease | None = None) -> tuple[RoutingPolicy, RolloutRecord | None]:
        """:meth:`publish` that records the rollout's new state (and ``production`` stage, ``event``)
        in the same transaction as the deployment: a stage either happened or did not. ``fence``:
        the rollout lease the decision is taken under (NotLeader, nothing done, once it is lost)."""
        m = self._model(model)
        async with m.lock:
            return await self._change_locked(m, change, action=action, actor=actor, reason=reason,
                                             rollout=rollout, production=production, event=event, fence=fence)

    async def _failsafe_locked(self, m: ManagedModel, policy: RoutingPolicy, *, action: str, actor: str,
                               reason: str, rollout: RolloutRecord | None = None,
                               audit: Sequence[dict[str, Any]] = (), event: dict[str, Any] | None = None,
                               webhooks: Sequence[dict[str, Any]] = ()) -> OutboxEntry:
        """Return traffic without the registry. Caller holds ``m.lock``. In this order:

        1. validate (InvalidInput, nothing done, when a version it routes to is not resident);
        2. journal the decision (deployment, rollout state, audit, event) and the webhook
           deliveries it owes in the outbox, as one fsynced line;
        3. publish the snapshot (one atomic store): traffic has left the challenger;
        4. hand the registry write to the reconciler (background, with backoff).

        A crash after 2 is completed on restart (the outbox is recorded before routing is
        restored); a crash before 2 leaves the decision untaken. Nothing here waits on the
        registry. The published policy keeps the last recorded generation until it is recorded.
        """
        policy.validate(m.name, m.resident_versions())
        payload = {"deployment": deployment_args(policy, action=action, actor=actor, reason=reason),
                   "rollout": rollout.to_dict() if rollout is not None else None,
                   "audit": list(audit), "event": event}
        items: list[tuple[str, str | None, dict[str, Any]]] = [("decision", m.name, payload)]
        items += [("webhook", m.name, w) for w in webhooks]
        entry = self.outbox.append(items)[0]
        crash_point("rollback.after_journal")
        await self.manager.apply_locked(m, dataclasses.replace(
            policy, generation=m.policy.generation if m.policy is not None else 0), background=True)
        crash_point("rollback.after_publish")
        self.reconciler.kick()
        return entry

    async def return_to_champion(self, model: str, change: Callable[[RoutingPolicy | None], RoutingPolicy], *,
                                 action: str, actor: str, reason: str = "", rollout: RolloutRecord | None = None,
                                 audit: Sequence[dict[str, Any]] = (), event: dict[str, Any] | None = None,
                                 webhooks: Sequence[dict[str, Any]] = ()) -> OutboxEntry:
        """The fail-safe publish (see :meth:`_failsafe_locked`): ``change(current policy)`` is live
        when this returns, whether or not the registry answers. Returns the journaled entry (its
        payload may still be amended in memory before the loop next yields)."""
        m = self._model(model)
        async with m.lock:
            return await self._failsafe_locked(m, change(m.policy), action=action, actor=actor, reason=reason,
                                               rollout=rollout, audit=audit, event=event, webhooks=webhooks)

    def pending_warnings(self, model: str) -> list[str]:
        """What the operator must know about ``model``'s decisions not yet in the registry."""
        entries = self.outbox.pending("decision", model)
        if not entries:
            return []
        first = entries[0]
        since = _iso(first.created_at)
        why = self.reconciler.last_error or "not yet attempted"
        return [f"registry write pending: {len(entries)} decision(s) since {since} (first: "
                f"{first.payload.get('deployment', {}).get('reason', '')}) are live but not yet in the registry; "
                f"retrying with backoff ({why})"]

    async def publish(self, model: str, change: Callable[[RoutingPolicy | None], RoutingPolicy], *, action: str,
                      actor: str, reason: str = "") -> RoutingPolicy:
        """The one way to change a model's routing: ``change(current policy)``, validated, recorded, published.

        ``change`` runs under the model's lock on the policy live at that moment (None when
        nothing routes yet), so concurrent changes never work from a stale policy; it should be
        a :class:`RoutingPolicy` transition. Then the guarantees of :meth:`_change_locked` and
        :meth:`_record_locked`, in their order. Returns the recorded policy (with its new generation).
        """
        m = self._model(model)
        async with m.lock:
            recorded, _ = await self._change_locked(m, change, action=action, actor=actor, reason=reason)
            return recorded

    # -- queries -------------------------------------------------------------------------

    def policy(self, model: str) -> RoutingPolicy | None:
        """What routes the model's unpinned requests now (None: nothing yet); ModelNotFound outside the repository."""
        return self._model(model).policy

    async def list_models(self) -> list[ModelSummaryView]:
        names = sorted(set(self.manager.repository.names()) | set(self.manager.models))
        out = []
        for name in names:
            m = self.manager.models.get(name)
            rollout, _ = await self._read_failsafe(self.registry.active_rollout, name)
            policy = m.policy if m else None
            out.append(ModelSummaryView(
                name=name, champion=policy.champion if policy else 0,
                traffic=tuple(policy.traffic) if policy else (),
                resident_versions=tuple(m.resident_versions()) if m else (),
                state="READY" if policy else "UNAVAILABLE",
                rollout_state=rollout.state if rollout else ""))
        return out

    async def status(self, model: str, warnings: Sequence[str] = ()) -> ModelView:
        """The model's state. Works while the registry is down: live routing and residency come
        from this server, registry fields are then empty and a warning says why."""
        m = self._model(model)
        warnings = list(warnings) + self.pending_warnings(model)
        if m.entry.error:
            warnings.append(f"unavailable: {m.entry.error}")
        listed, down = await self._read_failsafe(self.registry.list_versions, model)
        rollout = None
        if not down:
            rollout, down = await self._read_failsafe(self.registry.active_rollout, model)
        if down:
            warnings.append(f"registry unavailable: {down}; showing this server's live state")
        pending = [e for e in self.outbox.pending("decision", model) if e.payload.get("rollout")]
        if pending:  # the journaled decision is the truth until the registry has it
            rollout = rollout_from_dict(pending[-1].payload["rollout"])
        records = {r.version: r for r in listed or ()}
        registry_generation, replicas = 0, ()
        if not down:
            registry_generation, replicas = await self._fleet_view(model)
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
            drift=self.drift_summary(model) if self.drift_summary is not None else {},
            registry_generation=registry_generation, replicas=replicas)

    async def _fleet_view(self, model: str) -> tuple[int, tuple[ReplicaView, ...]]:
        """The registry's current generation of ``model`` and every replica's report of it (this
        replica's from memory, so it is never stale)."""
        from swapserve.controlplane.fleet import STALE_AFTER_S

        current, down = await self._read_failsafe(self.registry.current_deployment, model)
        states, down2 = (None, down) if down else await self._read_failsafe(
            lambda: self.registry.replica_states(model, stale_after_s=STALE_AFTER_S))
        if down or down2:
            return 0, ()
        target = current.generation if current is not None else 0
        me = self.fleet.replica_id if self.fleet is not None else None
        now = datetime.now(timezone.utc)
        out = []
        for st in states or ():
            if st.replica_id == me:
                continue
            stale = st.stale
            out.append(ReplicaView(
                replica_id=st.replica_id, address=st.address, generation=st.generation,
                converged=st.converged and st.generation >= target and not stale,
                reason=st.reason or ("" if st.generation >= target else f"generation {target} not yet applied")
                if not stale else f"no heartbeat since {_iso(st.heartbeat_at)} (down?); last reported "
                f"generation {st.generation}", heartbeat_at=_iso(st.heartbeat_at), stale=stale))
        if self.fleet is not None:
            m = self.manager.models.get(model)
            applied = m.policy.generation if m is not None and m.policy is not None and m.policy.pinned else 0
            c = self.fleet.convergence(model)
            reason = c.reason if c is not None and c.reason else (
                "" if applied >= target else f"generation {target} not yet applied")
            out.append(ReplicaView(replica_id=self.fleet.replica_id, address=self.fleet.address, generation=applied,
                                   converged=applied >= target and not reason, reason=reason,
                                   heartbeat_at=_iso(now), this=True))
        return target, tuple(sorted(out, key=lambda r: r.replica_id))

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

    async def tokens(self, include_inactive: bool = False) -> list[TokenRecord]:
        return list(await self._db(lambda: self.registry.tokens(include_inactive=include_inactive)))

    async def create_token(self, name: str, sha256: str, *, roles: list[str], models: list[str], actor: str,
                           expires_in_s: float = 0.0, reason: str = "") -> TokenRecord:
        """Store an API token by its hash (audited). ``expires_in_s`` 0: it never expires."""
        if expires_in_s < 0 or not math.isfinite(expires_in_s):
            raise InvalidInput("expires_in_s must be a positive number of seconds, or 0 for never")
        expires = datetime.now(timezone.utc) + timedelta(seconds=expires_in_s) if expires_in_s else None
        record = await self._db(lambda: self.registry.create_token(
            name, sha256, roles=roles, models=models, actor=actor, expires_at=expires, reason=reason))
        await self._tokens_changed()
        return record

    async def revoke_token(self, name: str, *, actor: str, reason: str = "") -> list[TokenRecord]:
        """Revoke every active token named ``name`` (audited); this server stops accepting them at once."""
        records = await self._db(lambda: self.registry.revoke_token(name, actor=actor, reason=reason))
        await self._tokens_changed()
        return list(records)

    async def _tokens_changed(self) -> None:
        if self.on_tokens_changed is not None:
            await self._db(self.on_tokens_changed)

    # -- mutations -----------------------------------------------------------------------

    async def register(self, model: str, version: int, *, actor: str, reason: str = "",
                       training_run: str | None = None, data_ref: str | None = None,
                       parent_version: int | None = None, metrics: dict[str, dict[str, float]] | None = None,
                       metadata: dict[str, Any] | None = None) -> ModelView:
        """Record a version directory in the registry (sha256 of its model file). Idempotent for the same files."""
        m = self._model(model)
        version = check_version(version, model)
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
        version = check_version(version, model)
        async with m.lock:
            was_resident = bool(m.slots.get(version) and m.slots[version].resident)
            warnings = await self.manager.ensure_resident_locked(m, version, actor=actor)
            if not was_resident:
                await self._db(lambda: self.registry.audit(actor=actor, action="load", model=model, version=version,
                                                           before=None, after={"resident": True}, reason=reason))
        return await self.status(model, warnings)

    async def unload(self, model: str, version: int, *, actor: str, reason: str = "", force: bool = False) -> ModelView:
        m = self._model(model)
        version = check_version(version, model)
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

    async def load_model(self, model: str, *, actor: str, reason: str = "") -> ModelView:
        """Load (or reload) a whole model per its config and version policy: the repository API's
        RepositoryModelLoad. Audited with ``actor``. Refused (FAILED_PRECONDITION) while a rollout
        runs on the model: a reload may replace the versions the rollout compares. A failed load
        changes nothing that serves (``ModelManager.load_locked``, tentative) and is raised."""
        m = self._model(check_model_name(model))
        async with m.lock:
            await self._check_rollout(model, "reload", force=False, forceable=False)
            before = self._residency(m)
            await self.manager.load_locked(m, tentative=True)
            await self._db(lambda: self.registry.audit(
                actor=actor, action="repository_load", model=model, before=before, after=self._residency(m),
                reason=reason or "RepositoryModelLoad"))
        return await self.status(model)

    async def unload_model(self, model: str, *, actor: str, reason: str = "") -> ModelView:
        """Stop serving a whole model and free its versions: the repository API's RepositoryModelUnload.
        Audited with ``actor``. Refused (FAILED_PRECONDITION, nothing changed) while a rollout runs on
        the model, and while its champion is one the control plane recorded (promote, traffic,
        rollback, a rollout): that deployment is the fleet's, restored on every restart, and only the
        control service changes it. A model served by the default routing (the highest version its
        policy loaded, as in Triton) is unloaded."""
        m = self._model(check_model_name(model))
        async with m.lock:
            await self._check_rollout(model, "unload", force=False, forceable=False)
            if m.policy is not None and m.policy.pinned:
                raise FailedPrecondition(
                    f"model '{model}' serves version {m.policy.champion} as its champion, recorded by the control "
                    f"plane (deployment generation {m.policy.generation}); the repository API does not unload a "
                    f"recorded champion: change it with the control service (`swapserve promote|traffic|rollback "
                    f"{model}`), and `swapserve unload {model} VERSION` unloads versions that take no traffic")
            before = self._residency(m)
            await self.manager.unload_locked(m)
            await self._db(lambda: self.registry.audit(
                actor=actor, action="repository_unload", model=model, before=before, after=self._residency(m),
                reason=reason or "RepositoryModelUnload"))
        return await self.status(model)

    @staticmethod
    def _residency(m: ManagedModel) -> dict[str, Any]:
        return {"resident": m.resident_versions(), "champion": m.policy.champion if m.policy else None}

    async def promote(self, model: str, version: int, *, actor: str, reason: str = "", force: bool = False) -> ModelView:
        """100% of traffic to ``version``; the old champion goes on the history and stays resident
        (:meth:`RoutingPolicy.promoted`: the split and cohort rules go, the other shadows stay)."""
        m = self._model(model)
        async with m.lock:
            note = await self._check_rollout(model, "promote", force)
            self._resident_ready(m, version, "promote")
            await self._change_locked(m, lambda p: (p or RoutingPolicy.single(version)).promoted(version),
                                      action="promote", actor=actor, reason=note + reason)
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
            note = await self._check_rollout(model, "roll back", force, failsafe=True)
            await self._catch_up_locked(m, failsafe=True)  # roll back what the fleet serves, not a stale view
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
            entry = await self._failsafe_locked(m, policy, action="rollback", actor=actor, reason=note + reason)
        # Routing is live; give the registry a moment so that a healthy one answers "recorded".
        try:
            await asyncio.wait_for(self.reconciler.drain(model), ROLLBACK_RECORD_WAIT_S)
        except asyncio.TimeoutError:
            pass
        if self.outbox.get(entry.id) is not None:
            warnings.append(f"rolled back to version {target}: routing is live, the registry write is pending "
                            f"({self.reconciler.last_error or 'the registry is slow'}); it is retried in the background")
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

            def change(p: RoutingPolicy | None) -> RoutingPolicy:
                if p is None:
                    return RoutingPolicy.first_split(traffic, shadows=shadows, cohorts=cohorts,
                                                     key_attribute=key_attribute)
                return p.with_split(traffic, shadows=shadows, cohorts=cohorts, key_attribute=key_attribute)

            await self._change_locked(m, change, action="traffic", actor=actor, reason=note + reason)
        return await self.status(model)


__all__ = ["ControlPlane"]
