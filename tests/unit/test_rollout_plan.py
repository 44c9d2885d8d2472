"""Rollout plans: parsing, validation messages, built-ins and the registry round-trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapserve.errors import InvalidInput
from swapserve.rollout import (
    BUILTIN_PLANS,
    CohortMatch,
    Gates,
    RolloutPlan,
    Stage,
    builtin_plan,
    load_plan,
    parse_plan,
)
from swapserve.units import parse_duration, percent_to_bp

EXAMPLE = """
stages:
  - {name: shadow,  traffic: 0,  shadow: true, min_duration: 10m, min_samples: 2000}
  - {name: canary,  traffic: 5,  min_duration: 1h, min_samples: 1000}
  - {name: half,    traffic: 50, min_duration: 1h, approve: true}
  - {name: full,    traffic: 100}
gates: {max_slice_accuracy_drop: 0.01, max_error_rate_increase: 0.005, p99_ms: 50, confidence: 0.99}
watch: 24h
require_offline_eval: true
"""


def test_example_plan_parses_to_stages_and_gates() -> None:
    plan = parse_plan(EXAMPLE)
    assert [s.name for s in plan.stages] == ["shadow", "canary", "half", "full"]
    assert [s.traffic_bp for s in plan.stages] == [0, 500, 5000, 10000]
    assert plan.stages[0] == Stage(name="shadow", traffic_bp=0, shadow=True, min_duration_s=600.0, min_samples=2000)
    assert plan.stages[1].min_duration_s == 3600.0 and plan.stages[1].min_samples == 1000
    assert plan.stages[2].approve and not plan.stages[1].approve
    assert plan.stages[3] == Stage(name="full", traffic_bp=10000)
    assert plan.gates == Gates(max_slice_accuracy_drop=0.01, max_error_rate_increase=0.005, p99_ms=50.0,
                               confidence=0.99)
    assert plan.watch_s == 86400.0
    assert plan.require_offline_eval is True
    assert plan.rollback_approval_window_s == 86400.0 and plan.webhook is None
    assert plan.auto_promote and plan.strategy == "staged"
    assert plan.watch_stage() == Stage(name="watch", traffic_bp=10000, min_duration_s=86400.0)


def test_defaults() -> None:
    plan = parse_plan("stages: [{name: full, traffic: 100}]")
    assert plan.gates == Gates(max_slice_accuracy_drop=0.01, max_error_rate_increase=0.005, p99_ms=None,
                               confidence=0.99)
    assert plan.watch_s == 3600.0 and plan.require_offline_eval is False


def test_json_and_files(tmp_path: Path) -> None:
    plan = parse_plan(EXAMPLE)
    j = tmp_path / "plan.json"
    j.write_text(json.dumps(plan.to_dict()))
    y = tmp_path / "plan.yaml"
    y.write_text(EXAMPLE)
    assert load_plan(j) == plan == load_plan(y)
    with pytest.raises(InvalidInput, match="cannot read"):
        load_plan(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text,seconds", [
    (90, 90.0), (1.5, 1.5), ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0),
    ("1h30m", 5400.0), ("1.5h", 5400.0), ("2h 5m 3s", 7503.0), ("0", 0.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10x", "h", "-5", "-5m", "inf", "nan", "", True, None, [1]])
def test_bad_duration_names_the_field(bad: object) -> None:
    with pytest.raises(InvalidInput, match=r"stages\[0\]\.min_duration: .*s, m or h"):
        parse_plan(json.dumps({"stages": [{"name": "a", "min_duration": bad}]}))


@pytest.mark.parametrize("percent,bp", [(0, 0), (5, 500), (12.34, 1234), ("0.01", 1), (100, 10000), ("12.5%", 1250)])
def test_percent_to_basis_points(percent: object, bp: int) -> None:
    assert percent_to_bp(percent) == bp


@pytest.mark.parametrize("yaml_text,field,fix", [
    ("stages: [{name: a, traffic: 150}]", r"stages\[0\]\.traffic", "outside 0..100"),
    ("stages: [{name: a, traffic: -1}]", r"stages\[0\]\.traffic", "outside 0..100"),
    ("stages: [{name: a, traffic: 12.345}]", r"stages\[0\]\.traffic", "two decimals"),
    ("stages: [{name: a, traffic: 5, shadow: true}]", r"stages\[0\]\.shadow", "set traffic: 0"),
    ("stages: [{name: a, trafic: 5}]", r"stages\[0\]\.trafic", "did you mean 'traffic'"),
    ("stages: [{name: a}]\nwach: 1h", r"wach", "did you mean 'watch'"),
    ("stages: [{name: a}]\ngates: {confidnce: 0.9}", r"gates\.confidnce", "did you mean 'confidence'"),
    ("stages: [{name: a, min_samples: -3}]", r"stages\[0\]\.min_samples", "negative"),
    ("stages: [{name: a, min_samples: 2.5}]", r"stages\[0\]\.min_samples", "whole number"),
    ("stages: [{name: a, min_duration: 10x}]", r"stages\[0\]\.min_duration", "s, m or h"),
    ("stages: [{name: a}]\nwatch: soon", r"watch", "s, m or h"),
    ("stages: [{traffic: 5}]", r"stages\[0\]\.name", "required"),
    ("stages: [{name: a}, {name: a, traffic: 5}]", r"stages\[1\]\.name", "unique"),
    ("stages: [{name: a, traffic: 50}, {name: b, traffic: 5}]", r"stages\[1\]\.traffic", "never decreases"),
    ("stages: []", r"stages", "non-empty"),
    ("watch: 1h", r"stages", "required"),
    ("stages: [{name: a, approve: yes please}]", r"stages\[0\]\.approve", "true or false"),
    ("stages: [{name: a, cohorts: [{attribute: country, value: NO}]}]", r"stages\[0\]\.cohorts\[0\]\.value", "quote it"),
    ("stages: [{name: a, cohorts: [{attribute: country}]}]", r"stages\[0\]\.cohorts\[0\]\.value", "required"),
    ("stages: [{name: a, shadow: true, cohorts: [{attribute: c, value: x}]}]", r"stages\[0\]\.shadow", "cohorts"),
    ("stages: [{name: a}]\ngates: {max_slice_accuracy_drop: 1.5}", r"gates\.max_slice_accuracy_drop", "0..1"),
    ("stages: [{name: a}]\ngates: {confidence: 1}", r"gates\.confidence", r"\[0.5, 1\)"),
    ("stages: [{name: a}]\ngates: {p99_ms: 0}", r"gates\.p99_ms", "positive"),
    ("stages: [{name: a}]\nwebhook: not-a-url", r"webhook", "http"),
    ("strategy: rolling\nstages: [{name: a}]", r"strategy", "'ab'"),
    ("strategy: ab\nduration: 1h", r"split", "required"),
    ("strategy: ab\nsplit: 50\nduration: 1y", r"duration", "s, m or h"),
    ("- just\n- a list", r"plan", "mapping"),
    ("stages: [", r"", "not valid YAML"),
])
def test_validation_errors_name_the_field_and_fix(yaml_text: str, field: str, fix: str) -> None:
    with pytest.raises(InvalidInput, match=rf"^rollout plan: {field}.*{fix}") as info:
        parse_plan(yaml_text)
    assert info.value.code.name == "INVALID_ARGUMENT"


def test_cohorts_and_webhook() -> None:
    plan = parse_plan("stages: [{name: nl, cohorts: [{attribute: country, value: NL}, {attribute: tier, value: 1}]},"
                      " {name: full, traffic: 100}]\nwebhook: https://hooks.example/rollout")
    assert plan.stages[0].cohorts == (CohortMatch("country", "NL"), CohortMatch("tier", "1"))
    assert plan.webhook == "https://hooks.example/rollout"


def test_ab_form() -> None:
    plan = parse_plan("{strategy: ab, split: 50, duration: 1h}")
    assert plan.strategy == "ab" and not plan.auto_promote
    assert plan.stages == (Stage(name="ab", traffic_bp=5000, min_duration_s=3600.0, approve=True),)
    assert RolloutPlan.from_dict(plan.to_dict()) == plan


def test_builtins() -> None:
    assert set(BUILTIN_PLANS) == {"shadow", "canary", "blue-green", "cohort", "ab"}
    canary = builtin_plan("canary")
    assert [s.traffic_bp for s in canary.stages] == [500, 2500, 5000, 10000]
    assert all(s.min_duration_s == 60 and s.min_samples == 200 for s in canary.stages)
    shadow = builtin_plan("shadow")
    assert shadow.stages[0].shadow and shadow.stages[0].traffic_bp == 0
    assert [s.traffic_bp for s in shadow.stages] == [0, 500, 10000]
    bg = builtin_plan("blue-green", watch="1h")
    assert [s.traffic_bp for s in bg.stages] == [10000] and bg.watch_s == 3600
    cohort = builtin_plan("cohort", cohorts=[("country", "NL")])
    assert cohort.stages[0].cohorts == (CohortMatch("country", "NL"),) and cohort.stages[-1].traffic_bp == 10000
    ab = builtin_plan("ab", split=20, stage_duration="30m")
    assert not ab.auto_promote and ab.stages[0].traffic_bp == 2000 and ab.stages[0].min_duration_s == 1800
    slow = builtin_plan("canary", stage_duration="1h", min_samples=1000, gates=Gates(confidence=0.95))
    assert slow.stages[0].min_duration_s == 3600 and slow.stages[0].min_samples == 1000
    assert slow.gates.confidence == 0.95
    for name in BUILTIN_PLANS:
        p = builtin_plan(name, cohorts=[CohortMatch("tier", "beta")])
        assert RolloutPlan.from_dict(p.to_dict()) == p
    with pytest.raises(InvalidInput, match="cohort strategy needs at least one rule"):
        builtin_plan("cohort")
    with pytest.raises(InvalidInput, match="did you mean 'canary'"):
        builtin_plan("canry")


# -- round trip ------------------------------------------------------------------------------

_durations = st.floats(min_value=0, max_value=1e7, allow_nan=False, allow_infinity=False)
_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
    lambda s: bool(s.strip()))


@st.composite
def plans(draw: st.DrawFn) -> RolloutPlan:
    n = draw(st.integers(1, 5))
    names = draw(st.lists(_names, min_size=n, max_size=n, unique=True))
    traffic = sorted(draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n)))
    stages = []
    for name, bp in zip(names, traffic):
        cohorts = tuple(draw(st.lists(st.builds(CohortMatch, _names, _names), max_size=2)))
        shadow = bp == 0 and not cohorts and draw(st.booleans())
        stages.append(Stage(name=name, traffic_bp=bp, shadow=shadow, cohorts=cohorts,
                            min_duration_s=draw(_durations), min_samples=draw(st.integers(0, 10**9)),
                            approve=draw(st.booleans())))
    unit = st.floats(0, 1, allow_nan=False)
    gates = Gates(
        max_slice_accuracy_drop=draw(unit), max_error_rate_increase=draw(unit),
        p99_ms=draw(st.none() | st.floats(0.001, 1e6, allow_nan=False)),
        confidence=draw(st.floats(0.5, 1, exclude_max=True, allow_nan=False)),
        max_relative_mae_increase=draw(st.floats(0, 100, allow_nan=False)),
        p99_min_requests=draw(st.integers(0, 10**6)),
    )
    return RolloutPlan(stages=tuple(stages), gates=gates, watch_s=draw(_durations),
                       require_offline_eval=draw(st.booleans()), rollback_approval_window_s=draw(_durations),
                       webhook=draw(st.none() | st.just("https://hooks.example/x?y=1")))


@settings(max_examples=200, deadline=None)
@given(plans())
def test_round_trip_through_json(plan: RolloutPlan) -> None:
    stored = json.dumps(plan.to_dict())  # the controller stores the plan in the registry as JSON
    assert RolloutPlan.from_dict(json.loads(stored)) == plan
    assert parse_plan(stored) == plan
