"""Registry tables of rollouts: one active per model, every stage change recorded."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from swapserve import errors
from swapserve.registry.leases import LeaseTables
from swapserve.registry.models import RolloutEvidenceRow, RolloutRow
from swapserve.registry.models import ACTIVE_ROLLOUT_SQL
from swapserve.registry.records import ACTIVE_ROLLOUT_STATES, ROLLOUT_STATES, Lease, RolloutRecord
from swapserve.registry.rows import active_rollout_query, check_model, check_version, rollout_record


class RolloutTables(LeaseTables):
    """Registry tables of rollouts: one active per model, every stage change recorded."""

    def save_rollout(self, rollout: RolloutRecord, *, actor: str = "rollout", fence: Lease | None = None) -> RolloutRecord:
        """Insert (``id is None``) or update a rollout; returns the stored record (see ``_rollout_writer``).
        ``fence``: the lease the caller decides under, checked in the same transaction (NotLeader)."""
        # A uniqueness violation here is a real conflict, reported by the writer; no retry needed.
        with self._write() as s:
            if fence is not None:
                self._check_fence(s, fence)
            return self._rollout_writer(rollout, actor=actor)(s)

    def _rollout_writer(self, rollout: RolloutRecord, *, actor: str = "rollout",
                        final: bool = False) -> Callable[[Session], RolloutRecord]:
        """Insert (``id is None``) or update a rollout; returns the stored record.

        At most one active rollout (running/paused/awaiting_approval) per model: starting
        a second raises ``FailedPrecondition`` naming the active one. An update whose
        ``updated_at`` differs from the stored one (someone else saved in between) raises
        ``FailedPrecondition``. A new rollout or a change of state/stage emits a
        ``rollout`` event. ``final`` (a terminal decision replayed from the outbox): the stamp
        is not checked, and a rollout that is already terminal is returned unchanged.
        Returns ``run(session)``, which writes inside the caller's transaction.
        """
        r = rollout
        check_model(r.model)
        check_version(r.model, r.challenger)
        check_version(r.model, r.champion)
        if r.state not in ROLLOUT_STATES:
            raise errors.InvalidInput(
                f"model '{r.model}': unknown rollout state '{r.state}'; use one of {', '.join(ROLLOUT_STATES)}"
            )
        if isinstance(r.stage_index, bool) or not isinstance(r.stage_index, int) or r.stage_index < 0:
            raise errors.InvalidInput(f"model '{r.model}': rollout stage_index must be an int >= 0, got {r.stage_index!r}")

        def conflict(s: Session) -> errors.FailedPrecondition:
            other = s.scalar(active_rollout_query(r.model))
            desc = (f"rollout {other.id} (v{other.challenger} vs v{other.champion}, {other.state})"
                    if other is not None else "another rollout")
            return errors.FailedPrecondition(
                f"model '{r.model}' already has an active {desc}; finish, abort or roll it back "
                "before starting another"
            )

        def run(s: Session) -> RolloutRecord:
            now = self._now()
            if r.id is None:
                if r.active and s.scalar(active_rollout_query(r.model)) is not None:
                    raise conflict(s)
                row = RolloutRow(
                    model=r.model, challenger=r.challenger, champion=r.champion, plan=dict(r.plan),
                    strategy=r.strategy, stage_index=r.stage_index, state=r.state,
                    started_at=r.started_at or now, updated_at=now, evidence=dict(r.evidence),
                )
                s.add(row)
                changed = True
            else:
                found = s.get(RolloutRow, r.id)
                if found is None or found.model != r.model:
                    raise errors.ModelNotFound(
                        f"model '{r.model}': rollout {r.id} does not exist; save it with id=None to start one"
                    )
                row = found
                if final and row.state not in ACTIVE_ROLLOUT_STATES:
                    return rollout_record(row)  # already decided (a replayed outbox entry): it stays decided
                # A final decision was taken on this server's record and wins over a stale stamp.
                if not final and r.updated_at is not None and row.updated_at != r.updated_at:
                    raise errors.StaleRollout(
                        f"model '{r.model}': rollout {r.id} was saved by someone else at "
                        f"{row.updated_at.isoformat()}; reload it and retry"
                    )
                if r.active and row.state not in ACTIVE_ROLLOUT_STATES:
                    other = s.scalar(active_rollout_query(r.model))
                    if other is not None and other.id != row.id:
                        raise conflict(s)
                changed = (row.state, row.stage_index) != (r.state, r.stage_index)
                row.challenger, row.champion, row.plan = r.challenger, r.champion, dict(r.plan)
                row.strategy, row.stage_index, row.state = r.strategy, r.stage_index, r.state
                row.evidence, row.updated_at = dict(r.evidence), now
            try:
                s.flush()
            except IntegrityError:
                # Lost a race with another replica; the session is unusable, so no lookup.
                raise errors.FailedPrecondition(
                    f"model '{r.model}' already has an active rollout (started concurrently); "
                    "finish, abort or roll it back before starting another"
                ) from None
            rec = rollout_record(row)
            if changed:
                self._event(s, "rollout", f"{r.model} rollout {rec.id} v{r.challenger} vs "
                            f"v{r.champion}: {r.state}, stage {r.stage_index}", model=r.model,
                            version=r.challenger, data={"rollout_id": rec.id, "state": r.state,
                                                        "stage_index": r.stage_index, "actor": actor})
            return rec

        return run

    def get_rollout(self, rollout_id: int) -> RolloutRecord | None:
        with self._read() as s:
            row = s.get(RolloutRow, rollout_id)
            return rollout_record(row) if row is not None else None

    def active_rollout(self, model: str) -> RolloutRecord | None:
        """The model's running, paused or awaiting-approval rollout, if any."""
        with self._read() as s:
            row = s.scalar(active_rollout_query(model))
            return rollout_record(row) if row is not None else None

    def active_rollouts(self) -> list[RolloutRecord]:
        """Every model's active rollout (one query: every replica reads it about twice a second)."""
        with self._read() as s:
            rows = s.scalars(sa.select(RolloutRow).where(sa.text(ACTIVE_ROLLOUT_SQL)).order_by(RolloutRow.id))
            return [rollout_record(r) for r in rows]

    def rollouts(self, model: str, limit: int = 20) -> list[RolloutRecord]:
        """The model's rollouts, newest first."""
        with self._read() as s:
            rows = s.scalars(
                sa.select(RolloutRow).where(RolloutRow.model == model)
                .order_by(RolloutRow.id.desc()).limit(limit)
            )
            return [rollout_record(r) for r in rows]

    def save_evidence(self, rollout_id: int, model: str, counts: Mapping[str, Any], replica_id: str) -> None:
        """Overwrite one replica's flushed counts of a rollout (each replica calls this about once a
        second, for its own row only, so these writes never contend). A rollout that no longer
        exists is ignored (it ended and was pruned)."""
        def run(s: Session) -> None:
            if s.get(RolloutRow, rollout_id) is None:
                return
            row = s.get(RolloutEvidenceRow, (rollout_id, replica_id))
            if row is None:
                s.add(RolloutEvidenceRow(rollout_id=rollout_id, replica_id=replica_id, model=model,
                                         updated_at=self._now(), counts=dict(counts)))
            else:
                row.counts, row.updated_at = dict(counts), self._now()

        self._write_retrying(run)

    def load_evidence(self, rollout_id: int) -> dict[str, dict[str, Any]]:
        """Every replica's last flushed counts of the rollout, by replica id (empty: none yet)."""
        with self._read() as s:
            rows = s.scalars(sa.select(RolloutEvidenceRow).where(RolloutEvidenceRow.rollout_id == rollout_id))
            return {r.replica_id: dict(r.counts) for r in rows}
