"""NativeServer turns front-end events into servicer calls and answers each call exactly once.

The grpc++ front end is replaced by tests/fakes.FakeFrontend (a pipe instead of its eventfd, no
socket): the test plays the client by queueing events; the server's answers are what the fake
records. The servicers are plain grpcio handlers, as in swapserve/server/app.py.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from swapserve.server.transport.native import NativeServer
from swapserve.types import ARRIVALS
from tests.fakes import FakeFrontend, FakeFrontendModule, Finished
from tests.unit.stack import run

SERVICE = "test.Echo"
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, UNIMPLEMENTED, INTERNAL = (
    grpc.StatusCode.OK.value[0], grpc.StatusCode.CANCELLED.value[0], grpc.StatusCode.UNKNOWN.value[0],
    grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.UNIMPLEMENTED.value[0],
    grpc.StatusCode.INTERNAL.value[0])


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def decode(payload: bytes) -> str:
    return payload.decode("ascii")  # non-ASCII bytes: "could not parse the request message"


def encode(message: str) -> bytes:
    return message.encode()


class Probe:
    """What the handlers saw (arrivals, cancellations, time remaining), and a gate they can wait on."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrivals: list[int] = []
        self.cancelled: list[bool] = []
        self.remaining: list[float | None] = []


def handlers(probe: Probe) -> dict[str, grpc.RpcMethodHandler]:
    async def echo(request: str, context: Any) -> str:
        probe.arrivals.append(ARRIVALS.get())
        probe.remaining.append(context.time_remaining())
        return request + "!"

    async def later(request: str, context: Any) -> str:
        await asyncio.sleep(0.001)
        return request.upper()

    async def wait(request: str, context: Any) -> str:
        if request == "after-a-turn":
            await asyncio.sleep(0)  # a Task takes the call over before it blocks
        try:
            await probe.gate.wait()
        except asyncio.CancelledError:
            probe.cancelled.append(context.cancelled())
            raise
        return "released"

    async def reject(request: str, context: Any) -> str:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model 'm': bad input {request!r}")
        raise AssertionError("abort returned")

    async def crash(request: str, context: Any) -> str:
        raise ValueError("boom")

    async def coded(request: str, context: Any) -> str:
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details("set by the servicer")
        return "ignored"

    async def join(requests: AsyncIterator[str], context: Any) -> str:
        return "+".join([r async for r in requests])

    async def count(request: str, context: Any) -> AsyncIterator[str]:
        for i in range(int(request)):
            yield str(i)

    async def tell(request: str, context: Any) -> None:  # writes as grpcio's health Watch does
        for i in range(int(request)):
            await context.write(str(i))

    async def pace(requests: AsyncIterator[str], context: Any) -> str:  # works on each message until let go
        seen = []
        async for r in requests:
            seen.append(r)
            await probe.gate.wait()
        return "+".join(seen)

    def unary(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=decode, response_serializer=encode)

    return {
        "Echo": unary(echo), "Later": unary(later), "Wait": unary(wait), "Reject": unary(reject),
        "Crash": unary(crash), "Coded": unary(coded),
        "Join": grpc.stream_unary_rpc_method_handler(join, request_deserializer=decode, response_serializer=encode),
        "Count": grpc.unary_stream_rpc_method_handler(count, request_deserializer=decode,
                                                      response_serializer=encode),
        "Tell": grpc.unary_stream_rpc_method_handler(tell, request_deserializer=decode, response_serializer=encode),
        "Pace": grpc.stream_unary_rpc_method_handler(pace, request_deserializer=decode, response_serializer=encode),
    }


@pytest.fixture()
def module() -> Iterator[FakeFrontendModule]:
    fake = FakeFrontendModule()
    yield fake
    fake.close()


async def serve(module: FakeFrontendModule, probe: Probe, registered: bool = False) -> tuple[NativeServer, FakeFrontend]:
    server = NativeServer(1 << 20, frontend=module.Frontend)  # type: ignore[arg-type]
    if registered:
        server.add_registered_method_handlers(SERVICE, handlers(probe))
    else:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers(probe))])
    assert server.add_insecure_port("127.0.0.1:0") == 50051
    await server.start()
    assert not server.polled  # a plain event loop: the front end keeps its own thread
    return server, module.created[-1]


async def answer(fe: FakeFrontend, call_id: int, turns: int = 1000) -> Finished:
    """Let the loop run until ``call_id`` is finished."""
    for _ in range(turns):
        if call_id in fe.finished:
            return fe.finished[call_id]
        await asyncio.sleep(0.001 if _ > 10 else 0)
    raise AssertionError(f"call {call_id} was never answered; answered: {fe.finished}")


@pytest.mark.parametrize("registered", [False, True])
def test_unary_calls_are_answered_with_the_handlers_response(module: FakeFrontendModule, registered: bool) -> None:
    async def scenario() -> None:
        server, fe = await serve(module, Probe(), registered)
        fe.message(1, method("Echo"), b"hi")
        fe.message(2, method("Later"), b"slow")
        assert await answer(fe, 1) == Finished(OK, "", b"hi!")
        assert await answer(fe, 2) == Finished(OK, "", b"SLOW")
        await server.stop(0)

    run(scenario())


def test_errors_become_statuses_as_grpc_aio_answers_them(module: FakeFrontendModule) -> None:
    async def scenario() -> None:
        server, fe = await serve(module, Probe())
        fe.message(1, method("Reject"), b"x")
        fe.message(2, method("Crash"), b"x")
        fe.message(3, method("Nope"), b"x")
        fe.message(4, method("Echo"), b"\xff\xfe")
        fe.message(5, method("Coded"), b"x")
        fe.half_close(6, method("Echo"))  # a unary call that ended without a message
        assert await answer(fe, 1) == Finished(INVALID_ARGUMENT, "model 'm': bad input 'x'", None)
        assert await answer(fe, 2) == Finished(UNKNOWN, "Unexpected <class 'ValueError'>: boom", None)
        assert await answer(fe, 3) == Finished(UNIMPLEMENTED, "Method not found!", None)
        assert await answer(fe, 4) == Finished(INTERNAL, "could not parse the request message", None)
        assert await answer(fe, 5) == Finished(INVALID_ARGUMENT, "set by the servicer", None)
        assert await answer(fe, 6) == Finished(INTERNAL, "the call sent no request message", None)
        fe.message(7, method("Echo"), b"still fine")  # none of that touched later calls
        assert await answer(fe, 7) == Finished(OK, "", b"still fine!")
        await server.stop(0)

    run(scenario())


def test_unknown_methods_are_answered_unimplemented_and_leave_nothing_behind(module: FakeFrontendModule) -> None:
    """The method path is the client's to choose: answering a miss keeps no memory per path.

    Before: every distinct unknown path stayed in the handler table (100k paths ~96 MiB).
    """
    import tracemalloc

    async def scenario() -> None:
        server, fe = await serve(module, Probe())
        pad = "x" * 400

        async def misses(first: int, n: int) -> None:
            for i in range(first, first + n):
                fe.message(i, f"/attacker.Service/{pad}{i}", b"")
            for i in range(first, first + n):
                assert await answer(fe, i) == Finished(UNIMPLEMENTED, "Method not found!", None)
            fe.finished.clear()  # the fake's record of answers, not the server's memory

        await misses(1, 200)  # warm up: allocator pools, the loop's own structures
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await misses(1000, 3000)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 256 * 1024, f"3000 unknown methods kept {grown} bytes"
        fe.message(9999, method("Echo"), b"known")  # a known method still resolves, and is cached
        assert await answer(fe, 9999) == Finished(OK, "", b"known!")
        await server.stop(0)

    run(scenario())


@pytest.mark.parametrize("request_text", ["at-once", "after-a-turn"])
def test_a_cancelled_call_cancels_its_handler_and_is_answered_cancelled(module: FakeFrontendModule,
                                                                        request_text: str) -> None:
    probe = Probe()

    async def scenario() -> None:
        server, fe = await serve(module, probe)
        fe.message(1, method("Wait"), request_text.encode())
        for _ in range(5):
            await asyncio.sleep(0)
        assert 1 not in fe.finished
        fe.cancel(1, method("Wait"))
        assert await answer(fe, 1) == Finished(CANCELLED, "cancelled", None)
        assert probe.cancelled == [True]  # the handler saw CancelledError with context.cancelled()
        probe.gate.set()
        fe.message(2, method("Wait"), b"at-once")
        assert await answer(fe, 2) == Finished(OK, "", b"released")
        await server.stop(0)

    run(scenario())


def test_client_and_server_streams(module: FakeFrontendModule) -> None:
    async def scenario() -> None:
        server, fe = await serve(module, Probe())
        fe.message(1, method("Join"), b"a")
        fe.message(1, method("Join"), b"b")
        fe.message(1, method("Join"), b"c")
        for _ in range(5):
            await asyncio.sleep(0)
        assert 1 not in fe.finished  # waiting for the client to finish sending
        assert fe.reads[1] == 3  # one further message asked for per message handed to the handler
        fe.half_close(1, method("Join"))
        assert await answer(fe, 1) == Finished(OK, "", b"a+b+c")
        fe.message(2, method("Count"), b"3")
        assert await answer(fe, 2) == Finished(OK, "", None)
        assert fe.written[2] == [b"0", b"1", b"2"]
        await server.stop(0)

    run(scenario())


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_stream_is_read_only_as_fast_as_its_handler_takes_messages(module: FakeFrontendModule) -> None:
    """Before: every message was read at once (the front end re-armed its read after each), so a
    handler that fell behind had the whole stream queued in memory."""
    probe = Probe()

    async def scenario() -> None:
        server, fe = await serve(module, probe)
        fe.message(1, method("Pace"), b"a")
        await turns()
        assert fe.reads.get(1) == 1  # the handler took "a": one more message is read ahead
        fe.message(1, method("Pace"), b"b")  # that read's answer
        await turns()
        assert fe.reads[1] == 1  # the handler is still busy with "a": nothing more is read
        probe.gate.set()
        await turns()
        assert fe.reads[1] == 2  # it took "b": the next read
        fe.half_close(1, method("Pace"))
        assert await answer(fe, 1) == Finished(OK, "", b"a+b")
        assert fe.reads[1] == 2  # never asked past the end
        await server.stop(0)

    run(scenario())


@pytest.mark.parametrize("name", ["Count", "Tell"])
def test_a_streamed_answer_waits_while_the_front_end_is_full(module: FakeFrontendModule, name: str) -> None:
    """Before: every message was queued in the front end whether or not the client read them."""
    async def scenario() -> None:
        server, fe = await serve(module, Probe())
        fe.hold(1)  # a client that does not read: every write answers FULL
        fe.message(1, method(name), b"4")
        await turns()
        assert fe.written[1] == [b"0"] and 1 not in fe.finished  # the handler waits for room
        fe.writable(1, method(name))
        assert await answer(fe, 1) == Finished(OK, "", None)
        assert fe.written[1] == [b"0", b"1", b"2", b"3"]
        fe.hold(2)
        fe.message(2, method(name), b"4")
        await turns()
        fe.cancel(2, method(name))  # the client left while the handler waited
        assert await answer(fe, 2) == Finished(CANCELLED, "cancelled", None)
        assert fe.written[2] == [b"0"]
        await server.stop(0)

    run(scenario())


def test_handlers_learn_how_many_calls_arrived_together_and_their_deadline(module: FakeFrontendModule) -> None:
    probe = Probe()

    async def scenario() -> None:
        server, fe = await serve(module, probe)
        deadline = time.monotonic_ns() + 5_000_000_000
        fe.send(*[(i, fe.MESSAGE, method("Echo"), b"x", deadline) for i in (1, 2, 3)])
        for i in (1, 2, 3):
            await answer(fe, i)
        fe.message(4, method("Echo"), b"alone")
        await answer(fe, 4)
        assert probe.arrivals == [3, 3, 3, 1]
        assert all(r is not None and 4.0 < r <= 5.0 for r in probe.remaining[:3])
        assert probe.remaining[3] is None  # no deadline
        await server.stop(0)

    run(scenario())


def test_stop_cancels_what_is_in_flight_and_ends_termination_waits(module: FakeFrontendModule) -> None:
    probe = Probe()

    async def scenario() -> None:
        server, fe = await serve(module, probe)
        fe.message(1, method("Wait"), b"after-a-turn")
        for _ in range(5):
            await asyncio.sleep(0)
        waiting = asyncio.ensure_future(server.wait_for_termination())
        assert not await server.wait_for_termination(timeout=0.01)
        await server.stop(2.5)
        assert fe.stopped_with == 2.5
        assert await answer(fe, 1) == Finished(CANCELLED, "cancelled", None)
        assert await waiting is True
        await server.stop(1)  # idempotent

    run(scenario())
