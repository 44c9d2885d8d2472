"""Drift sketches and scoring: shifted streams alert within one window, unshifted ones don't."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from swapserve.errors import ModelNotFound
from swapserve.monitoring.drift_observer import MonitoringObserver
from swapserve.types import InferRequest, ModelSpec, TensorSpec
from tests.fakes import FakeClock

SPEC = ModelSpec("digits", "pytorch_libtorch", 64, (TensorSpec("pixels", "FP32", (64,)),),
                 (TensorSpec("probabilities", "FP32", (10,)),))
W = np.random.default_rng(99).normal(size=(64, 10)).astype(np.float32)


def model(x: np.ndarray) -> np.ndarray:
    z = (x - 0.5) @ W
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def data(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Digits-like: 64 features in [0, 1], a few always 0, the rest beta-distributed."""
    x = rng.beta(2.0, 5.0, size=(n, 64)).astype(np.float32)
    x[:, :4] = 0.0
    if shift:
        x[:, 20:28] = np.clip(x[:, 20:28] + shift, 0, 1)
    return x


def repo(tmp_path: Path, yaml_text: str = "windows: [10s, 60s]\ndrift: {min_samples: 100}\n",
         ref_rows: int = 1000, outputs: bool = True) -> Path:
    vdir = tmp_path / "digits" / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    x = data(np.random.default_rng(12345), ref_rows)
    arrays = {"pixels": x, **({"probabilities": model(x)} if outputs else {})}
    np.savez(vdir / "reference.npz", **arrays)  # type: ignore[arg-type]
    (tmp_path / "digits" / "monitoring.yaml").write_text(yaml_text)
    return tmp_path


def stream(obs: MonitoringObserver, clock: FakeClock, x: np.ndarray, rate_hz: float, batch: int = 1) -> None:
    for i in range(0, len(x), batch):
        rows = x[i: i + batch]
        req = InferRequest("digits", id=str(i))
        obs.on_request(req, SPEC, 1, [rows])
        obs.on_response(req, SPEC, 1, [rows], {"probabilities": model(rows)}, 0.001)
        clock.t += batch / rate_hz


def test_shifted_stream_alerts_within_one_window(tmp_path: Path) -> None:
    clock = FakeClock()
    obs = MonitoringObserver(repo(tmp_path), CollectorRegistry(), clock, context_dir=tmp_path / "c")
    rng = np.random.default_rng(1)
    stream(obs, clock, data(rng, 300), rate_hz=50)  # 6 s of normal traffic
    assert obs.tick() == [] and obs.report("digits").state == "ok"
    stream(obs, clock, data(rng, 500, shift=0.3), rate_hz=50)  # 10 s (one short window) shifted
    events = obs.tick()
    assert [e.kind for e in events] == ["drift_alert"]
    report = obs.report("digits")
    short = report.windows[0]
    assert short.window == "10s" and short.state == "alert" and short.input_score >= 0.25
    top = [f.name for f in short.features[:8]]
    assert set(top) == {f"pixels[{i}]" for i in range(20, 28)}  # the shifted features lead
    assert report.most_drifted(1)[0][1] in top
    d = report.to_dict(top=3)
    assert d["state"] == "alert" and len(d["windows"][0]["features"]) == 3  # type: ignore[index]
    # back to normal: the alert resolves once the short window has slid past the shift
    stream(obs, clock, data(rng, 600, shift=0.0), rate_hz=50)
    kinds = [e.kind for e in obs.tick()]
    assert obs.report("digits").windows[0].state == "ok"
    assert "drift_resolved" not in kinds  # the 60 s window still holds shifted data
    clock.t += 60
    stream(obs, clock, data(rng, 200), rate_hz=50)
    assert [e.kind for e in obs.tick()] == ["drift_resolved"]


def test_prediction_drift_from_outputs(tmp_path: Path) -> None:
    clock = FakeClock()
    obs = MonitoringObserver(repo(tmp_path), None, clock, context_dir=tmp_path / "c")
    rng = np.random.default_rng(2)
    x = data(rng, 500)
    for i in range(len(x)):  # same inputs, but the model now always answers class 3
        req = InferRequest("digits", id=str(i))
        obs.on_response(req, SPEC, 1, [x[i: i + 1]], {"probabilities": np.eye(10, dtype=np.float32)[[3]]}, 0.0)
        clock.t += 0.02
    w = obs.report("digits").windows[0]
    assert w.state == "alert" and w.input_score < 0.1 and w.prediction_score >= 0.25
    assert w.predictions[0].name == "probabilities:class" and w.predictions[0].test == "chi2"


def false_alarm(seed: int, tmp_path: Path) -> tuple[bool, bool]:
    """(alerted on an unshifted stream, alerted on a shifted one), one 10 s window at 30 rows/s."""
    out = []
    for shift in (0.0, 0.15):
        clock = FakeClock()
        obs = MonitoringObserver(tmp_path, None, clock, context_dir=tmp_path / "c")
        stream(obs, clock, data(np.random.default_rng(seed), 300, shift=shift), rate_hz=30)
        out.append(obs.report("digits").windows[0].state == "alert")
    return out[0], out[1]


def test_false_alarm_rate_over_seeds(tmp_path: Path) -> None:
    repo(tmp_path)
    results = [false_alarm(seed, tmp_path) for seed in range(50)]
    false_alarms = sum(a for a, _ in results)
    detected = sum(b for _, b in results)
    print(f"false alarms {false_alarms}/50, detected {detected}/50 (shift 0.15 on 8 of 64 features)")
    assert false_alarms <= 2  # Bonferroni at 1% family-wise + PSI >= 0.25: expected ~0
    assert detected >= 48


def test_window_slides_and_insufficient_samples(tmp_path: Path) -> None:
    clock = FakeClock()
    obs = MonitoringObserver(repo(tmp_path), None, clock, context_dir=tmp_path / "c")
    stream(obs, clock, data(np.random.default_rng(3), 50), rate_hz=50)
    assert obs.report("digits").windows[0].state == "insufficient"  # 50 < min_samples
    stream(obs, clock, data(np.random.default_rng(4), 200), rate_hz=50)
    assert obs.report("digits").windows[0].samples == 250
    clock.t += 11  # everything older than the 10 s window
    rep = obs.report("digits")
    assert rep.windows[0].samples == 0 and rep.windows[1].samples == 250


def test_batched_requests_count_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    obs = MonitoringObserver(repo(tmp_path), None, clock, context_dir=tmp_path / "c")
    stream(obs, clock, data(np.random.default_rng(5), 320, shift=0.3), rate_hz=64, batch=16)
    w = obs.report("digits").windows[0]
    assert w.samples == 320 and w.state == "alert"


def test_profile_captured_from_first_requests_without_reference(tmp_path: Path) -> None:
    (tmp_path / "digits" / "1").mkdir(parents=True)
    (tmp_path / "digits" / "monitoring.yaml").write_text("windows: [10s]\nprofile: {capture: 200}\n")
    clock = FakeClock()
    obs = MonitoringObserver(tmp_path, None, clock, context_dir=tmp_path / "c")
    rng = np.random.default_rng(6)
    stream(obs, clock, data(rng, 200), rate_hz=100)
    assert "capturing 200/200" in obs.report("digits").profile_source or \
        "captured" in obs.report("digits").profile_source
    assert [e.kind for e in obs.tick()] == []  # report() already built the profile
    clock.t += 10
    stream(obs, clock, data(rng, 300, shift=0.3), rate_hz=50)
    rep = obs.report("digits")
    assert rep.windows[0].state == "alert" and "captured (first 200 rows)" in rep.profile_source


def test_small_reference_file_is_ignored(tmp_path: Path) -> None:
    repo(tmp_path, ref_rows=8)  # the old make_examples smoke sample
    obs = MonitoringObserver(tmp_path, None, FakeClock(), context_dir=tmp_path / "c")
    stream(obs, FakeClock(), data(np.random.default_rng(7), 5), rate_hz=10)
    assert "reference.npz ignored (8 rows < min_reference_rows 100)" in obs.report("digits").profile_source


def test_bad_reference_shape_is_reported(tmp_path: Path) -> None:
    vdir = tmp_path / "digits" / "1"
    vdir.mkdir(parents=True)
    np.savez(vdir / "reference.npz", pixels=np.zeros((200, 63), np.float32))
    obs = MonitoringObserver(tmp_path, None, FakeClock(), context_dir=tmp_path / "c")
    stream(obs, FakeClock(), data(np.random.default_rng(7), 5), rate_hz=10)
    assert "array 'pixels' has shape [200, 63], expected [n, 64]" in obs.report("digits").error


def test_report_unknown_model() -> None:
    obs = MonitoringObserver("/nonexistent", None, FakeClock(), context_dir="/tmp/unused")
    with pytest.raises(ModelNotFound, match="model 'nope' has no drift data yet"):
        obs.report("nope")


def test_metrics_are_bounded_and_exported(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    clock = FakeClock()
    obs = MonitoringObserver(repo(tmp_path, "windows: [10s, 60s]\ndrift: {top_k: 3}\n"), reg, clock,
                             context_dir=tmp_path / "c")
    stream(obs, clock, data(np.random.default_rng(8), 500, shift=0.3), rate_hz=50)
    obs.tick()
    labels = {"model": "digits", "version": "1", "window": "10s"}
    assert reg.get_sample_value("swapserve_drift_alert", labels) == 1.0
    assert reg.get_sample_value("swapserve_drift_score", {**labels, "feature": "__overall__"}) >= 0.25
    scores = [s for m in reg.collect() if m.name == "swapserve_drift_score" for s in m.samples]
    assert len(scores) == 2 * (3 + 3)  # 2 windows x (top 3 features + overall/inputs/prediction)
    assert reg.get_sample_value("swapserve_data_quality_issues_total",
                                {"model": "digits", "version": "1", "input": "pixels", "kind": "nan"}) == 0.0
    assert reg.get_sample_value("swapserve_data_quality_rows_total",
                                {"model": "digits", "version": "1", "input": "pixels"}) == 500.0


def test_memory_per_version_is_bounded(tmp_path: Path) -> None:
    clock = FakeClock()
    obs = MonitoringObserver(repo(tmp_path), None, clock, context_dir=tmp_path / "c")
    stream(obs, clock, data(np.random.default_rng(9), 100), rate_hz=50)
    before = obs.memory_bytes("digits", 1)
    stream(obs, clock, data(np.random.default_rng(10), 2000), rate_hz=5)
    assert obs.memory_bytes("digits", 1) == before < 300_000  # bound: see benchmarks/bench_monitoring.py


def test_large_inputs_are_subsampled(tmp_path: Path) -> None:
    spec = ModelSpec("convnet", "pytorch_libtorch", 8, (TensorSpec("image", "FP32", (1, 32, 32)),),
                     (TensorSpec("logits", "FP32", (10,)),))
    (tmp_path / "convnet" / "1").mkdir(parents=True)
    (tmp_path / "convnet" / "monitoring.yaml").write_text("profile: {capture: 20, max_features: 256}\n")
    obs = MonitoringObserver(tmp_path, None, FakeClock(), context_dir=tmp_path / "c")
    rng = np.random.default_rng(0)
    for i in range(20):
        img = rng.random((1, 1, 32, 32), dtype=np.float32)
        obs.on_request(InferRequest("convnet"), spec, 1, [img])
        obs.on_response(InferRequest("convnet"), spec, 1, [img], {"logits": rng.random((1, 10), np.float32)}, 0.0)
    obs.tick()
    names = [f["name"] for f in obs._versions[("convnet", 1)].profile.inputs.to_dict()["features"]]  # type: ignore[union-attr,index]
    assert len(names) == 256 and names[:3] == ["image[0]", "image[4]", "image[8]"]


@pytest.mark.parametrize("reference", ["../../../outside.npz", "/etc/passwd", "link.npz"])
def test_a_reference_file_outside_the_version_directory_is_never_read(tmp_path: Path, reference: str) -> None:
    root = repo(tmp_path / "repo", f"windows: [10s, 60s]\nprofile: {{reference_file: {reference!r}}}\n")
    np.savez(tmp_path / "outside.npz", pixels=data(np.random.default_rng(1), 1000))  # type: ignore[arg-type]
    (root / "digits" / "1" / "link.npz").symlink_to(tmp_path / "outside.npz")
    obs = MonitoringObserver(root, None, FakeClock(), context_dir=tmp_path / "c")
    stream(obs, FakeClock(), data(np.random.default_rng(7), 5), rate_hz=10)
    report = obs.report("digits")
    assert "reference_file" in report.error and "capturing" in report.profile_source, report
