"""RolloutController on a fake clock: promote once the gates pass, hold for samples and time, roll back
on a worse slice, on errors and on latency (promise 7) — in-process, in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest

from swapserve.errors import FailedPrecondition
from swapserve.registry import RolloutRecord
from swapserve.rollout.controller import RolloutController
from swapserve.rollout.plan import RolloutPlan, parse_plan
from swapserve.types import ModelView
from tests.unit.stack import Stack, make_stack, run

ALICE = "alice"

STAGED = parse_plan("""
stages:
  - {name: canary, traffic: 10, min_duration: 10s, min_samples: 200}
  - {name: full, traffic: 100, min_duration: 10s}
watch: 30s
""")

#: A canary that never advances on its own: only a rollback (or an operator) ends it.
SLOW = parse_plan("""
stages:
  - {name: canary, traffic: 10, min_duration: 1h, min_samples: 1000000}
  - {name: full, traffic: 100}
gates: {p99_ms: 50}
""")


def feed(stack: Stack, version: int, n: int, *, accuracy: float = 0.9, slice_: str = "a", errors: float = 0.0,
         latency_s: float = 0.005) -> None:
    """``n`` requests of ``version`` on ``slice_``, as the data plane and the feedback join record them:
    a fraction ``errors`` failed, the others labelled, a fraction ``accuracy`` of those correct (spread
    evenly). They arrive 0.1 s from now: after any mark the controller took at the current time."""
    stack.clock.advance(0.1)
    labelled = 0
    for i in range(n):
        failed = int((i + 1) * errors) > int(i * errors)
        stack.slices.record_request("m", version, slice_, latency_s, error=failed)
        if not failed:
            correct = int((labelled + 1) * accuracy) > int(labelled * accuracy)
            stack.slices.record_outcome("m", version, slice_, "label", correct=correct)
            labelled += 1


async def rolling(stack: Stack, plan: RolloutPlan) -> RolloutController:
    """Champion 1 serving, a rollout of version 2 started (stage 0 published)."""
    await stack.control.load("m", 1, actor=ALICE)
    await stack.control.promote("m", 1, actor=ALICE)
    rc = RolloutController(stack.control, stack.slices, stack.metrics, clock=stack.clock)
    await rc.start("m", 2, plan, actor=ALICE, reason="test")
    return rc


def state(rc: RolloutController) -> tuple[str, int, str]:
    r = rc.current("m")
    assert r is not None
    return r.state, r.stage_index, str(r.evidence.get("phase"))


def last(stack: Stack) -> RolloutRecord:
    return stack.registry.rollouts("m", 1)[0]


def split(view: ModelView) -> tuple[int, tuple[tuple[int, int], ...]]:
    return view.champion, view.traffic


def test_a_challenger_as_good_as_the_champion_is_promoted_stage_by_stage(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        rc = await rolling(stack, STAGED)
        assert split(await c.status("m")) == (1, ((1, 9000), (2, 1000)))
        assert stack.sample("swapserve_rollout_stage", {"model": "m"}) == 0
        feed(stack, 1, 900)
        feed(stack, 2, 300)
        stack.clock.advance(11)
        await rc.tick()
        assert state(rc) == ("running", 1, "stages")
        view = await c.status("m")
        assert (view.champion, view.traffic, view.previous_champions) == (2, ((2, 10_000),), (1,))
        feed(stack, 2, 300)
        stack.clock.advance(11)
        await rc.tick()
        assert state(rc) == ("running", 1, "watch")  # promoted, gates still armed; v1 stays resident
        assert {v.version: v.resident for v in (await c.status("m")).versions} == {1: True, 2: True}
        stack.clock.advance(31)
        await rc.tick()
        assert rc.current("m") is None
        assert last(stack).state == "promoted"
        assert stack.registry.get_version("m", 2).stage == "production"
        assert stack.sample("swapserve_rollout_stage", {"model": "m"}) == -1
        assert split(await c.status("m")) == (2, ((2, 10_000),))
        await stack.manager.close()

    run(scenario())


def test_a_stage_holds_until_min_samples_and_min_duration_are_met(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))

    async def scenario() -> None:
        rc = await rolling(stack, STAGED)
        feed(stack, 1, 900)
        feed(stack, 2, 150)  # 150 of the 200 labels the stage needs
        stack.clock.advance(60)
        for _ in range(3):
            await rc.tick()
        assert state(rc) == ("running", 0, "stages")
        r = rc.current("m")
        assert r is not None and "waiting for 150 of 200 labelled outcomes" in r.evidence["last_hold"]
        feed(stack, 2, 50)
        await rc.tick()
        assert state(rc)[1] == 1  # enough samples now, and the stage ran long enough

        feed(stack, 2, 300)  # the full stage has no sample minimum, only its 10 s
        stack.clock.advance(5)
        await rc.tick()
        assert state(rc) == ("running", 1, "stages")
        stack.clock.advance(6)
        await rc.tick()
        assert state(rc) == ("running", 1, "watch")
        await stack.manager.close()

    run(scenario())


def test_an_accuracy_drop_on_one_slice_rolls_back_at_once(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        rc = await rolling(stack, SLOW)
        for s in ("a", "b", "c", "d", "e"):
            feed(stack, 1, 300, slice_=s)
            feed(stack, 2, 300, slice_=s, accuracy=0.7 if s == "c" else 0.9)
        await rc.tick()  # a second into an hour-long stage: minimum durations never hold a rollback back
        assert rc.current("m") is None
        r = last(stack)
        assert r.state == "rolled_back"
        rb = r.evidence["rollback"]
        assert (rb["gate"], rb["slice"], rb["champion"], rb["challenger"]) == ("accuracy", "c", 0.9, 0.7)
        assert split(await c.status("m")) == (1, ((1, 10_000),))
        assert stack.sample("swapserve_rollbacks_total", {"model": "m"}) == 1
        assert any("rolled back" in e.message for e in await c.events("m"))
        assert any(a.action == "rollout" and "automatic rollback" in a.reason for a in await c.audit_log("m"))
        await stack.manager.close()

    run(scenario())


@pytest.mark.parametrize(("champion", "challenger", "rolled_back"), [(0.92, 0.89, True), (0.92, 0.915, False)])
def test_a_three_point_drop_rolls_back_and_a_half_point_drop_does_not(tmp_path: Path, champion: float, challenger: float,
                                                   rolled_back: bool) -> None:
    stack = make_stack(tmp_path, (1, 2))

    async def scenario() -> None:
        rc = await rolling(stack, SLOW)
        feed(stack, 1, 10_000, accuracy=champion)  # enough labels to tell 3 points from the 1 point limit
        feed(stack, 2, 10_000, accuracy=challenger)
        await rc.tick()
        assert last(stack).state == ("rolled_back" if rolled_back else "running")
        await stack.manager.close()

    run(scenario())


def test_a_higher_error_rate_rolls_back(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))

    async def scenario() -> None:
        rc = await rolling(stack, SLOW)
        feed(stack, 1, 1000)
        feed(stack, 2, 1000, errors=0.1)
        await rc.tick()
        r = last(stack)
        assert r.state == "rolled_back" and r.evidence["rollback"]["gate"] == "error_rate"
        await stack.manager.close()

    run(scenario())


def test_a_slow_challenger_breaks_the_latency_gate_once_it_served_enough(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))

    async def scenario() -> None:
        rc = await rolling(stack, SLOW)
        feed(stack, 1, 1000)
        feed(stack, 2, 50, latency_s=0.2)  # too few requests to judge a p99 (100 needed)
        await rc.tick()
        assert state(rc) == ("running", 0, "stages")
        feed(stack, 2, 100, latency_s=0.2)
        await rc.tick()
        r = last(stack)
        assert r.state == "rolled_back" and r.evidence["rollback"]["gate"] == "latency"
        await stack.manager.close()

    run(scenario())


def test_a_paused_rollout_does_not_advance_but_still_rolls_back(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))

    async def scenario() -> None:
        rc = await rolling(stack, STAGED)
        await rc.action("m", "pause", actor=ALICE)
        feed(stack, 1, 900)
        feed(stack, 2, 300)
        stack.clock.advance(11)
        await rc.tick()
        assert state(rc) == ("paused", 0, "stages")
        feed(stack, 2, 600, accuracy=0.5)
        await rc.tick()
        assert last(stack).state == "rolled_back"
        await stack.manager.close()

    run(scenario())


def test_abort_returns_traffic_to_the_champion_and_only_one_rollout_runs_at_a_time(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        rc = await rolling(stack, STAGED)
        with pytest.raises(FailedPrecondition, match="already has a rollout in progress"):
            await rc.start("m", 2, STAGED, actor=ALICE)
        await rc.action("m", "abort", actor=ALICE, reason="changed my mind")
        assert last(stack).state == "aborted" and rc.current("m") is None
        assert split(await c.status("m")) == (1, ((1, 10_000),))
        await stack.manager.close()

    run(scenario())


def test_a_plan_whose_last_stage_is_below_100_percent_promotes_before_the_watch(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control
    plan = parse_plan("""
stages:
  - {name: canary, traffic: 10, min_duration: 10s, min_samples: 200}
watch: 30s
""")

    async def scenario() -> None:
        rc = await rolling(stack, plan)
        assert split(await c.status("m")) == (1, ((1, 9000), (2, 1000)))
        feed(stack, 1, 900)
        feed(stack, 2, 300)
        stack.clock.advance(11)
        await rc.tick()
        assert state(rc) == ("running", 0, "watch")
        view = await c.status("m")
        assert (view.champion, view.traffic, view.previous_champions) == (2, ((2, 10_000),), (1,))
        feed(stack, 1, 300)  # the champion's side during the watch: its frozen canary counts
        feed(stack, 2, 300)
        stack.clock.advance(31)
        await rc.tick()
        assert rc.current("m") is None and last(stack).state == "promoted"
        assert split(await c.status("m")) == (2, ((2, 10_000),))
        await stack.manager.close()

    run(scenario())
