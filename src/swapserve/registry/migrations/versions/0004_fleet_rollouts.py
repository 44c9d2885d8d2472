"""Rollouts decided once for the fleet: the ``leases`` table (the rollout lease and its fencing
epoch) and rollout evidence kept per replica (``rollout_evidence`` gains ``replica_id`` in its
primary key; rows flushed before this revision keep their counts under the replica id
``pre-fleet``).

Revision ID: 0004_fleet_rollouts
Revises: 0003_replicas
Create Date: 2026-12-02
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

_TS = sa.DateTime(timezone=True)

revision: str = "0004_fleet_rollouts"
down_revision: str | None = "0003_replicas"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("acquired_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
    )
    op.create_table(
        "rollout_evidence_new",
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("replica_id", sa.String(255), primary_key=True),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
    )
    op.execute("INSERT INTO rollout_evidence_new (rollout_id, replica_id, model, updated_at, counts) "
               "SELECT rollout_id, 'pre-fleet', model, updated_at, counts FROM rollout_evidence")
    op.drop_table("rollout_evidence")
    op.rename_table("rollout_evidence_new", "rollout_evidence")


def downgrade() -> None:
    op.create_table(
        "rollout_evidence_old",
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
    )
    # One row per rollout again: the most recently flushed replica's counts.
    op.execute("INSERT INTO rollout_evidence_old (rollout_id, model, updated_at, counts) "
               "SELECT e.rollout_id, e.model, e.updated_at, e.counts FROM rollout_evidence e "
               "WHERE e.replica_id = (SELECT MAX(f.replica_id) FROM rollout_evidence f "
               "WHERE f.rollout_id = e.rollout_id)")
    op.drop_table("rollout_evidence")
    op.rename_table("rollout_evidence_old", "rollout_evidence")
    op.drop_table("leases")
