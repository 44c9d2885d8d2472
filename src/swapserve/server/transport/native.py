"""The inference port on the native front end (:class:`swapserve.native.Frontend`, grpc++), hosting grpc.aio servicers.

``NativeServer`` has the part of ``grpc.aio.Server``'s interface that generated
``add_*Servicer_to_server`` functions and ``swapserve.server.app`` use, so the same
servicers (inference, feedback, health, reflection) run on either front end. The C++ side
accepts calls and moves bytes; this side turns events into servicer calls on the event loop:

- a message of a new call: look up the method's handler; unary requests run at once, streaming
  requests get an async iterator fed by the following messages (half-close ends it). Each
  further message is read only when the iterator hands out the one before (``read``), so a
  handler that stops asking (ModelStreamInfer at its in-flight limit) stops the reading, and the
  client waits in HTTP/2 flow control, as on grpc.aio;
- the handler's answer goes back with one ``finish`` (unary) or ``write`` per message + ``finish``.
  A streamed response's handler resumes after a ``write`` only while the front end has room for
  more of the call's answer (else once it reports WRITABLE), as grpc.aio resumes it only once
  the message was sent: a client that does not read holds the handler, not the server's memory;
- cancellation (client gone, deadline passed) cancels the handler's task, so the data plane
  counts the request CANCELED (its answer, if the model still runs it, is dropped).

Statuses are grpc.aio's: ``context.abort`` ends the call with its code and message; any other
exception is UNKNOWN, as grpc.aio answers it.

On a ``FrontendLoop`` (what ``swapserve serve`` runs, via ``run``) the front end is *polled*: the
loop's selector runs grpc++'s completion queue on the loop's own thread, so no second thread
wakes per request; on any other loop the front end keeps a completion-queue thread and hands
events over through its eventfd. Servicers see no difference.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import selectors
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc

from swapserve.errors import SwapserveError
from swapserve.native import EventKind, Frontend, PollResult, WriteResult, frontend_available
from swapserve.tls import ServerTls
from swapserve.types import ARRIVALS

log = logging.getLogger(__name__)

# Plain ints, compared per request and per turn of the loop.
_MESSAGE, _HALF_CLOSE, _WRITABLE = int(EventKind.MESSAGE), int(EventKind.HALF_CLOSE), int(EventKind.WRITABLE)
_WRITE_FULL = int(WriteResult.FULL)
_POLL_OFF, _POLL_IDLE, _POLL_PENDING = int(PollResult.OFF), int(PollResult.IDLE), int(PollResult.PENDING)


def available() -> bool:
    """Whether the native front end is built (grpc++ at install); else the server uses grpc.aio."""
    return frontend_available()


_T = TypeVar("_T")


def _serialized(serializer: Callable[[Any], bytes] | None, message: Any) -> bytes:
    """A response message as the front end sends it (a handler without a serializer yields bytes)."""
    return serializer(message) if serializer else message


class _Selector(selectors.EpollSelector):
    """An epoll selector that, with a front end attached, waits in the front end's completion queue.

    Then the loop's thread reads requests, runs them and sends their answers with no other
    thread involved while it is otherwise idle (``Frontend.poll``); the loop's own descriptors
    end the wait through the front end's watcher, and timers through the timeout.
    """

    def __init__(self) -> None:
        super().__init__()
        self.frontend: Frontend | None = None
        #: The NativeServer whose front end this selector runs (one per loop; a second one keeps its thread).
        self.owner: NativeServer | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        native = self.frontend
        if native is None:
            return super().select(timeout)
        state = native.poll(0.0)
        if state == _POLL_OFF:
            return super().select(timeout)
        ready = super().select(0)
        if state == _POLL_IDLE and not ready and (timeout is None or timeout > 0):
            state = native.poll(-1.0 if timeout is None else timeout)
            ready = super().select(0)
        if state == _POLL_PENDING:  # the front end's events, as if its descriptor were readable
            ready.append((self.get_key(native.fileno()), selectors.EVENT_READ))
        return ready


class FrontendLoop(asyncio.SelectorEventLoop):
    """The event loop ``serve`` runs on: a native front end started on it runs in its thread."""

    def __init__(self) -> None:
        self.frontend_selector = _Selector()
        super().__init__(self.frontend_selector)


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)`` on a FrontendLoop."""
    runner = getattr(asyncio, "Runner", None)
    if runner is None:  # Python 3.10: the native front end keeps its own thread
        return asyncio.run(main)
    with runner(loop_factory=FrontendLoop) as r:
        return r.run(main)  # type: ignore[no-any-return]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _HandlerCallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[Any, ...] = ()


class _Context:
    """What our servicers and grpcio's health/reflection servicers use of grpc.aio's ServicerContext."""

    __slots__ = ("_server", "_id", "_deadline_ns", "_code", "_details", "_serializer", "_cancelled", "_done", "_info")

    def __init__(self, server: NativeServer, call_id: int, deadline_ns: int,
                 serializer: Callable[[Any], bytes] | None) -> None:
        self._server, self._id, self._deadline_ns, self._serializer = server, call_id, deadline_ns, serializer
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._cancelled = False
        self._done = False
        #: (peer, metadata) read from the front end once, when first asked (fixed for the call).
        self._info: tuple[str, tuple[Any, ...]] | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = None) -> None:
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def time_remaining(self) -> float | None:
        if not self._deadline_ns:
            return None
        return max(0.0, (self._deadline_ns - time.monotonic_ns()) / 1e9)

    def _call_info(self) -> tuple[str, tuple[Any, ...]]:
        if self._info is None:
            self._info = self._server._native.call_info(self._id) or ("", ())
        return self._info

    def invocation_metadata(self) -> tuple[Any, ...]:
        return self._call_info()[1]

    def peer(self) -> str:
        return self._call_info()[0]

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._server._native.auth_info(self._id) or {}

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done

    async def write(self, message: Any) -> None:
        if self._server._native.write(self._id, _serialized(self._serializer, message)) == _WRITE_FULL:
            await self._server._room(self._id)

    async def send_initial_metadata(self, metadata: Any) -> None:
        return None

    def set_trailing_metadata(self, metadata: Any) -> None:
        return None


class _Call:
    __slots__ = ("task", "requests", "context", "waiting", "writable")

    def __init__(self, context: _Context) -> None:
        self.context = context
        self.task: asyncio.Task[None] | None = None
        #: A client-streaming call's messages not yet handed to its handler: at most one, and the
        #: end (each further message is read only once the iterator handed out the one before).
        self.requests: asyncio.Queue[Any] | None = None
        #: The future a call started eagerly waits on until a Task takes it over (see _start).
        self.waiting: asyncio.Future[Any] | None = None
        #: Set while the handler waits for room to write (a write answered FULL); WRITABLE resolves it.
        self.writable: asyncio.Future[None] | None = None

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
        elif self.waiting is not None:
            self.waiting.cancel()  # the coroutine resumes in its Task and sees CancelledError


class _Started:
    """Awaiting this resumes a coroutine that was started outside any Task."""

    __slots__ = ("coro",)

    def __init__(self, coro: Any) -> None:
        self.coro = coro

    def __await__(self) -> Any:
        return self.coro.__await__()


async def _resume(coro: Any) -> None:
    await _Started(coro)


_END = object()


class NativeServer:
    """A grpc.aio-like server for the inference port on the native front end. Create, add, start, stop."""

    def __init__(self, max_message_bytes: int, *, frontend: Callable[..., Frontend] = Frontend) -> None:
        """``frontend(address, max_message_bytes[, tls])`` makes the transport (a fake in unit tests)."""
        if frontend is Frontend and not frontend_available():
            raise RuntimeError("the native front end is not built (grpc++ was missing at install); "
                               "use --frontend python or install libgrpc++-dev and reinstall")
        self._max = max_message_bytes
        self._make_frontend = frontend
        #: Made by add_insecure_port (the address is known only then), used only after it.
        self._native: Frontend
        self._address = ""
        self._generic: list[grpc.GenericRpcHandler] = []
        self._methods: dict[str, grpc.RpcMethodHandler] = {}  # registered methods and generic hits, never misses
        self._calls: dict[int, _Call] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._selector: _Selector | None = None
        self._stopped = asyncio.Event()

    @property
    def polled(self) -> bool:
        """True when the completion queue runs in the event loop's thread (a FrontendLoop)."""
        return self._selector is not None

    # -- the grpc.aio.Server surface --------------------------------------------------------

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    def add_insecure_port(self, address: str) -> int:
        return self._add_port(address, None)

    def add_tls_port(self, address: str, tls: ServerTls) -> int:
        """A TLS port (mTLS when ``tls`` has a CA); new handshakes follow ``tls.reload()`` within a second."""
        return self._add_port(address, tls.staged())

    def _add_port(self, address: str, files: tuple[str, str, str] | None) -> int:
        self._native = self._make_frontend(address, self._max, files) if files else \
            self._make_frontend(address, self._max)
        self._address = address
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        selector = loop.frontend_selector if isinstance(loop, FrontendLoop) else None
        if selector is not None and selector.owner is None:
            selector.owner, self._selector = self, selector
        try:
            return int(self._native.start(polled=self._selector is not None))
        except SwapserveError as exc:
            log.error("native front end: %s", exc)
            return 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._native.fileno(), self._on_events)
        if self._selector is not None:
            assert self._loop.frontend_selector is self._selector  # type: ignore[attr-defined]
            self._native.watch(self._selector.fileno())  # raises SwapserveError (epoll) when it cannot
            self._selector.frontend = self._native

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls; in-flight ones get ``grace`` seconds, then are cancelled."""
        if not self._address or self._stopped.is_set():
            return
        await asyncio.to_thread(self._native.stop, float(grace or 0.0))
        if self._selector is not None:
            self._selector.frontend = self._selector.owner = None
        assert self._loop is not None
        self._loop.remove_reader(self._native.fileno())
        for call in list(self._calls.values()):
            call.cancel()
        self._stopped.set()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # -- events -----------------------------------------------------------------------------

    def _handler(self, method: str) -> grpc.RpcMethodHandler | None:
        """The method's handler, or None (the call is answered UNIMPLEMENTED).

        Only hits are cached: the path is the client's to choose, so caching misses would let a
        client grow this table by one entry per distinct path it sends, without bound. A miss
        asks the generic handlers again (a few dict lookups), which only unknown methods pay.
        """
        found = self._methods.get(method)
        if found is not None:
            return found
        details = _HandlerCallDetails(method)
        for g in self._generic:
            found = g.service(details)
            if found is not None:
                self._methods[method] = found
                return found
        return None

    def _on_events(self) -> None:
        events = self._native.drain()
        # Tasks created below copy the context: each request learns how many arrived with it.
        ARRIVALS.set(sum(1 for e in events if e[1] == _MESSAGE))
        for call_id, kind, method, payload, deadline_ns in events:
            try:
                if kind == _MESSAGE:
                    self._message(call_id, method, payload, deadline_ns)
                elif kind == _HALF_CLOSE:
                    call = self._calls.get(call_id)
                    if call is None:  # the client sent no message at all
                        self._begin(call_id, method, None, deadline_ns)
                    elif call.requests is not None:
                        call.requests.put_nowait(_END)
                elif kind == _WRITABLE:
                    call = self._calls.get(call_id)
                    if call is not None and call.writable is not None and not call.writable.done():
                        call.writable.set_result(None)
                else:  # CANCELLED
                    call = self._calls.get(call_id)
                    if call is not None:
                        call.context._cancelled = True
                        call.cancel()
                    else:
                        self._native.finish(call_id, grpc.StatusCode.CANCELLED.value[0], "cancelled")
            except Exception:  # noqa: BLE001 - one bad event must not stop the others
                log.exception("native front end: event for call %d (%s) failed", call_id, method)
                self._finish(call_id, grpc.StatusCode.INTERNAL, "internal error in the front end")

    @staticmethod
    def _decode(handler: grpc.RpcMethodHandler, payload: bytes) -> Any:
        return handler.request_deserializer(payload) if handler.request_deserializer else payload

    def _message(self, call_id: int, method: str, payload: bytes, deadline_ns: int) -> None:
        call = self._calls.get(call_id)
        if call is None:
            self._begin(call_id, method, payload, deadline_ns)
        elif call.requests is not None:  # a further message of a client-streaming call
            handler = self._methods[method]
            assert handler is not None
            call.requests.put_nowait(self._decode(handler, payload))

    def _begin(self, call_id: int, method: str, payload: bytes | None, deadline_ns: int) -> None:
        """A new call: its first message, or None when the client ended its stream before sending one."""
        handler = self._handler(method)
        if handler is None:
            self._native.finish(call_id, grpc.StatusCode.UNIMPLEMENTED.value[0], "Method not found!")
            return
        if payload is None and not handler.request_streaming:
            self._native.finish(call_id, grpc.StatusCode.INTERNAL.value[0], "the call sent no request message")
            return
        request = _END
        if payload is not None:
            try:
                request = self._decode(handler, payload)
            except Exception:  # noqa: BLE001 - an unparseable message is the client's error
                self._native.finish(call_id, grpc.StatusCode.INTERNAL.value[0], "could not parse the request message")
                return
        context = _Context(self, call_id, deadline_ns, handler.response_serializer)
        call = self._calls[call_id] = _Call(context)
        if handler.request_streaming:
            call.requests = asyncio.Queue()
            call.requests.put_nowait(request)
            request = self._iterate(call_id, call.requests)
        self._start(call_id, call, self._run(call_id, handler, request, context))

    def _start(self, call_id: int, call: _Call, coro: Any) -> None:
        """Run the call's coroutine now, up to its first suspension; a Task takes over only then.

        Most unary calls finish without suspending (an idle inline model answers at once), so
        they skip a Task and a turn of the event loop. A suspended call waits on an asyncio
        future; once it is done (or cancelled) a Task resumes the coroutine from there.
        """
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        except BaseException:  # noqa: BLE001 - _run answers every exception itself; this is a bug
            log.exception("native front end: call %d failed to start", call_id)
            self._task_done(call_id)
            return
        assert self._loop is not None
        if isinstance(waiting, asyncio.Future):
            waiting._asyncio_future_blocking = False  # what a Task does with the future it is given
            call.waiting = waiting
            waiting.add_done_callback(lambda _f: self._adopt(call_id, call, coro))
        else:  # a bare yield (asyncio.sleep(0)): continue on the next turn
            self._loop.call_soon(self._adopt, call_id, call, coro)

    def _adopt(self, call_id: int, call: _Call, coro: Any) -> None:
        assert self._loop is not None
        call.waiting = None
        call.task = self._loop.create_task(_resume(coro))
        call.task.add_done_callback(lambda _task: self._task_done(call_id))

    def _task_done(self, call_id: int) -> None:
        # A task cancelled before its first step never ran _run's handlers: answer the call here.
        if call_id in self._calls:
            self._finish(call_id, grpc.StatusCode.CANCELLED, "cancelled")

    async def _iterate(self, call_id: int, queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        """A client-streaming call's messages, read as its handler asks for them.

        Handing out one message asks the front end for the next, so one is read ahead while the
        handler works on this one, and none beyond it until the handler asks again.
        """
        while (item := await queue.get()) is not _END:
            self._native.read(call_id)
            yield item

    async def _room(self, call_id: int) -> None:
        """Wait until the front end has room for more of the call's answer (its WRITABLE event).

        Only after a ``write`` answered FULL; a cancelled call ends the wait with CancelledError.
        """
        call = self._calls.get(call_id)
        if call is None:
            return
        assert self._loop is not None
        call.writable = self._loop.create_future()
        try:
            await call.writable
        finally:
            call.writable = None

    def _finish(self, call_id: int, code: grpc.StatusCode, details: str, last: bytes | None = None) -> None:
        self._calls.pop(call_id, None)
        self._native.finish(call_id, code.value[0], details, last)

    async def _run(self, call_id: int, handler: grpc.RpcMethodHandler, request: Any, context: _Context) -> None:
        serialize = handler.response_serializer
        try:
            if handler.request_streaming and handler.response_streaming:
                behavior = handler.stream_stream
            elif handler.request_streaming:
                behavior = handler.stream_unary
            elif handler.response_streaming:
                behavior = handler.unary_stream
            else:
                behavior = handler.unary_unary
            result = behavior(request, context)
            if handler.response_streaming:
                if inspect.isasyncgen(result):
                    async for message in result:
                        if self._native.write(call_id, _serialized(serialize, message)) == _WRITE_FULL:
                            await self._room(call_id)
                elif inspect.isawaitable(result):  # writes through context.write, returns None
                    await result
            else:
                response = await result if inspect.isawaitable(result) else result
                if context._code not in (None, grpc.StatusCode.OK):
                    self._finish(call_id, context._code, context._details)
                    return
                self._finish(call_id, grpc.StatusCode.OK, "", serialize(response) if serialize else response)
                return
            code = context._code or grpc.StatusCode.OK
            self._finish(call_id, code, context._details)
        except _Abort as exc:
            self._finish(call_id, exc.code, exc.details)
        except asyncio.CancelledError:
            self._finish(call_id, grpc.StatusCode.CANCELLED, "cancelled")
        except Exception as exc:  # noqa: BLE001 - as grpc.aio answers an unexpected exception
            log.exception("native front end: %s raised", behavior)
            self._finish(call_id, grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")
        finally:
            context._done = True
