"""The operator CLI against a real ``swapserve serve``: every verb in --json, checked in the server's behaviour.

The CLI runs as a subprocess (the installed ``swapserve VERB ... --url HOST:PORT``), the way
operators run it; tritonclient checks what the server then does. This module never imports
swapserve's protos (tritonclient's cannot share a process with them).
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.serverproc import ROOT, SWAPSERVE, ServerProcess, copy_models

CONTROL = re.compile(r"swapserve ready: .*\bcontrol=(?P<host>\S+):(?P<port>\d+)")
TOKEN = "e2e-s3cret"


def control_url(srv: ServerProcess) -> str:
    """The control service's HOST:PORT from the ready line (``... control=127.0.0.1:PORT``)."""
    for line in srv.lines:
        m = CONTROL.search(line)
        if m:
            return f"{m['host']}:{m['port']}"
    raise AssertionError("the ready line names no control address:\n" + srv.log()[-3000:])


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"SWAPSERVE_URL", "SWAPSERVE_TOKEN"}}
    # A self-declared user name must not reach the audit log (it names the authenticated principal).
    env.update(LOGNAME="e2e-operator", USER="e2e-operator", **extra)
    return env


def run_cli(*argv: str, url: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    verb, *rest = argv
    cmd = [*SWAPSERVE, verb, *rest, *(["--url", url] if url else [])]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env or cli_env())


class Cli:
    """The CLI bound to one server; ``json(...)`` runs a verb with --json and returns the parsed document."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.url = control_url(srv)

    def run(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(*argv, url=self.url, env=env)

    def json(self, *argv: str) -> Any:
        proc = self.run(*argv, "--json")
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}\n"
                                 f"{self.srv.log()[-3000:]}")
        return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("swapserve-home")


@pytest.fixture(scope="module")
def srv(example_repo: Path, tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[ServerProcess]:
    repo = copy_models(example_repo, tmp_path_factory.mktemp("repo"), ["simple", "digits"])
    with ServerProcess(repo, "--control-address", "127.0.0.1:0", env={"SWAPSERVE_HOME": str(home)}) as proc:
        yield proc


@pytest.fixture(scope="module")
def ctl(srv: ServerProcess) -> Cli:
    return Cli(srv)


@pytest.fixture()
def triton(srv: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(srv.url)
    yield c
    c.close()


def digits_input(example_repo: Path) -> list[grpcclient.InferInput]:
    x = np.load(example_repo / "digits" / "holdout.npz")["x"][:1].astype(np.float32)
    inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def served_by(triton: grpcclient.InferenceServerClient, inputs: list[grpcclient.InferInput], n: int = 20,
              **params: str) -> set[str]:
    return {triton.infer("digits", inputs, parameters=params or None).get_response().model_version
            for _ in range(n)}


def version(status: dict[str, Any], v: int) -> dict[str, Any]:
    return next(x for x in status["versions"] if x["version"] == v)


# -- reads ----------------------------------------------------------------------------------------


def test_models_and_status(ctl: Cli) -> None:
    models = {m["name"]: m for m in ctl.json("models")}
    assert set(models) >= {"simple", "digits"}
    assert models["digits"]["state"] == "READY" and set(models["digits"]["resident_versions"]) >= {1, 2}
    assert sum(models["digits"]["traffic"].values()) == pytest.approx(100.0)

    status = ctl.json("status", "digits")
    assert status["name"] == "digits" and status["champion"] in (1, 2)
    assert sum(status["traffic"].values()) == pytest.approx(100.0)
    for v in (1, 2):
        assert version(status, v)["resident"] is True
    human = ctl.run("status", "digits")
    assert human.returncode == 0 and "VERSION" in human.stdout and "champion" in human.stdout


# -- changes, each checked in what the server then serves ------------------------------------------


def test_promote_rollback_and_traffic(ctl: Cli, triton: grpcclient.InferenceServerClient, example_repo: Path) -> None:
    inputs = digits_input(example_repo)

    after = ctl.json("promote", "digits", "1", "--reason", "e2e: back to v1")
    assert (after["champion"], after["traffic"]) == (1, {"1": 100.0})
    assert served_by(triton, inputs) == {"1"}

    after = ctl.json("promote", "digits", "2", "--reason", "e2e: v2 is better")
    assert (after["champion"], after["traffic"], after["previous_champions"][-1]) == (2, {"2": 100.0}, 1)
    assert version(after, 1)["resident"] is True  # the previous champion stays resident for rollback
    assert served_by(triton, inputs) == {"2"}

    after = ctl.json("rollback", "digits", "--reason", "e2e: v2 misbehaves")
    assert (after["champion"], after["traffic"]) == (1, {"1": 100.0})
    assert served_by(triton, inputs) == {"1"}

    after = ctl.json("rollback", "digits", "--to", "2")
    assert (after["champion"], after["traffic"]) == (2, {"2": 100.0})
    assert served_by(triton, inputs) == {"2"}

    after = ctl.json("traffic", "digits", "1=50", "2=50", "--key", "user", "--reason", "e2e: half and half")
    assert after["traffic"] == {"1": 50.0, "2": 50.0} and after["key_attribute"] == "user"
    seen = {u: triton.infer("digits", inputs, parameters={"user": u}).get_response().model_version
            for u in (f"user-{i}" for i in range(64))}
    assert set(seen.values()) == {"1", "2"}
    for u in list(seen)[:8]:  # the same key keeps its version
        assert served_by(triton, inputs, n=3, user=u) == {seen[u]}

    after = ctl.json("traffic", "digits", "1=33.33", "2=66.67", "--cohort", "country=de:1")
    assert after["traffic"] == {"1": 33.33, "2": 66.67}
    assert after["cohorts"] == [{"attribute": "country", "value": "de", "version": 1}]
    assert served_by(triton, inputs, n=10, country="de", user="someone") == {"1"}

    after = ctl.json("promote", "digits", "2")
    assert (after["traffic"], after["cohorts"]) == ({"2": 100.0}, [])
    assert served_by(triton, inputs) == {"2"}


def test_register_load_unload(ctl: Cli, srv: ServerProcess, triton: grpcclient.InferenceServerClient,
                              tmp_path: Path) -> None:
    shutil.copytree(srv.repository / "digits" / "2", srv.repository / "digits" / "3")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"overall": {"accuracy": 0.97}, "mobile": {"accuracy": 0.95}}))
    reg = ctl.json("register", "digits", "3", "--training-run", "run-3", "--data-ref", "s3://digits/v3",
                   "--parent", "2", "--metrics", str(metrics), "--reason", "e2e register")
    v3 = version(reg, 3)
    assert (v3["training_run"], v3["data_ref"], v3["parent_version"]) == ("run-3", "s3://digits/v3", 2)
    assert re.fullmatch(r"[0-9a-f]{64}", v3["sha256"]) and v3["resident"] is False

    loaded = ctl.json("load", "digits", "3")
    assert version(loaded, 3)["resident"] is True and version(loaded, 3)["state"] == "ready"
    assert triton.is_model_ready("digits", "3")
    assert version(ctl.json("load", "digits", "3"), 3)["resident"] is True  # idempotent

    unloaded = ctl.json("unload", "digits", "3", "--reason", "e2e done")
    assert version(unloaded, 3)["resident"] is False
    assert not triton.is_model_ready("digits", "3")


def test_events_and_audit(ctl: Cli) -> None:
    before = ctl.json("events", "digits", "--limit", "1000")
    last = max((e["id"] for e in before), default=0)

    follow = subprocess.Popen(
        [*SWAPSERVE, "events", "digits", "--follow", "--json", "--after", str(last),
         "--url", ctl.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env())
    try:
        time.sleep(1.0)  # subscribed before the change
        ctl.json("promote", "digits", "1", "--reason", "e2e: audited promote")
        assert follow.stdout is not None
        ready, _, _ = select.select([follow.stdout], [], [], 30)
        assert ready, "events --follow printed nothing within 30 s of a promote"
        event = json.loads(follow.stdout.readline())  # one JSON object per line
        assert event["id"] > last and event["model"] == "digits" and event["at"]
    finally:
        follow.send_signal(signal.SIGINT)
        rc = follow.wait(30)
    assert rc == 0, follow.stderr.read() if follow.stderr else ""

    newer = ctl.json("events", "digits", "--after", str(last))
    assert newer and all(e["id"] > last for e in newer)
    assert any(e["kind"] for e in newer)

    entries = ctl.json("audit", "digits", "--limit", "50")
    promote = next(e for e in entries if e["reason"] == "e2e: audited promote")
    assert promote["action"] == "promote" and promote["model"] == "digits" and promote["version"] == 1
    assert promote["actor"].startswith("local (loopback, ipv4:127.0.0.1:"), promote["actor"]
    assert "e2e-operator" not in promote["actor"]
    assert re.match(r"\d{4}-\d\d-\d\dT", promote["at"])
    assert len(ctl.json("audit", "digits", "--limit", "1")) == 1
    human = ctl.run("audit", "digits")
    assert human.returncode == 0 and "local (loopback" in human.stdout


# -- failures: exit codes and messages -------------------------------------------------------------


def test_unknown_model_is_not_found(ctl: Cli) -> None:
    proc = ctl.run("status", "no-such-model", "--json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: NOT_FOUND: ") and "no-such-model" in proc.stderr


def test_server_refusals_exit_1_with_the_message(ctl: Cli) -> None:
    proc = ctl.run("promote", "digits", "99")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "99" in proc.stderr
    proc = ctl.run("traffic", "digits", "1=50", "2=50", "--shadow", "99")
    assert proc.returncode == 1 and "99" in proc.stderr


def test_weights_not_summing_to_100_fail_locally(ctl: Cli) -> None:
    generation = ctl.json("status", "digits")["generation"]
    proc = ctl.run("traffic", "digits", "1=95", "2=4")
    assert proc.returncode == 2
    assert "must sum to 100%" in proc.stderr and "99%" in proc.stderr
    assert ctl.json("status", "digits")["generation"] == generation  # nothing reached the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_exits_3() -> None:
    url = f"127.0.0.1:{free_port()}"
    proc = run_cli("status", "digits", "--json", url=url)
    assert proc.returncode == 3 and proc.stdout == ""
    assert f"cannot reach the swapserve control service at {url}" in proc.stderr


def test_bad_usage_exits_2_without_a_server() -> None:
    proc = run_cli("traffic", "digits", "1=33.333", "2=66.667", url=f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and "two decimals" in proc.stderr
    proc = run_cli("traffic", "digits", "1=60", "2=60", url=f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and "sum to 120%" in proc.stderr


# -- authentication --------------------------------------------------------------------------------


def test_token(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    env = {"SWAPSERVE_HOME": str(tmp_path / "home"), "SWAPSERVE_CONTROL_TOKEN": TOKEN}
    with ServerProcess(repo, "--control-address", "127.0.0.1:0", env=env) as server:
        url = control_url(server)
        denied = run_cli("models", "--json", url=url)
        assert denied.returncode == 1 and denied.stderr.startswith("error: UNAUTHENTICATED: ")
        assert "--token" in denied.stderr and "SWAPSERVE_TOKEN" in denied.stderr
        wrong = run_cli("models", "--token", "nope", url=url)
        assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
        ok = run_cli("models", "--json", "--token", TOKEN, url=url)
        assert ok.returncode == 0 and [m["name"] for m in json.loads(ok.stdout)] == ["simple"]
        via_env = run_cli("status", "simple", "--json", url=url, env=cli_env(SWAPSERVE_TOKEN=TOKEN))
        assert via_env.returncode == 0 and json.loads(via_env.stdout)["name"] == "simple"
        via_env_url = run_cli("models", env=cli_env(SWAPSERVE_TOKEN=TOKEN, SWAPSERVE_URL=url))
        assert via_env_url.returncode == 0 and "simple" in via_env_url.stdout
