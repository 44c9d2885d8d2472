"""One registry transaction per rollout decision: deployment, rollout state, stage, audit and event."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from swapserve.registry.deployments import DeploymentTables
from swapserve.registry.models import RolloutRow
from swapserve.registry.records import ACTIVE_ROLLOUT_STATES, Deployment, Lease, RolloutRecord
from swapserve.registry.rollouts import RolloutTables
from swapserve.registry.rows import require_version, rollout_record
from swapserve.registry.versions import VersionTables


class DecisionTables(VersionTables, DeploymentTables, RolloutTables):
    """Writes that must happen together or not at all."""

    def record_decision(
        self,
        model: str,
        *,
        deployment: Mapping[str, Any] | None = None,
        rollout: RolloutRecord | None = None,
        production: int | None = None,
        audit: Sequence[Mapping[str, Any]] = (),
        event: Mapping[str, Any] | None = None,
        actor: str = "rollout-controller",
        replay: bool = False,
        fence: Lease | None = None,
    ) -> tuple[Deployment | None, RolloutRecord | None]:
        """Write a decision in one transaction: a deployment (``publish_deployment``'s keyword
        arguments), the rollout's new state, the challenger's ``production`` stage, extra audit
        rows and an event. Either all of it is recorded or none of it (a crash in between leaves
        the registry as before the decision).

        ``replay`` (an outbox entry written after the fact): the deployment is not written again
        when the current one already routes that way, the rollout is written unconditionally
        unless it is already terminal, and ``expected_generation`` is ignored, because the
        routing it records has been live since the decision. Replaying an entry twice therefore
        records it once, and replaying a decision on a rollout that another replica has ended
        meanwhile records nothing at all (the rollout was decided once, by the other).

        ``fence``: the lease the decision was taken under (``LeaseTables``); the transaction
        checks it first and records nothing (NotLeader) once the lease has moved on. Returns the deployment (None when not given) and the stored rollout.
        """
        dep_run = None
        if deployment is not None:
            kw = dict(deployment)
            if replay:
                kw["expected_generation"] = None
            dep_run = self._deployment_writer(model, skip_if_current=replay, **kw)
        roll_run = self._rollout_writer(rollout, actor=actor, final=replay) if rollout is not None else None

        def run(s: Any) -> tuple[Deployment | None, RolloutRecord | None]:
            if fence is not None:
                self._check_fence(s, fence)
            if replay and rollout is not None and rollout.id is not None:
                stored = s.get(RolloutRow, rollout.id)
                if stored is not None and stored.state not in ACTIVE_ROLLOUT_STATES:
                    return None, rollout_record(stored)  # already decided: nothing of this entry is recorded
            dep = dep_run(s) if dep_run is not None else None
            rec = roll_run(s) if roll_run is not None else None
            if production is not None:
                row = require_version(s, model, production)
                if row.stage != "production":
                    old, row.stage = row.stage, "production"
                    s.flush()
                    self._audit(s, actor=actor, action="stage", model=model, version=production,
                                before={"stage": old}, after={"stage": "production"},
                                reason=f"rollout {rec.id if rec else ''} promoted")
            for a in audit:
                self._audit(s, actor=a.get("actor", actor), action=a["action"], model=model,
                            version=a.get("version"), before=a.get("before"), after=a.get("after"),
                            reason=a.get("reason", ""))
            if event is not None:
                self._event(s, event["kind"], event["message"], model=model, version=event.get("version"),
                            data=event.get("data") or {})
            return dep, rec

        result: tuple[Deployment | None, RolloutRecord | None] = self._write_retrying(run)
        return result
