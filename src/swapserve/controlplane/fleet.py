"""The fleet acts as one: this replica follows the registry's current deployment of every model.

Desired state is written once (a control action on any replica writes a deployment with a new
generation, and on PostgreSQL a NOTIFY on :data:`DEPLOYMENTS_CHANNEL` in the same transaction) and
applied everywhere by this loop. Guarantees:

* **Off the request path.** The listener is its own thread with its own connection; the
  reconcile loop is an asyncio task whose registry reads run on the registry's executor and
  whose loads run on the model loaders' threads. The hot path reads only the routing snapshot.
* **Learns of every change.** On PostgreSQL a NOTIFY wakes the loop at once; a poll every
  ``poll_s`` (the only mechanism on SQLite) and a full pass after every (re)connection of the
  listener cover notifications that were missed.
* **Applies like a restart does** (``ControlPlane.catch_up``: preload and warm every version the
  deployment routes to, then publish the whole snapshot), under the model's lock, so a
  control action on this replica never interleaves with an apply.
* **Never applies half.** A deployment that cannot be applied here (memory budget, a failed
  load) publishes nothing: the replica keeps serving the last generation it applied, reports
  why, and is not ready (ServerReady false) until it has applied the current one; it retries
  every ``RETRY_FAILED_S`` and at once when a newer generation arrives.
* **Ready means caught up.** :meth:`ready` is false until a first full pass against the
  registry has succeeded (a replica that was down catches up before it reports ready).
  While the registry is unavailable the replica keeps serving what it applied and stays
  ready: the registry being down is not a reason to drop traffic.
* **Reports itself.** Its id, address, heartbeat and per-model applied generation are written
  to the registry's ``replicas`` tables (at most every ``HEARTBEAT_S``, and after a change), so
  ``swapserve status`` on any replica shows the whole fleet.

A rollout is still driven by the replica that started it; the deployments it writes reach the
others through this loop like any other change (the rollout lease is a separate concern).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from swapserve.errors import ModelNotFound, RegistryUnavailable, SwapserveError
from swapserve.registry.deployments import DEPLOYMENTS_CHANNEL

if TYPE_CHECKING:
    from swapserve.controlplane import ControlPlane

log = logging.getLogger(__name__)

#: How often the registry's generations are polled (seconds): the fallback to LISTEN/NOTIFY on
#: PostgreSQL, the only mechanism on SQLite (``--fleet-poll-s``).
DEFAULT_POLL_S = 1.0
#: Longest gap between two reports of this replica to the registry (seconds).
HEARTBEAT_S = 2.0
#: A replica whose heartbeat is older than this is shown as stale (it may be down).
STALE_AFTER_S = 4 * HEARTBEAT_S
#: How long a deployment that failed to apply here waits before the next attempt (seconds).
RETRY_FAILED_S = 10.0
#: Back-off of the listener's reconnection (seconds).
LISTEN_RETRY_S = 1.0


def default_replica_id() -> str:
    """``$POD_NAME`` (Kubernetes' downward API) when set, else ``hostname-pid``."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Convergence:
    """Where one model stands on this replica."""

    #: The generation of the deployment this replica serves (0: none recorded).
    applied: int = 0
    #: The registry's current generation, as last read.
    target: int = 0
    #: Why ``applied`` is not ``target`` ("" when converged).
    reason: str = ""
    #: The apply of ``target`` failed here (memory budget, load failure): not ready.
    failed: bool = False
    #: When it last failed (monotonic), for the retry back-off.
    failed_at: float = 0.0
    #: The generation that failed (a newer one is tried at once).
    failed_target: int = 0

    @property
    def converged(self) -> bool:
        return self.applied >= self.target and not self.reason


class DeploymentListener:
    """``LISTEN swapserve_deployments`` on its own psycopg connection, in its own thread.

    Calls ``on_notify()`` for every notification and ``on_connected()`` after every (re)connection
    (notifications sent while it was disconnected are lost: the caller makes a full pass). Both are
    called on the listener thread; they must only hand off (``loop.call_soon_threadsafe``).
    Reconnects every ``LISTEN_RETRY_S`` while the database is down; never raises.
    """

    def __init__(self, url: str, on_notify: Callable[[], None], on_connected: Callable[[], None]) -> None:
        parsed = sa.engine.make_url(url)
        # libpq's URI form; the query (sslmode, options, ...) is libpq's too and stays.
        self._conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        #: True while LISTEN is active.
        self.connected = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="swapserve-fleet-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3.0)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=2) as conn:
                    conn.execute(f"LISTEN {DEPLOYMENTS_CHANNEL}")
                    self.connected = True
                    log.info("fleet: listening for deployments on channel %s", DEPLOYMENTS_CHANNEL)
                    self._on_connected()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            log.debug("fleet: notified %s", note.payload)
                            self._on_notify()
            except psycopg.Error as exc:
                if self.connected:
                    log.warning("fleet: lost the notification connection (%s); polling every few seconds "
                                "until it is back", str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            except Exception:  # noqa: BLE001 - the listener must outlive any one failure
                log.exception("fleet: listener failed")
            self.connected = False
            self._stop.wait(LISTEN_RETRY_S)


class FleetSync:
    """Keeps this replica on the registry's current generation of every live model (see module doc)."""

    def __init__(self, control: ControlPlane, *, replica_id: str, address: str, poll_s: float = DEFAULT_POLL_S,
                 listen: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.control = control
        self.registry = control.registry
        self.replica_id = replica_id
        self.address = address
        self.poll_s = poll_s
        self.clock = clock
        if listen is None:
            listen = sa.engine.make_url(self.registry.url).get_backend_name() == "postgresql"
        self._listen = listen
        self.listener: DeploymentListener | None = None
        self.models: dict[str, Convergence] = {}
        #: Why the last pass could not read the registry ("" when it could).
        self.registry_error = ""
        self._caught_up = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._reported: dict[str, tuple[int, bool, str]] = {}
        self._reported_at = float("-inf")
        self._pass_lock: asyncio.Lock | None = None
        #: Called (on the loop) when :meth:`ready` changes: the server refreshes its gRPC health status.
        self.on_ready_change: Callable[[], None] = lambda: None
        self._was_ready = False

    # -- state -----------------------------------------------------------------------------

    def ready(self) -> bool:
        """Caught up once, and no model's current deployment failed to apply here."""
        return self._caught_up and not any(c.failed for c in self.models.values())

    def convergence(self, model: str) -> Convergence | None:
        return self.models.get(model)

    # -- running -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (PostgreSQL), make the first full pass (so :meth:`ready` reflects the registry
        before the server reports ready), then keep following in the background."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        wake = self._wake
        if self._listen:
            self.listener = DeploymentListener(self.registry.url, lambda: loop.call_soon_threadsafe(wake.set),
                                               lambda: loop.call_soon_threadsafe(wake.set))
            self.listener.start()
        await self.catch_up()
        self._task = loop.create_task(self._run())

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def stop(self, *, forget: bool = True) -> None:
        """Stop following; with ``forget`` remove this replica from the registry (best effort)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.listener is not None:
            await asyncio.to_thread(self.listener.stop)
        if forget:
            try:
                await asyncio.wait_for(self.registry.call(self.registry.forget_replica, self.replica_id), 2.0)
            except (SwapserveError, asyncio.TimeoutError, RuntimeError):
                pass

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.catch_up()
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("fleet: reconcile pass failed")

    async def catch_up(self) -> bool:
        """One pass: read every model's current generation, apply what is newer than what this
        replica serves, report. True when the registry answered (whether or not all applied)."""
        if self._pass_lock is None:
            self._pass_lock = asyncio.Lock()
        async with self._pass_lock:
            try:
                generations = await self.registry.call(self.registry.current_generations)
            except RegistryUnavailable as exc:
                if not self.registry_error:
                    log.warning("fleet: %s; serving the generations applied so far", exc.message)
                self.registry_error = exc.message
                return False
            if self.registry_error:
                log.info("fleet: the registry answers again; reconciling")
            self.registry_error = ""
            names = set(self.control.manager.repository.names())
            for model, generation in sorted(generations.items()):
                await self._converge(model, generation, model in names)
            self._caught_up = True
            if self.ready() != self._was_ready:
                self._was_ready = self.ready()
                self.on_ready_change()
            await self._report()
            return True

    async def _converge(self, model: str, target: int, in_repository: bool) -> None:
        c = self.models.setdefault(model, Convergence())
        c.target = target
        if not in_repository:
            c.reason = f"model '{model}' is not in this replica's model repository; add it (same files) to serve it"
            return
        m = self.control.manager.models.get(model)
        applied = m.policy.generation if m is not None and m.policy is not None and m.policy.pinned else 0
        if applied >= target:
            c.applied, c.reason, c.failed = applied, "", False
            return
        if (c.failed and c.applied == applied and c.failed_target == target
                and self.clock() - c.failed_at < RETRY_FAILED_S):
            return  # tried and failed recently; the next retry or a newer generation tries again
        try:
            await self.control.catch_up(model)
        except ModelNotFound as exc:
            c.reason, c.failed = exc.message, False
            return
        except RegistryUnavailable as exc:
            c.reason, c.failed = f"the registry is unavailable ({exc.message})", False
            return
        except SwapserveError as exc:
            m = self.control.manager.models.get(model)
            c.applied = m.policy.generation if m is not None and m.policy is not None and m.policy.pinned else 0
            c.failed, c.failed_at, c.failed_target = True, self.clock(), target
            c.reason = (f"cannot apply generation {target}: {exc.message}; serving generation {c.applied} "
                        f"meanwhile, retried every {RETRY_FAILED_S:g}s (free device memory or fix the version, "
                        "then it converges)")
            log.error("fleet: model '%s': %s", model, c.reason)
            return
        m = self.control.manager.models.get(model)
        c.applied = m.policy.generation if m is not None and m.policy is not None and m.policy.pinned else 0
        c.failed = False
        if c.applied >= target:
            c.reason = ""
            log.info("fleet: model '%s' applied generation %d", model, c.applied)
        elif self.control.outbox.pending("decision", model):
            c.reason = "a decision taken here (a rollback) is not yet recorded in the registry"
        else:
            c.reason = f"generation {target} is not yet applied"

    async def _report(self) -> None:
        report = {name: (c.applied, c.converged, c.reason) for name, c in self.models.items()}
        now = self.clock()
        if report == self._reported and now - self._reported_at < HEARTBEAT_S:
            return
        try:
            await self.registry.call(lambda: self.registry.report_replica(
                self.replica_id, address=self.address, models=report))
        except RegistryUnavailable as exc:
            log.debug("fleet: report not written: %s", exc.message)
            return
        self._reported, self._reported_at = report, now


__all__ = ["DEFAULT_POLL_S", "DeploymentListener", "FleetSync", "HEARTBEAT_S", "STALE_AFTER_S",
           "default_replica_id"]
