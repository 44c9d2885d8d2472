"""Rollouts under faults, against real server processes (issue 14, fault tolerance).

* The registry made unavailable (SQLite locked by another process's exclusive transaction;
  PostgreSQL stopped) while a failing canary runs: traffic leaves the challenger within 1 s of the
  deciding label, the server keeps serving, the operator sees the pending write (CLI, metrics),
  and the registry converges once it is back. The rollback's webhook arrives signed, after a retry.
* SIGKILL at each named step of a stage change and of a rollback: after a restart the registry
  and the live routing agree, and a rejected challenger gets no traffic.
* A restart during the watch with a worse challenger: not promoted.

The server runs as a subprocess; this process uses swapserve's own protos (never tritonclient).
"""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from swapserve._proto import feedback_pb2 as fpb
from swapserve._proto import grpc_service_pb2 as pb
from swapserve.bench.simulator import INFER, REPORT, build_oracle_model
from swapserve.cli.client import ControlClient
from swapserve.registry import Registry
from tests.e2e.serverproc import ROOT, SWAPSERVE, ServerProcess, wait_until
from tests.pg import PostgresServer, find_pg_bindir

MODEL = "oracle"
#: A canary that only a failed gate ends; half the keys, so both arms gather labels fast.
FAILING_CANARY = """
stages:
  - {name: canary, traffic: 50, min_duration: 1h, min_samples: 1000000}
  - {name: full, traffic: 100}
"""
SECRET = "test-webhook-secret"


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    build_oracle_model(path, MODEL, {
        1: [0.1] * 5,   # champion: 90% right on every slice
        2: [0.9] * 5,   # 10% right: a canary that must not stay live
        3: [0.1] * 5,   # the champion's twin (A/A)
    })
    return path


class Traffic:
    """Unpinned requests with random routing keys, and their true labels on demand."""

    def __init__(self, url: str, seed: int = 0) -> None:
        self.channel = grpc.insecure_channel(url)
        self._infer = self.channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        self._report = self.channel.unary_unary(REPORT, request_serializer=fpb.ReportRequest.SerializeToString,
                                                response_deserializer=fpb.ReportResponse.FromString)
        self.rng = random.Random(seed)
        self.n = 0

    def send(self, count: int) -> list[tuple[str, str, int]]:
        """``count`` requests; returns (request id, version that answered, true label) for each."""
        out = []
        for _ in range(count):
            self.n += 1
            label, s = self.rng.randrange(10), self.rng.randrange(5)
            req = pb.ModelInferRequest(model_name=MODEL, id=f"t-{self.n}-{self.rng.getrandbits(32)}")
            req.inputs.add(name="features", datatype="FP32", shape=[1, 3])
            req.raw_input_contents.append(np.array([[label, s, self.rng.random()]], np.float32).tobytes())
            req.parameters["slice"].string_param = "abcde"[s]
            req.parameters["routing_key"].int64_param = self.rng.getrandbits(62)
            resp = pb.ModelInferResponse.FromString(self._infer(req.SerializeToString(), timeout=30))
            out.append((resp.id, resp.model_version, label))
        return out

    def label(self, answered: list[tuple[str, str, int]]) -> None:
        if answered:
            self._report(fpb.ReportRequest(model=MODEL, outcomes=[fpb.Outcome(id=i, label=lab)
                                                                  for i, _, lab in answered]), timeout=30)

    def close(self) -> None:
        self.channel.close()


def cli(url: str, *argv: str) -> Any:
    proc = subprocess.run([*SWAPSERVE, *argv, "--json", "--url", url], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def metric(srv: ServerProcess, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def routed(c: ControlClient) -> dict[str, float]:
    return c.status(MODEL)["traffic"]  # type: ignore[no-any-return]


def fail_the_canary(c: ControlClient, t: Traffic, *, batch: int = 40, gap_s: float = 1.5) -> float:
    """Send labelled batches one at a time until routing leaves the challenger; returns how long
    after the deciding batch's labels that was seen. Each batch gets ``gap_s`` to decide, so the
    batch after which the switch shows is the deciding one."""
    for _ in range(30):
        answered = t.send(batch)
        sent = time.monotonic()
        t.label(answered)
        while time.monotonic() - sent < gap_s:
            if routed(c) == {"1": 100.0}:
                return time.monotonic() - sent
            time.sleep(0.02)
    raise AssertionError(f"the canary was never rolled back: {c.rollout(MODEL)}")


class Hooks(http.server.ThreadingHTTPServer):
    """A webhook receiver: answers 500 to the first delivery, then 200; keeps what it verified."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.attempts = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                ts = self.headers["X-Swapserve-Timestamp"]
                want = "sha256=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(want, self.headers["X-Swapserve-Signature"]) and \
                    abs(time.time() - int(ts)) < 300
                if receiver.attempts > 1 and ok:
                    receiver.got.append({"body": json.loads(body), "delivery": self.headers["X-Swapserve-Delivery"]})
                self.send_response(200 if receiver.attempts > 1 and ok else 500)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class SqliteLock:
    """Another process holding an exclusive transaction on the registry file (writers time out)."""

    def __init__(self, db: Path) -> None:
        code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
                "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(db)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def registry_state(url: str) -> tuple[str, dict[int, int]]:
    with Registry(url) as reg:
        r = reg.rollouts(MODEL, 1)[0]
        d = reg.current_deployment(MODEL)
        assert d is not None
        return r.state, {t.version: t.weight_bp for t in d.traffic}


# -- the registry unavailable during a failing canary ------------------------------------------------


def test_a_failing_canary_leaves_while_sqlite_is_locked_and_the_registry_converges(
        repo: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    hooks = Hooks()
    env = {"SWAPSERVE_HOME": str(home), "SWAPSERVE_REGISTRY_TIMEOUT_S": "1", "SWAPSERVE_WEBHOOK_SECRET": SECRET}
    with ServerProcess(repo, env=env) as srv, ControlClient(srv.control_url) as c:
        t = Traffic(srv.url, seed=1)
        try:
            c.promote(MODEL, 1, reason="baseline")
            c.start_rollout(MODEL, 2, plan=FAILING_CANARY + f"webhook: {hooks.url}\n", reason="bad canary")
            lock = SqliteLock(home / "registry.db")
            try:
                after = fail_the_canary(c, t)
                assert after < 1.0, f"traffic left the challenger {after:.2f}s after the deciding labels"
                served = {v for _, v, _ in t.send(100)}
                assert served == {"1"}  # the server keeps serving, the rejected challenger gets nothing
                doc = cli(srv.control_url, "status", MODEL)
                assert any("registry write pending" in w for w in doc["warnings"]), doc["warnings"]
                assert cli(srv.control_url, "rollout", "status", MODEL)["rollout"]["state"] == "rolled_back"
                assert metric(srv, "swapserve_registry_pending_writes") == 1
                # The webhook does not wait on the registry either: signed, retried once.
                wait_until(lambda: hooks.got, timeout=15)
            finally:
                lock.release()
            wait_until(lambda: metric(srv, "swapserve_registry_pending_writes") == 0, timeout=20)
            state, traffic = registry_state(f"sqlite:///{home / 'registry.db'}")
            assert state == "rolled_back" and traffic == {1: 10_000}
            r = c.rollout(MODEL)["rollout"]
            assert r["evidence"]["rollback"]["label_to_publish_ms"] < 1000
        finally:
            t.close()
            hooks.shutdown()
    (hook,) = hooks.got
    assert hooks.attempts == 2 and hook["body"]["event"] == "rollback" and hook["body"]["challenger"] == 2


def test_a_failing_canary_leaves_while_postgresql_is_down_and_the_registry_converges(
        repo: Path, tmp_path: Path) -> None:
    bindir = find_pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found; run scripts/ensure-postgres.sh")
    pg = PostgresServer(bindir)
    pg.start()
    try:
        url = pg.create_database("failsafe")
        env = {"SWAPSERVE_HOME": str(tmp_path / "home"), "SWAPSERVE_REGISTRY_TIMEOUT_S": "1"}
        with ServerProcess(repo, "--registry", url, env=env) as srv, ControlClient(srv.control_url) as c:
            t = Traffic(srv.url, seed=2)
            try:
                c.promote(MODEL, 1, reason="baseline")
                c.start_rollout(MODEL, 2, plan=FAILING_CANARY, reason="bad canary")
                pg.stop()
                after = fail_the_canary(c, t)
                assert after < 1.0, f"traffic left the challenger {after:.2f}s after the deciding labels"
                assert {v for _, v, _ in t.send(100)} == {"1"}
                assert metric(srv, "swapserve_registry_pending_writes") == 1
                assert any("registry" in w for w in c.status(MODEL)["warnings"])
                pg.resume()
                wait_until(lambda: metric(srv, "swapserve_registry_pending_writes") == 0, timeout=30)
                assert registry_state(url) == ("rolled_back", {1: 10_000})
                assert {v for _, v, _ in t.send(50)} == {"1"}
            finally:
                t.close()
    finally:
        pg.cleanup()


# -- SIGKILL at each step ----------------------------------------------------------------------------


def killed(srv: ServerProcess, t: Traffic, *, labels: bool, timeout: float = 30) -> None:
    """Drive labelled (or unlabelled) traffic until the server kills itself at its crash point."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert srv.proc is not None
        if srv.proc.poll() is not None:
            assert srv.proc.returncode == -9, srv.log()[-3000:]
            return
        try:
            answered = t.send(20)
            if labels:
                t.label(answered)
        except grpc.RpcError:
            pass  # the server died under us
        time.sleep(0.05)
    raise AssertionError("the server never reached its crash point:\n" + srv.log()[-3000:])


@pytest.mark.parametrize("point", ["rollback.after_journal", "rollback.after_publish", "rollback.after_commit"])
def test_sigkill_during_a_rollback_leaves_it_rolled_back(repo: Path, tmp_path: Path, point: str) -> None:
    env = {"SWAPSERVE_HOME": str(tmp_path / "home")}
    srv = ServerProcess(repo, env={**env, "SWAPSERVE_TEST_CRASH_AT": point}).start()
    try:
        with ControlClient(srv.control_url) as c:
            c.promote(MODEL, 1, reason="baseline")
            c.start_rollout(MODEL, 2, plan=FAILING_CANARY, reason="bad canary")
        t = Traffic(srv.url, seed=3)
        killed(srv, t, labels=True)
        t.close()
    finally:
        srv.stop()
    with ServerProcess(repo, env=env) as again, ControlClient(again.control_url) as c:
        assert routed(c) == {"1": 100.0}
        assert c.rollout(MODEL)["rollout"]["state"] == "rolled_back"
        assert registry_state(f"sqlite:///{tmp_path / 'home' / 'registry.db'}") == ("rolled_back", {1: 10_000})
        t = Traffic(again.url, seed=4)
        try:
            assert {v for _, v, _ in t.send(100)} == {"1"}
        finally:
            t.close()


#: canary -> full on time alone (no labels needed), then a long watch.
ADVANCING = """
stages:
  - {name: canary, traffic: 10, min_duration: 1s}
  - {name: full, traffic: 100, min_duration: 1h}
"""


@pytest.mark.parametrize("point", ["stage.before_commit@2", "stage.after_commit@2", "stage.after_publish@2"])
def test_sigkill_during_a_stage_change_leaves_a_stage_that_happened_or_did_not(
        repo: Path, tmp_path: Path, point: str) -> None:
    env = {"SWAPSERVE_HOME": str(tmp_path / "home")}
    srv = ServerProcess(repo, env={**env, "SWAPSERVE_TEST_CRASH_AT": point}).start()
    try:
        with ControlClient(srv.control_url) as c:
            c.promote(MODEL, 1, reason="baseline")
            c.start_rollout(MODEL, 3, plan=ADVANCING, reason="A/A")
        t = Traffic(srv.url, seed=5)
        killed(srv, t, labels=False)
        t.close()
    finally:
        srv.stop()
    with Registry(f"sqlite:///{tmp_path / 'home' / 'registry.db'}") as reg:
        recorded = reg.rollouts(MODEL, 1)[0]
        deployment = reg.current_deployment(MODEL)
        assert deployment is not None
    stages = {0: {1: 9000, 3: 1000}, 1: {3: 10_000}}
    # The rollout's stage and the routing were recorded together: both moved or neither did.
    assert recorded.state == "running"
    assert {t.version: t.weight_bp for t in deployment.traffic} == stages[recorded.stage_index]
    assert recorded.stage_index == (0 if point.startswith("stage.before_commit") else 1)
    with ServerProcess(repo, env=env) as again, ControlClient(again.control_url) as c:
        r = c.rollout(MODEL)["rollout"]  # (it may have taken the stage again since)
        assert r["state"] == "running"
        assert {int(v): round(p * 100) for v, p in routed(c).items()} == stages[r["stage_index"]]


# -- restart during the watch ------------------------------------------------------------------------


WATCHED = """
stages:
  - {name: canary, traffic: 10, min_duration: 2s}
  - {name: full, traffic: 100, min_duration: 1s}
watch: 1h
"""


def test_a_restart_during_the_watch_does_not_promote_a_worse_challenger(repo: Path, tmp_path: Path) -> None:
    env = {"SWAPSERVE_HOME": str(tmp_path / "home")}
    with ServerProcess(repo, env=env) as srv, ControlClient(srv.control_url) as c:
        c.promote(MODEL, 1, reason="baseline")
        c.start_rollout(MODEL, 2, plan=WATCHED, reason="worse, but its labels come late")
        t = Traffic(srv.url, seed=6)
        try:
            # Labels for the champion only: the canary has no evidence against it and advances.
            def watching() -> bool:
                t.label([a for a in t.send(20) if a[1] == "1"])
                r = c.rollout(MODEL)["rollout"]
                return bool(r and r["evidence"].get("phase") == "watch")

            wait_until(watching, timeout=25)
            time.sleep(2.5)  # > one evidence flush
        finally:
            t.close()
        srv.signal(9)
        srv.wait(10)
    with ServerProcess(repo, env=env) as again, ControlClient(again.control_url) as c:
        r = c.rollout(MODEL)["rollout"]
        assert r["evidence"]["phase"] == "watch" and "watch_restarted_at" in r["evidence"]
        t = Traffic(again.url, seed=7)
        try:
            def decided() -> str:
                t.label(t.send(20))  # now the challenger's (wrong) answers are labelled
                state = c.rollout(MODEL)["rollout"]["state"]
                return state if state != "running" else ""

            # The champion's baseline came back from the flushed counts: the watch fails the challenger.
            assert wait_until(decided, timeout=20) == "rolled_back"
        finally:
            t.close()
        assert routed(c) == {"1": 100.0}
