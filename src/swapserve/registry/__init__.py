"""The registry: swapserve's source of truth (versions, metrics by slice, lineage, stages,
deployments, rollouts, audit log, events).

SQLite under ``$SWAPSERVE_HOME`` by default, PostgreSQL for several replicas. The schema
comes only from the Alembic migrations shipped in ``migrations/``, applied on open.

    from swapserve.registry import Registry
    reg = Registry()                      # or Registry("postgresql+psycopg://...")
    reg.register_version("resnet", 2, source_path=path, sha256=digest)
    reg.publish_deployment("resnet", champion=2, traffic=[(2, 10_000)], action="promote",
                           actor="alice", reason="beats v1 on every slice")
"""
from __future__ import annotations

from swapserve.registry.records import (
    ACTIVE_ROLLOUT_STATES,
    METRIC_SOURCES,
    OVERALL_SLICE,
    ROLLOUT_STATES,
    STAGES,
    STATES,
    AuditEntry,
    CohortRule,
    Deployment,
    Event,
    RolloutRecord,
    TrafficShare,
    VersionRecord,
)
from swapserve.registry.store import Registry

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "METRIC_SOURCES",
    "OVERALL_SLICE",
    "ROLLOUT_STATES",
    "STAGES",
    "STATES",
    "AuditEntry",
    "CohortRule",
    "Deployment",
    "Event",
    "Registry",
    "RolloutRecord",
    "TrafficShare",
    "VersionRecord",
]
