"""Typed access to the native code: the core (``swapserve._native``) and the gRPC front end
(``swapserve._frontend``); the only module that imports either.

Routing (semantics in ``csrc/core/router.h``, mirrored by ``swapserve.routing.reference``):

* ``Router.publish(model, spec)`` swaps in a whole new, immutable routing table with one
  atomic store. Readers never wait for it; a spec whose generation is not greater than the
  model's current one is refused (:class:`~swapserve.errors.FailedPrecondition`).
* ``Router.route(model, attributes, request_id)`` is wait-free: cohort rules first (first
  match wins), then the routing key ``attributes[spec.key_attribute]``, else ``request_id``,
  else random, hashed to one of 10000 buckets and mapped to a version by cumulative weight
  in the published order. Same key + same snapshot = same version in every process.

Canonical key text: ``str`` -> UTF-8, ``int`` -> decimal, ``bool`` -> ``true``/``false``,
``float`` -> ``float.__repr__`` (``0.5``, ``1e+20``, ``nan``). Cohort rule values compare on
the same text, so the rule value ``42`` matches the attribute ``"42"``. Cohort rule values
may not be floats (write them as ``str``).

Batching: :class:`Batcher` (rules in ``csrc/core/batcher.h``).

The inference port's transport: :class:`Frontend` (``csrc/frontend/frontend.h``; built only
where grpc++ is, see :func:`frontend_available`).

Errors are the classes of :mod:`swapserve.errors`: stale publish -> ``FailedPrecondition``;
invalid spec, oversize request, bad attribute type -> ``InvalidInput``; unknown model ->
``ModelNotFound``; queue full -> ``ResourceExhausted``; closed batcher -> ``VersionNotReady``.
"""
from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import numpy as np
import numpy.typing as npt

from swapserve import _native
from swapserve.errors import FailedPrecondition, InvalidInput

#: A request attribute value (KServe v2 InferParameter kinds).
AttrValue = Union[str, int, bool, float]
#: A cohort rule value.
RuleValue = Union[str, int, bool]

_INT64_MAX = (1 << 63) - 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortRule:
    """Requests whose ``attribute`` equals ``value`` (canonical text) go to ``version``."""

    attribute: str
    value: RuleValue
    version: int


@dataclass(frozen=True)
class RoutingSpec:
    """A complete routing table for one model.

    ``versions`` take live traffic in this fixed order with ``weights_bp`` basis points each
    (same length, sum exactly 10000). ``shadows`` get a copy of every request (the serving
    version is left out of a route's shadows). ``cohorts`` win over weights, first match wins.
    """

    generation: int
    versions: tuple[int, ...]
    weights_bp: tuple[int, ...]
    shadows: tuple[int, ...] = ()
    cohorts: tuple[CohortRule, ...] = ()
    key_attribute: str = "routing_key"


class Route(NamedTuple):
    """Where one request goes: the serving version, its shadows, and the snapshot generation."""

    version: int
    shadows: tuple[int, ...]
    generation: int


_route_fast = _native.route_fast


def _require_int(model: str, field: str, value: object, upper: int = _INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"routing spec for model '{model}' is invalid: {field} {value!r} is not an integer")
    if not -_INT64_MAX <= value <= upper:
        raise InvalidInput(f"routing spec for model '{model}' is invalid: {field} {value} is out of range")
    return value


class Router:
    """Routing tables of every model, read wait-free and replaced as whole snapshots.

    Thread-safe. ``route``/``route_batch``/``snapshot``/``models`` never block on
    ``publish``/``remove``; publishers serialise among themselves. A failed publish leaves
    the previous table live.
    """

    def __init__(self) -> None:
        self._native = _native.Router()
        # Borrowed pointer for the per-request fast path; lives exactly as long as _native.
        self._capsule = self._native.capsule()

    def publish(self, model: str, spec: RoutingSpec) -> None:
        """Make ``spec`` the model's table (adds the model if new).

        Raises InvalidInput (invalid spec; message names the model and the problem) or
        FailedPrecondition (``spec.generation`` <= the model's current generation).
        """
        generation = _require_int(model, "generation", spec.generation, upper=(1 << 64) - 1)
        if generation < 0:
            raise InvalidInput(f"routing spec for model '{model}' is invalid: generation must be >= 0")
        versions = [_require_int(model, "version", v) for v in spec.versions]
        weights = [_require_int(model, "weight", w) for w in spec.weights_bp]
        shadows = [_require_int(model, "shadow version", s) for s in spec.shadows]
        cohorts = []
        for rule in spec.cohorts:
            if not isinstance(rule.attribute, str) or not isinstance(rule.value, (str, int, bool)):
                raise InvalidInput(
                    f"routing spec for model '{model}' is invalid: cohort rule {rule!r} needs a str attribute "
                    "and a str, int or bool value"
                )
            cohorts.append((rule.attribute, rule.value, _require_int(model, "cohort version", rule.version)))
        self._native.publish(model, generation, versions, weights, shadows, cohorts, spec.key_attribute)

    def remove(self, model: str) -> bool:
        """Drop the model's table; True if it existed. Readers see it or not, never half."""
        return self._native.remove(model)

    def route(self, model: str, attributes: Mapping[str, AttrValue] | None = None, request_id: str = "") -> Route:
        """Route one request; wait-free. Raises ModelNotFound, or InvalidInput for a key of a bad type."""
        if attributes is not None and type(attributes) is not dict:
            attributes = dict(attributes)
        return _route_fast(self._capsule, model, attributes, request_id, Route)  # type: ignore[no-any-return]

    def route_batch(self, model: str, keys: Iterable[AttrValue]) -> list[int]:
        """Versions for many routing keys (weights only, no cohorts), all from one snapshot."""
        return self._native.route_batch(model, keys)

    def snapshot(self, model: str) -> RoutingSpec | None:
        """The model's current spec, or None if it has no table."""
        raw = self._native.snapshot(model)
        if raw is None:
            return None
        generation, versions, weights, shadows, cohorts, key_attribute = raw
        return RoutingSpec(
            generation=generation,
            versions=tuple(versions),
            weights_bp=tuple(weights),
            shadows=tuple(shadows),
            cohorts=tuple(CohortRule(a, v, ver) for a, v, ver in cohorts),
            key_attribute=key_attribute,
        )

    def models(self) -> list[str]:
        """Names of the models with a table, sorted."""
        return self._native.models()


def hash64(key: AttrValue) -> int:
    """mix64(fnv1a64(canonical bytes)): the routing hash (exact definition in csrc/core/router.h)."""
    return _native.hash64(key)


def bucket_of(key: AttrValue) -> int:
    """``hash64(key) % 10000``: the key's routing bucket."""
    return _native.bucket_of(key)


def canonical_key(key: AttrValue) -> bytes:
    """The bytes a key is hashed as."""
    return _native.canonical(key)


def atomics_lock_free() -> bool:
    """Whether the atomics behind snapshot publication are lock-free on this machine."""
    return _native.atomics_lock_free()


def retired_pending() -> int:
    """Free what readers no longer hold; return how many retired snapshots still wait."""
    return _native.retired_pending()


# --------------------------------------------------------------------------- batching


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch from :meth:`Batcher.next_batch`.

    ``inputs[i]`` is input ``i`` of every ticket concatenated in ticket order (a 1-D uint8
    array owning its buffer); ``rows[k]`` and ``queue_ns[k]`` belong to ``tickets[k]``.
    ``expired`` tickets were NOT run: answer them DEADLINE_EXCEEDED. Either ``tickets`` or
    ``expired`` is non-empty.
    """

    tickets: list[int]
    rows: list[int]
    inputs: list[npt.NDArray[np.uint8]]
    queue_ns: list[int]
    expired: list[int]


class Batcher:
    """Dynamic batching queue of one serving version (rules in csrc/core/batcher.h).

    Thread-safe for any number of producers and consumers. ``max_batch_rows == 0`` disables
    batching (each request is its own batch); ``max_queue_delay_us == 0`` dispatches whatever
    is queued at once; ``max_queue_size == 0`` (requests) and ``max_queue_bytes == 0`` (their
    input bytes together) mean unbounded. ``name`` (e.g. ``"model 'm' version 3"``) appears in
    error messages.
    """

    def __init__(
        self,
        max_batch_rows: int,
        preferred_batch_rows: Sequence[int] = (),
        max_queue_delay_us: int = 0,
        max_queue_size: int = 0,
        max_queue_bytes: int = 0,
        name: str = "",
    ) -> None:
        self._native = _native.Batcher(
            max_batch_rows, list(preferred_batch_rows), max_queue_delay_us, max_queue_size, max_queue_bytes, name
        )

    def submit(self, ticket: int, rows: int, inputs: Sequence[Any], deadline_ns: int = 0) -> None:
        """Copy the request's C-contiguous input buffers into the queue.

        ``deadline_ns`` is an absolute ``time.monotonic_ns()`` (0 = none). Raises
        ResourceExhausted (``max_queue_size`` requests queued, or the queued input bytes with this
        request's would pass ``max_queue_bytes``; the message names the bound and how to raise it),
        VersionNotReady (closed), InvalidInput (rows outside [1, max_batch_rows], non-contiguous
        input, input count differs from earlier requests).
        """
        self._native.submit(ticket, rows, inputs, deadline_ns)

    def next_batch(self, timeout_us: int) -> Batch | None:
        """Block (GIL released) until a batch is due; None on timeout or once closed and drained.

        ``timeout_us < 0`` waits forever. Rows of the batch never exceed max_batch_rows.
        """
        raw = self._native.next_batch(timeout_us)
        return None if raw is None else Batch(*raw)

    def close(self) -> None:
        """Refuse new submits and wake every consumer; queued requests still drain."""
        self._native.close()

    def pending(self) -> int:
        """Requests queued now."""
        return self._native.pending()

    def __len__(self) -> int:
        return self._native.pending()

    def stats(self) -> dict[str, Any]:
        """Counters: submitted, rejected_full (max_queue_size), rejected_bytes (max_queue_bytes), expired,
        batches, rows_histogram {rows: batches}."""
        return self._native.stats()


def split_rows(array: npt.NDArray[Any], rows: Sequence[int]) -> list[npt.NDArray[Any]]:
    """Views of ``array`` along axis 0, ``rows[k]`` rows each (no copy); scatter helper."""
    total = sum(rows)
    if array.shape[0] != total:
        raise InvalidInput(f"batch output has {array.shape[0]} rows but the batch's requests sum to {total}")
    out = []
    start = 0
    for n in rows:
        out.append(array[start : start + n])
        start += n
    return out


# --------------------------------------------------------------------------- benchmarks


def bench_route_ns(router: Router, model: str, keys: Sequence[AttrValue], reps: int, iters: int) -> list[float]:
    """Per-call ns of the C++ Router::Route in a C++ loop (one value per rep)."""
    return _native.bench_route(router._native, model, keys, reps, iters)


def bench_publish_visible(trials: int) -> tuple[list[int], list[int]]:
    """Latencies (ns) until a spinning reader sees a new snapshot, per trial.

    First list: from the atomic store. Second: from the start of Router.publish (validation,
    table build and store included).
    """
    store, publish = _native.bench_publish_visible(trials)
    return store, publish


# --------------------------------------------------------------------------- native gRPC front end

class EventKind(enum.IntEnum):
    """What happened to a call (``FrontendEvent.kind``); values as in csrc/frontend/frontend.h."""

    MESSAGE = 0  #: a request message: the first of every call, then one per :meth:`Frontend.read`
    HALF_CLOSE = 1  #: a streamed call's client is done sending (maybe without any message)
    CANCELLED = 2  #: the client went away or the deadline passed before the call was finished
    WRITABLE = 3  #: a call whose :meth:`Frontend.write` answered FULL may be written to again


class WriteResult(enum.IntEnum):
    """What :meth:`Frontend.write` did with a message; values as in csrc/frontend/frontend.h."""

    GONE = 0  #: dropped: the call is gone or finished
    QUEUED = 1  #: queued behind the messages grpc has not sent yet
    FULL = 2  #: queued, and the call now holds as much as it may: write no more until WRITABLE


class PollResult(enum.IntEnum):
    """What :meth:`Frontend.poll` found."""

    OFF = 0  #: the queue is shut down, or the front end is not polled: wait on the loop's descriptors alone
    IDLE = 1  #: no event waits for :meth:`Frontend.drain`
    PENDING = 2  #: events wait for :meth:`Frontend.drain`


#: One event of :meth:`Frontend.drain`: (call id, :class:`EventKind` value, method path
#: (``/package.Service/Method``), the serialized message (``MESSAGE`` only, else ``b""``),
#: deadline as ``time.monotonic_ns()`` or 0 for none). A plain tuple: it is made per request.
FrontendEvent = tuple[int, int, str, bytes, int]

_NOT_BUILT = ("the native front end is not built (grpc++ was missing at install); "
              "use --frontend python or install libgrpc++-dev and reinstall")


@functools.cache
def _frontend_problem() -> str:
    """Why ``swapserve._frontend`` cannot be used ("" when it can). Imported on first use only:
    it loads grpc++, which only a server needs."""
    try:
        from swapserve import _frontend
    except ImportError as exc:
        log.debug("swapserve._frontend: %s", exc)
        return _NOT_BUILT
    if ((getattr(_frontend, "MESSAGE", None), getattr(_frontend, "HALF_CLOSE", None),
         getattr(_frontend, "CANCELLED", None), getattr(_frontend, "WRITABLE", None)) != tuple(EventKind)
            or (getattr(_frontend, "WRITE_GONE", None), getattr(_frontend, "WRITE_QUEUED", None),
                getattr(_frontend, "WRITE_FULL", None)) != tuple(WriteResult)
            or (_frontend.POLL_OFF, _frontend.POLL_IDLE, _frontend.POLL_PENDING) != tuple(PollResult)):
        return "swapserve._frontend does not match swapserve.native (a stale build); reinstall: pip install -e ."
    return ""


def frontend_available() -> bool:
    """Whether the native front end was built (it needs grpc++ at install) and can be loaded."""
    return not _frontend_problem()


class Frontend:
    """The inference port's gRPC transport in C++ (grpc++); semantics in csrc/frontend/frontend.h.

    Calls are accepted and their first messages read in C++ (further ones when Python asks,
    :meth:`read`); Python learns of them through :meth:`drain` and answers each call it was told
    about exactly once, with :meth:`finish` (after any :meth:`write` of a streamed response).
    Calls cancelled before Python saw them are answered in C++.

    Threaded (``start(polled=False)``): a C++ thread runs the completion queue and makes
    :meth:`fileno` readable when events wait. Polled: the event loop's selector calls
    :meth:`poll`, which runs the queue on the loop's thread; :meth:`watch` lets a blocking
    poll end when the loop's own descriptors become ready.

    Raises FailedPrecondition when the front end is not built, ResourceExhausted when the
    process is out of descriptors (the message says which limit to raise).
    """

    __slots__ = ("_native",)

    def __init__(self, address: str, max_message_bytes: int, tls: tuple[str, str, str] | None = None) -> None:
        """``tls``: (key, cert, CA) PEM paths grpc++ watches (reread within a second of a change;
        CA "" for no client certificates), None for plaintext."""
        problem = _frontend_problem()
        if problem:
            raise FailedPrecondition(problem)
        from swapserve import _frontend

        key, cert, ca = tls or ("", "", "")
        self._native = _frontend.Frontend(address, max_message_bytes, key, cert, ca)

    def start(self, polled: bool = False) -> int:
        """Bind and serve; returns the bound port.

        Raises VersionNotReady (the address cannot be bound), FailedPrecondition (called twice).
        """
        return self._native.start(polled)

    def poll(self, timeout_s: float) -> int:
        """Run ready completions; unless ``timeout_s == 0`` then wait for an event (``< 0``: no
        limit), the watched descriptors or the timeout. Returns a :class:`PollResult` value.

        Only on the event loop's thread; never blocks with ``timeout_s == 0`` (and keeps the GIL then).
        """
        return self._native.poll(timeout_s)

    def watch(self, fd: int) -> None:
        """Polled mode: let a blocking :meth:`poll` end when epoll set ``fd`` (the loop's) is readable.

        Raises FailedPrecondition (not polled, or already watching), SwapserveError (epoll).
        """
        self._native.watch(fd)

    def fileno(self) -> int:
        """Readable while events wait for :meth:`drain` (threaded mode, and polled once stopped)."""
        return self._native.fileno()

    def drain(self) -> list[FrontendEvent]:
        """Every event since the last drain, oldest first."""
        return self._native.drain()

    def call_info(self, call: int) -> tuple[str, tuple[tuple[str, str], ...]] | None:
        """``(peer, metadata)`` of a live call (grpc.aio's ``peer()`` and ``invocation_metadata()``,
        binary headers left out); None when the call is gone. Read on demand: free for calls that never ask."""
        return self._native.call_info(call)

    def auth_info(self, call: int) -> dict[str, list[bytes]] | None:
        """The TLS identity of a live call's connection, as grpc.aio's ``auth_context()`` gives it
        (``x509_common_name``, ``x509_subject_alternative_name``, ``transport_security_type``;
        empty without TLS); None when the call is gone."""
        return self._native.auth_info(call)

    def write(self, call: int, data: bytes) -> int:
        """Queue one message of a streamed response; a :class:`WriteResult` value. ``FULL``: the call
        holds as much unsent answer as it may (a client that does not read): write no more to it
        until a ``WRITABLE`` event. ``GONE``: the call is gone or finished, the message dropped."""
        return self._native.write(call, data)

    def read(self, call: int) -> bool:
        """Read the next message of a client-streamed ``call``: a ``MESSAGE`` event follows, or
        ``HALF_CLOSE`` when the client is done. Until asked, no further message is read (the client
        waits in HTTP/2 flow control). False, and nothing read, when the call is gone or finishing,
        a read is outstanding, or the half-close was reported."""
        return self._native.read(call)

    def finish(self, call: int, code: int, details: str, last: bytes | None = None) -> bool:
        """End ``call`` with gRPC status ``code`` (its number) and ``details``, ``last`` as the final
        message (dropped for an error status). False when the call is gone or already finished.
        """
        return self._native.finish(call, code, details, last)

    def stop(self, grace_s: float) -> None:
        """Refuse new calls, give in-flight ones ``grace_s`` seconds, then cancel them.

        Blocks for up to the grace period (the GIL released): the event loop must keep running
        (and answering) meanwhile, so call it from another thread. Idempotent.
        """
        self._native.stop(grace_s)
