"""Row helpers of the registry: argument checks, row look-ups and row -> record conversion.

Shared by the table groups (versions, deployments, rollouts, audit); none opens a session.
"""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from swapserve import errors
from swapserve.registry.models import AuditRow, DeploymentRow, EventRow, ModelVersion, RolloutRow
from swapserve.registry.records import (
    ACTIVE_ROLLOUT_STATES,
    AuditEntry,
    CohortRule,
    Deployment,
    Event,
    RolloutRecord,
    TrafficShare,
    VersionRecord,
)


def check_model(model: str) -> None:
    if not isinstance(model, str) or not model.strip():
        raise errors.InvalidInput(f"model name {model!r} is empty; pass the model's name")


def check_version(model: str, version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise errors.InvalidInput(
            f"model '{model}': version {version!r} is not a version number; use an int >= 0"
        )


def version_row(s: Session, model: str, version: int) -> ModelVersion | None:
    return s.scalar(sa.select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version))


def require_version(s: Session, model: str, version: int) -> ModelVersion:
    row = version_row(s, model, version)
    if row is None:
        known = list(s.scalars(sa.select(ModelVersion.version).where(ModelVersion.model == model)
                               .order_by(ModelVersion.version)))
        hint = f"registered versions: {known}" if known else "the model has no registered versions"
        raise errors.ModelNotFound(
            f"model '{model}' version {version} is not registered ({hint}); register it first"
        )
    return row


def current_row(s: Session, model: str) -> DeploymentRow | None:
    return s.scalar(
        sa.select(DeploymentRow).where(DeploymentRow.model == model)
        .order_by(DeploymentRow.generation.desc()).limit(1)
    )


def active_rollout_query(model: str) -> sa.Select[Any]:
    return (sa.select(RolloutRow)
            .where(RolloutRow.model == model, RolloutRow.state.in_(ACTIVE_ROLLOUT_STATES))
            .order_by(RolloutRow.id.desc()).limit(1))


def version_record(r: ModelVersion) -> VersionRecord:
    return VersionRecord(
        model=r.model, version=r.version, source_path=r.source_path, sha256=r.sha256,
        registered_at=r.registered_at, stage=r.stage, state=r.state, state_reason=r.state_reason,
        state_changed_at=r.state_changed_at, deployed_at=r.deployed_at,
        training_run=r.training_run, data_ref=r.data_ref, parent_version=r.parent_version,
        rollback_thresholds=dict(r.rollback_thresholds or {}), metadata=dict(r.meta or {}),
    )


def deployment_record(r: DeploymentRow) -> Deployment:
    return Deployment(
        model=r.model, generation=r.generation, champion=r.champion,
        traffic=tuple(TrafficShare(int(v), int(w)) for v, w in r.traffic),
        shadows=tuple(int(v) for v in r.shadows),
        cohorts=tuple(CohortRule(str(a), str(val), int(v)) for a, val, v in r.cohorts),
        key_attribute=r.key_attribute, previous_champions=tuple(int(v) for v in r.previous_champions),
        created_at=r.created_at, actor=r.actor, action=r.action, reason=r.reason, id=r.id,
    )


def rollout_record(r: RolloutRow) -> RolloutRecord:
    return RolloutRecord(
        model=r.model, challenger=r.challenger, champion=r.champion, plan=dict(r.plan or {}),
        strategy=r.strategy, stage_index=r.stage_index, state=r.state,
        evidence=dict(r.evidence or {}), id=r.id, started_at=r.started_at, updated_at=r.updated_at,
    )


def audit_record(r: AuditRow) -> AuditEntry:
    return AuditEntry(id=r.id, at=r.at, actor=r.actor, action=r.action, model=r.model,
                      version=r.version, before=r.before, after=r.after, reason=r.reason)


def event_record(r: EventRow) -> Event:
    return Event(id=r.id, at=r.at, kind=r.kind, message=r.message, model=r.model,
                 version=r.version, data=dict(r.data or {}))
