"""The outbox: a local, fsynced journal of registry writes that must not wait on the registry.

A fail-safe decision (a rollback, an abort, a failed gate) publishes routing at once; what it must
still record in the registry (deployment, rollout state, audit, event) and the webhook deliveries
it owes are appended here first, then written by a background reconciler when the registry
answers. The file lives next to the registry (under the server's state directory), one per
registry URL.

Guarantees
----------
* ``append`` returns only after its line is on disk (``fsync``): a decision journaled and then
  published survives a SIGKILL at any later point.
* One ``append`` is one JSON line; a line torn by a crash is ignored on open, so a group of
  entries appended together is there completely or not at all.
* Entries come back from ``pending`` in the order they were appended, until ``done`` (also
  fsynced); a restarted server sees exactly the entries that were never marked done.
* The file is rewritten (atomically, ``os.replace``) to nothing when no entry is pending, so it
  never grows without bound.
* Not thread-safe by itself: the server calls it from its event loop only. ``path=None`` keeps
  entries in memory (unit tests; nothing survives the process).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OutboxEntry:
    """One owed write. ``kind``: ``decision`` (registry rows) or ``webhook`` (a delivery).
    ``attempts``/``last_error``/``next_at`` are kept in memory only: after a restart every
    entry is retried at once."""

    id: str
    kind: str
    model: str | None
    payload: dict[str, Any]
    created_at: float
    attempts: int = 0
    last_error: str = ""
    next_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "model": self.model, "payload": self.payload,
                "created_at": self.created_at}


def outbox_path(home: Path, registry_url: str) -> Path:
    """``<home>/outbox-<digest of the registry URL>.jsonl``: a server pointed at another registry
    never replays this one's writes into it."""
    digest = hashlib.sha256(registry_url.encode()).hexdigest()[:12]
    return Path(home).expanduser() / f"outbox-{digest}.jsonl"


class Outbox:
    def __init__(self, path: Path | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._pending: dict[str, OutboxEntry] = {}
        self._listeners: list[Callable[[], None]] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._replay(path)

    # -- reading back ---------------------------------------------------------------------

    def _replay(self, path: Path) -> None:
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    # Only the last line can be torn (a crash mid-append); it was never acknowledged.
                    log.warning("outbox %s: line %d is incomplete and ignored", path, n)
                    continue
                if rec.get("op") == "add":
                    for e in rec.get("entries", []):
                        self._pending[e["id"]] = OutboxEntry(e["id"], e["kind"], e.get("model"), e["payload"],
                                                             float(e.get("created_at", 0.0)))
                elif rec.get("op") == "done":
                    self._pending.pop(rec.get("id", ""), None)
        if self._pending:
            log.warning("outbox %s: %d registry write(s) or webhook(s) pending from before the restart",
                        path, len(self._pending))

    def pending(self, kind: str | None = None, model: str | None = None) -> list[OutboxEntry]:
        """Entries not yet done, oldest first (optionally of one kind and model)."""
        return [e for e in self._pending.values()
                if (kind is None or e.kind == kind) and (model is None or e.model == model)]

    def get(self, entry_id: str) -> OutboxEntry | None:
        return self._pending.get(entry_id)

    def subscribe(self, fn: Callable[[], None]) -> None:
        """``fn()`` after every append and done (metrics, wake-ups)."""
        self._listeners.append(fn)

    # -- writing --------------------------------------------------------------------------

    def _write(self, rec: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, items: Iterable[tuple[str, str | None, Mapping[str, Any]]]) -> list[OutboxEntry]:
        """Journal ``(kind, model, payload)`` items as one line, durable when this returns."""
        now = self.clock()
        entries = [OutboxEntry(uuid.uuid4().hex, kind, model, json.loads(json.dumps(payload, default=str)), now)
                   for kind, model, payload in items]
        self._write({"op": "add", "entries": [e.to_json() for e in entries]})
        for e in entries:
            self._pending[e.id] = e
        self._notify()
        return entries

    def done(self, entry_id: str) -> None:
        """Mark an entry written (or given up); durable when this returns."""
        if self._pending.pop(entry_id, None) is None:
            return
        if self._pending:
            self._write({"op": "done", "id": entry_id})
        else:
            self._truncate()
        self._notify()

    def _truncate(self) -> None:
        if self.path is None or not self.path.exists():
            return
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _notify(self) -> None:
        for fn in list(self._listeners):
            fn()


__all__ = ["Outbox", "OutboxEntry", "outbox_path"]
