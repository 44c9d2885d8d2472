"""Run ``swapserve serve`` as a subprocess on ephemeral ports (the way users run it).

This package is the only place that imports tritonclient; it never imports
swapserve._proto (the two cannot share a process: see swapserve.server).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The ``swapserve`` entry point installed beside this interpreter: the command users run. In CI the
#: suite also runs from virtualenvs holding only the built wheel or sdist (scripts/test-dist.sh),
#: so every server and CLI call goes through the installed package, never the source tree.
SWAPSERVE = [str(Path(sys.executable).with_name("swapserve"))]
READY = re.compile(r"swapserve ready: grpc=(?P<host>[^:]+):(?P<grpc>\d+) metrics=(?P<metrics>\S+)"
                   r"(?: control=(?P<control>\S+))?")


class ServerProcess:
    """A swapserve server subprocess. Use as a context manager; ``url`` is host:port for tritonclient."""

    def __init__(self, repository: Path | None, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 120) -> None:
        """``repository`` None runs ``swapserve serve`` without ``--model-repository`` (pass SWAPSERVE_HOME in env)."""
        self.repository = repository
        self.args = list(args)
        self.command = list(SWAPSERVE)  #: what runs ``serve`` (a test may prefix it, e.g. with unshare)
        # Each server gets its own state directory (SQLite registry) unless the test shares one.
        home = {"SWAPSERVE_HOME": str(Path(repository).parent / "swapserve-home")} if repository else {}
        self.env = {**os.environ, **home, **(env or {})}
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.grpc_port = 0
        self.metrics_port: int | None = None
        self.control_url = ""

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> ServerProcess:
        repository = ["--model-repository", str(self.repository)] if self.repository else []
        cmd = [*self.command, "serve", *repository, "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
               "--control-address", "127.0.0.1:0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                     cwd=ROOT)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                m = READY.search(line)
                if m:
                    self.grpc_port = int(m["grpc"])
                    self.metrics_port = None if m["metrics"] == "None" else int(m["metrics"])
                    self.control_url = m["control"] or ""
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(self.timeout) or not self.grpc_port:
            self.stop()
            raise RuntimeError("swapserve did not start:\n" + "\n".join(self.lines[-50:]))
        return self

    def log(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


EXAMPLE_MODELS = ("simple", "digits", "convnet", "digits_onnx")


def build_example_repo(scratch: Path) -> Path:
    """The example repository with its weights: the set-up's build, or a fresh deterministic one in ``scratch``."""
    repo = ROOT / "model_repository"
    if all(any((repo / m).glob("[0-9]*/model.*")) for m in EXAMPLE_MODELS):
        return repo
    subprocess.run([*SWAPSERVE, "examples", str(scratch), "--models", ",".join(EXAMPLE_MODELS)], check=True)
    return scratch


def copy_models(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copytree(src / n, dst / n)
    return dst


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")
