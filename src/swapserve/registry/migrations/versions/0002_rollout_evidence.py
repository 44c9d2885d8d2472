"""Rollout evidence: per-rollout counts per version and slice, flushed every second, so that a
restarted server resumes a rollout with the evidence it had (at most a flush interval lost).

Revision ID: 0002_evidence
Revises: 0001
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

_TS = sa.DateTime(timezone=True)

revision: str = "0002_evidence"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollout_evidence",
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rollout_evidence")
