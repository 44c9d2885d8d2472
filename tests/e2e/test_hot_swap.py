"""Hot swap under load, crash recovery and the memory budget: the real server, tritonclient and the real CLI."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.e2e.serverproc import ROOT, SWAPSERVE, ServerProcess, copy_models, wait_until


def cli(srv: ServerProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    verb, *rest = args
    cmd = [*SWAPSERVE, verb, *rest, "--url", srv.control_url, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n{srv.log()[-3000:]}")
    return proc


def status(srv: ServerProcess, model: str) -> dict:  # type: ignore[type-arg]
    return json.loads(cli(srv, "status", model).stdout)


def pixels(x: np.ndarray) -> list[aioclient.InferInput]:
    inp = aioclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32))
    return [inp]


class Load:
    """``clients`` concurrent tritonclient aio loops on a background thread, recording every request."""

    def __init__(self, url: str, x: np.ndarray, clients: int = 16, params: bool = False) -> None:
        self.url, self.x, self.clients = url, x, clients
        self.records: list[tuple[float, float, str]] = []  # (sent, received, model_version)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with aioclient.InferenceServerClient(self.url) as c:
            async def loop(i: int) -> None:
                n = 0
                while not self._stop.is_set():
                    row = self.x[(i * 7 + n) % len(self.x)][None]
                    n += 1
                    sent = time.monotonic()
                    try:
                        r = await c.infer("digits", pixels(row))
                        self.records.append((sent, time.monotonic(), r.get_response().model_version))
                    except InferenceServerException as exc:
                        self.errors.append(f"{exc.status()}: {exc.message()}")

            await asyncio.gather(*(loop(i) for i in range(self.clients)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_swap_under_load(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["digits"])
    x = np.load(example_repo / "digits" / "holdout.npz")["x"]
    with ServerProcess(repo) as srv:
        assert status(srv, "digits")["champion"] == 2
        changes: list[tuple[float, float, str]] = []  # (start, end, champion after)
        with Load(srv.url, x, clients=16) as load:
            wait_until(lambda: len(load.records) > 50)
            for _ in range(50):
                t0 = time.monotonic()
                after = json.loads(cli(srv, "promote", "digits", "1", "--reason", "swap test").stdout)
                changes.append((t0, time.monotonic(), str(after["champion"])))
                t0 = time.monotonic()
                after = json.loads(cli(srv, "rollback", "digits", "--reason", "swap test").stdout)
                changes.append((t0, time.monotonic(), str(after["champion"])))
            time.sleep(0.2)
        assert [c[2] for c in changes] == ["1", "2"] * 50
        assert load.errors == []
        assert len(load.records) > 500
        # Every answer came from a version the snapshot in force allowed.
        for sent, received, version in load.records:
            allowed = {"2"}
            for start, end, champion in changes:
                if end < sent:
                    allowed = {champion}  # changes that finished before the request was sent decide alone
                elif start < received:
                    allowed.add(champion)  # a change overlapping the request may or may not have hit it
            assert version in allowed, (sent, received, version)
        # Both versions really served, in turn.
        assert {v for _, _, v in load.records} == {"1", "2"}
        stats = grpcclient.InferenceServerClient(srv.url).get_inference_statistics("digits", as_json=True)
        fails = sum(int(s["inference_stats"]["fail"].get("count", 0)) for s in stats["model_stats"])
        assert fails == 0


def test_crash_recovery_restores_split_and_audit(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["digits"])
    x = np.load(example_repo / "digits" / "holdout.npz")["x"]
    home = tmp_path / "home"
    env = {"SWAPSERVE_HOME": str(home)}
    srv = ServerProcess(repo, env=env).start()
    try:
        with Load(srv.url, x, clients=4):
            cli(srv, "traffic", "digits", "1=70", "2=30", "--key", "user", "--reason", "canary by hand")
            time.sleep(0.5)
            before = status(srv, "digits")
            srv.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            srv.wait(30)
    finally:
        srv.stop()
    assert before["traffic"] == {"1": 70.0, "2": 30.0}
    with ServerProcess(repo, env=env) as again:
        after = status(again, "digits")
        assert after["traffic"] == {"1": 70.0, "2": 30.0}
        assert after["generation"] == before["generation"]
        audit = json.loads(cli(again, "audit", "digits").stdout)
        entries = audit if isinstance(audit, list) else audit["entries"]
        assert any(e["action"] == "traffic" and e["reason"] == "canary by hand" for e in entries)
        # The split is really in force: keyed requests spread ~70/30 and each key is sticky.
        c = grpcclient.InferenceServerClient(again.url)
        seen: dict[int, str] = {}
        for user in range(200):
            inp = grpcclient.InferInput("pixels", [1, 64], "FP32")
            inp.set_data_from_numpy(x[:1].astype(np.float32))
            r = c.infer("digits", [inp], parameters={"user": user})
            seen[user] = r.get_response().model_version
        share = sum(v == "1" for v in seen.values()) / len(seen)
        assert 0.55 < share < 0.85
        for user in range(0, 200, 20):
            inp = grpcclient.InferInput("pixels", [1, 64], "FP32")
            inp.set_data_from_numpy(x[:1].astype(np.float32))
            assert c.infer("digits", [inp], parameters={"user": user}).get_response().model_version == seen[user]


def test_preload_over_budget_is_refused_while_serving(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["digits", "convnet"])
    x = np.load(example_repo / "digits" / "holdout.npz")["x"]
    with ServerProcess(repo, "--model-control-mode", "explicit", "--load-model", "digits",
                       "--device-memory-budget", "200KiB") as srv:
        with Load(srv.url, x, clients=4) as load:
            wait_until(lambda: len(load.records) > 20)
            proc = cli(srv, "load", "convnet", "1", check=False)
            n = len(load.records)
            wait_until(lambda: len(load.records) > n + 20)
        assert proc.returncode == 1
        assert "RESOURCE_EXHAUSTED" in proc.stderr
        assert "budget is 0.2 MiB" in proc.stderr and "convnet" in proc.stderr and "digits:2" in proc.stderr
        assert load.errors == []
        assert grpcclient.InferenceServerClient(srv.url).is_server_ready()


def test_load_refuses_changed_artifact(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["digits"])
    with ServerProcess(repo, "--model-control-mode", "explicit") as srv:
        reg = json.loads(cli(srv, "register", "digits", "1", "--training-run", "run-42").stdout)
        v1 = next(v for v in reg["versions"] if v["version"] == 1)
        assert v1["training_run"] == "run-42" and len(v1["sha256"]) == 64
        with open(repo / "digits" / "1" / "model.pt", "ab") as f:
            f.write(b"tampered")
        proc = cli(srv, "load", "digits", "1", check=False)
        assert proc.returncode == 1 and "FAILED_PRECONDITION" in proc.stderr and "changed" in proc.stderr
        ok = json.loads(cli(srv, "load", "digits", "2").stdout)  # registers v2 first, then loads it
        assert next(v for v in ok["versions"] if v["version"] == 2)["resident"] is True
        assert json.loads(cli(srv, "load", "digits", "2").stdout)  # idempotent


def test_champion_history_each_rollback_steps_back(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["digits"])
    import shutil

    shutil.copytree(repo / "digits" / "2", repo / "digits" / "3")
    with ServerProcess(repo) as srv:
        assert status(srv, "digits")["champion"] == 3  # Triton's default: the highest version
        cli(srv, "promote", "digits", "1")
        s = json.loads(cli(srv, "promote", "digits", "2").stdout)
        assert s["previous_champions"] == [3, 1]
        s = json.loads(cli(srv, "unload", "digits", "3", "--reason", "make room").stdout)
        assert next(v for v in s["versions"] if v["version"] == 3)["resident"] is False
        s = json.loads(cli(srv, "rollback", "digits").stdout)
        assert s["champion"] == 1 and s["previous_champions"] == [3] and s["warnings"] == []
        proc = cli(srv, "rollback", "digits")
        s = json.loads(proc.stdout)
        assert s["champion"] == 3 and s["previous_champions"] == []
        assert any("3" in w and "preloaded" in w for w in s["warnings"])  # evicted: warmed again first
        assert next(v for v in s["versions"] if v["version"] == 3)["state"] == "serving"
        proc = cli(srv, "rollback", "digits", check=False)
        assert proc.returncode == 1 and "no previous champion" in proc.stderr
