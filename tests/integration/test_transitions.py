"""Deployment transitions through the real control plane and rollout controller (in-process server).

Promote and rollback keep the shadows and routing key they are not about (and give the new
champion all served traffic: split and cohort rules go); a rollout's stages and its abort also
keep the operator's cohort rules. The live snapshot and the registry always agree (a restart
restores the same), and ControlPlane.publish validates before it writes and writes before it
publishes.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from swapserve.errors import FailedPrecondition, InvalidInput
from swapserve.rollout import parse_plan
from swapserve.routing.policy import RoutingPolicy
from swapserve.units import BASIS_POINTS
from tests.e2e.serverproc import copy_models

SLOW_CANARY = parse_plan("""
stages:
  - {name: canary, traffic: 10, min_duration: 1h, min_samples: 1000000, cohorts: [{attribute: tier, value: beta}]}
  - {name: full, traffic: 100}
""")


@pytest.fixture()
def live(example_repo: Path, tmp_path: Path, make_server: Any) -> Any:
    """simple v1..v4 resident; champion 1 with an operator's shadow (4) and cohort rule (country=nl -> 4)."""
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    for v in (2, 3, 4):
        shutil.copytree(repo / "simple" / "1", repo / "simple" / str(v))
    srv = make_server(repo)
    control = srv.server.control
    for v in (1, 2, 3, 4):
        srv.call(control.load("simple", v, actor="test"))
    srv.call(control.set_traffic("simple", [(1, BASIS_POINTS)], shadows=[4], cohorts=[("country", "nl", 4)],
                                 key_attribute="user", actor="test"))
    return srv


def routed(srv: Any) -> tuple[Any, ...]:
    """(champion, traffic, shadows, cohorts, key, history) live, asserting the registry holds the same."""
    view = srv.call(srv.server.control.status("simple"))
    deployment = srv.server.registry.current_deployment("simple")
    recorded = RoutingPolicy.from_deployment(deployment)
    assert recorded.generation == view.generation
    assert (recorded.champion, recorded.traffic, recorded.shadows, recorded.cohorts, recorded.key_attribute,
            recorded.previous_champions) == (view.champion, view.traffic, view.shadows, view.cohorts,
                                             view.key_attribute, view.previous_champions)
    return view.champion, view.traffic, view.shadows, view.cohorts, view.key_attribute, view.previous_champions


def test_promote_and_rollback_keep_shadows_and_key(live: Any) -> None:
    control = live.server.control
    history = routed(live)[5]  # (4,): the default champion (highest version) was replaced by 1
    live.call(control.promote("simple", 2, actor="test"))
    assert routed(live) == (2, ((2, BASIS_POINTS),), (4,), (), "user", (*history, 1))
    live.call(control.rollback("simple", actor="test"))
    assert routed(live) == (1, ((1, BASIS_POINTS),), (4,), (), "user", history)
    live.call(control.rollback("simple", to_version=3, actor="test"))
    assert routed(live) == (3, ((3, BASIS_POINTS),), (4,), (), "user", (*history, 1))
    live.call(control.promote("simple", 4, actor="test"))  # the shadow becomes champion: it stops shadowing
    assert routed(live) == (4, ((4, BASIS_POINTS),), (), (), "user", (*history, 1, 3))


def test_a_rollout_replaces_only_its_own_routes(live: Any) -> None:
    rollouts = live.server.rollouts
    history = routed(live)[5]
    live.call(rollouts.start("simple", 2, SLOW_CANARY, actor="test"))
    assert routed(live) == (1, ((1, 9000), (2, 1000)), (4,), (("country", "nl", 4), ("tier", "beta", 2)),
                            "user", history)
    live.call(rollouts.action("simple", "abort", actor="test"))
    assert routed(live) == (1, ((1, BASIS_POINTS),), (4,), (("country", "nl", 4),), "user", history)


def test_publish_validates_before_it_writes(live: Any) -> None:
    control = live.server.control
    before = routed(live)
    generation = live.server.registry.current_deployment("simple").generation
    live.call(control.unload("simple", 3, actor="test"))
    with pytest.raises(InvalidInput, match=r"\[3\] are not resident"):
        live.call(control.publish("simple", lambda p: p.promoted(3), action="promote", actor="test"))
    with pytest.raises(InvalidInput, match="both champion and shadow"):
        live.call(control.publish("simple", lambda p: p.with_split([(1, BASIS_POINTS)], shadows=[1]),
                                  action="traffic", actor="test"))
    with pytest.raises(FailedPrecondition, match="no previous champion"):
        live.call(control.publish("simple", lambda p: RoutingPolicy.single(1).rolled_back(), action="rollback",
                                  actor="test"))
    assert live.server.registry.current_deployment("simple").generation == generation
    assert routed(live) == before


def test_publish_on_a_stale_view_starts_from_the_registrys_deployment(live: Any) -> None:
    control, registry = live.server.control, live.server.registry
    current = registry.current_deployment("simple")
    # Another replica records a deployment this one has not applied (yet).
    registry.publish_deployment("simple", champion=1, traffic=[(1, 5000), (2, 5000)], action="traffic",
                                actor="replica-b", expected_generation=current.generation, key_attribute="account")
    recorded = live.call(control.publish("simple", lambda p: p.promoted(2), action="promote", actor="test"))
    # Computed from replica-b's deployment (its key attribute stays), not refused for the stale view.
    assert (recorded.champion, recorded.generation, recorded.key_attribute) == (2, current.generation + 2, "account")
    assert [d.actor for d in registry.deployment_history("simple", 2)] == ["test", "replica-b"]
    assert routed_live_only(live)[:2] == (2, ((2, 10_000),))


def routed_live_only(srv: Any) -> tuple[Any, ...]:
    view = srv.call(srv.server.control.status("simple"))
    return view.champion, view.traffic, view.shadows, view.cohorts, view.key_attribute, view.previous_champions
