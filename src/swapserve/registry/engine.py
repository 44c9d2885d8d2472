"""The registry's plumbing: engine, migrations, transactions and locks (see ``store.py`` for the guarantees)."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from swapserve import errors
from swapserve.registry import chain
from swapserve.registry.models import AuditRow, EventRow
from swapserve.registry.records import AuditEntry, Event
from swapserve.registry.rows import audit_record, event_record

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

def _timeout_s() -> float:
    raw = os.environ.get("SWAPSERVE_REGISTRY_TIMEOUT_S", "")
    try:
        value = float(raw) if raw else 10.0
    except ValueError:
        raise ValueError(f"SWAPSERVE_REGISTRY_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"SWAPSERVE_REGISTRY_TIMEOUT_S={raw!r} must be > 0")
    return value


#: Longest any one registry call may wait on the database: SQLite's busy wait for another
#: process's write transaction, PostgreSQL's connect, statement and lock timeouts, the pool's
#: checkout. Past it the call fails with RegistryUnavailable instead of hanging the control path
#: (SWAPSERVE_REGISTRY_TIMEOUT_S).
REGISTRY_TIMEOUT_S = _timeout_s()
#: How long a SQLite writer waits for another process's write transaction (ms).
SQLITE_BUSY_TIMEOUT_MS = int(REGISTRY_TIMEOUT_S * 1000)
#: Threads of the registry's own executor: registry calls never queue behind model loads
#: (which use asyncio's default pool), and a hung database holds at most these threads.
REGISTRY_THREADS = 8
#: How often a write is retried after losing a uniqueness race (PostgreSQL without locks).
_WRITE_ATTEMPTS = 5

_EVENTS_LOCK = "swapserve:events"
#: The audit chain's writers on PostgreSQL: each row links to the newest committed one, so they
#: must take turns until commit. The events lock itself: a lock of its own would deadlock with
#: transactions that write an event before an audit row (record_decision), and both are written
#: at the end of a transaction, so it changes no lock order.
_AUDIT_LOCK = _EVENTS_LOCK
_MIGRATE_LOCK = "swapserve:migrate"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock (same on every replica)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_R = TypeVar("_R", bound="RegistryBase")


class RegistryBase:
    """The registry's engine, schema migration, transactions, clock and audit/event rows.

    Every table group (``versions``, ``deployments``, ``rollouts``, ``audit``) builds on this;
    ``swapserve.registry.Registry`` combines them. Arguments as ``Registry``'s.

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
            self._engine = sa.create_engine(self.url, echo=echo, pool_pre_ping=True,
                                            pool_timeout=REGISTRY_TIMEOUT_S, **self._pg_args(parsed))
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
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

    def _pg_args(self, parsed: sa.URL) -> dict[str, Any]:
        """Driver timeouts for PostgreSQL: connect, statement and lock waits bounded by REGISTRY_TIMEOUT_S."""
        if self._dialect != "postgresql" or parsed.get_driver_name() not in ("psycopg", "psycopg2"):
            return {}
        ms = int(REGISTRY_TIMEOUT_S * 1000)
        args: dict[str, Any] = {"connect_timeout": max(1, int(REGISTRY_TIMEOUT_S))}
        if "options" not in parsed.query:  # an operator's own options win
            args["options"] = f"-c statement_timeout={ms} -c lock_timeout={ms}"
        return {"connect_args": args}

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
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._engine.dispose()

    # -- calling from asyncio ---------------------------------------------------------

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The registry's own threads (created on first use)."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(REGISTRY_THREADS, thread_name_prefix="swapserve-registry")
            return self._executor

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` (a registry method or a lambda over several) on the registry's
        executor, never asyncio's default pool that the model loaders use. Database failures arrive
        as RegistryUnavailable, after at most about REGISTRY_TIMEOUT_S."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(fn, *args, **kwargs))

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({sa.engine.make_url(self.url).render_as_string(hide_password=True)!r})"

    # -- transactions ---------------------------------------------------------------

    def _locked(self) -> AbstractContextManager[Any]:
        return self._write_lock if self._write_lock is not None else nullcontext()

    def _unavailable(self, exc: BaseException) -> errors.RegistryUnavailable:
        where = sa.engine.make_url(self.url).render_as_string(hide_password=True)
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return errors.RegistryUnavailable(
            f"the registry {where} is unavailable ({detail}); routing already published stays, pending "
            "writes are retried from the outbox: check the database and `swapserve status`")

    @contextmanager
    def _read(self) -> Iterator[Session]:
        # An in-memory database has one shared connection: serialise readers too.
        try:
            with (self._locked() if self._memory else nullcontext()), self._reader() as s, s.begin():
                yield s
        except IntegrityError:
            raise
        except (DBAPIError, PoolTimeout) as exc:  # down, locked, timed out: one error callers handle
            raise self._unavailable(exc) from exc

    @contextmanager
    def _write(self) -> Iterator[Session]:
        try:
            with self._locked(), self._writer() as s, s.begin():
                yield s
        except IntegrityError:
            raise
        except (DBAPIError, PoolTimeout) as exc:
            raise self._unavailable(exc) from exc

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


    # -- audit and event rows (written inside the caller's transaction) ----------------

    def _audit(
        self, s: Session, *, actor: str, action: str, model: str | None, version: int | None,
        before: Any, after: Any, reason: str,
    ) -> AuditEntry:
        if not actor or not action:
            raise errors.InvalidInput("an audit entry needs an actor (who) and an action (what)")
        # Serialise chain writers (SQLite already has one writer at a time), then link to the newest row.
        self._pg_lock(s, _AUDIT_LOCK)
        prev = s.scalar(sa.select(AuditRow.hash).order_by(AuditRow.id.desc()).limit(1))
        row = AuditRow(at=self._now(), actor=actor, action=action, model=model, version=version,
                       before=before, after=after, reason=reason or "", prev_hash=prev or chain.GENESIS)
        s.add(row)
        s.flush()  # assigns the id, which the hash covers
        row.hash = chain.link(row.prev_hash or chain.GENESIS, chain.entry_fields(
            id=row.id, at=row.at, actor=row.actor, action=row.action, model=row.model, version=row.version,
            before=row.before, after=row.after, reason=row.reason))
        s.flush()
        return audit_record(row)

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
        return event_record(row)


# -- helpers ------------------------------------------------------------------------
