"""Rollouts against a real server, driven by the traffic-and-label simulator (issue #6's evidence).

The server runs as a subprocess (the simulator's 500 requests/s need the CPU to themselves);
this process uses swapserve's own protos and control client, never tritonclient.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from swapserve.bench.simulator import Simulator, build_oracle_model
from swapserve.cli.client import ControlClient, ControlError
from tests.e2e.serverproc import ServerProcess

FAST_PLAN = """
stages:
  - {name: canary, traffic: 10, min_duration: 3s, min_samples: 100}
  - {name: half, traffic: 50, min_duration: 3s, min_samples: 100}
  - {name: full, traffic: 100, min_duration: 2s}
watch: 3s
"""

SLOW_CANARY = """
stages:
  - {name: canary, traffic: 10, min_duration: 1h, min_samples: 1000000}
  - {name: full, traffic: 100}
"""


def wait_state(c: ControlClient, model: str, states: set[str], timeout: float) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.rollout(model)["rollout"]
        if r and r["state"] in states and r["evidence"].get("phase") != "watch":
            return r  # type: ignore[no-any-return]
        time.sleep(0.25)
    raise AssertionError(f"rollout did not reach {states} in {timeout}s: {c.rollout(model)['rollout']}")


@pytest.fixture()
def oracle(tmp_path: Path):  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    build_oracle_model(repo, "oracle", {
        1: [0.1] * 5,                       # champion: 90% on every slice
        2: [0.1, 0.1, 0.2, 0.1, 0.1],      # 10 points worse on slice "c" only
        3: [0.1] * 5,                       # identical to the champion (A/A)
        4: [0.05] * 5,                      # better everywhere
    })
    with ServerProcess(repo) as srv, ControlClient(srv.control_url) as c:
        c.promote("oracle", 1, reason="baseline")
        yield srv, c


def test_worse_challenger_on_one_slice_is_rolled_back(oracle) -> None:  # type: ignore[no-untyped-def]
    srv, c = oracle
    sim = Simulator(srv.url, "oracle", rate=500, seed=1).start()
    try:
        time.sleep(2)
        t0 = time.monotonic()
        c.start_rollout("oracle", 2, plan=SLOW_CANARY, reason="worse on slice c")
        r = wait_state(c, "oracle", {"rolled_back", "promoted"}, timeout=90)
        elapsed = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        stats = sim.stop()
    assert r["state"] == "rolled_back"
    rb = r["evidence"]["rollback"]
    assert rb["slice"] == "c" and rb["gate"] == "accuracy"
    assert elapsed <= 60, elapsed
    assert rb["label_to_publish_ms"] is not None and rb["label_to_publish_ms"] < 1000
    status = c.status("oracle")
    assert status["traffic"] == {"1": 100.0} and status["champion"] == 1
    assert stats.errors == {} and stats.ok == stats.sent
    assert stats.by_version["2"] > 0  # the canary really served
    events = [e for e in c.events("oracle", limit=1000) if e["kind"] == "rollout"]
    assert any("rolled back" in e["message"] for e in events)
    audit = c.audit_log("oracle")
    assert any(a["action"] == "rollout" and "automatic rollback" in a["reason"] for a in audit)


def test_identical_challenger_is_promoted(oracle) -> None:  # type: ignore[no-untyped-def]
    srv, c = oracle
    sim = Simulator(srv.url, "oracle", rate=300, seed=2).start()
    try:
        c.start_rollout("oracle", 3, plan=FAST_PLAN, reason="A/A")
        r = wait_state(c, "oracle", {"rolled_back", "promoted"}, timeout=90)
    finally:
        stats = sim.stop()
    assert r["state"] == "promoted", r["evidence"].get("rollback")
    assert c.status("oracle")["champion"] == 3
    assert stats.errors == {}


def test_better_challenger_goes_through_every_stage(oracle) -> None:  # type: ignore[no-untyped-def]
    srv, c = oracle
    sim = Simulator(srv.url, "oracle", rate=300, seed=3).start()
    try:
        started = c.start_rollout("oracle", 4, plan=FAST_PLAN, reason="better")
        assert started["model"]["traffic"] == {"1": 90.0, "4": 10.0}
        r = wait_state(c, "oracle", {"rolled_back", "promoted"}, timeout=90)
    finally:
        stats = sim.stop()
    assert r["state"] == "promoted"
    stages = [h["stage"] for h in r["evidence"]["history"] if h["event"] == "stage"]
    assert stages == ["canary", "half", "full"]
    assert any(h["event"] == "watch" for h in r["evidence"]["history"])
    status = c.status("oracle")
    assert status["champion"] == 4 and status["previous_champions"][-1] == 1
    assert stats.errors == {}
    # A second rollout can start now; a conflicting manual change during one is refused.
    c.start_rollout("oracle", 1, plan=SLOW_CANARY, reason="try the old one again")
    with pytest.raises(ControlError) as err:
        c.promote("oracle", 1)
    assert err.value.code == "FAILED_PRECONDITION" and "rollout" in err.value.message
    done = c.rollout_action("oracle", "abort", reason="enough")
    assert done["rollout"]["state"] == "aborted" and done["model"]["traffic"] == {"4": 100.0}


def test_shadow_stage_gathers_labels_then_canary(oracle) -> None:  # type: ignore[no-untyped-def]
    srv, c = oracle
    plan = """
stages:
  - {name: shadow, traffic: 0, shadow: true, min_duration: 2s, min_samples: 100}
  - {name: full, traffic: 100, min_duration: 1s}
watch: 1s
"""
    sim = Simulator(srv.url, "oracle", rate=200, seed=4).start()
    try:
        started = c.start_rollout("oracle", 4, plan=plan, reason="shadow first")
        assert started["model"]["shadows"] == [4] and started["model"]["traffic"] == {"1": 100.0}
        time.sleep(1.5)
        assert sim.stats.by_version["4"] == 0  # never answered by the shadow while it shadows
        r = wait_state(c, "oracle", {"rolled_back", "promoted"}, timeout=60)
    finally:
        sim.stop()
    assert r["state"] == "promoted"
    live = c.status("oracle")["live"]
    assert live["4"]["overall"]["labelled"] >= 100  # labels scored the shadow's answers


def test_cohort_blue_green_and_ab(oracle) -> None:  # type: ignore[no-untyped-def]
    srv, c = oracle
    cohort = """
stages:
  - {name: cohort, traffic: 0, cohorts: [{attribute: slice, value: a}], min_duration: 1h}
  - {name: full, traffic: 100}
"""
    sim = Simulator(srv.url, "oracle", rate=200, seed=5).start()
    try:
        doc = c.start_rollout("oracle", 4, plan=cohort, reason="slice a first")
        assert doc["model"]["cohorts"] == [{"attribute": "slice", "value": "a", "version": 4}]
        time.sleep(2)
        before = dict(sim.stats.by_version)
        time.sleep(2)
        served_by_4 = sim.stats.by_version["4"] - before.get("4", 0)
        total = sum(sim.stats.by_version.values()) - sum(before.values())
        assert 0.1 < served_by_4 / total < 0.3  # one slice of five, sticky to the challenger
        c.rollout_action("oracle", "abort", reason="next")

        bg = """
stages:
  - {name: green, traffic: 100, min_duration: 2s}
watch: 2s
"""
        doc = c.start_rollout("oracle", 3, plan=bg, reason="blue-green")
        assert doc["model"]["traffic"] == {"3": 100.0} and doc["model"]["previous_champions"][-1] == 1
        blue = next(v for v in doc["model"]["versions"] if v["version"] == 1)
        assert blue["resident"]  # blue stays warm for the instant switch-back
        r = wait_state(c, "oracle", {"promoted", "rolled_back"}, timeout=60)
        assert r["state"] == "promoted"

        ab = c.start_rollout("oracle", 4, plan="strategy: ab\nsplit: 50\nduration: 3s\n", reason="A/B")
        assert ab["model"]["traffic"] == {"3": 50.0, "4": 50.0}
        r = wait_state(c, "oracle", {"completed", "rolled_back"}, timeout=60)
    finally:
        sim.stop()
    assert r["state"] == "completed"
    report = r["evidence"]["report"]
    assert report["champion"]["version"] == 3 and report["challenger"]["version"] == 4
    assert report["challenger"]["slices"]["overall"]["labelled"] > 0
    assert c.status("oracle")["traffic"] == {"3": 100.0}  # the experiment ended on the champion


def test_restart_resumes_rollout_and_webhook_fires_on_rollback(tmp_path: Path) -> None:
    import http.server
    import json
    import signal
    import threading

    hits: list[dict] = []  # type: ignore[type-arg]

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            hits.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    repo = tmp_path / "repo"
    build_oracle_model(repo, "oracle", {1: [0.1] * 5, 2: [0.1, 0.1, 0.3, 0.1, 0.1]})
    env = {"SWAPSERVE_HOME": str(tmp_path / "home")}
    plan = SLOW_CANARY + f"webhook: http://127.0.0.1:{hook.server_port}/rollback\n"
    try:
        srv = ServerProcess(repo, env=env).start()
        try:
            with ControlClient(srv.control_url) as c:
                c.promote("oracle", 1)
                c.start_rollout("oracle", 2, plan=plan, reason="will crash mid-rollout")
                before = c.rollout("oracle")
            srv.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            srv.wait(30)
        finally:
            srv.stop()
        with ServerProcess(repo, env=env) as again, ControlClient(again.control_url) as c:
            after = c.rollout("oracle")
            assert after["rollout"]["id"] == before["rollout"]["id"]
            assert after["rollout"]["state"] == "running" and after["rollout"]["stage_index"] == 0
            assert after["model"]["traffic"] == {"1": 90.0, "2": 10.0}  # the stage's split is back in force
            sim = Simulator(again.url, "oracle", rate=400, seed=6).start()
            try:
                r = wait_state(c, "oracle", {"rolled_back"}, timeout=90)
            finally:
                sim.stop()
            assert r["evidence"]["rollback"]["slice"] == "c"
            deadline = time.monotonic() + 10
            while not hits and time.monotonic() < deadline:
                time.sleep(0.1)
            assert hits and hits[0]["event"] == "rollback" and hits[0]["challenger"] == 2
    finally:
        hook.shutdown()


def test_offline_gate_refuses_a_worse_challenger_unless_forced(tmp_path: Path) -> None:
    import json
    import shutil
    import subprocess
    import sys

    from tests.e2e.serverproc import ROOT

    src = ROOT / "model_repository"
    repo = tmp_path / "repo"
    shutil.copytree(src / "digits", repo / "digits")
    plan = tmp_path / "plan.yaml"
    plan.write_text(SLOW_CANARY + "require_offline_eval: true\n")
    with ServerProcess(repo) as srv, ControlClient(srv.control_url) as c:
        c.promote("digits", 2)
        with pytest.raises(ControlError) as err:
            c.start_rollout("digits", 1, plan=plan.read_text())
        assert err.value.code == "FAILED_PRECONDITION" and "no offline evaluation" in err.value.message
        out = subprocess.run(
            [sys.executable, "-m", "swapserve.cli", "evaluate", "digits", "1", "--data",
             str(repo / "digits" / "holdout.npz"), "--url", srv.control_url, "--infer-url", srv.url,
             "--load-seconds", "1", "--rate", "50", "--json"],
            capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        v1, v2 = doc["metrics"]["challenger"], doc["metrics"]["champion"]
        assert v1["overall"]["accuracy"] < v2["overall"]["accuracy"] - 0.05
        assert set(v1) >= {"round", "straight", "curved", "overall"} and v1["overall"]["p99_ms"] > 0
        with pytest.raises(ControlError) as err:
            c.start_rollout("digits", 1, plan=plan.read_text())
        assert err.value.code == "FAILED_PRECONDITION" and "offline gate" in err.value.message
        forced = c.start_rollout("digits", 1, plan=plan.read_text(), force=True, reason="know better")
        assert forced["rollout"]["state"] == "running"
        assert "forced past the offline gate" in forced["rollout"]["evidence"]["start_reason"]
        assert any(a["action"] == "rollout.start" and "forced" in a["reason"] for a in c.audit_log("digits"))
