"""Registry tables of deployments: what is live, written once per generation."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from swapserve import errors
from swapserve.registry.engine import RegistryBase
from swapserve.registry.models import DeploymentRow, ModelVersion
from swapserve.registry.records import CohortRule, Deployment, TrafficShare, cohorts_of, traffic_of
from swapserve.registry.rows import check_model, current_row, deployment_record
from swapserve.routing.policy import RoutingPolicy

#: The PostgreSQL channel every replica LISTENs on. A NOTIFY with payload
#: ``{"model": NAME, "generation": N}`` is sent in the transaction that writes generation N, so it
#: is delivered exactly when (and only if) the deployment commits.
DEPLOYMENTS_CHANNEL = "swapserve_deployments"


class DeploymentTables(RegistryBase):
    """Registry tables of deployments: what is live, written once per generation."""

    def current_deployment(self, model: str) -> Deployment | None:
        """What is live for ``model`` now (the newest deployment), or ``None``."""
        with self._read() as s:
            row = current_row(s, model)
            return deployment_record(row) if row is not None else None

    def publish_deployment(
        self,
        model: str,
        *,
        champion: int,
        traffic: Iterable[TrafficShare | tuple[int, int]],
        shadows: Iterable[int] = (),
        cohorts: Iterable[CohortRule | tuple[str, str, int] | Mapping[str, Any]] = (),
        key_attribute: str = "routing_key",
        previous_champions: Iterable[int] | None = None,
        action: str,
        actor: str,
        reason: str = "",
        expected_generation: int | None = None,
    ) -> Deployment:
        """Make a new deployment current: generation = old + 1, plus its audit row, atomically.

        ``traffic`` is ``[(version, weight_bp), ...]`` summing to 10000. Every version named
        must be registered. ``previous_champions`` defaults to the old stack, with the old
        champion pushed when the champion changes. ``expected_generation`` (0 when nothing is
        deployed yet) makes the publish conditional: if the current generation differs,
        ``FailedPrecondition`` is raised and nothing is written.
        """
        run = self._deployment_writer(
            model, champion=champion, traffic=traffic, shadows=shadows, cohorts=cohorts,
            key_attribute=key_attribute, previous_champions=previous_champions, action=action, actor=actor,
            reason=reason, expected_generation=expected_generation)
        result: Deployment = self._write_retrying(run)
        return result

    def _deployment_writer(
        self,
        model: str,
        *,
        champion: int,
        traffic: Iterable[TrafficShare | tuple[int, int]],
        shadows: Iterable[int] = (),
        cohorts: Iterable[CohortRule | tuple[str, str, int] | Mapping[str, Any]] = (),
        key_attribute: str = "routing_key",
        previous_champions: Iterable[int] | None = None,
        action: str,
        actor: str,
        reason: str = "",
        expected_generation: int | None = None,
        skip_if_current: bool = False,
    ) -> Callable[[Session], Deployment]:
        """Validate the arguments now and return ``run(session)`` that writes the deployment (and its
        audit row and event) inside the caller's transaction. With ``skip_if_current`` a deployment
        that already routes exactly this way is returned as is (replaying an outbox entry twice
        writes one generation)."""
        check_model(model)
        try:
            shares = traffic_of(traffic)
        except (TypeError, ValueError) as exc:
            raise errors.InvalidInput(f"model '{model}': traffic must be [(version, weight_bp), ...]: {exc}") from None
        shadow_versions = tuple(int(v) for v in shadows)
        rules = cohorts_of(cohorts)
        # The shape rules have one home, the routing policy; the registry refuses what it refuses.
        RoutingPolicy(champion=champion, traffic=tuple((t.version, t.weight_bp) for t in shares),
                      shadows=shadow_versions, cohorts=tuple((r.attribute, r.value, r.version) for r in rules),
                      key_attribute=key_attribute).check(model)
        explicit_stack = None if previous_champions is None else tuple(int(v) for v in previous_champions)

        def run(s: Session) -> Deployment:
            # Serialise publishers of one model across replicas (SQLite: BEGIN IMMEDIATE).
            self._pg_lock(s, f"swapserve:deploy:{model}")
            cur = current_row(s, model)
            if skip_if_current and cur is not None:
                have = deployment_record(cur)
                if (have.champion == champion and [(t.version, t.weight_bp) for t in have.traffic]
                        == [(t.version, t.weight_bp) for t in shares] and tuple(have.shadows) == shadow_versions
                        and [(c.attribute, c.value, c.version) for c in have.cohorts]
                        == [(c.attribute, c.value, c.version) for c in rules]
                        and have.key_attribute == key_attribute
                        and (explicit_stack is None or tuple(have.previous_champions) == explicit_stack)):
                    return have
            cur_gen = cur.generation if cur is not None else 0
            if expected_generation is not None and expected_generation != cur_gen:
                who = f" by {cur.actor} ({cur.action}, {cur.created_at.isoformat()})" if cur else ""
                raise errors.GenerationConflict(
                    f"model '{model}': the deployment is at generation {cur_gen}, not "
                    f"{expected_generation}; it was changed{who}. Re-read the current deployment "
                    "and retry."
                )
            needed = {champion, *(t.version for t in shares), *shadow_versions, *(r.version for r in rules)}
            known = set(s.scalars(sa.select(ModelVersion.version).where(ModelVersion.model == model)))
            missing = sorted(needed - known)
            if missing:
                raise errors.ModelNotFound(
                    f"model '{model}': version(s) {missing} are not registered; register them "
                    "(and load them) before routing traffic to them"
                )
            if explicit_stack is not None:
                stack = explicit_stack
            elif cur is None:
                stack = ()
            elif cur.champion != champion:
                stack = (*cur.previous_champions, cur.champion)
            else:
                stack = tuple(cur.previous_champions)
            before = deployment_record(cur).to_dict() if cur is not None else None
            row = DeploymentRow(
                model=model, generation=cur_gen + 1, champion=champion,
                traffic=[[t.version, t.weight_bp] for t in shares], shadows=list(shadow_versions),
                cohorts=[[r.attribute, r.value, r.version] for r in rules],
                key_attribute=key_attribute, previous_champions=list(stack),
                created_at=self._now(), actor=actor, action=action, reason=reason,
            )
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                if expected_generation is not None:
                    raise errors.GenerationConflict(
                        f"model '{model}': another publish took generation {cur_gen + 1} first; "
                        "re-read the current deployment and retry"
                    ) from None
                raise
            dep = deployment_record(row)
            if self._dialect == "postgresql":  # delivered at commit, never for a rolled-back write
                s.execute(sa.text("SELECT pg_notify(:channel, :payload)"), {
                    "channel": DEPLOYMENTS_CHANNEL,
                    "payload": json.dumps({"model": model, "generation": dep.generation})})
            self._audit(s, actor=actor, action=action, model=model, version=champion,
                        before=before, after=dep.to_dict(), reason=reason)
            split = ", ".join(f"v{t.version}={t.weight_bp / 100:g}%" for t in shares)
            self._event(s, "control", f"{model} generation {dep.generation} ({action}): champion "
                        f"v{champion}, traffic {split}", model=model, version=champion,
                        data={"generation": dep.generation, "action": action, "actor": actor,
                              "reason": reason})
            return dep

        return run

    def deployment_history(self, model: str, limit: int = 50) -> list[Deployment]:
        """The model's deployments, newest first."""
        with self._read() as s:
            rows = s.scalars(
                sa.select(DeploymentRow).where(DeploymentRow.model == model)
                .order_by(DeploymentRow.generation.desc()).limit(limit)
            )
            return [deployment_record(r) for r in rows]

    def live_models(self) -> list[str]:
        """Every model that has a current deployment, sorted."""
        with self._read() as s:
            return list(s.scalars(sa.select(DeploymentRow.model).distinct().order_by(DeploymentRow.model)))
