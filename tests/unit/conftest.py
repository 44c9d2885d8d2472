"""The unit tier: fast, local, no network. Collaborators are fakes (tests/fakes.py).

Like Ray's ``disallow_ray_init``, an autouse fixture fails any unit test that reaches for the
network: an AF_INET/AF_INET6 socket that binds, connects or sends; a gRPC server or channel
(grpcio or the native grpc++ front end); a PostgreSQL connection. A test that needs one of
these is an integration test and belongs in tests/integration (in-process server on port 0).
The refusal raises at the call, and the test also fails at teardown if the refusal was
swallowed somewhere (an ``except Exception`` in a worker), so it cannot pass by accident.
Unix sockets (asyncio's self-pipe) stay allowed.
"""
from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

_INET = (socket.AF_INET, socket.AF_INET6)


class NetworkInUnitTest(AssertionError):
    """A unit test tried to use the network."""


class NetworkGuard:
    """What the guard refused during one test (``refused``); ``forgive()`` clears it."""

    def __init__(self, test: str) -> None:
        self.test = test
        self.refused: list[str] = []

    def refuse(self, what: str) -> NetworkInUnitTest:
        self.refused.append(what)
        return NetworkInUnitTest(
            f"{self.test}: unit tests must not use the network ({what}). Use the fakes in tests/fakes.py, "
            "or move the test to tests/integration (an in-process server bound to port 0)")

    def forgive(self) -> None:
        """Forget the refusals so far (for a test that checks the guard itself)."""
        self.refused.clear()


def _socket_method(guard: NetworkGuard, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        if self.family in _INET:
            raise guard.refuse(f"socket.{name}{args!r} on an {self.family.name} socket")
        return original(self, *args, **kwargs)

    return checked


def _refusing(guard: NetworkGuard, what: str) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise guard.refuse(what)

    return refused


@pytest.fixture(autouse=True)
def network_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[NetworkGuard]:
    guard = NetworkGuard(request.node.nodeid)
    for name in ("bind", "connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, _socket_method(guard, name, getattr(socket.socket, name)))
    for module, name in ((grpc, "server"), (grpc, "insecure_channel"), (grpc, "secure_channel"),
                         (grpc.aio, "server"), (grpc.aio, "insecure_channel"), (grpc.aio, "secure_channel")):
        monkeypatch.setattr(module, name, _refusing(guard, f"{module.__name__}.{name}()"))
    try:
        from swapserve import _frontend
    except ImportError:  # built only where grpc++ is installed
        pass
    else:
        monkeypatch.setattr(_frontend, "Frontend", _refusing(guard, "the native grpc++ front end (_frontend.Frontend)"))
    try:
        import psycopg
    except ImportError:
        pass
    else:
        monkeypatch.setattr(psycopg, "connect", _refusing(guard, "psycopg.connect (PostgreSQL)"))
        monkeypatch.setattr(psycopg.Connection, "connect", classmethod(_refusing(guard, "psycopg.Connection.connect")))
    yield guard
    if guard.refused:
        pytest.fail(f"{guard.test} used the network (refused: {'; '.join(guard.refused)}); unit tests use "
                    "tests/fakes.py, network tests live in tests/integration", pytrace=False)
