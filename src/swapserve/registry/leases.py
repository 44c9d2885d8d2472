"""Registry tables of leases: one replica at a time acts for the fleet (the rollout lease).

A lease is a row with a holder, an expiry and an ``epoch``. ``acquire_lease`` renews it for its
holder, or takes it over once it has expired (or was released), raising the epoch by one; a
holder that stops renewing loses it after ``ttl_s``. Every write that acts under a lease passes
the ``Lease`` it holds as its ``fence``: the write's own transaction locks the lease row and
checks holder, epoch and expiry, so a replica that lost the lease (paused, partitioned, slow)
has its decision refused (``NotLeader``) instead of recorded. Safety rests on that check alone;
clocks only decide how soon an expired lease is taken over (replicas' clocks must agree to well
under ``ttl_s``, which NTP gives).
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from swapserve import errors
from swapserve.registry.engine import RegistryBase
from swapserve.registry.models import LeaseRow
from swapserve.registry.records import Lease

#: The lease of the replica that decides every rollout of the fleet.
ROLLOUT_LEASE = "rollouts"


def _record(row: LeaseRow) -> Lease:
    return Lease(name=row.name, holder=row.holder, epoch=row.epoch, acquired_at=row.acquired_at,
                 expires_at=row.expires_at)


class LeaseTables(RegistryBase):
    """Named leases with fencing epochs."""

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> tuple[bool, Lease | None]:
        """Renew ``name`` for ``holder``, or take it when it is free or expired.

        Returns ``(held, lease)``: ``held`` True with the lease now held (its epoch is the fence
        for decisions), or False with the other holder's lease (None if the race to create the
        row was lost; try again later)."""
        if not name or not holder or ttl_s <= 0:
            raise errors.InvalidInput("a lease needs a name, a holder and a positive ttl")
        now = self._now()
        expires = now + timedelta(seconds=ttl_s)
        try:
            with self._write() as s:
                row = s.get(LeaseRow, name, with_for_update=True)
                if row is None:
                    row = LeaseRow(name=name, holder=holder, epoch=1, acquired_at=now, expires_at=expires)
                    s.add(row)
                    s.flush()
                    return True, _record(row)
                if row.holder == holder and row.expires_at > now:
                    row.expires_at = expires
                    return True, _record(row)
                if row.expires_at > now:
                    return False, _record(row)
                row.holder, row.epoch, row.acquired_at, row.expires_at = holder, row.epoch + 1, now, expires
                return True, _record(row)
        except IntegrityError:
            return False, None

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up now (a graceful stop), so another replica takes it without waiting for
        the expiry. Nothing happens unless ``holder`` holds it."""
        with self._write() as s:
            row = s.get(LeaseRow, name, with_for_update=True)
            if row is not None and row.holder == holder:
                row.expires_at = min(row.expires_at, self._now())

    def lease(self, name: str) -> Lease | None:
        """The lease as stored (its holder may have let it expire: compare ``expires_at``)."""
        with self._read() as s:
            row = s.get(LeaseRow, name)
            return _record(row) if row is not None else None

    def _check_fence(self, s: Session, fence: Lease) -> None:
        """Inside a write: refuse (NotLeader) unless ``fence`` is still the live lease. Locks the
        lease row to the end of the transaction, so it cannot change hands before the commit."""
        row = s.get(LeaseRow, fence.name, with_for_update=True)
        if row is None or row.holder != fence.holder or row.epoch != fence.epoch:
            who = f"replica '{row.holder}' (epoch {row.epoch})" if row is not None else "nobody"
            raise errors.NotLeader(f"the {fence.name} lease of replica '{fence.holder}' (epoch {fence.epoch}) has "
                                   f"passed to {who}; the decision was not recorded")
        if row.expires_at <= self._now():
            raise errors.NotLeader(f"the {fence.name} lease of replica '{fence.holder}' expired at "
                                   f"{row.expires_at.isoformat()} before the decision was recorded")
