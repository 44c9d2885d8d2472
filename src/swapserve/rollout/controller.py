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
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from swapserve.controlplane import ControlPlane
from swapserve.controlplane.reconcile import rollout_from_dict
from swapserve.crashpoints import crash_point
from swapserve.errors import FailedPrecondition, InvalidInput, SwapserveError
from swapserve.feedback.slices import SliceStats
from swapserve.registry.records import RolloutRecord
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

_ADDITIVE = ("requests", "errors", "labelled", "correct", "numeric", "abs_error_sum", "sq_error_sum")


def _plus(a: SliceCounts, b: SliceCounts) -> SliceCounts:
    """Counts of two disjoint periods together (p99: the worse of the two, which is conservative)."""
    p99 = [p for p in (a.latency_p99_s, b.latency_p99_s) if p is not None]
    return SliceCounts(**{f: getattr(a, f) + getattr(b, f) for f in _ADDITIVE},
                       latency_p99_s=max(p99) if p99 else None)


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
                 webhooks: WebhookSender | None = None) -> None:
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
        #: model -> counts flushed before this server started (added to what it counts itself).
        self._baseline: dict[str, dict[str, Any]] = {}
        self._last_flush = 0.0
        self._flushing: asyncio.Task[None] | None = None
        self.webhooks = webhooks if webhooks is not None else WebhookSender(control.outbox)
        self.webhooks.gate = self._webhook_gate
        self._wake: asyncio.Event | None = None
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

    async def _save(self, r: RolloutRecord, **changes: Any) -> RolloutRecord:
        new = await self._db(lambda: self.registry.save_rollout(dataclasses.replace(r, **changes)))
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
        """Resume the registry's active rollouts and start checking them (call once, on the loop)."""
        self._wake = asyncio.Event()
        for e in self.control.outbox.pending("webhook"):
            if e.payload.get("requires") and await self._webhook_gate(e, restarted=True) == "drop":
                self.control.outbox.done(e.id)
        decided = {}  # rollouts whose end is journaled but not yet recorded: never resumed
        for e in self.control.outbox.pending("decision"):
            if e.payload.get("rollout"):
                rec = rollout_from_dict(e.payload["rollout"])
                decided[rec.id] = rec
        for model in await self._db(self.registry.list_models):
            r = await self._db(self.registry.active_rollout, model)
            if r is None:
                recent = await self._db(self.registry.rollouts, model, 1)
                r = recent[0] if recent and recent[0].state == "running" else None
            if r is not None and r.id in decided:
                self._decided[model] = decided[r.id]
                log.info("rollout %d of model '%s' ended (%s) before the restart; its record is pending",
                         r.id, model, decided[r.id].state)
                continue
            if r is not None:
                await self._restore_evidence(r)
            if r is not None and r.evidence.get("phase") == "watch":
                # The champion's baseline is what this server counted; after a restart the watch
                # starts over from a fresh mark instead of ending on the time already served.
                mark = self.slices.mark(model)
                r = dataclasses.replace(r, evidence=dict(r.evidence, stage_started_at=mark,
                                                         watch_restarted_at=self.clock()))
            if r is not None:
                self._active[model] = r
                self._guard(model, frozenset({r.champion, r.challenger}))
                self.slices.limit_reporters(model, self.plan_of(r).gates.max_reporter_share)
                self._export(r)
                log.info("rollout %d of model '%s' resumed at stage %d (%s)", r.id, model, r.stage_index, r.state)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

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
        """Check every active rollout once: advance, hold or roll back.

        What the loop runs every ``tick_s`` and after joined labels; callable directly (tests
        drive it on a fake clock). One broken rollout is logged and never stops the others.
        """
        for model in list(self._active):
            try:
                async with self._lock(model):
                    await self._step(model)
            except Exception:  # noqa: BLE001 - one broken rollout must not stop the others
                log.exception("rollout of model '%s': step failed", model)
        # Every model's routing is settled before any registry write is waited for.
        await self._settle(RECORD_WAIT_S)

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
            mark = self.slices.mark(model)
            record = RolloutRecord(
                model=model, challenger=version, champion=champion, plan=plan.to_dict(), strategy=plan.strategy,
                stage_index=0, state="running",
                evidence={"phase": "stages", "started_at": mark, "stage_started_at": mark, "history": [],
                          "start_reason": note + reason, "actor": actor, "created": now})
            self._guard(model, frozenset({champion, version}))
            try:
                # The rollout row and stage 0's routing: one transaction (a crash leaves both or neither).
                record = await self._enter_stage(record, 0, f"rollout started: {reason or 'no reason given'}")
            except BaseException:
                self._guard(model, frozenset())
                raise
            await self._db(lambda: self.registry.audit(
                actor=actor, action="rollout.start", model=model, version=version, before=None,
                after=record.to_dict(), reason=note + reason))
            return record

    async def action(self, model: str, action: str, *, actor: str, reason: str = "") -> RolloutRecord:
        """pause | resume | approve | abort, audited."""
        async with self._lock(model):
            r = self._active.get(model)
            if r is None:
                raise FailedPrecondition(f"model '{model}' has no rollout in progress")
            if action == "pause":
                if r.state != "running":
                    raise FailedPrecondition(f"model '{model}': the rollout is {r.state}, not running")
                r = await self._save(r, state="paused")
            elif action == "resume":
                if r.state != "paused":
                    raise FailedPrecondition(f"model '{model}': the rollout is {r.state}, not paused")
                r = await self._save(r, state="running")
            elif action == "approve":
                if r.state != "awaiting_approval":
                    raise FailedPrecondition(f"model '{model}': the rollout is {r.state}; nothing awaits approval")
                ev = dict(r.evidence, approved_stage=r.stage_index)
                r = await self._save(r, state="running", evidence=ev)
            elif action == "abort":
                # Fail-safe: the audit row travels with the decision (outbox), not ahead of it.
                r = await self._return_to_champion(r, "aborted", f"aborted by {actor}: {reason}", None, audit=[
                    {"actor": actor, "action": "rollout.abort", "version": r.challenger, "before": None,
                     "after": {"state": "aborted"}, "reason": reason}])
            else:
                raise InvalidInput(f"unknown rollout action '{action}'; use pause, resume, approve or abort")
            if action == "abort":
                await self._settle(2 * RECORD_WAIT_S)
            else:
                await self._db(lambda: self.registry.audit(
                    actor=actor, action=f"rollout.{action}", model=model, version=r.challenger, before=None,
                    after={"state": r.state}, reason=reason))
            if self._wake is not None:
                self._wake.set()
            return r

    def current(self, model: str) -> RolloutRecord | None:
        return self._active.get(model)

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
                      production: int | None = None) -> RolloutRecord:
        """Publish a stage and record ``target`` (the rollout's new state) in the same transaction."""
        _, stored = await self.control.publish_decision(
            r.model, self._stage_change(r, traffic_bp=traffic_bp, shadow=shadow, cohorts=cohorts),
            action="rollout", actor="rollout-controller",
            reason=f"rollout {r.id if r.id is not None else f'of v{r.challenger}'}: {reason}", rollout=target,
            production=production)
        assert stored is not None
        return self._adopt(stored)

    async def _enter_stage(self, r: RolloutRecord, index: int, reason: str) -> RolloutRecord:
        plan = self.plan_of(r)
        stage = plan.stages[index]
        # The mark is taken before the publish that it belongs to (one transaction records both); the
        # few requests routed by the old split in between count for the new stage, never the reverse
        # of a stage change.
        mark = self.slices.mark(r.model)
        self.slices.limit_reporters(r.model, plan.gates.max_reporter_share)  # each stage: a fresh budget
        history = list(r.evidence.get("history", [])) + [
            {"at": self.clock(), "event": "stage", "stage": stage.name, "traffic": stage.traffic, "reason": reason}]
        ev = dict(r.evidence, stage_started_at=mark, history=history, phase="stages")
        ev.pop("approved_stage", None)
        target = dataclasses.replace(r, stage_index=index, state="running", evidence=ev)
        return await self._decide(
            r, f"stage '{stage.name}' ({stage.traffic:g}%{', shadow' if stage.shadow else ''}"
            f"{', cohorts' if stage.cohorts else ''})", target, traffic_bp=stage.traffic_bp, shadow=stage.shadow,
            cohorts=tuple((c.attribute, c.value) for c in stage.cohorts))

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

    # -- evidence (what this server counted, plus what was flushed before it started) ------------

    def _counts(self, r: RolloutRecord, version: int) -> dict[str, SliceCounts]:
        started = float(r.evidence.get("started_at", self.clock()))
        live = self.slices.snapshot(r.model, version, since=started)
        base = self._baseline.get(r.model)
        if base is None or base.get("rollout") != r.id:
            return live
        old = base["champion" if version == r.champion else "challenger"]
        return {s: _plus(old.get(s, SliceCounts()), live.get(s, SliceCounts())) for s in set(old) | set(live)}

    def _evidence(self, r: RolloutRecord) -> tuple[dict[str, SliceCounts], dict[str, SliceCounts], int]:
        """Champion and challenger counts since the rollout started, and the challenger's labelled
        outcomes in this stage — across restarts (the flushed counts of the same stage count)."""
        stage_started = float(r.evidence.get("stage_started_at", r.evidence.get("started_at", self.clock())))
        labelled = self.slices.snapshot(r.model, r.challenger, since=stage_started)[OVERALL].labelled
        base = self._baseline.get(r.model)
        if base is not None and base.get("rollout") == r.id and base.get("stage_started_at") == stage_started:
            labelled += int(base.get("stage_labelled", 0))
        return self._counts(r, r.champion), self._counts(r, r.challenger), labelled

    def _evidence_doc(self, r: RolloutRecord) -> dict[str, Any]:
        champ, chall, labelled = self._evidence(r)
        return {"rollout": r.id, "stage_index": r.stage_index, "phase": r.evidence.get("phase"),
                "stage_started_at": float(r.evidence.get("stage_started_at", 0.0)), "stage_labelled": labelled,
                "champion": _counts_to_json(champ), "challenger": _counts_to_json(chall), "at": self.clock()}

    async def flush_evidence(self) -> None:
        """Write every active rollout's counts to the registry (one row per rollout, overwritten).
        Never raises: while the registry is down the previous flush stays."""
        for r in list(self._active.values()):
            if r.id is None:
                continue
            doc = self._evidence_doc(r)
            try:
                await self._db(self.registry.save_evidence, r.id, r.model, doc)
            except SwapserveError as exc:
                log.debug("rollout %s evidence not flushed: %s", r.id, exc.message)

    def _maybe_flush(self) -> None:
        now = time.monotonic()
        if now - self._last_flush < EVIDENCE_FLUSH_S or (self._flushing is not None and not self._flushing.done()):
            return
        self._last_flush = now
        self._flushing = asyncio.get_running_loop().create_task(self.flush_evidence())

    async def _restore_evidence(self, r: RolloutRecord) -> None:
        try:
            doc = await self._db(self.registry.load_evidence, r.id)
        except SwapserveError as exc:
            log.warning("rollout %s: flushed evidence not read (%s); gates start from no data (hold)", r.id,
                        exc.message)
            return
        if doc is None:
            return
        self._baseline[r.model] = {"rollout": r.id, "stage_started_at": doc.get("stage_started_at"),
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
        champ, chall, labelled = self._evidence(r)
        decision = evaluate(plan.gates, champ, chall, stage=stage, stage_elapsed_s=now - stage_started,
                            challenger_labelled=labelled)
        if decision.verdict == "fail":
            await self._rollback(r, decision)
            return
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
        mark = self.slices.mark(model)
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
                _, stored = await self._db(lambda: self.registry.record_decision(
                    r.model, rollout=promoted, production=r.challenger, actor="rollout-controller"))
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
