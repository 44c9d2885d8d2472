"""ORM tables of the registry. Private to ``swapserve.registry``: callers get records.

The schema is created and changed only by the Alembic migrations in ``migrations/``;
``tests/unit/test_registry.py`` checks that these classes and the migrations agree.
Times are stored as UTC (naive on SQLite, timestamptz on PostgreSQL) and always come
back as timezone-aware UTC datetimes.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Rollouts in these states block another rollout of the same model (partial unique index).
ACTIVE_ROLLOUT_SQL = "state IN ('running', 'paused', 'awaiting_approval')"


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A datetime that is stored as UTC and read back timezone-aware UTC on every backend."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("registry times must be timezone-aware (UTC)")
        value = value.astimezone(timezone.utc)
        # SQLite has no time zones: store naive UTC so that ordering by text stays right.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON(), Any: sa.JSON()}


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (sa.UniqueConstraint("model", "version", name="uq_model_versions_model_version"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(sa.String(255))
    version: Mapped[int] = mapped_column(sa.Integer)
    source_path: Mapped[str] = mapped_column(sa.Text)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    registered_at: Mapped[datetime]
    deployed_at: Mapped[datetime | None]
    training_run: Mapped[str | None] = mapped_column(sa.Text)
    data_ref: Mapped[str | None] = mapped_column(sa.Text)
    parent_version: Mapped[int | None] = mapped_column(sa.Integer)
    stage: Mapped[str] = mapped_column(sa.String(32))
    state: Mapped[str] = mapped_column(sa.String(32))
    state_reason: Mapped[str] = mapped_column(sa.Text)
    state_changed_at: Mapped[datetime | None]
    rollback_thresholds: Mapped[dict[str, Any]]
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", sa.JSON)


class MetricValue(Base):
    __tablename__ = "metric_values"
    __table_args__ = (
        sa.ForeignKeyConstraint(
            ["model", "version"], ["model_versions.model", "model_versions.version"],
            name="fk_metric_values_version", ondelete="CASCADE",
        ),
        sa.Index("ix_metric_values_model_version", "model", "version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(sa.String(255))
    version: Mapped[int] = mapped_column(sa.Integer)
    slice: Mapped[str] = mapped_column(sa.String(255))
    name: Mapped[str] = mapped_column(sa.String(255))
    value: Mapped[float] = mapped_column(sa.Float)
    source: Mapped[str] = mapped_column(sa.String(16))
    recorded_at: Mapped[datetime]


class DeploymentRow(Base):
    __tablename__ = "deployments"
    __table_args__ = (
        # The database itself refuses a duplicate generation, whatever the callers do.
        sa.UniqueConstraint("model", "generation", name="uq_deployments_model_generation"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(sa.String(255))
    generation: Mapped[int] = mapped_column(sa.Integer)
    champion: Mapped[int] = mapped_column(sa.Integer)
    traffic: Mapped[Any]  # [[version, weight_bp], ...]
    shadows: Mapped[Any]  # [version, ...]
    cohorts: Mapped[Any]  # [[attribute, value, version], ...]
    key_attribute: Mapped[str] = mapped_column(sa.String(255))
    previous_champions: Mapped[Any]  # [version, ...], most recent last
    created_at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(sa.String(255))
    action: Mapped[str] = mapped_column(sa.String(64))
    reason: Mapped[str] = mapped_column(sa.Text)


class RolloutEvidenceRow(Base):
    """The latest flushed counts of one rollout on one replica (overwritten about once a second;
    the rollout's evidence is the sum over its replicas' rows)."""

    __tablename__ = "rollout_evidence"

    rollout_id: Mapped[int] = mapped_column(sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    replica_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(255))
    updated_at: Mapped[datetime]
    counts: Mapped[Any]


class LeaseRow(Base):
    """A named lease (``rollouts``: which replica decides the fleet's rollouts). ``epoch`` grows by
    one on every change of holder: the fencing token every decision is checked against."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(sa.String(255))
    epoch: Mapped[int] = mapped_column(sa.Integer)
    acquired_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class TokenRow(Base):
    """An API token (``swapserve token create``): only its SHA-256 is stored. ``roles`` and
    ``models`` are JSON lists; a revoked token keeps its row (``revoked_at``) for the record."""

    __tablename__ = "tokens"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(128), index=True)
    sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    roles: Mapped[Any]
    models: Mapped[Any]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(sa.String(255))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(sa.String(255))


class RolloutRow(Base):
    __tablename__ = "rollouts"
    __table_args__ = (
        sa.Index(
            "uq_rollouts_one_active_per_model", "model", unique=True,
            sqlite_where=sa.text(ACTIVE_ROLLOUT_SQL), postgresql_where=sa.text(ACTIVE_ROLLOUT_SQL),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(sa.String(255), index=True)
    challenger: Mapped[int] = mapped_column(sa.Integer)
    champion: Mapped[int] = mapped_column(sa.Integer)
    plan: Mapped[Any]
    strategy: Mapped[str] = mapped_column(sa.String(64))
    stage_index: Mapped[int] = mapped_column(sa.Integer)
    state: Mapped[str] = mapped_column(sa.String(32))
    started_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    evidence: Mapped[Any]


class AuditRow(Base):
    __tablename__ = "audit_log"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(sa.String(255))
    action: Mapped[str] = mapped_column(sa.String(64))
    model: Mapped[str | None] = mapped_column(sa.String(255), index=True)
    version: Mapped[int | None] = mapped_column(sa.Integer)
    before: Mapped[Any | None]
    after: Mapped[Any | None]
    reason: Mapped[str] = mapped_column(sa.Text)
    #: The hash chain (swapserve.registry.chain): the previous row's hash and this row's.
    prev_hash: Mapped[str | None] = mapped_column(sa.String(64))
    hash: Mapped[str | None] = mapped_column(sa.String(64))


class EventRow(Base):
    __tablename__ = "events"
    # AUTOINCREMENT: SQLite never reuses an id, so "after_id" polling never misses one.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    model: Mapped[str | None] = mapped_column(sa.String(255), index=True)
    version: Mapped[int | None] = mapped_column(sa.Integer)
    kind: Mapped[str] = mapped_column(sa.String(64))
    message: Mapped[str] = mapped_column(sa.Text)
    data: Mapped[Any]


class ReplicaRow(Base):
    """One serving process of the fleet (``swapserve serve``), as it last reported itself."""

    __tablename__ = "replicas"

    replica_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    address: Mapped[str] = mapped_column(sa.String(255))
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]


class ReplicaModelRow(Base):
    """The deployment generation one replica applied for one model, and why it is not converged."""

    __tablename__ = "replica_models"

    replica_id: Mapped[str] = mapped_column(sa.ForeignKey("replicas.replica_id", ondelete="CASCADE"),
                                            primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    applied_generation: Mapped[int]
    converged: Mapped[bool]
    reason: Mapped[str] = mapped_column(sa.Text)
    updated_at: Mapped[datetime]
