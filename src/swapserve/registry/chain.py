"""The audit log's hash chain: how an entry's hash is computed and how a whole log is verified.

Every ``audit_log`` row stores ``prev_hash`` (the ``hash`` of the row before it in id order,
``GENESIS`` for the first) and ``hash`` = SHA-256 hex of ``prev_hash`` followed by the
canonical JSON of the row's own fields (``entry_fields``: id, at, actor, action, model,
version, before, after, reason). Changing any field of a row, deleting a row or inserting
one therefore breaks the chain at that row, and ``verify`` names it.

What it does not do: the hash carries no secret, so someone who can write the database can
rewrite a row *and every row after it* consistently, or drop rows from the end. Keep the
head hash that ``swapserve audit verify`` prints somewhere the database's writers cannot
reach, and pass it back with ``--expect-head``: a rewritten or truncated log no longer holds it.

The canonical form is part of the stored format: changing ``canonical`` or ``entry_fields``
invalidates every existing chain, so it must never change without a migration that re-chains.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

#: ``prev_hash`` of the first entry of a chain.
GENESIS = "0" * 64


def _json_value(value: Any) -> Any:
    # What the database gives back: JSON round trip (tuples -> lists, int keys -> strings).
    return json.loads(json.dumps(value, default=str))


def _at(value: datetime) -> str:
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_fields(*, id: int, at: datetime, actor: str, action: str, model: str | None, version: int | None,
                 before: Any, after: Any, reason: str) -> dict[str, Any]:
    """The fields a row's hash covers, in the form they hash in."""
    return {"id": int(id), "at": _at(at), "actor": actor, "action": action, "model": model,
            "version": None if version is None else int(version), "before": _json_value(before),
            "after": _json_value(after), "reason": reason or ""}


def canonical(fields: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same bytes for the same fields on every backend."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def link(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """The hash of an entry: SHA-256 hex of ``prev_hash`` (ASCII) + ``canonical(fields)``."""
    return hashlib.sha256(prev_hash.encode() + canonical(fields)).hexdigest()


@dataclass(frozen=True)
class ChainRow:
    """One audit row as read for verification."""

    fields: dict[str, Any]
    prev_hash: str | None
    hash: str | None

    @property
    def id(self) -> int:
        return int(self.fields["id"])


@dataclass(frozen=True)
class Problem:
    """One place where the chain does not hold. ``kind``: edited | inserted | deleted | unhashed | head."""

    id: int  # the row at which it shows (0: the log as a whole)
    kind: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "message": self.message}


@dataclass
class Verdict:
    """The result of ``verify``: ``ok`` exactly when ``problems`` is empty."""

    rows: int = 0
    head_id: int = 0
    head_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": self.rows, "head_id": self.head_id, "head_hash": self.head_hash,
                "problems": [p.to_dict() for p in self.problems]}


def verify(rows: Iterable[ChainRow], *, expect_head: str | None = None) -> Verdict:
    """Walk ``rows`` in id order and report every break of the chain, first one first.

    - a row whose own hash does not match its fields: ``edited`` (its fields changed);
    - a row without a hash: ``unhashed`` (written around swapserve, e.g. inserted by hand);
    - a row whose ``prev_hash`` is not the hash of the row before it: ``inserted`` when it is
      the hash of an earlier row (the rows between were inserted), else ``deleted`` (rows
      before it are missing);
    - ``expect_head`` (a head hash printed by an earlier verify) no longer in the chain: ``head``
      (the log was truncated or rewritten since).

    After a break the walk continues from the row's stored hash, so one edit is reported once.
    """
    v = Verdict()
    prev_id, prev = 0, GENESIS
    walked: list[int] = [0]  # ids of the chained rows so far (0: the start)
    seen: dict[str, int] = {GENESIS: 0}  # hash -> its index in `walked`
    head_seen = expect_head is None or expect_head == GENESIS
    for row in rows:
        v.rows += 1
        rid = row.id
        if row.hash is None or row.prev_hash is None:
            v.problems.append(Problem(rid, "unhashed", f"audit entry {rid} has no hash: it was written around "
                                                       "swapserve (inserted into the table by hand?)"))
            continue  # the next row still links to `prev`
        if link(row.prev_hash, row.fields) != row.hash:
            v.problems.append(Problem(rid, "edited", f"audit entry {rid} was edited: its fields no longer match "
                                                     "its hash"))
        elif row.prev_hash != prev and row.prev_hash in seen:
            base = seen[row.prev_hash]
            extra = walked[base + 1:]
            where = f"entry {walked[base]}" if walked[base] else "the start of the chain"
            v.problems.append(Problem(extra[0], "inserted", f"audit entr{'y' if len(extra) == 1 else 'ies'} "
                                      f"{', '.join(map(str, extra))} {'was' if len(extra) == 1 else 'were'} "
                                      f"inserted: entry {rid} links to {where}"))
        elif row.prev_hash != prev:
            after = f"between entry {prev_id} and entry {rid}" if prev_id else f"before entry {rid}"
            v.problems.append(Problem(rid, "deleted", f"audit entries were deleted {after} (entry {rid} links to "
                                      f"a missing entry){f', or entry {prev_id} was rewritten' if prev_id else ''}"))
        prev_id, prev = rid, row.hash
        seen[row.hash] = len(walked)
        walked.append(rid)
        head_seen = head_seen or row.hash == expect_head
    v.head_id, v.head_hash = prev_id, prev
    if not head_seen:
        v.problems.append(Problem(0, "head", f"the expected head {expect_head} is not in the chain: entries were "
                                             "deleted from its end or the log was rewritten since it was recorded"))
    return v
