"""The fleet: replicas sharing a registry follow its current deployment, a stale replica catches
up before it acts, a replica that cannot apply keeps serving and says why (two stacks over one
SQLite registry stand for two replicas; the poll is driven by hand, no sockets)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from swapserve.controlplane.fleet import RETRY_FAILED_S, FleetSync
from swapserve.errors import VersionNotReady
from swapserve.rollout.controller import RolloutController
from swapserve.rollout.plan import parse_plan
from tests.unit.stack import Stack, make_stack, run

ALICE = "alice"
SLOW = parse_plan("""
stages:
  - {name: canary, traffic: 10, min_duration: 1h, min_samples: 1000000}
  - {name: full, traffic: 100}
""")


def served_by(stack: Stack, n: int = 300) -> Counter[int]:
    return Counter(stack.manager.route("m", "", {"routing_key": f"k{i}"})[0].version for i in range(n))


def sync_of(stack: Stack, name: str) -> FleetSync:
    sync = FleetSync(stack.control, replica_id=name, address=f"{name}:8001", listen=False, clock=stack.clock)
    stack.control.fleet = sync
    stack.manager.ready_gate = sync.ready
    return sync


async def two_replicas(tmp: Path, versions: tuple[int, ...] = (1, 2)) -> tuple[Stack, Stack]:
    """A serves champion 1 (generation 1); B, over the same registry, restored it."""
    a = make_stack(tmp, versions)
    await a.control.load("m", 1, actor=ALICE)
    await a.control.promote("m", 1, actor=ALICE)
    b = a.restarted()
    await b.manager.restore()
    return a, b


def test_a_change_through_one_replica_is_applied_by_the_other_with_the_same_routing(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b = await two_replicas(tmp_path)
        sa, sb = sync_of(a, "a"), sync_of(b, "b")
        await sa.catch_up()
        await sb.catch_up()
        assert sb.ready() and b.manager.server_ready()
        await a.control.load("m", 2, actor=ALICE)
        await a.control.set_traffic("m", [(1, 7000), (2, 3000)], actor=ALICE)
        assert served_by(b) == Counter({1: 300})  # B has not polled yet
        await sb.catch_up()
        assert b.control.policy("m") == a.control.policy("m")
        routed_a = [a.manager.route("m", "", {"routing_key": f"k{i}"})[0].version for i in range(300)]
        routed_b = [b.manager.route("m", "", {"routing_key": f"k{i}"})[0].version for i in range(300)]
        assert routed_a == routed_b and set(routed_a) == {1, 2}  # the same key, the same version
        view = await a.control.status("m")
        assert view.registry_generation == 2
        assert {(r.replica_id, r.generation, r.converged) for r in view.replicas} == {("a", 2, True), ("b", 2, True)}

    run(scenario())


def test_a_stale_replica_catches_up_before_it_acts_instead_of_refusing(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b = await two_replicas(tmp_path, (1, 2, 3))
        for v in (2, 3):
            await a.control.load("m", v, actor=ALICE)
            await b.control.load("m", v, actor=ALICE)
        await a.control.promote("m", 2, actor=ALICE)  # generation 2; B still routes generation 1
        assert b.control.policy("m").generation == 1  # type: ignore[union-attr]
        view = await b.control.set_traffic("m", [(2, 9000), (3, 1000)], actor=ALICE)
        assert (view.champion, view.generation, view.previous_champions) == (2, 3, (1,))
        # A stale rollout start compares against the fleet's champion, and a started rollout is abortable.
        await b.control.promote("m", 2, actor=ALICE)  # generation 4 from B
        await a.control.promote("m", 3, actor=ALICE)  # generation 5 from A; B is stale again
        rc = RolloutController(b.control, b.slices, b.metrics, clock=b.clock)
        rec = await rc.start("m", 2, SLOW, actor=ALICE, reason="stale replica")
        assert (rec.champion, rec.challenger, rec.state) == (3, 2, "running")
        assert b.registry.current_deployment("m").generation == 6  # type: ignore[union-attr]
        await rc.action("m", "abort", actor=ALICE, reason="test")
        assert b.registry.active_rollout("m") is None

    run(scenario())


def test_a_replica_that_cannot_apply_keeps_serving_reports_why_and_is_not_ready(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b = await two_replicas(tmp_path)
        sb = sync_of(b, "b")
        await sb.catch_up()
        b.loader.behave(2, load_error=VersionNotReady("out of device memory"))
        await a.control.load("m", 2, actor=ALICE)
        await a.control.promote("m", 2, actor=ALICE)
        await sb.catch_up()
        assert served_by(b) == Counter({1: 300})  # the last generation it could apply
        assert not sb.ready() and not b.manager.server_ready()
        c = sb.convergence("m")
        assert c is not None and (c.applied, c.target, c.converged) == (1, 2, False)
        assert "out of device memory" in c.reason and "generation 2" in c.reason
        view = await a.control.status("m")
        (rb,) = [r for r in view.replicas if r.replica_id == "b"]
        assert not rb.converged and "out of device memory" in rb.reason
        # Fixed: the next retry converges.
        b.loader.behave(2)
        await sb.catch_up()
        assert not sb.ready()  # retried only after the back-off
        b.clock.advance(RETRY_FAILED_S + 1)
        await sb.catch_up()
        assert sb.ready() and served_by(b) == Counter({2: 300})

    run(scenario())


def test_not_ready_before_the_first_pass_and_a_replica_that_was_down_catches_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b = await two_replicas(tmp_path)
        sb = sync_of(b, "b")
        assert not b.manager.server_ready()  # no pass against the registry yet
        await a.control.load("m", 2, actor=ALICE)
        await a.control.promote("m", 2, actor=ALICE)  # while B was "down"
        await sb.catch_up()
        assert b.manager.server_ready() and served_by(b) == Counter({2: 300})

    run(scenario())


def test_a_newer_generation_is_tried_at_once_after_a_failed_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b = await two_replicas(tmp_path)
        sb = sync_of(b, "b")
        b.loader.behave(2, load_error=VersionNotReady("out of device memory"))
        await a.control.load("m", 2, actor=ALICE)
        await a.control.promote("m", 2, actor=ALICE)
        await sb.catch_up()
        assert not sb.ready()
        await a.control.rollback("m", actor=ALICE)  # generation 3 routes to version 1 again
        await sb.catch_up()  # no back-off for a generation that has not failed
        assert sb.ready() and served_by(b) == Counter({1: 300})
        assert b.control.policy("m").generation == 3  # type: ignore[union-attr]

    run(scenario())
