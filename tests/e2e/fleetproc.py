"""A fleet on one machine for end-to-end tests: a PostgreSQL server (``pg``, a module-scoped
fixture: import it into the test module) and ``swapserve serve`` replicas on it (``Replica``)."""
from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.serverproc import ROOT, SWAPSERVE, ServerProcess
from tests.pg import PostgresServer, find_pg_bindir

KEYS = [f"user-{i}" for i in range(48)]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    bindir = find_pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found; run scripts/ensure-postgres.sh")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.cleanup()


class Replica:
    """One ``swapserve serve`` of the fleet plus a tritonclient and the CLI bound to it.

    ``args``: more ``serve`` arguments (the front end is grpc.aio unless they name one)."""

    def __init__(self, name: str, repo: Path, home: Path, registry: str, args: Sequence[str] = ()) -> None:
        self.name, self.repo, self.home, self.registry = name, repo, home, registry
        self.args = list(args) if "--frontend" in args else ["--frontend", "python", *args]
        self.proc: ServerProcess | None = None
        self.client: grpcclient.InferenceServerClient | None = None

    def start(self) -> Replica:
        self.proc = ServerProcess(self.repo, "--registry", self.registry, "--replica-id", self.name,
                                  *self.args, env={"SWAPSERVE_HOME": str(self.home)}).start()
        self.client = grpcclient.InferenceServerClient(self.proc.url)
        return self

    def kill(self) -> None:
        assert self.proc is not None and self.proc.proc is not None
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(30)
        if self.client is not None:
            self.client.close()

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc is not None:
            self.proc.stop()

    def ctl(self, *argv: str) -> Any:
        assert self.proc is not None
        cmd = [*SWAPSERVE, *argv, "--json", "--url", self.proc.control_url]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, f"{' '.join(argv)} via {self.name}: {out.stderr}\n{self.proc.log()[-2000:]}"
        return json.loads(out.stdout)

    def routed(self, inputs: list[grpcclient.InferInput], keys: list[str] = KEYS) -> dict[str, str]:
        assert self.client is not None
        return {k: self.client.infer("digits", inputs, parameters={"user": k}).get_response().model_version
                for k in keys}


def digits_input(repo: Path, row: int = 0) -> list[grpcclient.InferInput]:
    x = np.load(repo / "digits" / "holdout.npz")["x"][row:row + 1].astype(np.float32)
    inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]
