"""Registry tables of the fleet: which replicas serve, and which deployment generation each applied.

Each replica writes only its own rows (its id is unique in the fleet), so these writes never
contend with each other or with the control path's deployment writes; readers (``swapserve
status``) see every replica's last report with its heartbeat, and judge staleness from it.
"""
from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa

from swapserve.registry.engine import RegistryBase
from swapserve.registry.models import DeploymentRow, ReplicaModelRow, ReplicaRow
from swapserve.registry.records import ReplicaModelState


class ReplicaTables(RegistryBase):
    """Registry tables of the fleet: heartbeats and per-model applied generations."""

    def current_generations(self) -> dict[str, int]:
        """``{model: current deployment generation}`` for every model with a deployment (one query:
        the fleet's poll runs it every few seconds)."""
        with self._read() as s:
            rows = s.execute(sa.select(DeploymentRow.model, sa.func.max(DeploymentRow.generation))
                             .group_by(DeploymentRow.model))
            return {str(m): int(g) for m, g in rows}

    def report_replica(self, replica_id: str, *, address: str,
                       models: Mapping[str, tuple[int, bool, str]] | None = None) -> None:
        """Heartbeat of ``replica_id`` and, for each model given, ``(applied generation, converged,
        reason)``. Upserts; models not given keep their last report."""
        now = self._now()
        with self._write() as s:
            row = s.get(ReplicaRow, replica_id)
            if row is None:
                s.add(ReplicaRow(replica_id=replica_id, address=address, started_at=now, heartbeat_at=now))
                s.flush()
            else:
                row.address, row.heartbeat_at = address, now
            for model, (generation, converged, reason) in (models or {}).items():
                mr = s.get(ReplicaModelRow, (replica_id, model))
                if mr is None:
                    s.add(ReplicaModelRow(replica_id=replica_id, model=model, applied_generation=generation,
                                          converged=converged, reason=reason, updated_at=now))
                else:
                    mr.applied_generation, mr.converged, mr.reason, mr.updated_at = generation, converged, reason, now

    def forget_replica(self, replica_id: str) -> None:
        """Remove a replica's rows (a graceful shutdown: it no longer serves)."""
        with self._write() as s:
            s.execute(sa.delete(ReplicaModelRow).where(ReplicaModelRow.replica_id == replica_id))
            s.execute(sa.delete(ReplicaRow).where(ReplicaRow.replica_id == replica_id))

    def replica_states(self, model: str, *, stale_after_s: float = 10.0) -> list[ReplicaModelState]:
        """Every replica's last report for ``model``, by replica id. A replica that has not reported
        the model yet is listed with generation 0 and not converged; one without a heartbeat for
        ``stale_after_s`` is marked ``stale``."""
        now = self._now()
        with self._read() as s:
            rows = s.execute(
                sa.select(ReplicaRow, ReplicaModelRow)
                .join(ReplicaModelRow, sa.and_(ReplicaModelRow.replica_id == ReplicaRow.replica_id,
                                               ReplicaModelRow.model == model), isouter=True)
                .order_by(ReplicaRow.replica_id))
            out = []
            for r, mr in rows:
                out.append(ReplicaModelState(
                    replica_id=r.replica_id, address=r.address, model=model,
                    generation=mr.applied_generation if mr is not None else 0,
                    converged=bool(mr.converged) if mr is not None else False,
                    reason=mr.reason if mr is not None else "has not reported this model yet",
                    heartbeat_at=r.heartbeat_at, updated_at=mr.updated_at if mr is not None else r.heartbeat_at,
                    stale=(now - r.heartbeat_at).total_seconds() > stale_after_s))
            return out
