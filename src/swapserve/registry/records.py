"""Plain, immutable records the registry returns. No ORM object ever leaves the registry.

Every record has ``to_dict()``, which is JSON-safe (times as ISO 8601 UTC strings, tuples
as lists) for the CLI's ``--json`` output and for the audit log's before/after columns.
Traffic weights are basis points: 10000 is the whole of a model's traffic.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Where a version stands in its promotion path (MLflow-style).
STAGES: tuple[str, ...] = ("staging", "production", "archived")
DEFAULT_STAGE = "staging"

#: Lifecycle states; the lifecycle module owns the transitions, the registry records them.
STATES: tuple[str, ...] = (
    "registered", "loading", "warming", "ready", "serving", "draining", "unloaded", "failed",
)

#: Rollout states. The first three are "active": at most one active rollout per model.
ROLLOUT_STATES: tuple[str, ...] = (
    "running", "paused", "awaiting_approval", "promoted", "rolled_back", "aborted", "completed",
)
ACTIVE_ROLLOUT_STATES: tuple[str, ...] = ("running", "paused", "awaiting_approval")

#: Where a metric value came from: an offline evaluation or live traffic with ground truth.
METRIC_SOURCES: tuple[str, ...] = ("offline", "live")

#: The slice name that stands for all traffic.
OVERALL_SLICE = "overall"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (ISO 8601 times, lists for tuples)."""
        out = _jsonable(self)
        assert isinstance(out, dict)
        return out


@dataclass(frozen=True)
class VersionRecord(_Record):
    """One registered version of a model and everything known about it."""

    model: str
    version: int
    source_path: str
    sha256: str
    registered_at: datetime
    stage: str = DEFAULT_STAGE
    state: str = "registered"
    state_reason: str = ""
    state_changed_at: datetime | None = None
    deployed_at: datetime | None = None  # first time it served traffic; set once
    training_run: str | None = None
    data_ref: str | None = None
    parent_version: int | None = None  # lineage: the version this one was trained from
    rollback_thresholds: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrafficShare(_Record):
    """One version's share of a model's traffic, in basis points."""

    version: int
    weight_bp: int

    @property
    def percent(self) -> float:
        return self.weight_bp / 100.0


@dataclass(frozen=True)
class CohortRule(_Record):
    """Requests whose ``attribute`` parameter equals ``value`` go to ``version``."""

    attribute: str
    value: str
    version: int


@dataclass(frozen=True)
class Deployment(_Record):
    """What is live for a model: one immutable row per change, newest = current.

    ``generation`` strictly increases per model (1 for the first deployment). ``traffic``
    is ordered and its weights sum to ``swapserve.units.BASIS_POINTS``. ``previous_champions`` is the
    champion history, most recent last: a promote pushes the old champion, a rollback
    pops it back.
    """

    model: str
    generation: int
    champion: int
    traffic: tuple[TrafficShare, ...]
    shadows: tuple[int, ...] = ()
    cohorts: tuple[CohortRule, ...] = ()
    key_attribute: str = "routing_key"
    previous_champions: tuple[int, ...] = ()
    created_at: datetime | None = None
    actor: str = "system"
    action: str = ""
    reason: str = ""
    id: int | None = None

    def weight_of(self, version: int) -> int:
        """The version's traffic share in basis points (0 when it takes no traffic)."""
        return next((t.weight_bp for t in self.traffic if t.version == version), 0)

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version this deployment needs resident: traffic, shadows, cohorts, champion."""
        seen: dict[int, None] = {self.champion: None}
        for t in self.traffic:
            seen[t.version] = None
        for v in self.shadows:
            seen[v] = None
        for c in self.cohorts:
            seen[c.version] = None
        return tuple(seen)


@dataclass(frozen=True)
class RolloutRecord(_Record):
    """A rollout of ``challenger`` against ``champion``; save it with ``Registry.save_rollout``.

    Build a new one with ``id=None`` (the registry assigns id and times); change one with
    ``dataclasses.replace(record, state=..., stage_index=...)`` and save it again.
    """

    model: str
    challenger: int
    champion: int
    plan: Mapping[str, Any] = field(default_factory=dict)
    strategy: str = "canary"
    stage_index: int = 0
    state: str = "running"
    evidence: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_ROLLOUT_STATES


@dataclass(frozen=True)
class AuditEntry(_Record):
    """One mutating control action: who, when, what (before/after) and why."""

    id: int
    at: datetime
    actor: str
    action: str
    model: str | None
    version: int | None
    before: Any
    after: Any
    reason: str


@dataclass(frozen=True)
class Event(_Record):
    """One entry of the event stream; ``id`` increases monotonically (poll with after_id)."""

    id: int
    at: datetime
    kind: str
    message: str
    model: str | None = None
    version: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaModelState(_Record):
    """What one replica applied for one model: ``generation`` (0: none yet), and when it is not
    ``converged`` on the registry's current generation, ``reason`` says why (still loading,
    memory budget, a failed load)."""

    replica_id: str
    address: str
    model: str
    generation: int
    converged: bool
    reason: str
    heartbeat_at: datetime
    updated_at: datetime
    #: No heartbeat for longer than the caller's ``stale_after_s`` (by the registry's clock).
    stale: bool = False


@dataclass(frozen=True)
class TokenRecord(_Record):
    """An API token as stored: its name, roles, the models it may call and its SHA-256 (never
    the token). ``active`` at a time when it is neither revoked nor expired."""

    id: int
    name: str
    sha256: str
    roles: tuple[str, ...]
    models: tuple[str, ...]
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class Lease(_Record):
    """A named lease as stored: ``holder`` may act for the fleet until ``expires_at`` (by the
    registry's clock). ``epoch`` changes with every new holder; a decision carries the epoch it
    was taken under and is refused once the lease has moved on (fencing)."""

    name: str
    holder: str
    epoch: int
    acquired_at: datetime
    expires_at: datetime


def traffic_of(pairs: Iterable[TrafficShare | tuple[int, int]]) -> tuple[TrafficShare, ...]:
    """Normalise ``[(version, weight_bp), ...]`` or TrafficShares into TrafficShares."""
    out = []
    for p in pairs:
        if isinstance(p, TrafficShare):
            out.append(p)
        else:
            version, weight = p
            out.append(TrafficShare(int(version), int(weight)))
    return tuple(out)


def cohorts_of(
    rules: Iterable[CohortRule | tuple[str, str, int] | Mapping[str, Any]],
) -> tuple[CohortRule, ...]:
    """Normalise ``[(attribute, value, version), ...]``, dicts or CohortRules."""
    out = []
    for r in rules:
        if isinstance(r, CohortRule):
            out.append(r)
        elif isinstance(r, Mapping):
            out.append(CohortRule(str(r["attribute"]), str(r["value"]), int(r["version"])))
        else:
            attribute, value, version = r
            out.append(CohortRule(str(attribute), str(value), int(version)))
    return tuple(out)
