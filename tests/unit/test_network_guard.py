"""The unit tier's network guard (tests/unit/conftest.py) refuses the network and nothing else."""
from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from tests.unit.conftest import NetworkGuard, NetworkInUnitTest


def test_a_listening_or_connecting_inet_socket_is_refused(network_guard: NetworkGuard) -> None:
    for family, address in ((socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_INET6, ("::1", 0))):
        with socket.socket(family, socket.SOCK_STREAM) as s, \
                pytest.raises(NetworkInUnitTest, match="move the test to tests/integration"):
            s.bind(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkInUnitTest):
        s.connect(("127.0.0.1", 9))
    assert len(network_guard.refused) == 3
    network_guard.forgive()


def test_grpc_servers_and_channels_are_refused(network_guard: NetworkGuard) -> None:
    with pytest.raises(NetworkInUnitTest, match=r"grpc\.aio\.server"):
        grpc.aio.server()
    with pytest.raises(NetworkInUnitTest, match=r"grpc\.insecure_channel"):
        grpc.insecure_channel("127.0.0.1:8001")
    network_guard.forgive()


def test_unix_sockets_and_event_loops_still_work() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"ping")
        assert b.recv(4) == b"ping"
    assert asyncio.run(asyncio.sleep(0, "ok")) == "ok"
