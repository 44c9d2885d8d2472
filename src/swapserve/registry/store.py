"""The registry API: the source of truth for versions, what is live, rollouts and the audit log.

Guarantees
----------
* Opening a ``Registry`` runs Alembic ``upgrade head``; the schema never comes from
  anywhere else. Opening an up-to-date database changes nothing.
* Every method is one database transaction: it either happens completely or not at all.
  A deployment and its audit row are written together or not at all.
* Safe to call from several threads of one process (each call uses its own session);
  call it from asyncio through ``asyncio.to_thread``. Several processes (CLI + server,
  or several replicas on PostgreSQL) may share one database: writers serialise on the
  database (SQLite ``BEGIN IMMEDIATE``; PostgreSQL advisory locks), generations are
  additionally protected by a unique constraint.
* Event ids increase monotonically in commit order, so ``events(after_id=last)`` polling
  never skips an event.
* Returned objects are frozen records from ``swapserve.registry.records``; nothing returned
  is attached to a session. Times are timezone-aware UTC.

Errors: ``InvalidInput`` for malformed arguments, ``ModelNotFound`` for an unknown model,
version or rollout, ``AlreadyExists`` for a re-registration with different files,
``FailedPrecondition`` for a stale ``expected_generation`` or a second active rollout.

The registry records deployments; it does not compute them. A new champion, split or
history comes from a ``RoutingPolicy`` transition, published through ``ControlPlane.publish``.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from swapserve import errors
from swapserve.registry.models import (
    AuditRow,
    DeploymentRow,
    EventRow,
    MetricValue,
    ModelVersion,
    RolloutRow,
)
from swapserve.registry.records import (
    ACTIVE_ROLLOUT_STATES,
    DEFAULT_STAGE,
    METRIC_SOURCES,
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
    cohorts_of,
    traffic_of,
)
from swapserve.routing.policy import RoutingPolicy

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: How long a SQLite writer waits for another process's write transaction (ms).
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: How often a write is retried after losing a uniqueness race (PostgreSQL without locks).
_WRITE_ATTEMPTS = 5

_EVENTS_LOCK = "swapserve:events"
_MIGRATE_LOCK = "swapserve:migrate"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock (same on every replica)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class Registry:
    """Versions, metrics by slice, deployments, rollouts, audit log and events.

    ``url`` is any SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``);
    without one, the SQLite file ``registry.db`` under ``home`` (default
    ``$SWAPSERVE_HOME``, else ``~/.swapserve``) is used and created if needed.
    ``clock`` returns the current time (timezone-aware); tests pass a fake one.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        home: Path | None = None,
        clock: Callable[[], datetime] | None = None,
        echo: bool = False,
    ) -> None:
        self.url = url or self.default_url(home)
        self._clock = clock or _utcnow
        parsed = sa.engine.make_url(self.url)
        self._dialect = parsed.get_backend_name()
        self._write_lock: threading.RLock | None = None
        self._memory = False
        if self._dialect == "sqlite":
            self._engine = self._sqlite_engine(parsed, echo)
            # One writer at a time inside this process; BEGIN IMMEDIATE covers other processes.
            self._write_lock = threading.RLock()
        else:
            self._engine = sa.create_engine(self.url, echo=echo, pool_pre_ping=True)
        self._reader = sessionmaker(self._engine, expire_on_commit=False)
        self._writer = sessionmaker(
            self._engine.execution_options(swapserve_begin="IMMEDIATE"), expire_on_commit=False,
        )
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    # -- opening ------------------------------------------------------------------

    @staticmethod
    def default_url(home: Path | None = None) -> str:
        """``sqlite:///<home>/registry.db``; ``home`` defaults to $SWAPSERVE_HOME or ~/.swapserve."""
        if home is None:
            home = Path(os.environ.get("SWAPSERVE_HOME") or "~/.swapserve")
        return f"sqlite:///{Path(home).expanduser() / 'registry.db'}"

    def _sqlite_engine(self, parsed: sa.URL, echo: bool) -> sa.Engine:
        database = parsed.database or ""
        self._memory = database in ("", ":memory:") or database.startswith("file::memory:")
        kwargs: dict[str, Any] = {}
        if self._memory:
            # One shared connection, so every thread sees the same in-memory database.
            kwargs["poolclass"] = sa.pool.StaticPool
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **kwargs,
        )
        memory = self._memory

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            try:
                if not memory:
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            finally:
                cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # Writers take the write lock up front: a deferred transaction that reads
            # and then writes can fail with SQLITE_BUSY instead of waiting its turn.
            mode = conn.get_execution_options().get("swapserve_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine

    def _migrate(self) -> None:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self._locked(), self._engine.execution_options(
            swapserve_begin="IMMEDIATE"
        ).begin() as conn:
            if self._dialect == "postgresql":
                # Replicas starting together must not race to create the same tables.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(_MIGRATE_LOCK)})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (``None`` for an empty database)."""
        with self._engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def close(self) -> None:
        """Release every connection. The registry must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({sa.engine.make_url(self.url).render_as_string(hide_password=True)!r})"

    # -- transactions ---------------------------------------------------------------

    def _locked(self) -> AbstractContextManager[Any]:
        return self._write_lock if self._write_lock is not None else nullcontext()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        # An in-memory database has one shared connection: serialise readers too.
        with (self._locked() if self._memory else nullcontext()), self._reader() as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._locked(), self._writer() as s, s.begin():
            yield s

    def _write_retrying(self, fn: Callable[[Session], Any]) -> Any:
        """Run ``fn`` in a write transaction, again if it lost a uniqueness race."""
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                with self._write() as s:
                    return fn(s)
            except IntegrityError:
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _pg_lock(self, s: Session, name: str) -> None:
        """Hold a PostgreSQL advisory lock until the transaction ends (no-op on SQLite)."""
        if self._dialect == "postgresql":
            s.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(name)})

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the registry clock must return timezone-aware datetimes")
        return now.astimezone(timezone.utc)

    # -- versions -------------------------------------------------------------------

    def register_version(
        self,
        model: str,
        version: int,
        *,
        source_path: str | Path,
        sha256: str,
        training_run: str | None = None,
        data_ref: str | None = None,
        parent_version: int | None = None,
        rollback_thresholds: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        actor: str = "system",
        reason: str = "",
    ) -> VersionRecord:
        """Record a new version (state ``registered``, stage ``staging``); audited + event.

        Idempotent: registering the same files (same sha256) again returns the existing
        record and writes nothing. Different files under an existing (model, version)
        raise ``AlreadyExists`` naming both hashes: versions are immutable.
        """
        _check_model(model)
        _check_version(model, version)
        if parent_version is not None:
            _check_version(model, parent_version)
        digest = str(sha256).strip().lower()
        if not digest:
            raise errors.InvalidInput(
                f"model '{model}' version {version}: sha256 is empty; pass the hex digest "
                "of the version's files"
            )

        def run(s: Session) -> VersionRecord:
            row = _version_row(s, model, version)
            if row is not None:
                if row.sha256 == digest:
                    return _version_record(row)
                raise errors.AlreadyExists(
                    f"model '{model}' version {version} is already registered with sha256 "
                    f"{row.sha256} (from {row.source_path}); the new files at {source_path} "
                    f"hash to {digest}. Versions are immutable: register the new files under "
                    "a new version number."
                )
            now = self._now()
            row = ModelVersion(
                model=model, version=version, source_path=str(source_path), sha256=digest,
                registered_at=now, deployed_at=None, training_run=training_run,
                data_ref=data_ref, parent_version=parent_version, stage=DEFAULT_STAGE,
                state="registered", state_reason="", state_changed_at=now,
                rollback_thresholds=dict(rollback_thresholds or {}), meta=dict(metadata or {}),
            )
            s.add(row)
            s.flush()
            rec = _version_record(row)
            self._audit(s, actor=actor, action="register", model=model, version=version,
                        before=None, after=rec.to_dict(), reason=reason)
            self._event(s, "registry", f"{model} v{version} registered", model=model,
                        version=version, data={"sha256": digest, "source_path": str(source_path)})
            return rec

        result: VersionRecord = self._write_retrying(run)
        return result

    def get_version(self, model: str, version: int) -> VersionRecord | None:
        with self._read() as s:
            row = _version_row(s, model, version)
            return _version_record(row) if row is not None else None

    def require_version(self, model: str, version: int) -> VersionRecord:
        """Like ``get_version`` but raises ``ModelNotFound`` for an unknown version."""
        with self._read() as s:
            return _version_record(_require_version(s, model, version))

    def list_versions(self, model: str) -> list[VersionRecord]:
        """The model's versions, ascending by version number (empty for an unknown model)."""
        with self._read() as s:
            rows = s.scalars(
                sa.select(ModelVersion).where(ModelVersion.model == model).order_by(ModelVersion.version)
            )
            return [_version_record(r) for r in rows]

    def list_models(self) -> list[str]:
        """Every model with at least one registered version, sorted."""
        with self._read() as s:
            return list(s.scalars(sa.select(ModelVersion.model).distinct().order_by(ModelVersion.model)))

    def set_state(self, model: str, version: int, state: str, reason: str = "") -> VersionRecord:
        """Record a lifecycle transition and emit a ``lifecycle`` event.

        The lifecycle module owns which transitions are legal; the registry checks only that
        ``state`` is one of ``records.STATES``. The first time a version is ``serving``,
        its ``deployed_at`` is set.
        """
        if state not in STATES:
            raise errors.InvalidInput(
                f"model '{model}' version {version}: unknown lifecycle state '{state}'; "
                f"use one of {', '.join(STATES)}"
            )

        def run(s: Session) -> VersionRecord:
            row = _require_version(s, model, version)
            old = row.state
            now = self._now()
            row.state, row.state_reason, row.state_changed_at = state, reason, now
            if state == "serving" and row.deployed_at is None:
                row.deployed_at = now
            s.flush()
            msg = f"{model} v{version}: {old} -> {state}" + (f" ({reason})" if reason else "")
            self._event(s, "lifecycle", msg, model=model, version=version,
                        data={"from": old, "to": state, "reason": reason})
            return _version_record(row)

        result: VersionRecord = self._write_retrying(run)
        return result

    def set_stage(
        self, model: str, version: int, stage: str, *, actor: str, reason: str = "",
    ) -> VersionRecord:
        """Move a version to ``staging``/``production``/``archived``; audited + event."""
        if stage not in STAGES:
            raise errors.InvalidInput(
                f"model '{model}' version {version}: unknown stage '{stage}'; "
                f"use one of {', '.join(STAGES)}"
            )

        def run(s: Session) -> VersionRecord:
            row = _require_version(s, model, version)
            old = row.stage
            row.stage = stage
            s.flush()
            self._audit(s, actor=actor, action="stage", model=model, version=version,
                        before={"stage": old}, after={"stage": stage}, reason=reason)
            self._event(s, "control", f"{model} v{version}: stage {old} -> {stage}",
                        model=model, version=version, data={"from": old, "to": stage, "actor": actor})
            return _version_record(row)

        result: VersionRecord = self._write_retrying(run)
        return result

    def set_rollback_thresholds(
        self, model: str, version: int, thresholds: Mapping[str, Any], *, actor: str, reason: str = "",
    ) -> VersionRecord:
        """Replace the version's rollback thresholds (JSON object); audited."""

        def run(s: Session) -> VersionRecord:
            row = _require_version(s, model, version)
            before = dict(row.rollback_thresholds)
            row.rollback_thresholds = dict(thresholds)
            s.flush()
            self._audit(s, actor=actor, action="thresholds", model=model, version=version,
                        before=before, after=dict(thresholds), reason=reason)
            return _version_record(row)

        result: VersionRecord = self._write_retrying(run)
        return result

    def mark_deployed(self, model: str, version: int) -> VersionRecord:
        """Set ``deployed_at`` to now unless it is already set (first time it served)."""

        def run(s: Session) -> VersionRecord:
            row = _require_version(s, model, version)
            if row.deployed_at is None:
                row.deployed_at = self._now()
                s.flush()
            return _version_record(row)

        result: VersionRecord = self._write_retrying(run)
        return result

    # -- metrics ----------------------------------------------------------------------

    def record_metrics(
        self,
        model: str,
        version: int,
        metrics: Mapping[str, Mapping[str, float]],
        *,
        source: str = "offline",
    ) -> None:
        """Append ``{slice: {metric: value}}`` for a version (``"overall"`` = all traffic).

        Values must be finite numbers. History is kept; ``metrics()`` returns the latest.
        """
        if source not in METRIC_SOURCES:
            raise errors.InvalidInput(
                f"model '{model}' version {version}: unknown metric source '{source}'; "
                f"use one of {', '.join(METRIC_SOURCES)}"
            )
        flat: list[tuple[str, str, float]] = []
        for slice_name, values in metrics.items():
            if not isinstance(values, Mapping):
                raise errors.InvalidInput(
                    f"model '{model}' version {version}: metrics must be {{slice: {{metric: value}}}}; "
                    f"slice '{slice_name}' maps to {type(values).__name__}"
                )
            for name, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise errors.InvalidInput(
                        f"model '{model}' version {version}: metric '{name}' of slice "
                        f"'{slice_name}' is {value!r}; metric values must be finite numbers"
                    )
                flat.append((str(slice_name), str(name), float(value)))

        def run(s: Session) -> None:
            _require_version(s, model, version)
            now = self._now()
            s.add_all(
                MetricValue(model=model, version=version, slice=sl, name=n, value=v,
                            source=source, recorded_at=now)
                for sl, n, v in flat
            )

        self._write_retrying(run)

    def metrics(
        self, model: str, version: int, *, source: str | None = None,
    ) -> dict[str, dict[str, float]]:
        """The latest value per (slice, metric), optionally only from one ``source``."""
        with self._read() as s:
            _require_version(s, model, version)
            q = sa.select(MetricValue).where(MetricValue.model == model, MetricValue.version == version)
            if source is not None:
                q = q.where(MetricValue.source == source)
            out: dict[str, dict[str, float]] = {}
            for r in s.scalars(q.order_by(MetricValue.recorded_at, MetricValue.id)):
                out.setdefault(r.slice, {})[r.name] = r.value
            return out

    # -- deployments ------------------------------------------------------------------

    def current_deployment(self, model: str) -> Deployment | None:
        """What is live for ``model`` now (the newest deployment), or ``None``."""
        with self._read() as s:
            row = _current_row(s, model)
            return _deployment_record(row) if row is not None else None

    def publish_deployment(
        self,
        model: str,
        *,
        champion: int,
        traffic: Iterable[TrafficShare | tuple[int, int]],
        shadows: Iterable[int] = (),
        cohorts: Iterable[CohortRule | tuple[str, str, int] | Mapping[str, Any]] = (),
        key_attribute: str = "routing_key",
        previous_champions: Iterable[int] | None = None,
        action: str,
        actor: str,
        reason: str = "",
        expected_generation: int | None = None,
    ) -> Deployment:
        """Make a new deployment current: generation = old + 1, plus its audit row, atomically.

        ``traffic`` is ``[(version, weight_bp), ...]`` summing to 10000. Every version named
        must be registered. ``previous_champions`` defaults to the old stack, with the old
        champion pushed when the champion changes. ``expected_generation`` (0 when nothing is
        deployed yet) makes the publish conditional: if the current generation differs,
        ``FailedPrecondition`` is raised and nothing is written.
        """
        _check_model(model)
        try:
            shares = traffic_of(traffic)
        except (TypeError, ValueError) as exc:
            raise errors.InvalidInput(f"model '{model}': traffic must be [(version, weight_bp), ...]: {exc}") from None
        shadow_versions = tuple(int(v) for v in shadows)
        rules = cohorts_of(cohorts)
        # The shape rules have one home, the routing policy; the registry refuses what it refuses.
        RoutingPolicy(champion=champion, traffic=tuple((t.version, t.weight_bp) for t in shares),
                      shadows=shadow_versions, cohorts=tuple((r.attribute, r.value, r.version) for r in rules),
                      key_attribute=key_attribute).check(model)
        explicit_stack = None if previous_champions is None else tuple(int(v) for v in previous_champions)

        def run(s: Session) -> Deployment:
            # Serialise publishers of one model across replicas (SQLite: BEGIN IMMEDIATE).
            self._pg_lock(s, f"swapserve:deploy:{model}")
            cur = _current_row(s, model)
            cur_gen = cur.generation if cur is not None else 0
            if expected_generation is not None and expected_generation != cur_gen:
                who = f" by {cur.actor} ({cur.action}, {cur.created_at.isoformat()})" if cur else ""
                raise errors.FailedPrecondition(
                    f"model '{model}': the deployment is at generation {cur_gen}, not "
                    f"{expected_generation}; it was changed{who}. Re-read the current deployment "
                    "and retry."
                )
            needed = {champion, *(t.version for t in shares), *shadow_versions, *(r.version for r in rules)}
            known = set(s.scalars(sa.select(ModelVersion.version).where(ModelVersion.model == model)))
            missing = sorted(needed - known)
            if missing:
                raise errors.ModelNotFound(
                    f"model '{model}': version(s) {missing} are not registered; register them "
                    "(and load them) before routing traffic to them"
                )
            if explicit_stack is not None:
                stack = explicit_stack
            elif cur is None:
                stack = ()
            elif cur.champion != champion:
                stack = (*cur.previous_champions, cur.champion)
            else:
                stack = tuple(cur.previous_champions)
            before = _deployment_record(cur).to_dict() if cur is not None else None
            row = DeploymentRow(
                model=model, generation=cur_gen + 1, champion=champion,
                traffic=[[t.version, t.weight_bp] for t in shares], shadows=list(shadow_versions),
                cohorts=[[r.attribute, r.value, r.version] for r in rules],
                key_attribute=key_attribute, previous_champions=list(stack),
                created_at=self._now(), actor=actor, action=action, reason=reason,
            )
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                if expected_generation is not None:
                    raise errors.FailedPrecondition(
                        f"model '{model}': another publish took generation {cur_gen + 1} first; "
                        "re-read the current deployment and retry"
                    ) from None
                raise
            dep = _deployment_record(row)
            self._audit(s, actor=actor, action=action, model=model, version=champion,
                        before=before, after=dep.to_dict(), reason=reason)
            split = ", ".join(f"v{t.version}={t.weight_bp / 100:g}%" for t in shares)
            self._event(s, "control", f"{model} generation {dep.generation} ({action}): champion "
                        f"v{champion}, traffic {split}", model=model, version=champion,
                        data={"generation": dep.generation, "action": action, "actor": actor,
                              "reason": reason})
            return dep

        result: Deployment = self._write_retrying(run)
        return result

    def deployment_history(self, model: str, limit: int = 50) -> list[Deployment]:
        """The model's deployments, newest first."""
        with self._read() as s:
            rows = s.scalars(
                sa.select(DeploymentRow).where(DeploymentRow.model == model)
                .order_by(DeploymentRow.generation.desc()).limit(limit)
            )
            return [_deployment_record(r) for r in rows]

    def live_models(self) -> list[str]:
        """Every model that has a current deployment, sorted."""
        with self._read() as s:
            return list(s.scalars(sa.select(DeploymentRow.model).distinct().order_by(DeploymentRow.model)))

    # -- rollouts ---------------------------------------------------------------------

    def save_rollout(self, rollout: RolloutRecord, *, actor: str = "rollout") -> RolloutRecord:
        """Insert (``id is None``) or update a rollout; returns the stored record.

        At most one active rollout (running/paused/awaiting_approval) per model: starting
        a second raises ``FailedPrecondition`` naming the active one. An update whose
        ``updated_at`` differs from the stored one (someone else saved in between) raises
        ``FailedPrecondition``. A new rollout or a change of state/stage emits a
        ``rollout`` event.
        """
        r = rollout
        _check_model(r.model)
        _check_version(r.model, r.challenger)
        _check_version(r.model, r.champion)
        if r.state not in ROLLOUT_STATES:
            raise errors.InvalidInput(
                f"model '{r.model}': unknown rollout state '{r.state}'; use one of {', '.join(ROLLOUT_STATES)}"
            )
        if isinstance(r.stage_index, bool) or not isinstance(r.stage_index, int) or r.stage_index < 0:
            raise errors.InvalidInput(f"model '{r.model}': rollout stage_index must be an int >= 0, got {r.stage_index!r}")

        def conflict(s: Session) -> errors.FailedPrecondition:
            other = s.scalar(_active_rollout_query(r.model))
            desc = (f"rollout {other.id} (v{other.challenger} vs v{other.champion}, {other.state})"
                    if other is not None else "another rollout")
            return errors.FailedPrecondition(
                f"model '{r.model}' already has an active {desc}; finish, abort or roll it back "
                "before starting another"
            )

        def run(s: Session) -> RolloutRecord:
            now = self._now()
            if r.id is None:
                if r.active and s.scalar(_active_rollout_query(r.model)) is not None:
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
                if r.updated_at is not None and row.updated_at != r.updated_at:
                    raise errors.FailedPrecondition(
                        f"model '{r.model}': rollout {r.id} was saved by someone else at "
                        f"{row.updated_at.isoformat()}; reload it and retry"
                    )
                if r.active and row.state not in ACTIVE_ROLLOUT_STATES:
                    other = s.scalar(_active_rollout_query(r.model))
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
            rec = _rollout_record(row)
            if changed:
                self._event(s, "rollout", f"{r.model} rollout {rec.id} v{r.challenger} vs "
                            f"v{r.champion}: {r.state}, stage {r.stage_index}", model=r.model,
                            version=r.challenger, data={"rollout_id": rec.id, "state": r.state,
                                                        "stage_index": r.stage_index, "actor": actor})
            return rec

        # A uniqueness violation here is a real conflict, reported above; no retry needed.
        with self._write() as s:
            return run(s)

    def get_rollout(self, rollout_id: int) -> RolloutRecord | None:
        with self._read() as s:
            row = s.get(RolloutRow, rollout_id)
            return _rollout_record(row) if row is not None else None

    def active_rollout(self, model: str) -> RolloutRecord | None:
        """The model's running, paused or awaiting-approval rollout, if any."""
        with self._read() as s:
            row = s.scalar(_active_rollout_query(model))
            return _rollout_record(row) if row is not None else None

    def rollouts(self, model: str, limit: int = 20) -> list[RolloutRecord]:
        """The model's rollouts, newest first."""
        with self._read() as s:
            rows = s.scalars(
                sa.select(RolloutRow).where(RolloutRow.model == model)
                .order_by(RolloutRow.id.desc()).limit(limit)
            )
            return [_rollout_record(r) for r in rows]

    # -- audit log and events ---------------------------------------------------------

    def audit(
        self,
        *,
        actor: str,
        action: str,
        model: str | None = None,
        version: int | None = None,
        before: Any = None,
        after: Any = None,
        reason: str = "",
    ) -> AuditEntry:
        """Append one audit entry (before/after must be JSON-serialisable)."""
        with self._write() as s:
            return self._audit(s, actor=actor, action=action, model=model, version=version,
                               before=before, after=after, reason=reason)

    def audit_log(
        self, model: str | None = None, *, action: str | None = None, limit: int = 100,
    ) -> list[AuditEntry]:
        """Audit entries, newest first, optionally of one model and/or one action."""
        with self._read() as s:
            q = sa.select(AuditRow)
            if model is not None:
                q = q.where(AuditRow.model == model)
            if action is not None:
                q = q.where(AuditRow.action == action)
            return [_audit_record(r) for r in s.scalars(q.order_by(AuditRow.id.desc()).limit(limit))]

    def add_event(
        self,
        kind: str,
        message: str,
        *,
        model: str | None = None,
        version: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Event:
        """Append an event (kind: lifecycle/control/rollout/drift/...)."""
        with self._write() as s:
            return self._event(s, kind, message, model=model, version=version, data=data)

    def events(
        self,
        model: str | None = None,
        *,
        after_id: int = 0,
        limit: int = 100,
        kinds: Iterable[str] | None = None,
    ) -> list[Event]:
        """Events with ``id > after_id``, oldest first, at most ``limit``.

        To follow: remember the last id returned and pass it as ``after_id`` next time.
        """
        with self._read() as s:
            q = sa.select(EventRow).where(EventRow.id > after_id)
            if model is not None:
                q = q.where(EventRow.model == model)
            if kinds is not None:
                q = q.where(EventRow.kind.in_(list(kinds)))
            return [_event_record(r) for r in s.scalars(q.order_by(EventRow.id).limit(limit))]

    def last_event_id(self) -> int:
        """The id of the newest event (0 when there is none): follow from "now"."""
        with self._read() as s:
            return int(s.scalar(sa.select(sa.func.max(EventRow.id))) or 0)

    def _audit(
        self, s: Session, *, actor: str, action: str, model: str | None, version: int | None,
        before: Any, after: Any, reason: str,
    ) -> AuditEntry:
        if not actor or not action:
            raise errors.InvalidInput("an audit entry needs an actor (who) and an action (what)")
        row = AuditRow(at=self._now(), actor=actor, action=action, model=model, version=version,
                       before=before, after=after, reason=reason or "")
        s.add(row)
        s.flush()
        return _audit_record(row)

    def _event(
        self, s: Session, kind: str, message: str, *, model: str | None = None,
        version: int | None = None, data: Mapping[str, Any] | None = None,
    ) -> Event:
        # Taken last in every transaction (no deadlock), held to commit: ids on PostgreSQL
        # become visible in id order, so a follower polling by after_id never skips one.
        self._pg_lock(s, _EVENTS_LOCK)
        row = EventRow(at=self._now(), kind=kind, message=message, model=model,
                       version=version, data=dict(data or {}))
        s.add(row)
        s.flush()
        return _event_record(row)


# -- helpers ------------------------------------------------------------------------


def _check_model(model: str) -> None:
    if not isinstance(model, str) or not model.strip():
        raise errors.InvalidInput(f"model name {model!r} is empty; pass the model's name")


def _check_version(model: str, version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise errors.InvalidInput(
            f"model '{model}': version {version!r} is not a version number; use an int >= 0"
        )


def _version_row(s: Session, model: str, version: int) -> ModelVersion | None:
    return s.scalar(sa.select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version))


def _require_version(s: Session, model: str, version: int) -> ModelVersion:
    row = _version_row(s, model, version)
    if row is None:
        known = list(s.scalars(sa.select(ModelVersion.version).where(ModelVersion.model == model)
                               .order_by(ModelVersion.version)))
        hint = f"registered versions: {known}" if known else "the model has no registered versions"
        raise errors.ModelNotFound(
            f"model '{model}' version {version} is not registered ({hint}); register it first"
        )
    return row


def _current_row(s: Session, model: str) -> DeploymentRow | None:
    return s.scalar(
        sa.select(DeploymentRow).where(DeploymentRow.model == model)
        .order_by(DeploymentRow.generation.desc()).limit(1)
    )


def _active_rollout_query(model: str) -> sa.Select[Any]:
    return (sa.select(RolloutRow)
            .where(RolloutRow.model == model, RolloutRow.state.in_(ACTIVE_ROLLOUT_STATES))
            .order_by(RolloutRow.id.desc()).limit(1))


def _version_record(r: ModelVersion) -> VersionRecord:
    return VersionRecord(
        model=r.model, version=r.version, source_path=r.source_path, sha256=r.sha256,
        registered_at=r.registered_at, stage=r.stage, state=r.state, state_reason=r.state_reason,
        state_changed_at=r.state_changed_at, deployed_at=r.deployed_at,
        training_run=r.training_run, data_ref=r.data_ref, parent_version=r.parent_version,
        rollback_thresholds=dict(r.rollback_thresholds or {}), metadata=dict(r.meta or {}),
    )


def _deployment_record(r: DeploymentRow) -> Deployment:
    return Deployment(
        model=r.model, generation=r.generation, champion=r.champion,
        traffic=tuple(TrafficShare(int(v), int(w)) for v, w in r.traffic),
        shadows=tuple(int(v) for v in r.shadows),
        cohorts=tuple(CohortRule(str(a), str(val), int(v)) for a, val, v in r.cohorts),
        key_attribute=r.key_attribute, previous_champions=tuple(int(v) for v in r.previous_champions),
        created_at=r.created_at, actor=r.actor, action=r.action, reason=r.reason, id=r.id,
    )


def _rollout_record(r: RolloutRow) -> RolloutRecord:
    return RolloutRecord(
        model=r.model, challenger=r.challenger, champion=r.champion, plan=dict(r.plan or {}),
        strategy=r.strategy, stage_index=r.stage_index, state=r.state,
        evidence=dict(r.evidence or {}), id=r.id, started_at=r.started_at, updated_at=r.updated_at,
    )


def _audit_record(r: AuditRow) -> AuditEntry:
    return AuditEntry(id=r.id, at=r.at, actor=r.actor, action=r.action, model=r.model,
                      version=r.version, before=r.before, after=r.after, reason=r.reason)


def _event_record(r: EventRow) -> Event:
    return Event(id=r.id, at=r.at, kind=r.kind, message=r.message, model=r.model,
                 version=r.version, data=dict(r.data or {}))
