"""Data quality (count / reject), monitoring.yaml parsing, and the deploy/ files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from swapserve.errors import ConfigError, InvalidInput
from swapserve.monitoring.drift_observer import MonitoringObserver
from swapserve.monitoring.monitor_config import load_monitoring_config
from swapserve.types import InferRequest, ModelSpec, TensorSpec
from swapserve.units import parse_duration

ROOT = Path(__file__).resolve().parents[2]
SPEC = ModelSpec("digits", "pytorch_libtorch", 64, (TensorSpec("pixels", "FP32", (64,)),),
                 (TensorSpec("probabilities", "FP32", (10,)),))


def make_repo(tmp_path: Path, yaml_text: str = "", rows: int = 500) -> Path:
    vdir = tmp_path / "digits" / "1"
    vdir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.random((rows, 64), dtype=np.float32)
    probs = rng.dirichlet(np.ones(10), size=rows).astype(np.float32)
    np.savez(vdir / "reference.npz", pixels=x, probabilities=probs)
    if yaml_text:
        (tmp_path / "digits" / "monitoring.yaml").write_text(yaml_text)
    return tmp_path


def send(obs: MonitoringObserver, x: np.ndarray) -> None:
    req = InferRequest("digits", id="r")
    obs.on_request(req, SPEC, 1, [x])
    obs.on_response(req, SPEC, 1, [x], {"probabilities": np.full((len(x), 10), 0.1, np.float32)}, 0.001)


def good_row() -> np.ndarray:
    return np.full((1, 64), 0.5, dtype=np.float32) + np.linspace(0, 0.1, 64, dtype=np.float32)


def quality(obs: MonitoringObserver) -> dict:  # type: ignore[type-arg]
    return obs.report("digits", 1).to_dict()["data_quality"]["inputs"]["pixels"]  # type: ignore[index]


def test_count_policy_counts_nan_inf_and_out_of_range(tmp_path: Path) -> None:
    obs = MonitoringObserver(make_repo(tmp_path), context_dir=tmp_path / "ctx")
    x = good_row()
    x[0, 17] = np.nan
    x[0, 3] = np.inf
    x[0, 5] = 7.0  # reference max is < 1
    send(obs, x)
    send(obs, good_row())
    q = quality(obs)
    assert (q["nan"], q["inf"], q["out_of_range"], q["rejected"], q["rows"]) == (1, 1, 1, 0, 2)
    top = {d["feature"]: d["kind"] for d in obs.report("digits", 1).to_dict()["data_quality"]["top_features"]}
    assert top == {"pixels[17]": "nan", "pixels[3]": "inf", "pixels[5]": "out_of_range"}


def test_reject_policy_names_feature_and_value(tmp_path: Path) -> None:
    obs = MonitoringObserver(make_repo(tmp_path, "data_quality: {policy: reject}\n"), context_dir=tmp_path / "c")
    x = good_row()
    x[0, 17] = np.nan
    with pytest.raises(InvalidInput, match=r"model 'digits' version 1: input 'pixels' feature 17 is NaN; "
                                           r"data-quality policy is reject"):
        send(obs, x)
    y = good_row()
    y[0, 9] = 3.5
    with pytest.raises(InvalidInput, match=r"feature 9 is 3.5, outside the reference range \[0\.\d+, 0\.99\d*\]"):
        send(obs, y)
    send(obs, good_row())  # a good request passes
    q = quality(obs)
    assert (q["rejected"], q["nan"], q["out_of_range"]) == (2, 1, 1)


def test_reject_kinds_and_range_override(tmp_path: Path) -> None:
    text = "data_quality:\n  policy: reject\n  reject_kinds: [nan]\n  ranges: {\"pixels[2]\": [0, 0.2]}\n"
    obs = MonitoringObserver(make_repo(tmp_path, text), context_dir=tmp_path / "c")
    x = good_row()
    x[0, 2] = 0.6  # inside the reference range, outside the override: counted, not rejected
    send(obs, x)
    assert quality(obs)["out_of_range"] == 1
    x[0, 2] = np.nan
    with pytest.raises(InvalidInput, match="feature 2 is NaN"):
        send(obs, x)


def test_batched_rows_and_constant_rows(tmp_path: Path) -> None:
    obs = MonitoringObserver(make_repo(tmp_path, "data_quality: {policy: reject, reject_kinds: [constant]}\n"),
                             context_dir=tmp_path / "c")
    batch = np.repeat(good_row(), 4, axis=0)
    batch[2] = 0.0  # a blank row: the reference has none
    with pytest.raises(InvalidInput, match=r"input 'pixels' is constant \(every element is 0\) \(row 2\)"):
        send(obs, batch)


def test_checks_before_profile_exist_only_for_nonfinite(tmp_path: Path) -> None:
    (tmp_path / "digits" / "1").mkdir(parents=True)  # no reference file: capture mode
    obs = MonitoringObserver(tmp_path, context_dir=tmp_path / "c")
    x = good_row()
    x[0, 0] = 50.0
    x[0, 1] = -np.inf
    send(obs, x)
    q = quality(obs)
    assert (q["out_of_range"], q["inf"]) == (0, 1)


@pytest.mark.parametrize(("text", "message"), [
    ("windows: [5m, 0.5s]\n", r"monitoring.yaml: field 'windows': window '0.5s' is shorter than 1s"),
    ("drift: {psi: {warn: 0.5, alert: 0.2}}\n", r"field 'drift.psi': warn \(0.5\) must not exceed alert"),
    ("data_quality: {policy: drop}\n", r"field 'data_quality.policy' must be one of \['count', 'reject'\]"),
    ("trigger: {comand: [x]}\n", r"unknown field\(s\) \['trigger.comand'\]"),
    ("trigger: {command: 'python x.py'}\n", r"field 'trigger.command' must be a non-empty argv list"),
    ("trigger: {min_interval: soon}\n", r"field 'trigger.min_interval': expected a duration"),
    ("windows: [5m\n", r"is not valid YAML"),
    ("data_quality: {ranges: {pixels: [1, 0]}}\n", r"entry 'pixels': expected \[lo, hi\] with lo <= hi"),
])
def test_config_errors_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "monitoring.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_monitoring_config(tmp_path / "digits")
    assert "model 'digits'" in err.value.message


def test_config_defaults_and_durations(tmp_path: Path) -> None:
    cfg = load_monitoring_config(tmp_path)  # no file
    assert cfg.windows_s == (300.0, 3600.0) and cfg.quality.policy == "count" and not cfg.trigger.configured
    assert [parse_duration(v) for v in ("500ms", "5s", "5m", "1h", "1d", 7)] == [0.5, 5, 300, 3600, 86400, 7]
    (tmp_path / "monitoring.yaml").write_text(
        "windows: [1h, 10s]\ntrigger: {command: [python, -c, pass], min_interval: 2m, schedule: 1d}\n")
    cfg = load_monitoring_config(tmp_path)
    assert cfg.windows_s == (10.0, 3600.0)
    assert cfg.trigger.command == ("python", "-c", "pass") and cfg.trigger.min_interval_s == 120.0


def test_broken_config_disables_monitoring_but_never_fails_requests(tmp_path: Path) -> None:
    obs = MonitoringObserver(make_repo(tmp_path, "drift: {bogus: 1}\n"), context_dir=tmp_path / "c")
    x = good_row()
    x[0, 0] = np.nan
    send(obs, x)  # no exception: monitoring is off for the model, the error is reported
    assert "unknown field(s) ['drift.bogus']" in obs.report("digits").error
    with pytest.raises(ConfigError):
        obs.prepare(SPEC, 1)


def test_deploy_files_load() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "swapserve.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for metric in ("swapserve_request_latency_seconds_bucket", "nv_inference_request_failure",
                   "nv_inference_request_success", "swapserve_traffic_share", "swapserve_drift_score",
                   "swapserve_slice_accuracy", "swapserve_rollout_stage"):
        assert metric in exprs, metric
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert all({"alert", "expr", "labels", "annotations"} <= set(r) for r in alerts)
    text = " ".join(r["expr"] for r in alerts)
    for metric in ("swapserve_request_latency_seconds_bucket", "nv_inference_request_failure",
                   "swapserve_traffic_share", "swapserve_rollbacks_total", "swapserve_rollout_stage",
                   "swapserve_drift_alert", "swapserve_slice_accuracy", "swapserve_data_quality_issues_total"):
        assert metric in text, metric
