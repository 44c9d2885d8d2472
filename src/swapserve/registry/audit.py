"""Registry tables of the audit log and events: who did what, and what happened, in order."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from swapserve import errors
from swapserve.registry import chain
from swapserve.registry.engine import RegistryBase
from swapserve.registry.models import AuditRow, EventRow
from swapserve.registry.records import AuditEntry, Event
from swapserve.registry.rows import audit_record, event_record


class AuditTables(RegistryBase):
    """Registry tables of the audit log and events: who did what, and what happened, in order."""

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
            return [audit_record(r) for r in s.scalars(q.order_by(AuditRow.id.desc()).limit(limit))]

    def verify_audit(self, *, expect_head: str | None = None) -> chain.Verdict:
        """Walk the whole audit chain (``swapserve.registry.chain.verify``); reads only."""
        with self._read() as s:
            return chain.verify(_chain_rows(s), expect_head=expect_head)

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
            return [event_record(r) for r in s.scalars(q.order_by(EventRow.id).limit(limit))]

    def last_event_id(self) -> int:
        """The id of the newest event (0 when there is none): follow from "now"."""
        with self._read() as s:
            return int(s.scalar(sa.select(sa.func.max(EventRow.id))) or 0)


def _chain_rows(s: Session) -> Iterator[chain.ChainRow]:
    for r in s.scalars(sa.select(AuditRow).order_by(AuditRow.id).execution_options(yield_per=1000)):
        yield chain.ChainRow(chain.entry_fields(id=r.id, at=r.at, actor=r.actor, action=r.action, model=r.model,
                                                version=r.version, before=r.before, after=r.after, reason=r.reason),
                             r.prev_hash, r.hash)


def verify_registry(url: str, *, expect_head: str | None = None) -> chain.Verdict:
    """Verify the audit chain of the registry at ``url`` without a server and without migrating it
    (unlike ``Registry(url)``): a database at a revision before the chain is refused with the fix.

    Raises RegistryUnavailable when the database cannot be read, FailedPrecondition when it has
    no audit chain yet.
    """
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    where = sa.engine.make_url(url).render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            if not insp.has_table("audit_log"):
                raise errors.FailedPrecondition(f"{where} holds no swapserve registry (no audit_log table): "
                                                "check --registry")
            if "hash" not in {c["name"] for c in insp.get_columns("audit_log")}:
                raise errors.FailedPrecondition(
                    f"the registry {where} predates the audit chain: start this version's `swapserve serve "
                    f"--registry ...` once (its migration chains the existing entries), then verify again")
        with Session(engine) as s, s.begin():
            return chain.verify(_chain_rows(s), expect_head=expect_head)
    except DBAPIError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise errors.RegistryUnavailable(f"cannot read the registry {where}: {detail}") from exc
    finally:
        engine.dispose()
