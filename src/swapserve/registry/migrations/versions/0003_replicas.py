"""The fleet: every replica's heartbeat and, per model, the deployment generation it applied and
why it is not converged (``swapserve status`` shows them).

Revision ID: 0003_replicas
Revises: 0002_evidence
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

_TS = sa.DateTime(timezone=True)

revision: str = "0003_replicas"
down_revision: str | None = "0002_evidence"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(255), primary_key=True),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("heartbeat_at", _TS, nullable=False),
    )
    op.create_table(
        "replica_models",
        sa.Column("replica_id", sa.String(255), sa.ForeignKey("replicas.replica_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("model", sa.String(255), primary_key=True),
        sa.Column("applied_generation", sa.Integer(), nullable=False),
        sa.Column("converged", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("replica_models")
    op.drop_table("replicas")
