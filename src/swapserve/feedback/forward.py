"""Labels in a fleet: a report to any replica joins the prediction it belongs to.

Each replica logs the predictions it served (``PredictionLog``, in memory), so a label reported
to another replica must travel to the one that logged it. The id tells which: a server-assigned
id starts with the tag of the replica that assigned it (``dataplane.replica_tag``). For each
report, ``Forwarder.report``:

1. joins here every outcome whose id this replica logged (its prediction or shadow log) or
   tagged, exactly as a single server does;
2. sends the outcomes tagged with another replica's tag to that replica (its gRPC address from
   the registry's ``replicas`` table, ``PeerDirectory``);
3. asks every other live replica about the untagged ids (client-supplied request ids) that are
   ``unknown`` or ``expired`` here; the most informative answer wins (``merge``): the answer of
   the replica that has the prediction (joined, excluded, duplicate, invalid) beats expired,
   which beats unknown.

One Report per peer (its tagged outcomes and the untagged ones together), all peers at once,
each with a short deadline (``FORWARD_TIMEOUT_S``). Guarantees:

* **Order and counts.** One result per outcome, in the request's order; the summary counts are
  those of the merged results. The joins happen (and are booked in the per-slice counters and
  reporter books) only on the replica that logged the prediction, so a label counts once fleet
  wide; ``swapserve_feedback_outcomes_total`` counts each outcome's final result once, on the
  replica it was reported to (a forwarded report is not counted again where it lands).
* **Never fails the report.** A peer that is down, too slow or refuses the forwarded call leaves
  its outcomes ``unknown`` with a message naming the replica and why.
* **No loops.** A forwarded call carries ``FORWARDED_METADATA: <origin replica id>``; a call
  that carries it is joined where it lands and never forwarded again.
* **No escalation.** The forwarded call carries the caller's own credential metadata, and the
  serving replica authenticates the reporter with its own rules (``server.feedback.FeedbackAuth``);
  replicas have no trusted channel between them. Anonymous loopback feedback therefore reaches
  only replicas on the same host; in a fleet, use feedback tokens (the same on every replica).
* **Off the request path, and cheap when alone.** The registry is read on the registry's
  executor, at most every ``REFRESH_S`` (sooner only for a tag it does not know yet); a report
  whose ids are all this replica's never reads it.

The transport (``Send``) is injected: ``server.feedback_forward`` sends over grpc.aio (protobuf
stays in ``server/``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from swapserve.dataplane import tag_of
from swapserve.errors import RegistryUnavailable
from swapserve.feedback.observer import FeedbackObserver, Outcome, OutcomeResult, ReportSummary, check_report, summarize
from swapserve.feedback.slices import ANONYMOUS

log = logging.getLogger(__name__)

#: Metadata a forwarded report carries: the origin replica's id. Such a call is never forwarded.
FORWARDED_METADATA = "x-swapserve-forwarded"
#: Deadline of one forwarded report (seconds): a replica that is down costs the reporter at most this.
FORWARD_TIMEOUT_S = 2.0
#: How long the replica list read from the registry is used before it is read again (seconds).
REFRESH_S = 1.5
#: The soonest it is read again because a report carries a tag it does not know (a new replica).
MIN_REFRESH_S = 0.25

#: How informative an answer is; the highest wins (ties: the first, this replica's own answer first).
_RANK = {"joined": 3, "excluded": 3, "duplicate": 3, "invalid": 3, "expired": 2, "unknown": 1}


@dataclass(frozen=True)
class Peer:
    """A replica of the fleet as the registry lists it."""

    replica_id: str
    address: str  #: host:port of its inference (gRPC) port, where the feedback service is
    stale: bool = False  #: no heartbeat for a while: it may be down

    def __str__(self) -> str:
        return f"replica '{self.replica_id}' ({self.address})"


class ForwardFailed(Exception):
    """A peer did not answer a forwarded report. ``refused``: it answered with an error status
    (UNAUTHENTICATED, ...); otherwise it could not be reached in time."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.refused = reason, refused


#: ``send(peer, model, outcomes, credentials, timeout_s)``: one Report to ``peer`` carrying the
#: caller's credential metadata (and FORWARDED_METADATA); one result per outcome, in order.
#: Raises ForwardFailed.
Send = Callable[[Peer, str, Sequence[Outcome], Sequence[tuple[str, str]], float], Awaitable[Sequence[OutcomeResult]]]
#: ``load(model)``: every replica the registry lists for ``model`` (this one included).
#: Raises RegistryUnavailable.
LoadPeers = Callable[[str], Awaitable[Sequence[Peer]]]


@dataclass(frozen=True)
class PeerMap:
    """The other replicas, as last read: ``by_tag`` (tags naming exactly one replica), ``live``
    (those with a recent heartbeat, asked about untagged ids), ``error`` (why the last read failed)."""

    by_tag: dict[str, Peer] = field(default_factory=dict)
    live: tuple[Peer, ...] = ()
    error: str = ""


class PeerDirectory:
    """The other replicas by tag, read from the registry at most every ``refresh_s`` per model.

    This replica (by id or address) is never listed. A tag two replicas share (a 1 in 2^32
    chance per pair) names neither: their ids are asked of every live replica instead. While the
    registry cannot be read, the last list is used (``PeerMap.error`` says why) and the read is
    retried after ``refresh_s``. Concurrent callers share one read.
    """

    def __init__(self, load: LoadPeers, *, replica_id: str, address: str, tag: Callable[[str], str],
                 refresh_s: float = REFRESH_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        #: This replica: never listed (``address`` may be set once the port is bound).
        self.replica_id, self.address = replica_id, address
        self._tag = tag
        self.refresh_s = refresh_s
        self._clock = clock
        self._maps: dict[str, tuple[float, PeerMap]] = {}
        self._reads: dict[str, asyncio.Future[PeerMap]] = {}

    async def peers(self, model: str, *, fresh: bool = False) -> PeerMap:
        """The current map; ``fresh`` re-reads one older than ``MIN_REFRESH_S`` (a tag it lacks)."""
        cached = self._maps.get(model)
        now = self._clock()
        if cached is not None:
            age = now - cached[0]
            if age < (min(MIN_REFRESH_S, self.refresh_s) if fresh else self.refresh_s):
                return cached[1]
        read = self._reads.get(model)
        if read is None:
            read = asyncio.ensure_future(self._read(model, cached[1] if cached is not None else PeerMap()))
            self._reads[model] = read
            read.add_done_callback(lambda _: self._reads.pop(model, None))
        return await asyncio.shield(read)

    async def _read(self, model: str, last: PeerMap) -> PeerMap:
        try:
            replicas = await self._load(model)
        except RegistryUnavailable as exc:
            result = PeerMap(last.by_tag, last.live, f"the registry is unavailable ({exc.message})")
        else:
            result = self._index(replicas)
        self._maps[model] = (self._clock(), result)
        return result

    def _index(self, replicas: Iterable[Peer]) -> PeerMap:
        by_tag: dict[str, Peer] = {}
        shared: set[str] = set()
        live = []
        for p in replicas:
            if p.replica_id == self.replica_id or p.address == self.address or not p.address:
                continue
            tag = self._tag(p.replica_id)
            if tag in by_tag:
                shared.add(tag)
            by_tag[tag] = p
            if not p.stale:
                live.append(p)
        for tag in shared:
            del by_tag[tag]
        return PeerMap(by_tag, tuple(live))


def merge(answers: Sequence[OutcomeResult]) -> OutcomeResult:
    """The most informative of several replicas' answers about one outcome (``_RANK``; ties: the
    first). ``answers`` is not empty."""
    best = answers[0]
    for a in answers[1:]:
        if _RANK.get(a.status, 0) > _RANK.get(best.status, 0):
            best = a
    return best


def _unknown_everywhere(o: Outcome, model: str, asked: Sequence[Peer], failed: dict[Peer, ForwardFailed],
                        registry_error: str) -> OutcomeResult:
    answered = [p.replica_id for p in asked if p not in failed]
    where = "this replica" + (f" or {', '.join(repr(r) for r in answered)}" if answered else "")
    msg = (f"no prediction of model '{model}' was logged with request id '{o.id}' on {where} (was the id "
           "returned by the server used?)")
    missing = [f"no answer from {p} ({failed[p].reason})" for p in asked if p in failed]
    if registry_error:
        missing.append(f"the other replicas could not be listed: {registry_error}")
    if missing:
        msg += "; " + "; ".join(missing)
    return OutcomeResult(o.id, "unknown", msg)


def _owner_failed(o: Outcome, peer: Peer, failure: ForwardFailed) -> OutcomeResult:
    if failure.refused:
        return OutcomeResult(o.id, "unknown", (
            f"request '{o.id}' was served by {peer}, which refused the forwarded report: {failure.reason}; the "
            "serving replica authenticates the reporter itself, so every replica must accept its feedback token "
            "(the same --feedback-token-file on all)"))
    return OutcomeResult(o.id, "unknown", (
        f"request '{o.id}' was served by {peer}, which did not answer the forwarded report ({failure.reason}); "
        "the label was not recorded: send it again once that replica is back (its predictions live only in "
        "its memory)"))


class Forwarder:
    """Joins a report's outcomes here or on the replica that logged them (see the module doc)."""

    def __init__(self, feedback: FeedbackObserver, directory: PeerDirectory, send: Send, *, tag: str,
                 timeout_s: float = FORWARD_TIMEOUT_S, counter: Any = None) -> None:
        """``tag``: this replica's (its ids start with it). ``counter``: a prometheus Counter with
        labels (model, result), counting forwarded outcomes by their final result (``unreachable``
        / ``refused`` when the replica that served them did not answer)."""
        self.feedback = feedback
        self.directory = directory
        self._send = send
        self.tag = tag
        self.timeout_s = timeout_s
        self._counter = counter

    def _mine(self, o: Outcome) -> bool:
        rid = o.id
        return not rid or tag_of(rid) == self.tag or rid in self.feedback.log or rid in self.feedback.shadow_log

    async def report(self, model: str, outcomes: Sequence[Outcome], reporter: str = ANONYMOUS,
                     credentials: Sequence[tuple[str, str]] = (), *,
                     deadline_s: float | None = None) -> ReportSummary:
        """Like ``FeedbackObserver.report`` (same results, same errors), for the whole fleet.

        ``credentials``: the caller's credential metadata, passed on to the replicas asked.
        ``deadline_s``: what is left of the caller's deadline (forwarding stops well before it).
        """
        check_report(model, len(outcomes))
        if all(self._mine(o) for o in outcomes):
            return self.feedback.report(model, outcomes, reporter)  # a single server's report, unchanged
        tags = {tag_of(o.id) for o in outcomes if not self._mine(o)} - {""}
        peers = await self.directory.peers(model)
        if tags - peers.by_tag.keys():
            peers = await self.directory.peers(model, fresh=True)
        here: list[int] = []
        owned: dict[int, Peer] = {}
        for i, o in enumerate(outcomes):
            owner = None if self._mine(o) else peers.by_tag.get(tag_of(o.id))
            if owner is None:
                here.append(i)
            else:
                owned[i] = owner
        results: list[OutcomeResult | None] = [None] * len(outcomes)
        local = self.feedback.report(model, [outcomes[i] for i in here], reporter, count=False)
        ask: list[int] = []
        for i, r in zip(here, local.results):
            results[i] = r
            if r.status in ("unknown", "expired") and not self._mine(outcomes[i]):
                ask.append(i)
        # One call per peer: the outcomes it owns, then the untagged ones every live replica is asked.
        calls: dict[Peer, list[int]] = {}
        for i, p in owned.items():
            calls.setdefault(p, []).append(i)
        if ask:
            for p in peers.live:
                calls.setdefault(p, []).extend(ask)
        timeout = self.timeout_s if deadline_s is None else max(0.05, min(self.timeout_s, 0.8 * deadline_s))
        answers = await asyncio.gather(*(self._call(p, model, [outcomes[i] for i in idx], credentials, timeout)
                                         for p, idx in calls.items()))
        failed: dict[Peer, ForwardFailed] = {}
        heard: dict[int, list[OutcomeResult]] = {}
        for (p, idx), answer in zip(calls.items(), answers):
            if isinstance(answer, ForwardFailed):
                failed[p] = answer
                continue
            for i, r in zip(idx, answer):
                heard.setdefault(i, []).append(r)
        for i, p in owned.items():
            got = heard.get(i)
            results[i] = merge(got) if got else _owner_failed(outcomes[i], p, failed[p])
        for i in ask:
            best = merge([results[i], *heard.get(i, ())])  # type: ignore[list-item]
            if best.status == "unknown":
                best = _unknown_everywhere(outcomes[i], model, peers.live, failed, peers.error)
            results[i] = best
        summary = summarize(results)  # type: ignore[arg-type]
        self.feedback.count_results(model, summary)
        self._count(model, owned, ask, bool(peers.live), results, failed)  # type: ignore[arg-type]
        return summary

    async def _call(self, peer: Peer, model: str, outcomes: list[Outcome], credentials: Sequence[tuple[str, str]],
                    timeout: float) -> Sequence[OutcomeResult] | ForwardFailed:
        try:
            answer = await self._send(peer, model, outcomes, credentials, timeout)
        except ForwardFailed as exc:
            log.warning("feedback: %d outcome(s) for model '%s' not forwarded to %s: %s", len(outcomes), model, peer,
                        exc.reason)
            return exc
        if len(answer) != len(outcomes) or any(r.id != o.id for r, o in zip(answer, outcomes)):
            return ForwardFailed(f"it answered {len(answer)} result(s) for {len(outcomes)} outcome(s)", refused=True)
        return answer

    def _count(self, model: str, owned: dict[int, Peer], ask: list[int], asked: bool, results: list[OutcomeResult],
               failed: dict[Peer, ForwardFailed]) -> None:
        if self._counter is None:
            return
        counts: dict[str, int] = {}
        for i, p in owned.items():
            f = failed.get(p)
            result = results[i].status if f is None else ("refused" if f.refused else "unreachable")
            counts[result] = counts.get(result, 0) + 1
        for i in ask if asked else ():
            counts[results[i].status] = counts.get(results[i].status, 0) + 1
        for result, n in counts.items():
            self._counter.labels(model, result).inc(n)


__all__ = ["FORWARDED_METADATA", "FORWARD_TIMEOUT_S", "ForwardFailed", "Forwarder", "LoadPeers", "Peer", "PeerDirectory",
           "PeerMap", "REFRESH_S", "Send", "merge"]
