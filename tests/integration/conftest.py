"""An in-process swapserve (grpc.aio on port 0, its own event-loop thread) and swapserve's own stubs."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

from swapserve._proto import grpc_service_pb2_grpc as pb_grpc
from swapserve.config import Settings
from swapserve.server.app import Server, create_server
from swapserve.server.transport import native as native_frontend
from tests.e2e.serverproc import build_example_repo


class InProcessServer:
    """Runs ``create_server`` on a private event loop thread; ``call`` runs a coroutine there.

    ``polled``: the loop is the one ``swapserve serve`` runs on (a native front end runs its
    completion queue in the loop's thread); otherwise a plain asyncio loop (the front end keeps
    its own thread).
    """

    def __init__(self, settings: Settings, polled: bool = False) -> None:
        self.settings = settings
        self.loop = native_frontend.FrontendLoop() if polled else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Server | None = None

    def call(self, coro: Any, timeout: float = 120) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        self.server = self.call(create_server(self.settings))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}")
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        if self.server is not None:
            self.call(self.server.stop(5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example_repo(tmp_path_factory.mktemp("examples"))


def settings_for(repo: Path, home: Path, **kw: Any) -> Settings:
    return Settings(model_repository=repo, host="127.0.0.1", grpc_port=0, metrics_port=-1,
                    control_address="127.0.0.1:0", home=home, **kw)


@pytest.fixture()
def make_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[InProcessServer] = []

    def make(repo: Path, polled: bool = False, **kw: Any) -> InProcessServer:
        s = InProcessServer(settings_for(repo, tmp_path / f"home{len(servers)}", **kw), polled).__enter__()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.__exit__(None, None, None)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A registry URL: a SQLite file, and a fresh database on the suite's PostgreSQL (``tests.pg``)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))
