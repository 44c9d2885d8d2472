"""Writes the outbox's decisions to the registry once it answers: in order, with backoff.

A fail-safe decision (rollback, abort, failed gate) has published routing and journaled what the
registry must still record; this task records it. Guarantees:

* entries are written in the order they were journaled, one registry transaction each
  (``Registry.record_decision`` with ``replay=True``: writing an entry twice records it once),
  and marked done only after that transaction committed;
* while the registry is unavailable it retries with exponential backoff (``RETRY_MIN_S`` doubling
  to ``RETRY_MAX_S``) and never raises; ``last_error`` and ``pending`` say what waits and why;
* an entry the registry refuses for good (not RegistryUnavailable: e.g. a version that was
  deleted) is logged with its payload and dropped, so it cannot block the entries after it;
* ``flush(model)`` lets a normal (registry-first) change of that model wait for the model's
  pending decisions, so a later change is never overwritten by an older decision.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from swapserve.crashpoints import crash_point
from swapserve.errors import RegistryUnavailable, SwapserveError
from swapserve.registry import Registry
from swapserve.registry.outbox import Outbox, OutboxEntry
from swapserve.registry.records import Deployment, RolloutRecord

log = logging.getLogger(__name__)

#: First retry after a failed registry write (seconds); doubles up to RETRY_MAX_S.
RETRY_MIN_S = 0.25
RETRY_MAX_S = 5.0

Recorded = Callable[[OutboxEntry, "Deployment | None", "RolloutRecord | None"], None]


def rollout_from_dict(d: dict[str, Any]) -> RolloutRecord:
    """The inverse of ``RolloutRecord.to_dict`` (as journaled in the outbox)."""
    def when(v: Any) -> datetime | None:
        return datetime.fromisoformat(v) if isinstance(v, str) and v else None

    return RolloutRecord(model=d["model"], challenger=int(d["challenger"]), champion=int(d["champion"]),
                         plan=dict(d.get("plan") or {}), strategy=d.get("strategy", "canary"),
                         stage_index=int(d.get("stage_index", 0)), state=d["state"],
                         evidence=dict(d.get("evidence") or {}), id=d.get("id"),
                         started_at=when(d.get("started_at")), updated_at=when(d.get("updated_at")))


class Reconciler:
    def __init__(self, registry: Registry, outbox: Outbox, *, on_recorded: Recorded | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.outbox = outbox
        self.on_recorded = on_recorded
        self.clock = clock
        self.last_error = ""
        self.retry_s = RETRY_MIN_S
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None

    def pending(self, model: str | None = None) -> list[OutboxEntry]:
        return self.outbox.pending("decision", model)

    def kick(self) -> None:
        """Try now (a new entry was journaled)."""
        if self._wake is not None:
            self._wake.set()

    def _write(self, e: OutboxEntry) -> tuple[Deployment | None, RolloutRecord | None]:
        p = e.payload
        rollout = rollout_from_dict(p["rollout"]) if p.get("rollout") else None
        result = self.registry.record_decision(
            e.model or "", deployment=p.get("deployment"), rollout=rollout, production=p.get("production"),
            audit=p.get("audit") or (), event=p.get("event"), replay=True)
        crash_point("rollback.after_commit")
        return result

    async def drain(self, model: str | None = None) -> bool:
        """Write pending decisions (of ``model``, or all) in order; True when none is left.
        Stops at the first RegistryUnavailable (order matters); never raises."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            for e in self.pending(model):
                try:
                    dep, rec = await self.registry.call(self._write, e)
                except RegistryUnavailable as exc:
                    e.attempts += 1
                    e.last_error = self.last_error = exc.message
                    return False
                except SwapserveError as exc:
                    log.error("outbox: the registry refuses decision %s of model '%s' for good (%s); dropped: %s",
                              e.id, e.model, exc.message, e.payload)
                    self.outbox.done(e.id)
                    continue
                self.outbox.done(e.id)
                self.last_error = ""
                log.info("outbox: decision %s of model '%s' recorded in the registry%s", e.id, e.model,
                         f" after {e.attempts} failed attempt(s)" if e.attempts else "")
                if self.on_recorded is not None:
                    self.on_recorded(e, dep, rec)
            return not self.pending(model)

    async def flush(self, model: str) -> None:
        """Record ``model``'s pending decisions now; RegistryUnavailable when some remain."""
        if self.pending(model) and not await self.drain(model):
            raise RegistryUnavailable(
                f"model '{model}': {len(self.pending(model))} decision(s) (a rollback) are not yet recorded in "
                f"the registry ({self.last_error}); routing already follows them. Retry when the registry is back")

    async def run(self) -> None:
        """Forever: wait for an entry (or the backoff), write what is pending. Cancel to stop."""
        self._wake = asyncio.Event()
        while True:
            timeout = self.retry_s if self.pending() else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if not self.pending():
                continue
            try:
                ok = await self.drain()
            except Exception:  # noqa: BLE001 - the reconciler must outlive any one failure
                log.exception("outbox: reconcile failed")
                ok = False
            self.retry_s = RETRY_MIN_S if ok else min(RETRY_MAX_S, self.retry_s * 2)
            if not ok:
                log.warning("outbox: %d registry write(s) pending, retrying in %.2fs: %s", len(self.pending()),
                            self.retry_s, self.last_error)


__all__ = ["RETRY_MAX_S", "RETRY_MIN_S", "Reconciler", "rollout_from_dict"]
