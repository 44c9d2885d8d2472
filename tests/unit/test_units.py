"""The one grammar for durations and traffic percents (swapserve.units), and that every caller uses it."""
from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swapserve.cli.control import percent_to_bp as cli_percent
from swapserve.errors import ConfigError, InvalidInput
from swapserve.monitoring.monitor_config import parse_monitoring
from swapserve.rollout import parse_plan
from swapserve.units import BASIS_POINTS, UnitError, bp_to_percent, format_duration, parse_duration, percent_to_bp

# -- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    (90, 90.0), (1.5, 1.5), ("90", 90.0), ("90.5", 90.5), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0),
    ("1h30m", 5400.0), ("1.5h", 5400.0), ("2h 5m 3s", 7503.0), ("0", 0.0), ("500ms", 0.5), ("1d", 86400.0),
    (".5s", 0.5), (" 5 m ", 300.0), ("1m500ms", 60.5), ("1H", 3600.0),
])
def test_both_former_grammars_are_one(text: object, seconds: float) -> None:
    # rollout plans used to reject 500ms and monitoring.yaml used to reject 1h30m.
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10x", "h", "ms", "-5", "-5m", "inf", "nan", "", "1y", "5 m s", "1h-30m",
                                 True, None, [1], float("inf"), -1])
def test_bad_durations_say_what_to_write(bad: object) -> None:
    with pytest.raises(UnitError, match=r"s, m or h \(also ms and d\), e\.g\. 90, 90s, 500ms"):
        parse_duration(bad)


@given(st.lists(st.tuples(st.integers(0, 999), st.sampled_from(["ms", "s", "m", "h", "d"])), min_size=1, max_size=4))
def test_a_duration_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    size = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == pytest.approx(sum(n * size[u] for n, u in parts))


@given(st.integers(0, 10**9))
def test_format_duration_round_trips_whole_milliseconds(ms: int) -> None:
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_format_duration_picks_the_largest_exact_unit() -> None:
    assert [format_duration(s) for s in (300, 3600, 30, 86400, 1.5, 90)] == ["5m", "1h", "30s", "1d", "1500ms", "90s"]


# -- percents and basis points --------------------------------------------------------------------


def test_basis_points_are_one_hundredths_of_a_percent() -> None:
    assert BASIS_POINTS == 10_000 == percent_to_bp(100)


@given(st.integers(0, BASIS_POINTS))
def test_every_basis_point_round_trips(bp: int) -> None:
    assert percent_to_bp(bp_to_percent(bp)) == bp
    assert percent_to_bp(str(bp / 100)) == bp
    assert percent_to_bp(f"{bp / 100}%") == bp


@pytest.mark.parametrize(("value", "problem"), [
    ("150", "outside 0..100"), (-1, "outside 0..100"), ("12.345", "two decimals"), ("abc", "not a percent"),
    ("nan", "not a percent"), ("inf", "not a percent"), ("", "not a percent"), (True, "not a percent"), (None, "not a percent"),
])
def test_bad_percents_say_what_is_wrong(value: object, problem: str) -> None:
    with pytest.raises(UnitError, match=problem):
        percent_to_bp(value)


# -- every caller names its field around the same grammar -----------------------------------------


def test_rollout_plan_names_the_field() -> None:
    assert parse_plan("stages: [{name: a, min_duration: 500ms}]").stages[0].min_duration_s == 0.5
    with pytest.raises(InvalidInput, match=r"^rollout plan: stages\[0\]\.min_duration: expected a duration, "
                                           r"got 'soon'; use seconds"):
        parse_plan("stages: [{name: a, min_duration: soon}]")


def test_monitoring_config_names_the_field() -> None:
    assert parse_monitoring({"windows": ["1h30m", "10s"]}, "m.yaml").windows_s == (10.0, 5400.0)
    with pytest.raises(ConfigError, match=r"^m\.yaml: field 'trigger.min_interval': expected a duration, "
                                          r"got 'soon'; use seconds"):
        parse_monitoring({"trigger": {"min_interval": "soon"}}, "m.yaml")


def test_cli_flag_reports_through_argparse() -> None:
    assert cli_percent("33.33") == 3333
    with pytest.raises(argparse.ArgumentTypeError, match="two decimals"):
        cli_percent("33.333")

