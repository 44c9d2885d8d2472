"""What fuzzing found (tests/fuzz): inputs that escaped the parsers' own errors. Each failed before
its fix with the exception named in the test; the saved corpus (tests/fuzz/corpus/) keeps them too."""
from __future__ import annotations

from pathlib import Path

import pytest

from swapserve import units
from swapserve.errors import ConfigError, InvalidInput
from swapserve.monitoring.monitor_config import load_monitoring_config, parse_monitoring
from swapserve.repository.config import parse_config, spec_from_config
from swapserve.rollout.plan import parse_plan

SIMPLE = """name: "simple"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] } ]
"""
HUGE = "1" * 400  # an integer no float holds
HUGER = "1" * 5000  # past Python's 4300-digit int/str conversion limit


def _spec(tmp_path: Path, text: str | bytes) -> object:
    d = tmp_path / "simple"
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_bytes(text if isinstance(text, bytes) else text.encode())
    return spec_from_config(parse_config(d), d)


@pytest.mark.parametrize("text, message", [
    # ValueError: Enum DataType has no name defined for value 999
    (SIMPLE.replace("TYPE_INT32 dims", "999 dims", 1), "input 'INPUT0' data_type 999 is not a known value"),
    # ValueError: Enum Kind has no name defined for value 77
    (SIMPLE + "instance_group [ { kind: 77 } ]\n", "instance_group kind 77 is not a known value"),
    # KeyError: 'BYTES'
    (SIMPLE + 'model_warmup [ { name: "w" inputs { key: "INPUT0" value: { data_type: TYPE_STRING dims: [ 16 ] '
     'zero_data: true } } } ]\n', "has data_type TYPE_STRING; give a fixed-size type"),
    # KeyError: 'INVALID'
    (SIMPLE + 'model_warmup [ { name: "w" inputs { key: "INPUT0" value: { dims: [ 16 ] zero_data: true } } } ]\n',
     "has data_type TYPE_INVALID"),
    # ValueError: Value out of range (text_format's setattr, not a ParseError)
    (SIMPLE.replace("max_batch_size: 8", "max_batch_size: 99999999999999999999999"), "Value out of range"),
    # UnicodeDecodeError
    (b'name: "\xff"\n', "is not UTF-8 text (byte 7)"),
    # accepted before: the native batcher's int64 nanoseconds overflow
    (SIMPLE + "dynamic_batching { max_queue_delay_microseconds: 18446744073709551615 }\n",
     "max_queue_delay_microseconds 18446744073709551615 is more than 60000000"),
    # accepted before (sum of counts -4, clamped to one worker)
    (SIMPLE + "instance_group [ { count: -5 }, { count: 1 } ]\n", "instance_group count -5 is negative"),
])
def test_config_errors_are_config_errors(tmp_path: Path, text: str | bytes, message: str) -> None:
    with pytest.raises(ConfigError, match="^model 'simple': ") as err:
        _spec(tmp_path, text)
    assert message in err.value.message


@pytest.mark.parametrize("text, field", [
    # OverflowError: int too large to convert to float
    (f"stages: [{{name: a, min_duration: {HUGE}}}]", "stages[0].min_duration"),
    (f"stages: [{{name: a}}]\ngates: {{max_slice_accuracy_drop: {HUGE}}}", "gates.max_slice_accuracy_drop"),
    (f"stages: [{{name: a}}]\ngates: {{max_relative_mae_increase: {HUGE}}}", "gates.max_relative_mae_increase"),
    (f"stages: [{{name: a}}]\ngates: {{p99_ms: {HUGE}}}", "gates.p99_ms"),
    (f"stages: [{{name: a}}]\ngates: {{max_reporter_share: {HUGE}}}", "gates.max_reporter_share"),
    (f"stages: [{{name: a}}]\nwatch: {HUGE}", "watch"),
    # ValueError: Exceeds the limit (4300 digits) for integer string conversion (in str())
    (f"stages: [{{name: a, traffic: {'9' * 4000}}}]", "stages[0].traffic"),
    # ... and in PyYAML's and json's own int()
    (f"stages: [{{name: a, traffic: {HUGER}}}]", "not a usable YAML document"),
    (f'{{"stages": [{{"name": "a", "traffic": {HUGER}}}]}}', "not a usable JSON document"),
    # RecursionError
    ("[" * 100_000, "not a usable YAML document"),
    ('{"a": ' * 100_000, "not a usable JSON document"),
])
def test_plan_errors_are_invalid_input(text: str, field: str) -> None:
    with pytest.raises(InvalidInput, match="^rollout plan") as err:
        parse_plan(text)
    assert field in err.value.message


@pytest.mark.parametrize("data, field", [
    ({"drift": {"p_value": 10 ** 400}}, "drift.p_value"),
    ({"windows": [10 ** 400]}, "windows"),
    ({"data_quality": {"ranges": {"x": [0, 10 ** 400]}}}, "ranges"),
    ({"drift": {"psi": {"warn": 10 ** 400}}}, "drift.psi"),
    ({"trigger": {"timeout": 10 ** 400}}, "trigger.timeout"),
])
def test_monitoring_huge_numbers_are_config_errors(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:  # OverflowError before
        parse_monitoring(data, "m.yaml")
    assert field in err.value.message


@pytest.mark.parametrize("content, message", [
    (b"windows: [\xff]\n", "is not UTF-8 text"),  # UnicodeDecodeError
    (f"slots: {HUGER}\n".encode(), "not a usable YAML document"),  # ValueError (4300 digits)
    (b"[" * 100_000, "not a usable YAML document"),  # RecursionError
])
def test_monitoring_file_errors_are_config_errors(tmp_path: Path, content: bytes, message: str) -> None:
    d = tmp_path / "digits"
    d.mkdir()
    (d / "monitoring.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match="^model 'digits'") as err:
        load_monitoring_config(d)
    assert message in err.value.message


def test_units_reject_huge_integers_with_their_own_error() -> None:
    with pytest.raises(units.UnitError, match="finite duration"):
        units.parse_duration(10 ** 400)
    with pytest.raises(units.UnitError, match="outside 0..100"):
        units.percent_to_bp(10 ** 5000)
    assert units.percent_to_bp(100) == 10_000


def test_drift_binning_of_huge_finite_inputs_warns_nothing(tmp_path: Path) -> None:
    """A client's fp32 values near the type's limit overflowed the NaN check's sum: numpy printed a
    RuntimeWarning in the server's log for each such request (pytest makes it an error here)."""
    import numpy as np

    from swapserve.monitoring.profile import FeatureLayout, build_profile

    spec = _spec(tmp_path, SIMPLE.replace("TYPE_INT32", "TYPE_FP32"))
    layout = FeatureLayout.for_inputs(spec, 256)  # type: ignore[arg-type]
    profile = build_profile(np.random.default_rng(0).random((200, layout.width)), layout, 10)
    x = np.full((2, layout.width), 3e38, dtype=np.float32)
    x[1, 3] = np.nan
    bins = profile.bin_indices(x)
    assert bins[1, 3] == profile.columns - 1 and bins[0, 3] != profile.columns - 1


def test_a_plan_text_with_a_lone_surrogate_is_refused() -> None:
    """Fuzzing found YAML's "\\ud83d\\ude00" escape (two surrogates, not one character): a cohort
    value that did not survive the plan's JSON round trip. It is InvalidInput naming the field."""
    from swapserve.errors import InvalidInput
    from swapserve.rollout.plan import parse_plan

    text = ('strategy: staged\nstages:\n  - name: nl\n    traffic: 0\n    cohorts:\n'
            '      - {attribute: country, value: "\\ud83d\\ude00"}\n')
    with pytest.raises(InvalidInput, match=r"stages\[0\]\.cohorts\[0\]\.value.*lone UTF-16 surrogate"):
        parse_plan(text)
