"""Retraining trigger: once per alert episode, min_interval, schedule, accuracy floor, real command;
an allowlisted environment, a timeout that kills the process group, a floor on min_interval."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from swapserve.monitoring.drift_observer import MonitoringObserver
from swapserve.errors import ConfigError
from swapserve.monitoring.monitor_config import (DEFAULT_PASS_ENV, MIN_INTERVAL_FLOOR_ENV, TriggerConfig,
                                                 parse_monitoring)
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


# -- locked down: environment, timeout, min_interval floor ---------------------------------------

SECRETS = {"SWAPSERVE_TOKEN": "control-secret", "SWAPSERVE_CONTROL_TOKEN": "control-secret-2",
           "SWAPSERVE_FEEDBACK_TOKEN": "feedback-secret", "SWAPSERVE_WEBHOOK_SECRET": "hook-secret",
           "SWAPSERVE_REGISTRY": "postgresql+psycopg://swap:registry-password@db/swapserve",
           "AWS_SECRET_ACCESS_KEY": "aws-secret"}
DUMP_ENV = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"


def test_command_sees_an_allowlisted_environment_and_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {**SECRETS, "LC_ALL": "C.UTF-8", "MLFLOW_TRACKING_URI": "http://mlflow", "PASSED_ON": "yes",
                 "UNLISTED": "no"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "env.json"
    trig = trigger(tmp_path, FakeClock(0.0), command=(sys.executable, "-c", DUMP_ENV, str(out)),
                   pass_env=("PASSED_ON", "MLFLOW_*", "SWAPSERVE_WEBHOOK_SECRET"), env={"RETRAIN_EPOCHS": "5"})
    rec = trig.evaluate(0.0, 1, drift_alert=True)
    assert rec is not None and rec.status == "started"
    assert [r.status for r in trig.join(60)] == ["succeeded"]
    env = json.loads(out.read_text())
    # named explicitly: passed, the secret included; everything else of the server's stays behind
    assert env["SWAPSERVE_WEBHOOK_SECRET"] == "hook-secret"
    leaked = {k for k, v in env.items() if k != "SWAPSERVE_WEBHOOK_SECRET" and
              any(s in v for s in SECRETS.values() if s != "hook-secret")}
    assert not leaked and not (set(SECRETS) - {"SWAPSERVE_WEBHOOK_SECRET"}) & set(env)
    assert "UNLISTED" not in env
    assert (env["PASSED_ON"], env["MLFLOW_TRACKING_URI"], env["RETRAIN_EPOCHS"], env["LC_ALL"]) == \
        ("yes", "http://mlflow", "5", "C.UTF-8")
    assert env["PATH"] == os.environ["PATH"]
    assert (env["SWAPSERVE_MODEL"], env["SWAPSERVE_MODEL_VERSION"], env["SWAPSERVE_NEXT_VERSION"]) == ("digits", "1", "2")
    assert env["SWAPSERVE_RETRAIN_CONTEXT"] == rec.context_path
    assert env["SWAPSERVE_MODEL_REPOSITORY"] == str(tmp_path)
    allowed = set(DEFAULT_PASS_ENV) | {"PASSED_ON", "MLFLOW_TRACKING_URI", "RETRAIN_EPOCHS", "SWAPSERVE_WEBHOOK_SECRET",
                                      "SWAPSERVE_MODEL", "SWAPSERVE_MODEL_VERSION", "SWAPSERVE_NEXT_VERSION",
                                      "SWAPSERVE_RETRAIN_CONTEXT", "SWAPSERVE_MODEL_REPOSITORY"}
    # LC_CTYPE may be set by the interpreter itself (PEP 538 coercion); it matches LC_* anyway
    assert {k for k in env if not k.startswith("LC_")} <= allowed


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


SPAWN_AND_HANG = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the job ignores SIGTERM: SIGKILL must follow
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(child.pid))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(300)
"""


def test_command_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    (tmp_path / "digits" / "1").mkdir(parents=True)
    cfg = TriggerConfig(command=(sys.executable, "-c", SPAWN_AND_HANG, str(pidfile)), timeout_s=1.0, kill_grace_s=0.5)
    trig = RetrainingTrigger("digits", cfg, tmp_path, tmp_path / "ctx", clock=time.monotonic)
    started = time.monotonic()
    rec = trig.evaluate(0.0, 1, drift_alert=True)
    assert rec is not None and rec.status == "started"
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    child = int(pidfile.read_text())
    assert not _gone(child)
    done = trig.join(60)
    assert time.monotonic() - started < 30
    assert len(done) == 1 and done[0].status == "failed" and done[0].timed_out
    assert done[0].exit_code == -signal.SIGKILL and "timed out after 1s" in done[0].detail and "SIGKILL" in done[0].detail
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), f"child {child} of the timed-out job is still running"
    # the next firing is not blocked by the killed job
    assert trig.evaluate(10_000.0, 1, drift_alert=False) is None


def test_a_job_that_exits_on_sigterm_is_not_sigkilled(tmp_path: Path) -> None:
    (tmp_path / "digits" / "1").mkdir(parents=True)
    cfg = TriggerConfig(command=(sys.executable, "-c", "import time; time.sleep(300)"), timeout_s=1.0, kill_grace_s=30.0)
    trig = RetrainingTrigger("digits", cfg, tmp_path, tmp_path / "ctx", clock=time.monotonic)
    assert trig.evaluate(0.0, 1, drift_alert=True) is not None
    done = trig.join(20)
    assert [(r.status, r.timed_out, r.exit_code) for r in done] == [("failed", True, -signal.SIGTERM)]
    assert "SIGKILL" not in done[0].detail


@pytest.mark.parametrize("value", [0, "0s", "59s", 1])
def test_min_interval_below_the_floor_is_refused(value: object) -> None:
    with pytest.raises(ConfigError, match=r"m\.yaml: field 'trigger\.min_interval' must be at least 1m .*got "
                                          rf"{value!r}.*min_interval: 1h"):
        parse_monitoring({"trigger": {"command": ["python", "-c", "pass"], "min_interval": value}}, "m.yaml")


def test_min_interval_floor_and_its_test_escape_hatch(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    assert parse_monitoring({"trigger": {"min_interval": "1m"}}, "m.yaml").trigger.min_interval_s == 60.0
    monkeypatch.setenv(MIN_INTERVAL_FLOOR_ENV, "0")
    with caplog.at_level(logging.WARNING):
        assert parse_monitoring({"trigger": {"min_interval": 0}}, "m.yaml").trigger.min_interval_s == 0.0
    assert "meant for tests only" in caplog.text
    monkeypatch.setenv(MIN_INTERVAL_FLOOR_ENV, "soon")
    with pytest.raises(ConfigError, match=MIN_INTERVAL_FLOOR_ENV):
        parse_monitoring({"trigger": {"min_interval": 0}}, "m.yaml")


def test_trigger_job_keys_are_parsed_and_checked() -> None:
    cfg = parse_monitoring({"trigger": {"timeout": "2h", "kill_grace": "5s", "pass_env": ["A", "B_*"],
                                        "env": {"EPOCHS": 5}}}, "m.yaml").trigger
    assert (cfg.timeout_s, cfg.kill_grace_s, cfg.pass_env, cfg.env) == (7200.0, 5.0, ("A", "B_*"), {"EPOCHS": "5"})
    assert parse_monitoring({}, "m.yaml").trigger.timeout_s == 3600.0
    for bad, match in [({"timeout": "10ms"}, "trigger.timeout' must be at least 1s"),
                       ({"pass_env": "A"}, "trigger.pass_env' must be a list"),
                       ({"pass_env": ["A B"]}, "trigger.pass_env' must be a list"),
                       ({"env": {"1X": "a"}}, "not an environment variable name"),
                       ({"env": {"X": [1]}}, "must be a string or a number")]:
        with pytest.raises(ConfigError, match=match):
            parse_monitoring({"trigger": bad}, "m.yaml")
