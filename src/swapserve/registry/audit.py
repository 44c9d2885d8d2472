"""Registry tables of the audit log and events: who did what, and what happened, in order."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

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
