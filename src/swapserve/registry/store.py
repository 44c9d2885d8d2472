"""The registry API: the source of truth for versions, what is live, rollouts and the audit log.

Guarantees
----------
* Opening a ``Registry`` runs Alembic ``upgrade head``; the schema never comes from
  anywhere else. Opening an up-to-date database changes nothing.
* Every method is one database transaction: it either happens completely or not at all.
  A deployment and its audit row are written together or not at all.
* A decision (``record_decision``: deployment + rollout state + stage + audit + event) is
  one transaction.
* Safe to call from several threads of one process (each call uses its own session);
  call it from asyncio through ``Registry.call`` (its own executor, never the model
  loaders' pool). Several processes (CLI + server,
  or several replicas on PostgreSQL) may share one database: writers serialise on the
  database (SQLite ``BEGIN IMMEDIATE``; PostgreSQL advisory locks), generations are
  additionally protected by a unique constraint.
* Event ids increase monotonically in commit order, so ``events(after_id=last)`` polling
  never skips an event.
* Returned objects are frozen records from ``swapserve.registry.records``; nothing returned
  is attached to a session. Times are timezone-aware UTC.

Every call is bounded by ``REGISTRY_TIMEOUT_S`` (SQLite busy timeout; PostgreSQL connect,
statement and lock timeouts); a database that is down, locked or too slow raises
``RegistryUnavailable`` (UNAVAILABLE), never a driver exception.

Errors: ``InvalidInput`` for malformed arguments, ``ModelNotFound`` for an unknown model,
version or rollout, ``AlreadyExists`` for a re-registration with different files,
``FailedPrecondition`` for a stale ``expected_generation`` or a second active rollout.

The registry records deployments; it does not compute them. A new champion, split or
history comes from a ``RoutingPolicy`` transition, published through ``ControlPlane.publish``.
"""
from __future__ import annotations

from swapserve.registry.audit import AuditTables
from swapserve.registry.decisions import DecisionTables
from swapserve.registry.deployments import DeploymentTables
from swapserve.registry.engine import MIGRATIONS_DIR, RegistryBase
from swapserve.registry.leases import LeaseTables
from swapserve.registry.replicas import ReplicaTables
from swapserve.registry.rollouts import RolloutTables
from swapserve.registry.tokens import TokenTables
from swapserve.registry.versions import VersionTables

__all__ = ["MIGRATIONS_DIR", "Registry", "RegistryBase"]


class Registry(DecisionTables, VersionTables, DeploymentTables, RolloutTables, LeaseTables, AuditTables, ReplicaTables,
               TokenTables):
    """Versions, metrics by slice, deployments, rollouts, audit log and events.

    ``url`` is any SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``);
    without one, the SQLite file ``registry.db`` under ``home`` (default
    ``$SWAPSERVE_HOME``, else ``~/.swapserve``) is used and created if needed.
    ``clock`` returns the current time (timezone-aware); tests pass a fake one.

    One façade over the table groups, each in its own module: ``versions``,
    ``deployments``, ``rollouts``, ``audit``, ``replicas`` (the fleet), ``leases`` (the rollout lease), ``tokens`` (API tokens), ``decisions`` (writes that go together) (plumbing in ``engine``, row helpers in ``rows``).
    """
