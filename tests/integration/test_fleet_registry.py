"""The registry's side of the fleet: a deployment's NOTIFY is delivered with its commit (and never
for a write that did not commit), and replicas' reports round-trip (SQLite and PostgreSQL)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest

from swapserve.errors import GenerationConflict
from swapserve.registry import Registry
from swapserve.registry.deployments import DEPLOYMENTS_CHANNEL

from tests.fakes import FakeClock

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0, step=0.001)


@pytest.fixture
def reg(url: str, clock: FakeClock) -> Iterator[Registry]:
    r = Registry(url, clock=clock.utc)
    for v in (1, 2):
        r.register_version("m", v, source_path=f"/repo/m/{v}", sha256=f"{v:02x}" * 32)
    yield r
    r.close()


@pytest.mark.postgres
def test_a_deployment_notifies_at_its_commit_and_a_refused_one_does_not(fresh_postgres_url: str) -> None:
    import psycopg
    import sqlalchemy as sa

    reg = Registry(fresh_postgres_url)
    try:
        for v in (1, 2):
            reg.register_version("m", v, source_path=f"/repo/m/{v}", sha256=f"{v:02x}" * 32)
        conninfo = sa.engine.make_url(fresh_postgres_url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"LISTEN {DEPLOYMENTS_CHANNEL}")
            reg.publish_deployment("m", champion=1, traffic=[(1, 10_000)], action="promote", actor="a")
            reg.publish_deployment("m", champion=2, traffic=[(2, 10_000)], action="promote", actor="a",
                                   expected_generation=1)
            with pytest.raises(GenerationConflict, match="generation 2, not 1"):
                reg.publish_deployment("m", champion=1, traffic=[(1, 10_000)], action="promote", actor="b",
                                       expected_generation=1)
            got = [json.loads(n.payload) for n in conn.notifies(timeout=1.0)]
        assert got == [{"model": "m", "generation": 1}, {"model": "m", "generation": 2}]
    finally:
        reg.close()


def test_replica_reports_round_trip_and_age(reg: Registry, clock: FakeClock) -> None:
    reg.publish_deployment("m", champion=1, traffic=[(1, 10_000)], action="promote", actor="a")
    assert reg.current_generations() == {"m": 1}
    reg.report_replica("r1", address="h1:8001", models={"m": (1, True, "")})
    reg.report_replica("r2", address="h2:8001", models={"m": (0, False, "cannot apply generation 1: OOM")})
    reg.report_replica("r3", address="h3:8001")  # has not reported the model yet
    states = {s.replica_id: s for s in reg.replica_states("m", stale_after_s=10)}
    assert {k: (s.generation, s.converged, s.stale) for k, s in states.items()} == {
        "r1": (1, True, False), "r2": (0, False, False), "r3": (0, False, False)}
    assert "OOM" in states["r2"].reason and "not reported" in states["r3"].reason
    clock.advance(30)
    reg.report_replica("r1", address="h1:8001", models={"m": (1, True, "")})  # r1's heartbeat only
    states = {s.replica_id: s for s in reg.replica_states("m", stale_after_s=10)}
    assert {k: s.stale for k, s in states.items()} == {"r1": False, "r2": True, "r3": True}
    reg.forget_replica("r2")
    assert [s.replica_id for s in reg.replica_states("m")] == ["r1", "r3"]


# -- the rollout lease ---------------------------------------------------------------------------


def test_replicas_racing_for_the_lease_get_exactly_one_holder_and_a_decision_is_fenced(url: str) -> None:
    """Eight replicas (each its own Registry, so its own connections) try to take the free lease at
    once: one holds it. A decision fenced with a stale epoch commits nothing, even when the race
    for the row lock is run against a takeover."""
    import threading

    from swapserve.errors import NotLeader
    from swapserve.registry.leases import ROLLOUT_LEASE

    regs = [Registry(url) for _ in range(8)]
    try:
        barrier = threading.Barrier(len(regs))
        results: dict[int, bool] = {}

        def take(i: int) -> None:
            barrier.wait()
            results[i] = regs[i].acquire_lease(ROLLOUT_LEASE, f"r{i}", 30.0)[0]

        threads = [threading.Thread(target=take, args=(i,)) for i in range(len(regs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        holders = [i for i, held in results.items() if held]
        assert len(results) == len(regs) and len(holders) == 1, results
        lease = regs[0].lease(ROLLOUT_LEASE)
        assert lease is not None and lease.holder == f"r{holders[0]}" and lease.epoch == 1
        for v in (1, 2):
            regs[0].register_version("m", v, source_path=f"/repo/m/{v}", sha256=f"{v:02x}" * 32)
        args = {"champion": 1, "traffic": [(1, 10_000)], "action": "promote", "actor": "leader"}
        dep, _ = regs[holders[0]].record_decision("m", deployment=args, fence=lease)
        assert dep is not None and dep.generation == 1
        # The holder lets go; another takes the lease: the old epoch fences nothing any more.
        regs[holders[0]].release_lease(ROLLOUT_LEASE, lease.holder)
        other = (holders[0] + 1) % len(regs)
        held, newer = regs[other].acquire_lease(ROLLOUT_LEASE, f"r{other}", 30.0)
        assert held and newer is not None and newer.epoch == 2
        with pytest.raises(NotLeader, match=f"passed to replica 'r{other}'"):
            regs[holders[0]].record_decision("m", deployment=dict(args, champion=2, traffic=[(2, 10_000)]),
                                             fence=lease)
        current = regs[0].current_deployment("m")
        assert current is not None and (current.generation, current.champion) == (1, 1)
    finally:
        for r in regs:
            r.close()
