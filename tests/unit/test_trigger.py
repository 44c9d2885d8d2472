"""Retraining trigger: once per alert episode, min_interval, schedule, accuracy floor, real command."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import yaml

from swapserve.monitoring.drift_observer import MonitoringObserver
from swapserve.monitoring.monitor_config import TriggerConfig
from swapserve.monitoring.trigger import RetrainingTrigger
from swapserve.types import InferRequest, ModelSpec, TensorSpec
from tests.fakes import FakeClock


def trigger(tmp_path: Path, clock: FakeClock, **kw: object) -> RetrainingTrigger:
    cfg = TriggerConfig(**{"command": (sys.executable, "-c", "pass"), "min_interval_s": 60.0, **kw})  # type: ignore[arg-type]
    (tmp_path / "digits" / "1").mkdir(parents=True, exist_ok=True)
    return RetrainingTrigger("digits", cfg, tmp_path, tmp_path / "ctx", clock)


def test_fires_once_per_alert_episode_and_respects_min_interval(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    trig = trigger(tmp_path, clock)
    fired = []
    # episode 1: alert on for 100 ticks -> one firing
    for _ in range(100):
        clock.t += 1
        fired.append(trig.evaluate(clock.t, 1, drift_alert=True))
    assert [r.episode for r in fired if r] == [1]
    # off, then episode 2 starts 100 s after the first firing (beyond min_interval): fires
    clock.t += 1
    assert trig.evaluate(clock.t, 1, drift_alert=False) is None
    clock.t += 1
    rec = trig.evaluate(clock.t, 1, drift_alert=True)
    assert rec is not None and rec.episode == 2 and rec.reason == "drift"
    # flapping: off/on every second -> new episodes, but min_interval holds them back
    got = []
    for i in range(120):
        clock.t += 1
        got.append(trig.evaluate(clock.t, 1, drift_alert=i % 2 == 0))
    times = [r.fired_at for r in got if r]
    assert 1 <= len(times) <= 2  # at most one per 60 s over 120 s of flapping, never a storm
    trig.join()


def test_episode_delayed_by_min_interval_fires_once_when_allowed(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    trig = trigger(tmp_path, clock, schedule_s=None)
    assert trig.evaluate(0.0, 1, drift_alert=True) is not None
    assert trig.evaluate(1.0, 1, drift_alert=False) is None
    results = [trig.evaluate(float(t), 1, drift_alert=True) for t in range(2, 200)]
    fired = [r for r in results if r]
    assert len(fired) == 1 and fired[0].episode == 2
    trig.join()


def test_accuracy_floor_and_schedule(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    trig = trigger(tmp_path, clock, accuracy_floor=0.9, min_labelled=50, schedule_s=1000.0, min_interval_s=10.0)
    assert trig.evaluate(0.0, 2, accuracy=0.5, labelled=10) is None  # too few labels
    rec = trig.evaluate(1.0, 2, accuracy=0.85, labelled=200)
    assert rec is not None and rec.reason == "accuracy" and "0.8500 < floor 0.9" in rec.detail
    assert all(trig.evaluate(float(t), 2, accuracy=0.85, labelled=200) is None for t in range(2, 999))
    rec = trig.evaluate(1000.0, 2, accuracy=0.95, labelled=200)
    assert rec is not None and rec.reason == "schedule"
    trig.join()


def test_runs_a_real_command_with_context(tmp_path: Path) -> None:
    out = tmp_path / "ran.json"
    code = ("import json, os, sys; ctx = json.load(open(sys.argv[1])); "
            f"json.dump({{'env': os.environ['SWAPSERVE_RETRAIN_CONTEXT'], 'ctx': ctx}}, open({str(out)!r}, 'w'))")
    clock = FakeClock(0.0)
    trig = trigger(tmp_path, clock, command=(sys.executable, "-c", code, "{context}"))
    rec = trig.evaluate(5.0, 1, drift_alert=True, drift_report={"state": "alert"})
    assert rec is not None and rec.status == "started" and rec.pid > 0 and rec.action == "command"
    done = trig.join(60)
    assert [(r.status, r.exit_code) for r in done] == [("succeeded", 0)]
    got = json.loads(out.read_text())
    assert got["env"] == rec.context_path
    ctx = got["ctx"]
    assert (ctx["model"], ctx["version"], ctx["reason"], ctx["next_version"]) == ("digits", 1, "drift", 2)
    assert ctx["drift_report"] == {"state": "alert"}


def test_failing_command_is_reported_and_no_overlap(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    trig = trigger(tmp_path, clock, command=(sys.executable, "-c", "import time; time.sleep(0.5); raise SystemExit(3)"),
                   min_interval_s=0.0)
    first = trig.evaluate(0.0, 1, drift_alert=True)
    trig.evaluate(1.0, 1, drift_alert=False)
    second = trig.evaluate(2.0, 1, drift_alert=True)  # new episode while the first still runs
    assert first is not None and second is not None and second.status == "skipped"
    done = trig.join(60)
    assert [(r.status, r.exit_code) for r in done] == [("failed", 3)]


def test_observer_tick_fires_trigger_on_drift(tmp_path: Path) -> None:
    spec = ModelSpec("digits", "pytorch_libtorch", 64, (TensorSpec("pixels", "FP32", (64,)),),
                     (TensorSpec("probabilities", "FP32", (10,)),))
    vdir = tmp_path / "digits" / "1"
    vdir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(vdir / "reference.npz", pixels=rng.random((500, 64), dtype=np.float32))
    marker = tmp_path / "fired"
    cfg = {"windows": ["10s"], "trigger": {"command": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                                           "min_interval": "1m"}}
    (tmp_path / "digits" / "monitoring.yaml").write_text(yaml.safe_dump(cfg))
    clock = FakeClock(0.0)
    obs = MonitoringObserver(tmp_path, None, clock, context_dir=tmp_path / "ctx")
    kinds: list[str] = []
    for step in range(60):  # 60 s of strongly shifted traffic, ticking every second
        for _ in range(30):
            x = np.clip(rng.random((1, 64), dtype=np.float32) + 0.4, 0, 1)
            req = InferRequest("digits", id="x")
            obs.on_request(req, spec, 1, [x])
            obs.on_response(req, spec, 1, [x], {"probabilities": np.full((1, 10), 0.1, np.float32)}, 0.0)
            clock.t += 1 / 30
        kinds += [e.kind for e in obs.tick()]
    assert kinds.count("drift_alert") == 1 and kinds.count("retrain_triggered") == 1
    kinds += [e.kind for e in obs.join_triggers(60)]  # the command may have finished during the ticks
    assert kinds.count("retrain_finished") == 1
    assert marker.exists()
