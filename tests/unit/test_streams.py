"""ResponseStream: a stream's requests are read only while there is room, and unread answers are capped.

The transport is played by the test: it takes a response by calling ``next()`` again, and a
client that never reads is one whose transport stops calling it.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from swapserve.errors import ResourceExhausted
from swapserve.server.streams import ResponseStream, StreamLimits
from tests.unit.stack import run


class Client:
    """Sends ``n`` requests (0, 1, ...) as fast as the stream reads them; ``sent`` counts those read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sent = 0

    async def requests(self) -> AsyncIterator[int]:
        for i in range(self.n):
            self.sent += 1
            yield i


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def echo(request: int) -> bytes:
    await asyncio.sleep(0)
    return b"x" * 10 + str(request).encode()


def test_reading_stops_at_the_in_flight_limit_until_a_response_is_taken() -> None:
    """Before: one task per message, read as fast as the client sent (no limit)."""
    async def scenario() -> None:
        client = Client(1000)
        stream = ResponseStream(client.requests(), echo, len, StreamLimits(max_inflight=8, max_queued_bytes=1 << 20))
        await turns()
        assert client.sent == 8  # nothing taken yet: 8 read, the 9th not asked for
        first = await stream.next()
        await turns()
        assert first is not None and client.sent == 8  # handed out, not yet taken (the transport holds it)
        second = await stream.next()  # the first was taken: room for one more
        await turns()
        assert second is not None and client.sent == 9
        got = [first, second]
        while (r := await stream.next()) is not None:
            got.append(r)
        stream.close()
        assert sorted(got) == sorted(b"x" * 10 + str(i).encode() for i in range(1000))  # each exactly once

    run(scenario())


def test_unread_answers_past_the_byte_limit_end_the_stream_resource_exhausted() -> None:
    answered: list[int] = []
    cancelled: list[int] = []

    async def answer(request: int) -> bytes:
        try:
            await asyncio.sleep(0 if request < 5 else 30)  # the rest are still running at the overflow
        except asyncio.CancelledError:
            cancelled.append(request)
            raise
        answered.append(request)
        return b"y" * 100

    async def scenario() -> None:
        client = Client(20)
        stream = ResponseStream(client.requests(), answer, len, StreamLimits(max_inflight=10, max_queued_bytes=450))
        await turns()  # nothing taken (a client that does not read): 5 x 100 bytes unread pass 450
        with pytest.raises(ResourceExhausted) as err:
            await stream.next()  # what the waiting responses were is dropped: the error comes first
        assert "--stream-max-queued-bytes 450" in err.value.message and "500 bytes" in err.value.message
        await turns()
        assert sorted(answered) == [0, 1, 2, 3, 4] and sorted(cancelled) == [5, 6, 7, 8, 9]
        assert client.sent == 10  # nothing read after the overflow
        stream.close()

    run(scenario())


def test_close_cancels_what_is_still_running_and_reads_no_more() -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def slow(request: int) -> bytes:
        started.append(request)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(request)
            raise
        return b""

    async def scenario() -> None:
        client = Client(100)
        stream: ResponseStream[int, Any] = ResponseStream(client.requests(), slow, len,
                                                          StreamLimits(max_inflight=4, max_queued_bytes=100))
        await turns()
        stream.close()  # the client left
        await turns()
        assert started == [0, 1, 2, 3] and sorted(cancelled) == [0, 1, 2, 3] and client.sent == 4

    run(scenario())


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        StreamLimits(max_inflight=0)
    with pytest.raises(ValueError):
        StreamLimits(max_queued_bytes=0)
