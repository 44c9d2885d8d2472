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

Gates compare cumulative counts since the rollout started (``SliceStats.snapshot(since=...)``);
during the 100% stages and the watch the champion's counts are frozen at their canary values,
which is the baseline the challenger must keep up with.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from swapserve.controlplane import ControlPlane
from swapserve.errors import FailedPrecondition, InvalidInput
from swapserve.feedback.slices import SliceStats
from swapserve.registry.records import RolloutRecord
from swapserve.rollout.gates import OVERALL, Decision, evaluate
from swapserve.rollout.plan import RolloutPlan, Stage
from swapserve.routing.policy import RoutingPolicy
from swapserve.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

#: How often every active rollout is re-evaluated even without new labels (seconds).
TICK_S = 0.25
#: Webhook POST timeout (seconds); a slow webhook never delays a rollback.
WEBHOOK_TIMEOUT_S = 5.0


def _results(decision: Decision) -> list[dict[str, Any]]:
    return [{"gate": r.gate, "slice": r.slice, "passed": r.passed, "champion": r.champion,
             "challenger": r.challenger, "bound": r.bound, "threshold": r.threshold,
             "confidence": r.confidence, "samples": list(r.samples), "message": r.message}
            for r in decision.results]


class RolloutController:
    def __init__(self, control: ControlPlane, slices: SliceStats, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time, tick_s: float = TICK_S) -> None:
        self.control = control
        self.registry = control.registry
        self.manager = control.manager
        self.slices = slices
        self.metrics = metrics
        self.clock = clock
        self.tick_s = tick_s
        self._active: dict[str, RolloutRecord] = {}
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
        if new.active or new.evidence.get("phase") == "watch":
            self._active[new.model] = new
        else:
            self._active.pop(new.model, None)
            self._release(new)
        self._export(new)
        return new

    def _release(self, r: RolloutRecord) -> None:
        self._guard(r.model, frozenset())

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
        for model in await self._db(self.registry.list_models):
            r = await self._db(self.registry.active_rollout, model)
            if r is None:
                recent = await self._db(self.registry.rollouts, model, 1)
                r = recent[0] if recent and recent[0].state == "running" else None
            if r is not None:
                self._active[model] = r
                self._guard(model, frozenset({r.champion, r.challenger}))
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

    # -- operator actions --------------------------------------------------------------------

    async def start(self, model: str, version: int, plan: RolloutPlan, *, actor: str, reason: str = "",
                    force: bool = False) -> RolloutRecord:
        """Start a rollout of ``version`` against the current champion.

        Refused (FailedPrecondition) without a champion, with another rollout active, or when the
        plan requires an offline evaluation that is missing or failed — unless ``force`` (audited).
        The challenger is preloaded and warmed before stage 0 publishes any traffic to it.
        """
        async with self._lock(model):
            policy = self.control.policy(model)
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
            record = await self._db(lambda: self.registry.save_rollout(record, actor=actor))
            await self._db(lambda: self.registry.audit(
                actor=actor, action="rollout.start", model=model, version=version, before=None,
                after=record.to_dict(), reason=note + reason))
            self._guard(model, frozenset({champion, version}))
            self._active[model] = record
            record = await self._enter_stage(record, 0, f"rollout started: {reason or 'no reason given'}")
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
                r = await self._return_to_champion(r, "aborted", f"aborted by {actor}: {reason}", None)
            else:
                raise InvalidInput(f"unknown rollout action '{action}'; use pause, resume, approve or abort")
            await self._db(lambda: self.registry.audit(actor=actor, action=f"rollout.{action}", model=model,
                                                       version=r.challenger, before=None, after={"state": r.state},
                                                       reason=reason))
            if self._wake is not None:
                self._wake.set()
            return r

    def current(self, model: str) -> RolloutRecord | None:
        return self._active.get(model)

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

    async def _publish(self, r: RolloutRecord, reason: str, *, traffic_bp: int = 0, shadow: bool = False,
                       cohorts: tuple[tuple[str, str], ...] = ()) -> None:
        """Route the rollout's stage (challenger share, shadow, cohorts); the defaults return all traffic
        to the champion. Computed from the live policy under the model's lock (``RoutingPolicy.for_stage``)."""
        def stage(current: RoutingPolicy | None) -> RoutingPolicy:
            return (current or RoutingPolicy.single(r.champion)).for_stage(
                r.champion, r.challenger, traffic_bp=traffic_bp, shadow=shadow, cohorts=cohorts)

        await self.control.publish(r.model, stage, action="rollout", actor="rollout-controller",
                                   reason=f"rollout {r.id}: {reason}")

    async def _enter_stage(self, r: RolloutRecord, index: int, reason: str) -> RolloutRecord:
        plan = self.plan_of(r)
        stage = plan.stages[index]
        await self._publish(r, f"stage '{stage.name}' ({stage.traffic:g}%"
                            f"{', shadow' if stage.shadow else ''}{', cohorts' if stage.cohorts else ''})",
                            traffic_bp=stage.traffic_bp, shadow=stage.shadow,
                            cohorts=tuple((c.attribute, c.value) for c in stage.cohorts))
        mark = self.slices.mark(r.model)
        history = list(r.evidence.get("history", [])) + [
            {"at": self.clock(), "event": "stage", "stage": stage.name, "traffic": stage.traffic, "reason": reason}]
        ev = dict(r.evidence, stage_started_at=mark, history=history, phase="stages")
        ev.pop("approved_stage", None)
        return await self._save(r, stage_index=index, state="running", evidence=ev)

    async def _recently_rolled_back(self, r: RolloutRecord, plan: RolloutPlan) -> bool:
        past = await self._db(self.registry.rollouts, r.model, 20)
        cutoff = self.clock() - plan.rollback_approval_window_s
        return any(p.id != r.id and p.state == "rolled_back" and p.updated_at is not None
                   and p.updated_at.timestamp() >= cutoff for p in past)

    async def _step(self, model: str) -> None:
        r = self._active.get(model)
        if r is None:
            return
        plan = self.plan_of(r)
        stage = self._stage(r, plan)
        now = self.clock()
        started = float(r.evidence.get("started_at", now))
        stage_started = float(r.evidence.get("stage_started_at", started))
        champ = self.slices.snapshot(model, r.champion, since=started)
        chall = self.slices.snapshot(model, r.challenger, since=started)
        labelled = self.slices.snapshot(model, r.challenger, since=stage_started)[OVERALL].labelled
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
        history = list(r.evidence.get("history", [])) + [{"at": now, "event": "watch", "reason": decision.reason}]
        await self._save(r, evidence=dict(r.evidence, phase="watch", stage_started_at=mark, history=history))

    def _report(self, r: RolloutRecord) -> dict[str, Any]:
        started = float(r.evidence.get("started_at", 0))
        out = {}
        for role, v in (("champion", r.champion), ("challenger", r.challenger)):
            snap = self.slices.snapshot(r.model, v, since=started)
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
            await self._save(r, state="promoted", evidence=ev)
            await self._db(lambda: self.registry.set_stage(r.model, r.challenger, "production", actor="rollout-controller",
                                                           reason=f"rollout {r.id} promoted"))
            log.info("rollout %d of model '%s': version %d promoted", r.id, r.model, r.challenger)
        else:
            await self._publish(r, "A/B test finished; traffic back on the champion")
            await self._save(r, state="completed", evidence=ev)

    async def _return_to_champion(self, r: RolloutRecord, state: str, why: str,
                                  decision: Decision | None) -> RolloutRecord:
        t0 = time.perf_counter()
        await self._publish(r, why)
        published = time.perf_counter()
        ev = dict(r.evidence, phase="done")
        ev["history"] = list(r.evidence.get("history", [])) + [{"at": self.clock(), "event": state, "reason": why}]
        if decision is not None:
            worst = decision.failures[0] if decision.failures else None
            label_at = self._last_label.get(r.model)
            ev["rollback"] = {
                "reason": decision.reason, "at": self.clock(),
                "gate": worst.gate if worst else None, "slice": worst.slice if worst else None,
                "champion": worst.champion if worst else None, "challenger": worst.challenger if worst else None,
                "bound": worst.bound if worst else None, "threshold": worst.threshold if worst else None,
                "confidence": worst.confidence if worst else None,
                "seconds_since_start": self.clock() - float(r.evidence.get("created", self.clock())),
                "decide_to_publish_ms": (published - t0) * 1e3,
                "label_to_publish_ms": (published - label_at) * 1e3 if label_at is not None else None,
                "results": _results(decision)}
        return await self._save(r, state=state, evidence=ev)

    async def _rollback(self, r: RolloutRecord, decision: Decision) -> None:
        log.warning("rollout %d of model '%s': rolling back version %d: %s", r.id, r.model, r.challenger,
                    decision.reason)
        r = await self._return_to_champion(r, "rolled_back", f"automatic rollback: {decision.reason}", decision)
        self.metrics.rollbacks.labels(r.model).inc()
        await self._db(lambda: self.registry.add_event(
            "rollout", f"{r.model} v{r.challenger} rolled back: {decision.reason}", model=r.model,
            version=r.challenger, data=r.evidence.get("rollback", {})))
        webhook = self.plan_of(r).webhook
        if webhook:
            asyncio.get_running_loop().create_task(self._call_webhook(webhook, r))

    async def _call_webhook(self, url: str, r: RolloutRecord) -> None:
        body = json.dumps({"event": "rollback", "model": r.model, "challenger": r.challenger,
                           "champion": r.champion, "rollout": r.to_dict()}, default=str).encode()

        def post() -> None:
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=WEBHOOK_TIMEOUT_S).read()

        try:
            await asyncio.to_thread(post)
        except Exception as exc:  # noqa: BLE001 - a broken webhook is logged, never fatal
            log.warning("rollout %d webhook %s failed: %s", r.id, url, exc)


__all__ = ["RolloutController"]
