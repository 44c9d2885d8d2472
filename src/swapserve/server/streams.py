"""What one ModelStreamInfer stream may make the server hold: back-pressure on requests, a cap on unsent answers.

A stream's requests run concurrently and their responses go back as they finish (KServe v2 /
Triton streaming). Unbounded, a client that sends and never reads makes the server keep every
request's response (one task per message, a result queue without end) until it runs out of
memory. A :class:`ResponseStream` bounds that on either transport:

* **In flight**: at most ``max_inflight`` requests are read whose responses the transport has not
  taken. At the limit no further message is asked of the transport until it takes a response,
  so the client's further messages wait in HTTP/2 flow control: back-pressure, as gRPC applies
  to any slow reader, not an error. (Both transports resume the handler after a response only
  once they took it: grpc.aio when the message is sent, the native front end while the call's
  queue has room.)
* **Queued bytes**: the responses made and not yet taken hold at most ``max_queued_bytes``.
  Within the in-flight limit only responses larger than ``max_queued_bytes / max_inflight`` on
  average get there. One that would pass it ends the stream RESOURCE_EXHAUSTED, naming the flag:
  the waiting responses are dropped and the running requests cancelled at once, and the status
  follows what the transport already holds (the client sees it when it reads).

Per request this costs a semaphore step and the response's ``ByteSize``.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from swapserve.config import DEFAULT_STREAM_MAX_INFLIGHT, DEFAULT_STREAM_MAX_QUEUED_BYTES
from swapserve.errors import ResourceExhausted

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_END = object()


@dataclass(frozen=True)
class StreamLimits:
    """Bounds of one stream (``swapserve serve --stream-max-inflight``, ``--stream-max-queued-bytes``)."""

    max_inflight: int = DEFAULT_STREAM_MAX_INFLIGHT
    max_queued_bytes: int = DEFAULT_STREAM_MAX_QUEUED_BYTES

    def __post_init__(self) -> None:
        if self.max_inflight < 1 or self.max_queued_bytes < 1:
            raise ValueError(f"stream limits must be >= 1, got {self}")


class ResponseStream(Generic[Req, Resp]):
    """The responses of one request stream, answered concurrently and handed out as they finish.

    Create it on the event loop (it starts reading at once); call :meth:`next` for each response
    and :meth:`close` when done. ``answer`` turns one request into its response and must not
    raise (a failed request is a response too); ``size`` is a response's byte size.

    Guarantees: every request read is answered by exactly one response from :meth:`next` unless
    the stream ended early (:meth:`close`, or RESOURCE_EXHAUSTED); at most
    ``limits.max_inflight`` requests are read and not yet taken; responses made and not taken
    hold at most ``limits.max_queued_bytes`` bytes, else :meth:`next` raises.
    """

    def __init__(self, requests: AsyncIterator[Req], answer: Callable[[Req], Awaitable[Resp]],
                 size: Callable[[Resp], int], limits: StreamLimits) -> None:
        self._requests = requests
        self._answer = answer
        self._size = size
        self._limits = limits
        #: Finished responses with their sizes, then _END (or the overflow error), in finishing order.
        self._ready: asyncio.Queue[tuple[Resp, int] | object] = asyncio.Queue()
        #: One permit per request that may be read: taken before reading, given back when taken.
        self._room = asyncio.Semaphore(limits.max_inflight)
        self._running: set[asyncio.Task[None]] = set()
        self._queued = 0  # bytes of the responses made and not yet taken (the one handed out included)
        self._handed: int | None = None  # size of the response the last next() returned, until the next call
        self._overflow: ResourceExhausted | None = None
        self._reader = asyncio.create_task(self._read())

    async def next(self) -> Resp | None:
        """The next finished response, or None once every request is answered and the client is done.

        Calling it again says the transport took the previous response: that frees its place
        among the in-flight requests. Raises ResourceExhausted when the unsent responses passed
        ``max_queued_bytes`` (the stream should end with it).
        """
        if self._handed is not None:
            self._queued -= self._handed
            self._handed = None
            self._room.release()
        item = await self._ready.get()
        if item is _END:
            return None
        if isinstance(item, ResourceExhausted):
            raise item
        response, n = item  # type: ignore[misc]
        self._handed = n
        return response  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop reading and cancel the requests still running (the stream ended or the client left)."""
        self._reader.cancel()
        for task in list(self._running):
            task.cancel()

    async def _read(self) -> None:
        try:
            requests = aiter(self._requests)
            while True:
                await self._room.acquire()  # at the limit: read nothing until a response is taken
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(self._one(request))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            while self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
            self._ready.put_nowait(_END)

    async def _one(self, request: Req) -> None:
        response = await self._answer(request)
        if self._overflow is not None:
            return
        n = self._size(response)
        self._queued += n
        if self._queued <= self._limits.max_queued_bytes:
            self._ready.put_nowait((response, n))
            return
        self._overflow = ResourceExhausted(
            f"this stream holds {self._queued} bytes of responses its client has not read, more than "
            f"--stream-max-queued-bytes {self._limits.max_queued_bytes} (SWAPSERVE_STREAM_MAX_QUEUED_BYTES); "
            "read responses as they arrive, or raise the limit")
        while not self._ready.empty():  # free what waits now: the transport may never take it
            self._ready.get_nowait()
        self._ready.put_nowait(self._overflow)
        self._reader.cancel()
        me = asyncio.current_task()
        for task in list(self._running):
            if task is not me:
                task.cancel()
