"""Initial registry schema: versions, metrics, deployments, rollouts, audit log, events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Migrations freeze the schema as it was: no imports from the live ORM models.
_TS = sa.DateTime(timezone=True)  # stored UTC; models.UTCDateTime converts on the way in/out
_ACTIVE_ROLLOUT_SQL = "state IN ('running', 'paused', 'awaiting_approval')"

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("registered_at", _TS, nullable=False),
        sa.Column("deployed_at", _TS, nullable=True),
        sa.Column("training_run", sa.Text(), nullable=True),
        sa.Column("data_ref", sa.Text(), nullable=True),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=False),
        sa.Column("state_changed_at", _TS, nullable=True),
        sa.Column("rollback_thresholds", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.UniqueConstraint("model", "version", name="uq_model_versions_model_version"),
    )
    op.create_table(
        "metric_values",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("slice", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("recorded_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["model", "version"], ["model_versions.model", "model_versions.version"],
            name="fk_metric_values_version", ondelete="CASCADE",
        ),
    )
    op.create_index("ix_metric_values_model_version", "metric_values", ["model", "version"])
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("champion", sa.Integer(), nullable=False),
        sa.Column("traffic", sa.JSON(), nullable=False),
        sa.Column("shadows", sa.JSON(), nullable=False),
        sa.Column("cohorts", sa.JSON(), nullable=False),
        sa.Column("key_attribute", sa.String(255), nullable=False),
        sa.Column("previous_champions", sa.JSON(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.UniqueConstraint("model", "generation", name="uq_deployments_model_generation"),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("challenger", sa.Integer(), nullable=False),
        sa.Column("champion", sa.Integer(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("strategy", sa.String(64), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
    )
    op.create_index("ix_rollouts_model", "rollouts", ["model"])
    op.create_index(
        "uq_rollouts_one_active_per_model", "rollouts", ["model"], unique=True,
        sqlite_where=sa.text(_ACTIVE_ROLLOUT_SQL), postgresql_where=sa.text(_ACTIVE_ROLLOUT_SQL),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", _TS, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_audit_log_model", "audit_log", ["model"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", _TS, nullable=False),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_model", "events", ["model"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("audit_log")
    op.drop_table("rollouts")
    op.drop_table("deployments")
    op.drop_table("metric_values")
    op.drop_table("model_versions")
