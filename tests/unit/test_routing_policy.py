"""RoutingPolicy: the one home of deployment transitions and of the shape rules of a policy."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swapserve.errors import FailedPrecondition, InvalidInput
from swapserve.routing.policy import RoutingPolicy, check_split
from swapserve.routing.reference import ReferenceRouter
from swapserve.units import BASIS_POINTS

#: Champion 1 (after 4), an operator's shadow 3 and cohort rules to 3 and 5, keyed by user.
LIVE = RoutingPolicy(champion=1, traffic=((1, BASIS_POINTS),), shadows=(3,),
                     cohorts=(("tier", "beta", 3), ("country", "nl", 5)), key_attribute="user",
                     previous_champions=(4,), generation=7)


# -- promote / roll back keep what they are not about --------------------------------------------


def test_promote_keeps_shadows_and_key_and_sends_all_served_traffic_to_the_champion() -> None:
    p = LIVE.promoted(2)
    assert (p.champion, p.traffic, p.previous_champions) == (2, ((2, BASIS_POINTS),), (4, 1))
    assert p.shadows == (3,) and p.cohorts == () and p.key_attribute == "user"
    assert p.generation == LIVE.generation  # the base; the registry assigns the next one


def test_promote_drops_only_shadows_of_either_champion() -> None:
    assert LIVE.promoted(3).shadows == ()
    live = dataclasses.replace(LIVE, shadows=(1, 3, 5))
    assert dataclasses.replace(live, champion=2, traffic=((2, BASIS_POINTS),)).promoted(4).shadows == (1, 3, 5)
    assert live.promoted(4).shadows == (3, 5)  # from champion 1: its shadow goes, as after a rollback


def test_promoting_the_champion_changes_no_history() -> None:
    assert LIVE.promoted(1).previous_champions == (4,)


def test_rollback_pops_the_history_and_keeps_shadows_and_key() -> None:
    p = LIVE.promoted(2).rolled_back()
    assert (p.champion, p.traffic, p.previous_champions) == (1, ((1, BASIS_POINTS),), (4,))
    assert p.shadows == (3,) and p.cohorts == () and p.key_attribute == "user"


def test_rollback_drops_shadows_of_the_demoted_champion_and_the_target() -> None:
    live = RoutingPolicy(champion=2, traffic=((2, 9000), (5, 1000)), shadows=(3, 4),
                         cohorts=(("a", "x", 2), ("a", "z", 5)), previous_champions=(4,))
    p = live.rolled_back()
    assert (p.champion, p.traffic, p.shadows, p.cohorts) == (4, ((4, BASIS_POINTS),), (3,), ())


def test_rollback_to_a_named_version() -> None:
    p = LIVE.promoted(2).rolled_back(to=4)
    assert (p.champion, p.previous_champions) == (4, (1, 2))


def test_rollback_without_history_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match="no previous champion"):
        RoutingPolicy.single(1).rolled_back()


@given(st.lists(st.integers(1, 6), min_size=1, max_size=8))
def test_each_rollback_undoes_one_promote(champions: list[int]) -> None:
    p = RoutingPolicy.single(champions[0])
    seen = [p]
    for v in champions[1:]:
        if v != p.champion:
            p = p.promoted(v)
            seen.append(p)
    for before in reversed(seen[:-1]):
        p = p.rolled_back()
        assert (p.champion, p.previous_champions) == (before.champion, before.previous_champions)


# -- an operator's split --------------------------------------------------------------------------


def test_split_keeps_the_champion_and_bucket_order() -> None:
    live = RoutingPolicy(champion=1, traffic=((1, 9000), (2, 1000)), key_attribute="user")
    p = live.with_split([(3, 500), (2, 500), (1, 9000)], shadows=[4, 4], cohorts=[("tier", 1, 3)])
    assert p.champion == 1 and p.traffic == ((1, 9000), (2, 500), (3, 500))
    assert p.shadows == (4,) and p.cohorts == (("tier", "1", 3),) and p.key_attribute == "user"


def test_split_without_the_champion_crowns_the_largest_share() -> None:
    p = LIVE.with_split([(2, 7000), (5, 3000)])
    assert (p.champion, p.previous_champions) == (2, (4, 1))


# -- rollout stages -------------------------------------------------------------------------------


def test_stages_replace_the_challengers_routes_only() -> None:
    canary = LIVE.for_stage(1, 2, traffic_bp=500, cohorts=[("tier", "beta")])
    assert canary.traffic == ((1, 9500), (2, 500)) and canary.champion == 1
    assert canary.shadows == (3,)  # the operator's shadow stays
    assert canary.cohorts == (("country", "nl", 5), ("tier", "beta", 2))  # the stage's rule wins its value
    shadow = LIVE.for_stage(1, 2, traffic_bp=0, shadow=True)
    assert shadow.traffic == ((1, BASIS_POINTS),) and shadow.shadows == (3, 2)
    back = canary.for_stage(1, 2, traffic_bp=0)
    assert back.traffic == ((1, BASIS_POINTS),) and back.shadows == (3,) and back.cohorts == (("country", "nl", 5),)
    assert back.previous_champions == LIVE.previous_champions and back.key_attribute == "user"


def test_full_stage_promotes_and_a_rollback_after_it_steps_back() -> None:
    full = LIVE.for_stage(1, 2, traffic_bp=BASIS_POINTS)
    assert full == LIVE.promoted(2)
    back = full.for_stage(1, 2, traffic_bp=0)  # gates failed during the watch
    assert (back.champion, back.previous_champions, back.traffic) == (1, (4,), ((1, BASIS_POINTS),))
    assert back.shadows == LIVE.shadows and back.key_attribute == "user"


def test_raising_a_canary_only_moves_keys_to_the_challenger() -> None:
    keys = [f"user-{i}" for i in range(2000)]

    def versions(p: RoutingPolicy) -> list[int]:
        router = ReferenceRouter()
        router.publish("m", p.compile(1))
        return [router.route("m", {"user": k}).version for k in keys]

    base = RoutingPolicy(champion=1, traffic=((1, BASIS_POINTS),), key_attribute="user")
    before = versions(base.for_stage(1, 2, traffic_bp=500))
    after = versions(base.for_stage(1, 2, traffic_bp=5000))
    assert all(a == 2 for b, a in zip(before, after) if b == 2)
    assert sum(a == 2 for a in after) > sum(b == 2 for b in before)


# -- the shape rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(("traffic", "message"), [
    ([], "traffic is empty"),
    ([(1, 9500), (2, 400)], r"must sum to 100%, these sum to 99% \(1=95% \+ 2=4%\)"),
    ([(1, 5000), (1, 5000)], "version 1 is given twice"),
    ([(1, 11_000), (2, -1000)], "between 0 and 10000"),
    ([(-1, 10_000)], "not a version number"),
    ([(True, 10_000)], "not a version number"),
])
def test_a_split_is_checked_in_one_place(traffic: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_split(traffic)
    with pytest.raises(InvalidInput, match=f"^model 'm': .*{message}"):
        RoutingPolicy(champion=1, traffic=tuple(traffic)).check("m")


@pytest.mark.parametrize(("policy", "message"), [
    (RoutingPolicy(champion=1, traffic=((1, BASIS_POINTS),), shadows=(1,)), "both champion and shadow"),
    (RoutingPolicy(champion=1, traffic=((1, BASIS_POINTS),), shadows=(2, 2)), "repeat a version"),
    (RoutingPolicy(champion=1, traffic=((1, BASIS_POINTS),), cohorts=(("a", "x", 2), ("a", "x", 3))),
     "two cohort rules match"),
    (RoutingPolicy(champion=1, traffic=((1, BASIS_POINTS),), cohorts=(("", "x", 2),)), "empty attribute"),
    (RoutingPolicy(champion=1, traffic=((1, BASIS_POINTS),), key_attribute=""), "key_attribute is empty"),
])
def test_the_whole_policy_is_checked(policy: RoutingPolicy, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        policy.check("m")
    with pytest.raises(InvalidInput, match=message):
        policy.validate("m", [1, 2, 3])


def test_validate_also_wants_every_routed_version_resident() -> None:
    LIVE.validate("m", [1, 3, 5])
    with pytest.raises(InvalidInput, match=r"\[5\] are not resident"):
        LIVE.validate("m", [1, 3])


def test_a_first_split_crowns_the_largest_share_in_the_order_given() -> None:
    p = RoutingPolicy.first_split([(1, 3000), (2, 7000)], shadows=[3], key_attribute="user")
    assert (p.champion, p.traffic, p.shadows, p.key_attribute, p.previous_champions) == (
        2, ((1, 3000), (2, 7000)), (3,), "user", ())
