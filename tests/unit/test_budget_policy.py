"""Memory-budget eviction plans and routing policies (pure, no server)."""
from __future__ import annotations

import pytest

from swapserve.errors import InvalidInput, ResourceExhausted
from swapserve.lifecycle.budget import MIB, Resident, plan_eviction
from swapserve.routing.policy import RoutingPolicy


def r(model: str, v: int, mib: float, used: float, why: str = "") -> Resident:
    return Resident(model, v, int(mib * MIB), used, why)


def test_fits_without_eviction() -> None:
    assert plan_eviction("cpu", 100 * MIB, 10 * MIB, [r("a", 1, 50, 1.0)], "b", 1) == []


def test_evicts_least_recently_used_unprotected_first_and_only_as_needed() -> None:
    residents = [r("a", 1, 40, 3.0), r("a", 2, 40, 1.0), r("b", 1, 10, 2.0), r("a", 3, 5, 0.0, "champion")]
    chosen = plan_eviction("cpu", 100 * MIB, 20 * MIB, residents, "c", 1)
    assert [(x.model, x.version) for x in chosen] == [("a", 2)]  # the oldest; frees enough alone
    chosen = plan_eviction("cpu", 100 * MIB, 50 * MIB, residents, "c", 1)
    assert [(x.model, x.version) for x in chosen] == [("a", 2), ("b", 1)]
    chosen = plan_eviction("cpu", 100 * MIB, 60 * MIB, residents, "c", 1)
    assert [(x.model, x.version) for x in chosen] == [("a", 2), ("b", 1), ("a", 1)]  # never the champion


def test_refuses_with_the_budget_the_need_and_the_holders() -> None:
    residents = [r("a", 1, 80, 1.0, "champion"), r("a", 2, 10, 2.0, "previous champion")]
    with pytest.raises(ResourceExhausted) as err:
        plan_eviction("cpu", 100 * MIB, 30 * MIB, residents, "b", 7)
    msg = err.value.message
    assert "model 'b' version 7 needs ~30.0 MiB" in msg and "budget is 100.0 MiB" in msg
    assert "a:1 (80.0 MiB, champion)" in msg and "a:2 (10.0 MiB, previous champion)" in msg


def test_policy_validation_and_compilation() -> None:
    p = RoutingPolicy(champion=1, traffic=((1, 9500), (2, 500)), shadows=(3,), cohorts=(("country", "nl", 2),),
                      key_attribute="user")
    p.validate("m", [1, 2, 3])
    spec = p.compile(7)
    assert spec.versions == (1, 2) and spec.weights_bp == (9500, 500) and spec.generation == 7
    assert spec.shadows == (3,) and spec.cohorts[0].attribute == "country" and spec.key_attribute == "user"
    assert p.serving_versions() == {1, 2, 3} and p.weight_of(2) == 500 and not p.pinned
    with pytest.raises(InvalidInput, match="sum to 99%"):
        RoutingPolicy(champion=1, traffic=((1, 9400), (2, 500))).validate("m", [1, 2])
    with pytest.raises(InvalidInput, match=r"\[3\] are not resident"):
        p.validate("m", [1, 2])
    with pytest.raises(InvalidInput, match="twice"):
        RoutingPolicy(champion=1, traffic=((1, 5000), (1, 5000))).validate("m", [1])
