"""Rollouts decided once for a fleet: the lease and its fencing epoch, evidence summed over the
replicas' flushed rows, a new leader continuing the stage with the same evidence, operators'
actions through a follower. Two stacks over one SQLite registry and one fake clock stand for two
replicas (each with its own counters); the controllers' ticks are driven by hand."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from swapserve.errors import NotLeader
from swapserve.registry import Registry
from swapserve.registry.leases import ROLLOUT_LEASE
from swapserve.rollout.controller import RolloutController
from swapserve.rollout.plan import parse_plan
from tests.fakes import FakeClock
from tests.unit.stack import Stack, make_stack, run
from tests.unit.test_rollout_controller import feed

ALICE = "alice"
TTL = 4.0

#: Holds at the canary until 300 challenger labels (fleet-wide) and 10 s have passed.
CANARY = parse_plan("""
stages:
  - {name: canary, traffic: 20, min_duration: 10s, min_samples: 300}
  - {name: full, traffic: 100, min_duration: 10s}
watch: 30s
""")


# -- the lease itself ----------------------------------------------------------------------------


def test_a_lease_is_renewed_by_its_holder_refused_to_others_and_taken_over_only_once_expired(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    reg = Registry(f"sqlite:///{tmp_path}/r.db", clock=clock.utc)
    held, a1 = reg.acquire_lease(ROLLOUT_LEASE, "a", TTL)
    assert held and a1 is not None and (a1.holder, a1.epoch) == ("a", 1)
    held, seen = reg.acquire_lease(ROLLOUT_LEASE, "b", TTL)
    assert not held and seen is not None and seen.holder == "a"
    clock.advance(3)
    held, a2 = reg.acquire_lease(ROLLOUT_LEASE, "a", TTL)  # renewed: same epoch, later expiry
    assert held and a2 is not None and a2.epoch == 1 and a2.expires_at == a1.expires_at + timedelta(seconds=3)
    clock.advance(3)
    assert not reg.acquire_lease(ROLLOUT_LEASE, "b", TTL)[0]  # 3 s after the renewal: still a's
    clock.advance(1.5)
    held, b1 = reg.acquire_lease(ROLLOUT_LEASE, "b", TTL)  # expired: b takes it, the epoch moves on
    assert held and b1 is not None and (b1.holder, b1.epoch) == ("b", 2)
    reg.release_lease(ROLLOUT_LEASE, "a")  # not a's any more: nothing happens
    assert reg.lease(ROLLOUT_LEASE) == b1
    reg.release_lease(ROLLOUT_LEASE, "b")  # a graceful stop: the next replica need not wait
    held, a3 = reg.acquire_lease(ROLLOUT_LEASE, "a", TTL)
    assert held and a3 is not None and a3.epoch == 3


def test_a_decision_under_a_lost_or_expired_lease_is_refused_and_records_nothing(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)

    async def scenario() -> None:
        await stack.control.load("m", 1, actor=ALICE)
        await stack.control.promote("m", 1, actor=ALICE)
        rc = RolloutController(stack.control, stack.slices, stack.metrics, clock=stack.clock, replica_id="a")
        r = await rc.start("m", 2, CANARY, actor=ALICE, reason="test")
        reg = stack.registry
        _, a = reg.acquire_lease(ROLLOUT_LEASE, "a", TTL)
        assert a is not None
        before = (reg.current_deployment("m"), reg.get_rollout(r.id), len(reg.audit_log("m")))  # type: ignore[arg-type]
        stack.clock.advance(TTL + 1)
        expired = r.__class__(**{**r.__dict__, "state": "paused"})
        with pytest.raises(NotLeader, match="expired"):
            reg.record_decision("m", rollout=expired, fence=a)
        reg.acquire_lease(ROLLOUT_LEASE, "b", TTL)  # b takes the expired lease
        with pytest.raises(NotLeader, match="passed to replica 'b'"):
            reg.save_rollout(expired, fence=a)
        deployment = {"champion": 1, "traffic": [(1, 10_000)], "action": "rollout", "actor": "rollout-controller",
                      "reason": "stale leader"}
        with pytest.raises(NotLeader):
            reg.record_decision("m", deployment=deployment, rollout=expired, fence=a)
        assert (reg.current_deployment("m"), reg.get_rollout(r.id), len(reg.audit_log("m"))) == before  # type: ignore[arg-type]

    run(scenario())


# -- two replicas ------------------------------------------------------------------------------


async def fleet(tmp: Path) -> tuple[Stack, Stack, RolloutController, RolloutController]:
    """Replica a (which starts the rollout and so takes the free lease) and replica b, each with its
    own counters, over one registry; b follows the rollout."""
    a = make_stack(tmp)
    await a.control.load("m", 1, actor=ALICE)
    await a.control.promote("m", 1, actor=ALICE)
    b = a.restarted()
    await b.manager.restore()
    await b.control.load("m", 2, actor=ALICE)
    ra = RolloutController(a.control, a.slices, a.metrics, clock=a.clock, replica_id="a", lease_ttl_s=TTL)
    rb = RolloutController(b.control, b.slices, b.metrics, clock=b.clock, replica_id="b", lease_ttl_s=TTL)
    await ra.start("m", 2, CANARY, actor=ALICE, reason="fleet test")
    await rb.tick()
    return a, b, ra, rb


def test_one_replica_decides_with_every_replicas_evidence_and_the_other_only_follows(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b, ra, rb = await fleet(tmp_path)
        assert ra.leader()["replica"] == "a" and ra.leading and not rb.leading
        assert rb.current("m") is not None and rb.current("m").id == ra.current("m").id  # type: ignore[union-attr]
        # Only b sees the challenger fail (its share of the traffic); a sees a good champion.
        feed(a, 1, 400, accuracy=0.95)
        feed(b, 2, 400, accuracy=0.5)
        await rb.tick()  # a follower never decides, whatever it counted
        assert rb.current("m") is not None and a.registry.active_rollout("m") is not None
        await rb.flush_evidence()
        a.clock.advance(1)  # the leader re-reads the other replicas' rows every SYNC_S
        await ra.tick()
        done = a.registry.rollouts("m", 1)[0]
        assert done.state == "rolled_back"
        assert done.evidence["rollback"]["challenger"] is not None  # the failing arm came from b's row
        assert a.control.policy("m").traffic == ((1, 10_000),)  # type: ignore[union-attr]
        await rb.tick()
        assert rb.current("m") is None and rb.decided("m") is not None and rb.decided("m").state == "rolled_back"  # type: ignore[union-attr]
        decisions = [e for e in a.registry.audit_log("m") if "automatic rollback" in e.reason]
        assert len(decisions) == 1

    run(scenario())


def test_a_new_leader_continues_the_same_stage_with_the_dead_leaders_flushed_evidence(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b, ra, rb = await fleet(tmp_path)
        feed(a, 1, 200, accuracy=0.9)
        feed(a, 2, 200, accuracy=0.9)  # 200 of the 300 labels the canary needs
        await ra.flush_evidence()
        await ra.tick()
        stage = ra.current("m").stage_index  # type: ignore[union-attr]
        # a dies (no more ticks); its lease runs out and b takes over.
        a.clock.advance(TTL + 1)
        await rb.tick()
        assert rb.leading and rb.leader()["epoch"] == 2
        r = rb.current("m")
        assert r is not None and r.stage_index == stage
        _, chall, labelled = rb._evidence(r)  # noqa: SLF001 - the evidence the gates read
        assert labelled == 200 and chall["overall"].labelled == 200  # a's flushed part still counts
        # b's own labels add to it; past min_samples and min_duration the canary advances, once.
        feed(b, 2, 150, accuracy=0.9)
        feed(b, 1, 150, accuracy=0.9)
        b.clock.advance(10)
        await rb.tick()
        assert a.registry.active_rollout("m").stage_index == stage + 1  # type: ignore[union-attr]
        # a comes back believing it still leads: its lease is gone, it decides nothing.
        await ra.tick()
        assert not ra.leading and ra.leader()["replica"] == "b"
        assert [e.action for e in a.registry.audit_log("m", action="rollout")].count("rollout") == 2  # stage 0, stage 1

    run(scenario())


def test_pause_and_resume_through_a_follower_hold_and_release_the_leader(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b, ra, rb = await fleet(tmp_path)
        a.clock.advance(1)
        await rb.action("m", "pause", actor=ALICE, reason="look first")
        feed(a, 1, 400, accuracy=0.9)
        feed(a, 2, 400, accuracy=0.9)
        a.clock.advance(20)
        await ra.tick()  # enough evidence to advance, but paused through b
        assert a.registry.active_rollout("m").stage_index == 0  # type: ignore[union-attr]
        assert ra.current("m").state == "paused"  # type: ignore[union-attr]
        await rb.action("m", "resume", actor=ALICE, reason="ok")
        a.clock.advance(1)
        await ra.tick()
        assert a.registry.active_rollout("m").stage_index == 1  # type: ignore[union-attr]
        await rb.action("m", "abort", actor=ALICE, reason="enough")
        assert a.registry.active_rollout("m") is None
        a.clock.advance(1)
        await ra.tick()
        assert ra.current("m") is None and ra.decided("m").state == "aborted"  # type: ignore[union-attr]
        await a.control.catch_up("m")  # what a's fleet sync does with the abort's deployment
        assert a.control.policy("m").traffic == ((1, 10_000),)  # type: ignore[union-attr]

    run(scenario())
