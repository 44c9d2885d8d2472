"""The live rollout controller: applies stages, checks gates continuously, advances or rolls back.

One controller per server drives every active rollout (at most one per model). State lives in
the registry (``RolloutRecord``: plan, stage, state, evidence), so a restarted server resumes a
rollout at its stage; what is live is restored by the lifecycle manager from the deployment
records, which every stage change writes through the control plane (``ControlPlane.publish``
with a ``RoutingPolicy.for_stage`` transition: the controller never builds a policy itself).

Timeline of a rollout::

    start: offline gate (optional) -> preload + warm the challenger -> stage 0
    stage i: publish its split (challenger share, shadow, cohort rules); gates checked every
             tick and within ~tick_s of every joined label (fail -> rollback, at once);
             advance when gates pass and min_duration/min_samples are met (and approved if
             the stage asks for it)
    a 100% stage promotes the challenger (the old champion goes on the history, stays resident)
    watch: after the last stage the gates stay armed for ``watch``; then the rollout is
             ``promoted`` (A/B plans end ``completed`` with a report and traffic back on the
             champion instead)

Fault tolerance: every decision is one registry transaction (``ControlPlane.publish_decision``:
deployment + rollout state together), except a return to the champion (a failed gate, an
abort), which is fail-safe (``ControlPlane.return_to_champion``: journaled in the outbox,
published at once, recorded when the registry answers). A restarted server therefore resumes a
rollout exactly at a recorded stage, and never resumes one whose rollback it journaled.
Webhooks (rollback and promotion) are journaled too and signed (``rollout.webhook``).

Gates compare cumulative counts since the rollout started (``SliceStats.snapshot(since=...)``);
during the 100% stages and the watch the champion's counts are frozen at their canary values,
which is the baseline the challenger must keep up with.

A fleet decides once (docs/fleet.md, "Rollouts in a fleet"). Every replica runs a controller;
the one holding the registry's rollout lease (``registry.leases``, renewed every
``lease_ttl_s / 4``, lost after ``lease_ttl_s`` without renewal) is the leader and the only one
that evaluates gates. Every replica follows the registry's active rollouts (``SYNC_S``) and
flushes its own counts per version and slice to its own evidence row; the leader's evidence is
its live counts plus every other replica's last flush, so a label counted anywhere counts, and a
new leader continues the same stage with the same evidence. Each decision (a stage, a promotion,
an approval wait) is recorded under the lease's epoch as its fence, in the decision's own
transaction: a deposed leader's decision is refused (NotLeader), never recorded. A return to the
champion is always safe, so the last leader still takes it while the registry cannot be reached
(journaled, as above); operators' actions (start, pause, resume, approve, abort) work on any
replica.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from swapserve.controlplane import FAILSAFE_READ_S, ControlPlane
from swapserve.controlplane.reconcile import rollout_from_dict
from swapserve.crashpoints import crash_point
from swapserve.errors import FailedPrecondition, InvalidInput, NotLeader, StaleRollout, SwapserveError
from swapserve.feedback.slices import SliceStats
from swapserve.registry.leases import ROLLOUT_LEASE
from swapserve.registry.records import Lease, RolloutRecord
from swapserve.rollout.gates import OVERALL, Decision, evaluate
from swapserve.rollout.plan import RolloutPlan, Stage
from swapserve.rollout.webhook import WebhookSender, delivery
from swapserve.routing.policy import RoutingPolicy
from swapserve.telemetry.metrics import Metrics
from swapserve.types import SliceCounts
from swapserve.units import BASIS_POINTS

log = logging.getLogger(__name__)

#: How often every active rollout is re-evaluated even without new labels (seconds).
TICK_S = 0.25
#: How long a tick (or an abort) waits for its decisions to reach the registry before going on;
#: traffic has already left the challenger by then.
RECORD_WAIT_S = 1.0
#: How often every active rollout's counts are flushed to the registry (seconds): a crash loses at
#: most about this much evidence; a restarted server adds what it counts to the flushed counts.
EVIDENCE_FLUSH_S = 1.0
#: How long a tick waits for its lease renewal and registry reads before it checks the gates anyway.
REFRESH_WAIT_S = 0.25
#: Attempts of an operator's action that lost a race with the leader's write of the same rollout.
CONFLICT_RETRIES = 3
#: How often a replica re-reads the registry's active rollouts and the other replicas' evidence.
SYNC_S = 0.5
#: The rollout lease's time to live: a leader that stops renewing is replaced after about this long.
LEASE_TTL_S = 4.0
#: A leader stops taking fenced decisions this far into the ttl without a renewal (before the
#: registry could give the lease away); the registry's check is what guarantees it, this only spares it.
LEASE_SAFETY = 0.75

_ADDITIVE = ("requests", "errors", "labelled", "correct", "numeric", "abs_error_sum", "sq_error_sum")


def _plus(a: SliceCounts, b: SliceCounts) -> SliceCounts:
    """Counts of two disjoint periods together (p99: the worse of the two, which is conservative)."""
    p99 = [p for p in (a.latency_p99_s, b.latency_p99_s) if p is not None]
    return SliceCounts(**{f: getattr(a, f) + getattr(b, f) for f in _ADDITIVE},
                       latency_p99_s=max(p99) if p99 else None)


def _sum(parts: list[dict[str, SliceCounts]]) -> dict[str, SliceCounts]:
    out: dict[str, SliceCounts] = {}
    for part in parts:
        for s, c in part.items():
            out[s] = _plus(out[s], c) if s in out else c
    return out


def _counts_to_json(snap: dict[str, SliceCounts]) -> dict[str, dict[str, Any]]:
    return {s: dataclasses.asdict(c) for s, c in snap.items()}


def _counts_from_json(d: dict[str, Any]) -> dict[str, SliceCounts]:
    return {s: SliceCounts(**{k: v for k, v in c.items() if k in _ADDITIVE or k == "latency_p99_s"})
            for s, c in d.items()}


def _results(decision: Decision) -> list[dict[str, Any]]:
    return [{"gate": r.gate, "slice": r.slice, "passed": r.passed, "champion": r.champion,
             "challenger": r.challenger, "bound": r.bound, "threshold": r.threshold,
             "confidence": r.confidence, "samples": list(r.samples), "message": r.message}
            for r in decision.results]


class RolloutController:
    def __init__(self, control: ControlPlane, slices: SliceStats, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time, tick_s: float = TICK_S,
                 webhooks: WebhookSender | None = None, replica_id: str = "local",
                 lease_ttl_s: float = LEASE_TTL_S) -> None:
        self.control = control
        self.registry = control.registry
        self.manager = control.manager
        self.slices = slices
        self.metrics = metrics
        self.clock = clock
        self.tick_s = tick_s
        self._active: dict[str, RolloutRecord] = {}
        #: The last decided (terminal) rollout per model, shown while the registry may lag behind.
        self._decided: dict[str, RolloutRecord] = {}
        self.replica_id = replica_id
        self.lease_ttl_s = lease_ttl_s
        #: The rollout lease as last granted to this replica (None: another holds it, or none yet).
        #: Kept while the registry does not answer: the last leader may still return to the champion.
        self._lease: Lease | None = None
        self._lease_at = -float("inf")  # self.clock() when it was last granted
        self._next_lease = -float("inf")
        #: The lease as last read when another replica holds it (for `rollout status`).
        self._holder: Lease | None = None
        self._next_sync = -float("inf")
        #: rollout id -> what this replica flushed before this process started (same replica id).
        self._baseline: dict[int, dict[str, Any]] = {}
        #: rollout id -> {replica id: its last flushed counts}, every replica but this one.
        self._parts: dict[int, dict[str, dict[str, Any]]] = {}
        #: rollout id -> this process's own marks: since the rollout, since the current stage.
        self._local: dict[int, dict[str, float]] = {}
        #: marks this process took for the records it wrote (they are its own marks as they stand).
        self._own_marks: set[float] = set()
        #: rollout id -> (mark, time): a watch resumed after a restart starts over from the mark.
        self._watch_from: dict[int, tuple[float, float]] = {}
        self._last_flush = 0.0
        self._flushing: asyncio.Task[None] | None = None
        self.webhooks = webhooks if webhooks is not None else WebhookSender(control.outbox)
        self.webhooks.gate = self._webhook_gate
        self._wake: asyncio.Event | None = None
        self._refreshing: asyncio.Future[None] | None = None
        #: Whether the registry answered the last lease renewal.
        self._registry_ok = True
        self._last_label: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        slices.subscribe(self._on_outcome)

    # -- plumbing ----------------------------------------------------------------------------

    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    def _on_outcome(self, model: str, version: int, slice_: str, kind: str) -> None:
        """A label was joined (event loop): re-check that model's rollout now, not at the next tick."""
        r = self._active.get(model)
        if r is not None and version in (r.champion, r.challenger):
            self._last_label[model] = time.perf_counter()
            if self._wake is not None:
                self._wake.set()

    async def _db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.registry.call(fn, *args, **kwargs)

    async def _save(self, r: RolloutRecord, *, fenced: bool = True, **changes: Any) -> RolloutRecord:
        """Record ``r`` with ``changes``; ``fenced`` (the controller's own decisions): only while this
        replica still holds the lease (NotLeader otherwise). Operators' actions are not fenced."""
        fence = self._lease if fenced else None
        if fenced and fence is None:
            raise NotLeader(f"replica '{self.replica_id}' does not hold the rollout lease")
        new = await self._db(lambda: self.registry.save_rollout(dataclasses.replace(r, **changes), fence=fence))
        return self._adopt(new)

    def _adopt(self, new: RolloutRecord) -> RolloutRecord:
        """Make ``new`` (as stored, or as journaled) this controller's view of the rollout."""
        if new.active or new.evidence.get("phase") == "watch":
            self._active[new.model] = new
        else:
            self._active.pop(new.model, None)
            self._decided[new.model] = new
            self._release(new)
        self._export(new)
        return new

    def _release(self, r: RolloutRecord) -> None:
        self._guard(r.model, frozenset())
        self.slices.limit_reporters(r.model, None, freeze=True)  # `rollout status` keeps its last stage's reporters
        for book in (self._local, self._baseline, self._watch_from):
            book.pop(r.id, None)  # type: ignore[arg-type]
        # The other replicas' rows of ended rollouts: only the latest one per model (for `rollout status`).
        keep = {d.id for d in self._decided.values()} | {a.id for a in self._active.values()}
        for rid in [rid for rid in self._parts if rid not in keep]:
            del self._parts[rid]

    def _guard(self, model: str, versions: frozenset[int]) -> None:
        """Keep ``versions`` resident (never evicted) while the rollout relies on them."""
        m = self.manager.models.get(model)
        if m is not None:
            m.rollout_versions = versions

    def _export(self, r: RolloutRecord) -> None:
        active = r.active or r.evidence.get("phase") == "watch"
        self.metrics.rollout_stage.labels(r.model).set(r.stage_index if active else -1)

    @staticmethod
    def plan_of(r: RolloutRecord) -> RolloutPlan:
        return RolloutPlan.from_dict(r.plan)

    # -- lifecycle of the controller ---------------------------------------------------------

    async def start_loop(self) -> None:
        """Take the lease if it is free, follow the registry's active rollouts and start checking
        them (call once, on the loop)."""
        self._wake = asyncio.Event()
        for e in self.control.outbox.pending("webhook"):
            if e.payload.get("requires") and await self._webhook_gate(e, restarted=True) == "drop":
                self.control.outbox.done(e.id)
        for e in self.control.outbox.pending("decision"):
            if e.payload.get("rollout"):
                # Ended before the restart, its record still pending: never resumed.
                rec = rollout_from_dict(e.payload["rollout"])
                self._decided[rec.model] = rec
                log.info("rollout %s of model '%s' ended (%s) before the restart; its record is pending",
                         rec.id, rec.model, rec.state)
        await self._maintain_lease()
        try:
            await self._sync()  # due at once: nothing has been read yet
        except SwapserveError as exc:
            log.warning("rollouts not read at start (%s); following them once the registry answers", exc.message)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:  # what this replica counted since its last flush still counts for the next leader
            await asyncio.wait_for(self.flush_evidence(), 2.0)
        except asyncio.TimeoutError:
            pass
        if self._lease is not None:
            try:  # the next leader need not wait for the lease to expire
                await asyncio.wait_for(self._db(self.registry.release_lease, ROLLOUT_LEASE, self.replica_id), 2.0)
            except (SwapserveError, asyncio.TimeoutError):
                pass
            self._lease = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.tick()
            self._maybe_flush()

    async def tick(self) -> None:
        """Renew (or try to take) the lease, follow the registry, and, as the leader, check every
        active rollout once: advance, hold or roll back.

        What the loop runs every ``tick_s`` and after joined labels; callable directly (tests
        drive it on a fake clock). One broken rollout is logged and never stops the others.
        """
        # Lease and registry reads, waited for only briefly: a registry that does not answer must
        # not delay a gate (the step below then works on the last state read).
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.wait({self._refreshing}, timeout=REFRESH_WAIT_S)
        if self._lease is None:
            return  # a follower: the leader decides (its decisions reach this replica as deployments)
        for model in list(self._active):
            try:
                async with self._lock(model):
                    await self._step(model)
            except NotLeader as exc:
                log.warning("rollout of model '%s': %s; following the new leader", model, exc.message)
                self._lease, self._next_lease, self._next_sync = None, -float("inf"), -float("inf")
                break
            except FailedPrecondition as exc:  # e.g. paused or approved through another replica meanwhile
                log.info("rollout of model '%s': %s; re-reading it", model, exc.message)
                self._next_sync = -float("inf")
            except Exception:  # noqa: BLE001 - one broken rollout must not stop the others
                log.exception("rollout of model '%s': step failed", model)
        # Every model's routing is settled before any registry write is waited for.
        await self._settle(RECORD_WAIT_S)

    # -- the lease and the fleet's view --------------------------------------------------------

    async def _refresh(self) -> None:
        await self._maintain_lease()
        if not self._registry_ok:
            return  # no more calls to queue on a registry that just failed to answer
        try:
            await self._sync()
        except SwapserveError as exc:
            log.debug("rollouts not re-read: %s", exc.message)

    @property
    def leading(self) -> bool:
        """Whether this replica may take fenced decisions now (it holds a lease renewed recently)."""
        return self._lease is not None and self.clock() - self._lease_at < self.lease_ttl_s * LEASE_SAFETY

    async def _maintain_lease(self) -> None:
        """Renew the lease (or try to take it) every ``lease_ttl_s / 4``. While the registry does not
        answer, a held lease is kept (unfenced returns to the champion stay possible) but stops being
        ``leading`` once it is too old."""
        now = self.clock()
        if now < self._next_lease:
            return
        self._next_lease = now + self.lease_ttl_s / 4
        try:
            held, lease = await self._db(self.registry.acquire_lease, ROLLOUT_LEASE, self.replica_id, self.lease_ttl_s)
        except SwapserveError as exc:
            log.debug("rollout lease not renewed: %s", exc.message)
            self._registry_ok = False
            return
        self._registry_ok = True
        if held:
            assert lease is not None
            if self._lease is None or self._lease.epoch != lease.epoch:
                log.info("replica '%s' holds the rollout lease (epoch %d): it decides the fleet's rollouts",
                         self.replica_id, lease.epoch)
                self._next_sync = -float("inf")  # re-read everything before the first decision
            self._lease, self._lease_at, self._holder = lease, now, None
        else:
            if self._lease is not None:
                log.warning("replica '%s' lost the rollout lease to '%s'", self.replica_id,
                            lease.holder if lease is not None else "another replica")
            self._lease, self._holder = None, lease

    def leader(self) -> dict[str, Any]:
        """Who decides the fleet's rollouts, as this replica last saw it (for `rollout status`)."""
        lease = self._lease or self._holder
        return {"replica": lease.holder if lease is not None else None,
                "epoch": lease.epoch if lease is not None else None,
                "this_replica": self.replica_id, "leading": self.leading}

    async def _sync(self) -> None:
        """Follow the registry: adopt every active rollout as recorded (started, paused, approved or
        advanced through any replica), let go of those ended elsewhere, and read the other
        replicas' flushed evidence. At most every SYNC_S (at once after a change of leader)."""
        now = self.clock()
        if now < self._next_sync:
            return
        self._next_sync = now + SYNC_S
        active = await self._db(self.registry.active_rollouts)
        seen = {r.model for r in active}
        for r in active:
            mine = self._active.get(r.model)
            if mine is not None and (mine.id, mine.updated_at, mine.state, mine.stage_index) == \
                    (r.id, r.updated_at, r.state, r.stage_index):
                pass
            else:
                decided = self._decided.get(r.model)
                if decided is not None and decided.id == r.id:
                    continue  # this replica ended it; the record is on its way from the outbox
                async with self._lock(r.model):
                    mine = self._active.get(r.model)
                    if mine is None or mine.id != r.id or mine.updated_at is None or r.updated_at is None \
                            or r.updated_at >= mine.updated_at:  # never back to a record older than ours
                        await self._follow(r)
            if r.id is not None and r.model in self._active:
                parts = await self._db(self.registry.load_evidence, r.id)
                self._parts[r.id] = {k: v for k, v in parts.items() if k != self.replica_id}
        for model, r in list(self._active.items()):
            if model not in seen and r.id is not None:
                ended = await self._db(self.registry.get_rollout, r.id)
                if ended is not None and not ended.active:
                    async with self._lock(model):
                        if self._active.get(model) is r:
                            self._adopt(ended)

    async def _follow(self, r: RolloutRecord) -> None:
        """Make the registry's record of an active rollout this replica's view (caller holds the
        model's lock). A rollout new to this process restores its own flushed counts (same
        replica id) as the baseline it adds its live counts to."""
        prev = self._active.get(r.model)
        first = prev is None or prev.id != r.id
        if first and r.id is not None and r.id not in self._baseline:
            await self._restore_evidence(r)
        if first and r.evidence.get("phase") == "watch" and r.id is not None and r.id not in self._watch_from \
                and r.evidence.get("started_at") not in self._own_marks:
            # The champion's baseline is what was counted before; a watch resumed by a process that
            # did not see it run starts over from a fresh mark instead of ending on time not watched.
            self._watch_from[r.id] = (self.slices.mark(r.model), self.clock())
        if first or prev.evidence.get("stage_started_at") != r.evidence.get("stage_started_at"):
            self.slices.limit_reporters(r.model, self.plan_of(r).gates.max_reporter_share)  # a fresh stage budget
        self._active[r.model] = r
        self._marks(r)  # this replica counts for the rollout (and for a new stage) from now on
        self._guard(r.model, frozenset({r.champion, r.challenger}))
        self._export(r)
        if first:
            log.info("rollout %s of model '%s' followed at stage %d (%s)", r.id, r.model, r.stage_index, r.state)


    async def _settle(self, wait_s: float) -> None:
        """Give journaled decisions up to ``wait_s`` to reach the registry (the reconciler goes on
        after that); routing does not depend on it."""
        if not self.control.outbox.pending("decision"):
            return
        task = asyncio.ensure_future(self.control.reconciler.drain())
        await asyncio.wait({task}, timeout=wait_s)

    # -- operator actions --------------------------------------------------------------------

    async def start(self, model: str, version: int, plan: RolloutPlan, *, actor: str, reason: str = "",
                    force: bool = False) -> RolloutRecord:
        """Start a rollout of ``version`` against the current champion.

        Refused (FailedPrecondition) without a champion, with another rollout active, or when the
        plan requires an offline evaluation that is missing or failed — unless ``force`` (audited).
        The challenger is preloaded and warmed before stage 0 publishes any traffic to it.
        """
        await self._maintain_lease()  # a lone server leads from its first rollout on
        async with self._lock(model):
            # From the registry's current deployment, not this replica's view of it (another
            # replica may have changed the champion since): a stale view would pick the wrong one.
            policy = await self.control.catch_up(model)
            if policy is None:
                raise FailedPrecondition(f"model '{model}' has no champion to compare against; "
                                         f"`swapserve promote {model} VERSION` first")
            champion = policy.champion
            if version == champion:
                raise InvalidInput(f"model '{model}' version {version} is already the champion")
            active = await self._db(self.registry.active_rollout, model)
            if active is not None or model in self._active:
                raise FailedPrecondition(f"model '{model}' already has a rollout in progress "
                                         f"(`swapserve rollout status {model}`); abort it first")
            note = ""
            if plan.require_offline_eval:
                problems = await self._offline_problems(model, champion, version, plan)
                if problems and not force:
                    raise FailedPrecondition(
                        f"model '{model}': the offline gate refuses version {version}: {'; '.join(problems)}. "
                        f"Run `swapserve evaluate {model} {version} --data FILE`, or pass --force (audited)")
                if problems:
                    note = f"[forced past the offline gate: {'; '.join(problems)}] "
            await self.control.load(model, version, actor=actor, reason=f"rollout: preload challenger {version}")
            now = self.clock()
            mark = self._mark(model)
            record = RolloutRecord(
                model=model, challenger=version, champion=champion, plan=plan.to_dict(), strategy=plan.strategy,
                stage_index=0, state="running",
                evidence={"phase": "stages", "started_at": mark, "stage_started_at": mark, "history": [],
                          "start_reason": note + reason, "actor": actor, "created": now})
            self._guard(model, frozenset({champion, version}))
            try:
                # The rollout row and stage 0's routing: one transaction (a crash leaves both or neither).
                record = await self._enter_stage(record, 0, f"rollout started: {reason or 'no reason given'}",
                                                 fenced=False)  # an operator's action, on any replica
            except BaseException:
                self._guard(model, frozenset())
                raise
            await self._db(lambda: self.registry.audit(
                actor=actor, action="rollout.start", model=model, version=version, before=None,
                after=record.to_dict(), reason=note + reason))
            return record

    async def action(self, model: str, action: str, *, actor: str, reason: str = "") -> RolloutRecord:
        """pause | resume | approve | abort, audited; on any replica of the fleet (the leader follows
        the record). Acts on the registry's current record: a stale view (the leader advanced the
        stage meanwhile) is re-read and the action tried again, up to CONFLICT_RETRIES times. Abort is
        fail-safe and works while the registry is down (on this replica's view)."""
        if action not in ("pause", "resume", "approve", "abort"):
            raise InvalidInput(f"unknown rollout action '{action}'; use pause, resume, approve or abort")
        async with self._lock(model):
            for attempt in range(CONFLICT_RETRIES):
                try:
                    read = self._db(self.registry.active_rollout, model)
                    # An abort never waits on the registry longer than any fail-safe read does.
                    current = await (asyncio.wait_for(read, FAILSAFE_READ_S) if action == "abort" else read)
                except (SwapserveError, asyncio.TimeoutError):
                    if action != "abort":
                        raise
                    current = None  # the registry is down: abort what this replica knows of
                else:
                    decided = self._decided.get(model)
                    if current is not None and not (decided is not None and decided.id == current.id):
                        await self._follow(current)
                    elif current is None and model in self._active and self._active[model].id is not None:
                        ended = await self._db(self.registry.get_rollout, self._active[model].id)
                        if ended is not None and not ended.active:
                            self._adopt(ended)  # ended through another replica meanwhile
                r = self._active.get(model)
                if r is None:
                    raise FailedPrecondition(f"model '{model}' has no rollout in progress")
                try:
                    r = await self._act(r, action, actor=actor, reason=reason)
                    break
                except StaleRollout:
                    if attempt == CONFLICT_RETRIES - 1:
                        raise
                    log.info("rollout of model '%s' changed meanwhile; re-reading it and retrying %s", model, action)
            if action == "abort":
                await self._settle(2 * RECORD_WAIT_S)
            else:
                await self._db(lambda: self.registry.audit(
                    actor=actor, action=f"rollout.{action}", model=model, version=r.challenger, before=None,
                    after={"state": r.state}, reason=reason))
            if self._wake is not None:
                self._wake.set()
            return r

    async def _act(self, r: RolloutRecord, action: str, *, actor: str, reason: str) -> RolloutRecord:
        model = r.model
        if action == "pause":
            if r.state != "running":
                raise FailedPrecondition(f"model '{model}': the rollout is {r.state}, not running")
            return await self._save(r, state="paused", fenced=False)
        if action == "resume":
            if r.state != "paused":
                raise FailedPrecondition(f"model '{model}': the rollout is {r.state}, not paused")
            return await self._save(r, state="running", fenced=False)
        if action == "approve":
            if r.state != "awaiting_approval":
                raise FailedPrecondition(f"model '{model}': the rollout is {r.state}; nothing awaits approval")
            return await self._save(r, state="running", evidence=dict(r.evidence, approved_stage=r.stage_index),
                                    fenced=False)
        # Fail-safe: the audit row travels with the decision (outbox), not ahead of it.
        return await self._return_to_champion(r, "aborted", f"aborted by {actor}: {reason}", None, audit=[
            {"actor": actor, "action": "rollout.abort", "version": r.challenger, "before": None,
             "after": {"state": "aborted"}, "reason": reason}])

    def current(self, model: str) -> RolloutRecord | None:
        """The model's active rollout as this replica follows it (a resumed watch says when it
        restarted: ``watch_restarted_at``)."""
        r = self._active.get(model)
        if r is not None and r.id in self._watch_from and r.evidence.get("phase") == "watch":
            r = dataclasses.replace(r, evidence=dict(r.evidence, watch_restarted_at=self._watch_from[r.id][1]))
        return r

    def decided(self, model: str) -> RolloutRecord | None:
        """The rollout this server last ended (its record may still be pending in the outbox)."""
        return self._decided.get(model)

    # -- the offline gate --------------------------------------------------------------------

    async def _offline_problems(self, model: str, champion: int, challenger: int, plan: RolloutPlan) -> list[str]:
        theirs = await self._db(lambda: self.registry.metrics(model, champion, source="offline"))
        ours = await self._db(lambda: self.registry.metrics(model, challenger, source="offline"))
        if not ours:
            return [f"no offline evaluation of version {challenger} is recorded"]
        if not theirs:
            return [f"no offline evaluation of the champion (version {champion}) is recorded"]
        problems = []
        for slice_, values in sorted(ours.items()):
            a, b = theirs.get(slice_, {}).get("accuracy"), values.get("accuracy")
            if a is not None and b is not None and a - b > plan.gates.max_slice_accuracy_drop:
                problems.append(f"slice '{slice_}' accuracy {b:.2%} vs champion {a:.2%} "
                                f"(drop {100 * (a - b):.1f} points > {100 * plan.gates.max_slice_accuracy_drop:g})")
        p99 = ours.get(OVERALL, {}).get("p99_ms")
        if plan.gates.p99_ms is not None and p99 is not None and p99 > plan.gates.p99_ms:
            problems.append(f"p99 under load {p99:.1f} ms > {plan.gates.p99_ms:g} ms")
        return problems

    # -- stages ------------------------------------------------------------------------------

    def _stage(self, r: RolloutRecord, plan: RolloutPlan) -> Stage:
        if r.evidence.get("phase") == "watch":
            return plan.watch_stage()
        return plan.stages[r.stage_index]

    @staticmethod
    def _stage_change(r: RolloutRecord, *, traffic_bp: int = 0, shadow: bool = False,
                      cohorts: tuple[tuple[str, str], ...] = ()) -> Callable[[RoutingPolicy | None], RoutingPolicy]:
        """Route the rollout's stage (challenger share, shadow, cohorts); the defaults return all traffic
        to the champion. Computed from the live policy under the model's lock (``RoutingPolicy.for_stage``)."""
        def stage(current: RoutingPolicy | None) -> RoutingPolicy:
            return (current or RoutingPolicy.single(r.champion)).for_stage(
                r.champion, r.challenger, traffic_bp=traffic_bp, shadow=shadow, cohorts=cohorts)
        return stage

    async def _decide(self, r: RolloutRecord, reason: str, target: RolloutRecord, *, traffic_bp: int = 0,
                      shadow: bool = False, cohorts: tuple[tuple[str, str], ...] = (),
                      production: int | None = None, fenced: bool = True) -> RolloutRecord:
        """Publish a stage and record ``target`` (the rollout's new state) in the same transaction
        (``fenced``: under the lease, as :meth:`_save`)."""
        fence = self._lease if fenced else None
        if fenced and fence is None:
            raise NotLeader(f"replica '{self.replica_id}' does not hold the rollout lease")
        _, stored = await self.control.publish_decision(
            r.model, self._stage_change(r, traffic_bp=traffic_bp, shadow=shadow, cohorts=cohorts),
            action="rollout", actor="rollout-controller",
            reason=f"rollout {r.id if r.id is not None else f'of v{r.challenger}'}: {reason}", rollout=target,
            production=production, fence=fence)
        assert stored is not None
        return self._adopt(stored)

    async def _enter_stage(self, r: RolloutRecord, index: int, reason: str, *, fenced: bool = True) -> RolloutRecord:
        plan = self.plan_of(r)
        stage = plan.stages[index]
        # The mark is taken before the publish that it belongs to (one transaction records both); the
        # few requests routed by the old split in between count for the new stage, never the reverse
        # of a stage change.
        mark = self._mark(r.model)
        self.slices.limit_reporters(r.model, plan.gates.max_reporter_share)  # each stage: a fresh budget
        history = list(r.evidence.get("history", [])) + [
            {"at": self.clock(), "event": "stage", "stage": stage.name, "traffic": stage.traffic, "reason": reason}]
        ev = dict(r.evidence, stage_started_at=mark, history=history, phase="stages")
        ev.pop("approved_stage", None)
        target = dataclasses.replace(r, stage_index=index, state="running", evidence=ev)
        return await self._decide(
            r, f"stage '{stage.name}' ({stage.traffic:g}%{', shadow' if stage.shadow else ''}"
            f"{', cohorts' if stage.cohorts else ''})", target, traffic_bp=stage.traffic_bp, shadow=stage.shadow,
            cohorts=tuple((c.attribute, c.value) for c in stage.cohorts), fenced=fenced)

    async def _recently_rolled_back(self, r: RolloutRecord, plan: RolloutPlan) -> bool:
        past = await self._db(self.registry.rollouts, r.model, 20)
        cutoff = self.clock() - plan.rollback_approval_window_s
        return any(p.id != r.id and p.state == "rolled_back" and p.updated_at is not None
                   and p.updated_at.timestamp() >= cutoff for p in past)

    async def _webhook_gate(self, e: Any, restarted: bool = False) -> str:
        """A delivery that ``requires`` a recorded rollout state: ``deliver`` once the registry has it,
        ``wait`` while the decision is in flight (or the registry is down), ``drop`` when it did not
        happen (after a restart, a rollout still active resumes and journals its own delivery)."""
        need = e.payload.get("requires") or {}
        try:
            r = await self._db(self.registry.get_rollout, int(need["rollout"]))
        except SwapserveError:
            return "wait"
        if r is None:
            return "drop"
        if r.state == need.get("state"):
            return "deliver"
        return "drop" if restarted or not r.active else "wait"

    # -- evidence: this replica's counts (live + flushed before it started), plus the others' -----

    def _marks(self, r: RolloutRecord) -> tuple[float, float]:
        """This process's marks of ``r`` in its SliceStats: since the rollout, since the current
        stage. Marks the record holds are this process's own when it took them; otherwise (another
        replica started or advanced the rollout, or this one restarted) it marks when it first sees
        the rollout and each new stage."""
        started = float(r.evidence.get("started_at", 0.0))
        stage_key = float(r.evidence.get("stage_started_at", started))
        loc = self._local.get(r.id) if r.id is not None else None
        if loc is None:
            loc = {"started": started if started in self._own_marks else self.slices.mark(r.model)}
            if r.id is not None:
                self._local[r.id] = loc
        if loc.get("key") != stage_key:
            loc["key"] = stage_key
            loc["stage"] = stage_key if stage_key in self._own_marks else self.slices.mark(r.model)
        return loc["started"], loc["stage"]

    def _mark(self, model: str) -> float:
        """A mark for a record this process writes (its own clock and counters)."""
        mark = self.slices.mark(model)
        self._own_marks.add(mark)
        return mark

    def _own_counts(self, r: RolloutRecord, version: int) -> dict[str, SliceCounts]:
        started, _ = self._marks(r)
        live = self.slices.snapshot(r.model, version, since=started)
        base = self._baseline.get(r.id) if r.id is not None else None
        if base is None:
            return live
        return _sum([base["champion" if version == r.champion else "challenger"], live])

    def _own_stage_labelled(self, r: RolloutRecord) -> int:
        _, stage_mark = self._marks(r)
        labelled = self.slices.snapshot(r.model, r.challenger, since=stage_mark)[OVERALL].labelled
        base = self._baseline.get(r.id) if r.id is not None else None
        if base is not None and base.get("stage_started_at") == r.evidence.get("stage_started_at"):
            labelled += int(base.get("stage_labelled", 0))
        return labelled

    def _others(self, r: RolloutRecord) -> list[dict[str, Any]]:
        """The other replicas' last flushed counts of ``r`` (converted), as last read."""
        return [doc for doc in (self._parts.get(r.id, {}) if r.id is not None else {}).values()
                if doc.get("rollout") == r.id]

    def _counts(self, r: RolloutRecord, version: int) -> dict[str, SliceCounts]:
        """The fleet's counts of one arm since the rollout started: this replica's, plus every other
        replica's last flush."""
        role = "champion" if version == r.champion else "challenger"
        return _sum([self._own_counts(r, version), *(_counts_from_json(d.get(role, {})) for d in self._others(r))])

    def _evidence(self, r: RolloutRecord) -> tuple[dict[str, SliceCounts], dict[str, SliceCounts], int]:
        """Champion and challenger counts since the rollout started, and the challenger's labelled
        outcomes in this stage, fleet-wide and across restarts (flushed counts of the same stage count)."""
        stage_key = r.evidence.get("stage_started_at")
        labelled = self._own_stage_labelled(r) + sum(
            int(d.get("stage_labelled", 0)) for d in self._others(r) if d.get("stage_started_at") == stage_key)
        return self._counts(r, r.champion), self._counts(r, r.challenger), labelled

    def _evidence_doc(self, r: RolloutRecord) -> dict[str, Any]:
        """This replica's own part of the evidence (what it flushes)."""
        return {"rollout": r.id, "replica": self.replica_id, "stage_index": r.stage_index,
                "phase": r.evidence.get("phase"), "stage_started_at": r.evidence.get("stage_started_at"),
                "stage_labelled": self._own_stage_labelled(r),
                "champion": _counts_to_json(self._own_counts(r, r.champion)),
                "challenger": _counts_to_json(self._own_counts(r, r.challenger)), "at": self.clock()}

    def fleet_evidence(self, r: RolloutRecord) -> dict[str, Any]:
        """Per replica, what it contributes to ``r``'s evidence (labelled and requests per arm), and
        who decides (for `rollout status`)."""
        def brief(doc: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {"stage_labelled": int(doc.get("stage_labelled", 0)), "at": doc.get("at")}
            for role in ("champion", "challenger"):
                overall = (doc.get(role) or {}).get(OVERALL) or {}
                out[role] = {"requests": int(overall.get("requests", 0)), "labelled": int(overall.get("labelled", 0))}
            return out

        replicas = {d.get("replica") or rid: brief(d) for rid, d in (self._parts.get(r.id, {}) if r.id else {}).items()
                    if d.get("rollout") == r.id}
        if r.active or r.evidence.get("phase") == "watch":
            replicas[self.replica_id] = brief(self._evidence_doc(r))
        return {"leader": self.leader(), "replicas": dict(sorted(replicas.items()))}

    async def flush_evidence(self) -> None:
        """Write this replica's counts of every active rollout to its own evidence row (overwritten).
        Never raises: while the registry is down the previous flush stays (and no flush is tried
        until the lease's next renewal gets an answer)."""
        if not self._registry_ok:
            return
        for r in list(self._active.values()):
            if r.id is None:
                continue
            doc = self._evidence_doc(r)
            try:
                await self._db(self.registry.save_evidence, r.id, r.model, doc, self.replica_id)
            except SwapserveError as exc:
                log.debug("rollout %s evidence not flushed: %s", r.id, exc.message)

    def _maybe_flush(self) -> None:
        now = time.monotonic()
        if now - self._last_flush < EVIDENCE_FLUSH_S or (self._flushing is not None and not self._flushing.done()):
            return
        self._last_flush = now
        self._flushing = asyncio.get_running_loop().create_task(self.flush_evidence())

    async def _restore_evidence(self, r: RolloutRecord) -> None:
        """What this replica (same replica id) flushed before this process started becomes the
        baseline it adds its live counts to; the other replicas' rows are read by ``_sync``."""
        assert r.id is not None
        try:
            parts = await self._db(self.registry.load_evidence, r.id)
        except SwapserveError as exc:
            log.warning("rollout %s: flushed evidence not read (%s); gates start from no data (hold)", r.id,
                        exc.message)
            return
        self._parts[r.id] = {k: v for k, v in parts.items() if k != self.replica_id}
        doc = parts.get(self.replica_id)
        if doc is None:
            return
        self._baseline[r.id] = {"stage_started_at": doc.get("stage_started_at"),
                                "stage_labelled": doc.get("stage_labelled", 0),
                                "champion": _counts_from_json(doc.get("champion", {})),
                                "challenger": _counts_from_json(doc.get("challenger", {}))}

    async def _step(self, model: str) -> None:
        r = self._active.get(model)
        if r is None:
            return
        plan = self.plan_of(r)
        stage = self._stage(r, plan)
        now = self.clock()
        stage_started = float(r.evidence.get("stage_started_at", r.evidence.get("started_at", now)))
        if r.id in self._watch_from and r.evidence.get("phase") == "watch":
            stage_started = self._watch_from[r.id][1]
        champ, chall, labelled = self._evidence(r)
        decision = evaluate(plan.gates, champ, chall, stage=stage, stage_elapsed_s=now - stage_started,
                            challenger_labelled=labelled)
        if decision.verdict == "fail":
            await self._rollback(r, decision)  # always safe: taken even by a lease too old to fence with
            return
        if not self.leading:
            return  # the lease is not fresh (the registry does not answer): no decision that needs it
        if decision.verdict != "advance" or r.state == "paused":
            if r.evidence.get("last_hold") != decision.reason and decision.verdict == "hold":
                # Remember what it waits for (shown by `rollout status`), without a registry write per tick.
                self._active[model] = dataclasses.replace(r, evidence=dict(r.evidence, last_hold=decision.reason))
            return
        if r.evidence.get("phase") == "watch":
            await self._finish(r, decision)
            return
        last = len(plan.stages) - 1
        if not plan.auto_promote and r.stage_index == last:  # A/B: the period is over -> report
            await self._finish(r, decision)
            return
        needs = decision.needs_approval or (
            r.stage_index + 1 == last and await self._recently_rolled_back(r, plan))
        if needs and r.evidence.get("approved_stage") != r.stage_index:
            if r.state != "awaiting_approval":
                await self._save(r, state="awaiting_approval",
                                 evidence=dict(r.evidence, waiting=f"stage '{stage.name}' passed; "
                                               f"`swapserve rollout approve {model}` to go on"))
            return
        if r.stage_index < last:
            await self._enter_stage(r, r.stage_index + 1, decision.reason)
            return
        mark = self._mark(model)
        self.slices.limit_reporters(model, plan.gates.max_reporter_share)
        history = list(r.evidence.get("history", [])) + [{"at": now, "event": "watch", "reason": decision.reason}]
        watching = dict(r.evidence, phase="watch", stage_started_at=mark, history=history)
        if stage.traffic_bp < BASIS_POINTS:
            # A last stage below 100%: advancing past it promotes the challenger (the plan's contract),
            # in the same transaction as the watch that then guards it.
            await self._decide(r, f"stage '{stage.name}' passed: version {r.challenger} promoted for the watch",
                               dataclasses.replace(r, evidence=watching), traffic_bp=BASIS_POINTS)
            return
        await self._save(r, evidence=watching)

    def _report(self, r: RolloutRecord) -> dict[str, Any]:
        out = {}
        for role, v in (("champion", r.champion), ("challenger", r.challenger)):
            snap = self._counts(r, v)
            out[role] = {"version": v, "slices": {s: {"requests": c.requests, "errors": c.errors,
                                                      "labelled": c.labelled, "accuracy": c.accuracy,
                                                      "latency_p99_s": c.latency_p99_s}
                                                  for s, c in sorted(snap.items())}}
        return out

    async def _finish(self, r: RolloutRecord, decision: Decision) -> None:
        plan = self.plan_of(r)
        history = list(r.evidence.get("history", [])) + [{"at": self.clock(), "event": "finish",
                                                          "reason": decision.reason}]
        ev = dict(r.evidence, history=history, report=self._report(r), phase="done", final=_results(decision))
        if plan.auto_promote:
            promoted = dataclasses.replace(r, state="promoted", evidence=ev)
            # The webhook is journaled before the commit, to be delivered only once the registry says
            # "promoted": a crash in between can neither lose it nor announce a promotion that did
            # not happen (a resumed rollout journals its own).
            hook = self.webhooks.enqueue(plan.webhook, "promoted", promoted.to_dict(),
                                         requires={"rollout": r.id, "state": "promoted"}) if plan.webhook else None
            # Rollout state and the challenger's production stage: one transaction.
            crash_point("stage.before_commit")
            try:
                fence = self._lease
                if fence is None:
                    raise NotLeader(f"replica '{self.replica_id}' does not hold the rollout lease")
                _, stored = await self._db(lambda: self.registry.record_decision(
                    r.model, rollout=promoted, production=r.challenger, actor="rollout-controller", fence=fence))
            except BaseException:
                if hook is not None:
                    self.control.outbox.done(hook.id)  # not promoted (yet): the next attempt journals anew
                raise
            crash_point("stage.after_commit")
            assert stored is not None
            r = self._adopt(stored)
            self.webhooks.kick()
            log.info("rollout %d of model '%s': version %d promoted", r.id, r.model, r.challenger)
        else:
            await self._decide(r, "A/B test finished; traffic back on the champion",
                               dataclasses.replace(r, state="completed", evidence=ev))

    async def _return_to_champion(self, r: RolloutRecord, state: str, why: str, decision: Decision | None, *,
                                  audit: list[dict[str, Any]] | None = None) -> RolloutRecord:
        """Fail-safe: all traffic back on the champion without waiting on the registry (the decision,
        its event and webhook are journaled in the outbox and recorded when the registry answers)."""
        t0 = time.perf_counter()
        ev = dict(r.evidence, phase="done")
        ev["history"] = list(r.evidence.get("history", [])) + [{"at": self.clock(), "event": state, "reason": why}]
        final = dataclasses.replace(r, state=state, evidence=ev)
        event = None
        if decision is not None:
            worst = decision.failures[0] if decision.failures else None
            ev["rollback"] = {
                "reason": decision.reason, "at": self.clock(),
                "gate": worst.gate if worst else None, "slice": worst.slice if worst else None,
                "champion": worst.champion if worst else None, "challenger": worst.challenger if worst else None,
                "bound": worst.bound if worst else None, "threshold": worst.threshold if worst else None,
                "confidence": worst.confidence if worst else None,
                "seconds_since_start": self.clock() - float(r.evidence.get("created", self.clock())),
                "results": _results(decision)}
            event = {"kind": "rollout", "message": f"{r.model} v{r.challenger} rolled back: {decision.reason}",
                     "version": r.challenger, "data": ev["rollback"]}
        webhook = self.plan_of(r).webhook
        hooks = [delivery(webhook, "rollback" if state == "rolled_back" else state, final.to_dict())] \
            if webhook and state == "rolled_back" else []
        entry = await self.control.return_to_champion(
            r.model, self._stage_change(r), action="rollout", actor="rollout-controller",
            reason=f"rollout {r.id}: {why}", rollout=final, audit=audit or (), event=event, webhooks=hooks)
        published = time.perf_counter()
        if decision is not None:
            label_at = self._last_label.get(r.model)
            timing = {"decide_to_publish_ms": (published - t0) * 1e3,
                      "label_to_publish_ms": (published - label_at) * 1e3 if label_at is not None else None}
            ev["rollback"].update(timing)
            # Known only now; the journaled line has the decision, the registry gets the timing too
            # (unless the server restarts before recording it).
            entry.payload["rollout"]["evidence"]["rollback"].update(timing)
        self.webhooks.kick()
        return self._adopt(final)

    async def _rollback(self, r: RolloutRecord, decision: Decision) -> None:
        log.warning("rollout %d of model '%s': rolling back version %d: %s", r.id, r.model, r.challenger,
                    decision.reason)
        r = await self._return_to_champion(r, "rolled_back", f"automatic rollback: {decision.reason}", decision)
        self.metrics.rollbacks.labels(r.model).inc()


__all__ = ["RolloutController"]
