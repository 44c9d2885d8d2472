"""Labels in a fleet (issue 15): server ids name their replica, and a report to any replica joins
the prediction it belongs to.

Every replica here is a real ``FeedbackObserver`` with its own prediction log and counters; only
the wire between replicas is replaced (``send`` calls the other replica's observer the way its
feedback service would answer a forwarded call, or fails the way grpc does).
"""
from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter

from swapserve.dataplane import RANDOM_CHARS, TAG_CHARS, RequestIds, replica_tag, tag_of
from swapserve.errors import InvalidInput, RegistryUnavailable
from swapserve.feedback.forward import ForwardFailed, Forwarder, Peer, PeerDirectory, merge
from swapserve.feedback.observer import FeedbackObserver, Outcome, OutcomeResult
from swapserve.feedback.predictions import PredictionLog
from swapserve.feedback.slices import SliceStats
from swapserve.types import InferRequest, ModelSpec, Tensor, TensorSpec
from tests.fakes import FakeClock

DIGITS = ModelSpec("digits", "pytorch_libtorch", 64, (TensorSpec("pixels", "FP32", (64,)),),
                   (TensorSpec("probabilities", "FP32", (10,)),))


# -- ids ----------------------------------------------------------------------------------------


def test_a_replica_tag_is_8_hex_of_the_sha256_of_its_id() -> None:
    assert replica_tag("replica-0") == hashlib.sha256(b"replica-0").hexdigest()[:8]
    assert re.fullmatch(r"[0-9a-f]{8}", replica_tag("pod-a")) and replica_tag("pod-a") != replica_tag("pod-b")


def test_server_ids_start_with_the_replica_tag_and_keep_128_random_bits() -> None:
    tag = replica_tag("a")
    new_id = RequestIds(tag)
    ids = [new_id() for _ in range(1500)]  # crosses refills of the id buffer
    assert len(set(ids)) == 1500
    assert all(re.fullmatch(rf"{tag}[0-9a-f]{{{RANDOM_CHARS}}}", i) for i in ids)
    assert len({i[TAG_CHARS:] for i in ids}) == 1500
    assert {tag_of(i) for i in ids} == {tag}
    assert re.fullmatch(r"[0-9a-f]{32}", RequestIds()())  # untagged: as before


@pytest.mark.parametrize("rid", ["client-7", "0" * 32, "A" * 40, "g" * 40, "0" * 41, ""])
def test_an_id_not_in_the_server_format_has_no_tag(rid: str) -> None:
    assert tag_of(rid) == ""


# -- merging answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("answers,want", [
    (["unknown", "joined", "unknown"], "joined"),
    (["expired", "unknown", "duplicate"], "duplicate"),
    (["unknown", "expired"], "expired"),
    (["invalid", "unknown"], "invalid"),
    (["unknown", "excluded"], "excluded"),
    (["unknown", "unknown"], "unknown"),
])
def test_the_most_informative_answer_wins(answers: list[str], want: str) -> None:
    got = merge([OutcomeResult("x", s, f"from {i}") for i, s in enumerate(answers)])
    assert got.status == want and got.message == f"from {answers.index(want)}"


# -- a fleet of observers -----------------------------------------------------------------------


class Replica:
    """One replica's feedback state: its own log, counters and request ids."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.peer = Peer(name, f"10.0.0.{ord(name[0])}:8001")
        self.metrics = CollectorRegistry()
        self.feedback = FeedbackObserver(SliceStats(self.metrics), PredictionLog(capacity=10_000))
        self.new_id = RequestIds(replica_tag(name))
        self.down = False
        self.refuses = ""

    def serve(self, predicted: int, rid: str = "") -> str:
        req = InferRequest("digits", id=rid or self.new_id())
        x = np.zeros((1, 64), np.float32)
        req.inputs = [Tensor("pixels", "FP32", (1, 64), x)]
        out = np.full((1, 10), 0.01, np.float32)
        out[0, predicted] = 0.9
        self.feedback.on_response(req, DIGITS, 1, [x], {"probabilities": out}, 0.001)
        return req.id

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, {"model": "digits", **labels}) or 0.0


class Fleet:
    def __init__(self, *names: str) -> None:
        self.replicas = {n: Replica(n) for n in names}
        self.stale: set[str] = set()
        self.reads = 0
        self.registry_down = False
        self.clock = FakeClock(100.0)
        self.sent: list[tuple[str, list[str], tuple[tuple[str, str], ...]]] = []
        self.forwarders: dict[str, Forwarder] = {}

    async def load(self, model: str) -> list[Peer]:
        self.reads += 1
        if self.registry_down:
            raise RegistryUnavailable("the registry is down (test)")
        return [Peer(r.name, r.peer.address, r.name in self.stale) for r in self.replicas.values()]

    async def send(self, peer: Peer, model: str, outcomes: Sequence[Outcome], credentials: Sequence[tuple[str, str]],
                   timeout_s: float) -> list[OutcomeResult]:
        r = self.replicas[peer.replica_id]
        self.sent.append((peer.replica_id, [o.id for o in outcomes], tuple(credentials)))
        if r.down:
            raise ForwardFailed("UNAVAILABLE: failed to connect to all addresses")
        if r.refuses:
            raise ForwardFailed(f"UNAUTHENTICATED: {r.refuses}", refused=True)
        # What the peer's feedback service does with a forwarded call: join here, not counted again.
        return list(r.feedback.report(model, outcomes, "alice", count=False).results)

    def forwarder(self, name: str) -> Forwarder:
        if name in self.forwarders:
            return self.forwarders[name]
        r = self.replicas[name]
        directory = PeerDirectory(self.load, replica_id=name, address=r.peer.address, tag=replica_tag,
                                  clock=self.clock)
        counter = Counter("swapserve_feedback_forwarded", "", ["model", "result"], registry=r.metrics)
        fwd = self.forwarders[name] = Forwarder(r.feedback, directory, self.send, tag=r.new_id.tag, counter=counter)
        return fwd


def labels(*ids: str, label: int = 3) -> list[Outcome]:
    return [Outcome(i, "label", label) for i in ids]


def test_a_label_reported_to_any_replica_joins_where_the_prediction_was_logged() -> None:
    fleet = Fleet("a", "b", "c")
    a, b, c = fleet.replicas.values()
    fwd = fleet.forwarder("a")
    ids = [a.serve(3), b.serve(3), c.serve(5), b.serve(3, rid="client-1"), c.serve(3, rid="client-2"),
           a.serve(3, rid="client-3")]
    creds = (("authorization", "Bearer t0ken-of-alice-16"),)
    s = asyncio.run(fwd.report("digits", labels(*ids, "nobody-logged-this"), "alice", creds))
    assert [r.id for r in s.results] == [*ids, "nobody-logged-this"]  # the request's order
    assert [r.status for r in s.results] == ["joined"] * 6 + ["unknown"]
    assert (s.joined, s.unknown, s.invalid) == (6, 1, 0)
    assert "on this replica or 'b', 'c'" in s.results[-1].message
    # One call per peer: its own tagged ids, then the untagged ones nobody here logged.
    assert sorted(fleet.sent) == [("b", [ids[1], "client-1", "client-2", "nobody-logged-this"], creds),
                                  ("c", [ids[2], "client-1", "client-2", "nobody-logged-this"], creds)]
    # Each label joined once, on the replica that logged it; each outcome counted once, where reported.
    assert [r.feedback.slices.snapshot("digits", 1)["overall"].labelled for r in (a, b, c)] == [2, 2, 2]
    assert a.sample("swapserve_feedback_outcomes_total", result="joined") == 6
    assert a.sample("swapserve_feedback_outcomes_total", result="unknown") == 1
    assert b.sample("swapserve_feedback_outcomes_total", result="unknown") == 0
    assert a.sample("swapserve_feedback_forwarded_total", result="joined") == 4
    assert a.sample("swapserve_feedback_forwarded_total", result="unknown") == 1
    # Sent again, to another replica: duplicate, the first report stands.
    again = asyncio.run(fleet.forwarder("c").report("digits", labels(*ids, label=0), "alice", creds))
    assert [r.status for r in again.results] == ["duplicate"] * 6 and again.duplicate == 6
    assert [r.feedback.slices.snapshot("digits", 1)["overall"].correct for r in (a, b, c)] == [2, 2, 1]


def test_a_report_of_this_replicas_ids_alone_never_reads_the_registry() -> None:
    fleet = Fleet("a", "b")
    a = fleet.replicas["a"]
    fwd = fleet.forwarder("a")
    s = asyncio.run(fwd.report("digits", labels(a.serve(3), a.serve(3, rid="mine"), a.new_id()), "alice"))
    assert [r.status for r in s.results] == ["joined", "joined", "unknown"]  # a tag of its own: not asked around
    assert fleet.reads == 0 and fleet.sent == []
    with pytest.raises(InvalidInput, match="model name"):
        asyncio.run(fwd.report("", labels("x")))


def test_a_replica_that_is_down_or_refuses_leaves_its_outcomes_unknown_naming_it() -> None:
    fleet = Fleet("a", "b", "c")
    a, b, c = fleet.replicas.values()
    ids = [a.serve(3), b.serve(3), c.serve(3), c.serve(3, rid="client-9")]
    c.down = True
    s = asyncio.run(fleet.forwarder("a").report("digits", labels(*ids), "alice"))
    assert [r.status for r in s.results] == ["joined", "joined", "unknown", "unknown"]
    assert "served by replica 'c' (10.0.0.99:8001), which did not answer" in s.results[2].message
    assert "UNAVAILABLE" in s.results[2].message
    assert "no answer from replica 'c' (10.0.0.99:8001) (UNAVAILABLE" in s.results[3].message
    assert a.sample("swapserve_feedback_forwarded_total", result="unreachable") == 1
    c.down, c.refuses = False, "the feedback token this call carried is not one the server accepts"
    s = asyncio.run(fleet.forwarder("b").report("digits", labels(ids[2]), "alice"))
    assert s.results[0].status == "unknown" and "refused the forwarded report: UNAUTHENTICATED" in s.results[0].message
    c.refuses = ""
    assert asyncio.run(fleet.forwarder("b").report("digits", labels(*ids), "alice")).joined == 2  # c's, now


def test_untagged_ids_are_asked_only_of_live_replicas_and_tags_of_new_replicas_are_looked_up() -> None:
    fleet = Fleet("a", "b", "c")
    a, b, c = fleet.replicas.values()
    fwd = fleet.forwarder("a")
    fleet.stale.add("c")
    s = asyncio.run(fwd.report("digits", labels(c.serve(3, rid="on-c"), c.serve(3)), "alice"))
    assert [r.status for r in s.results] == ["unknown", "joined"]  # a stale replica's own ids are still sent
    assert [(p, ids) for p, ids, _ in fleet.sent] == [("c", [s.results[1].id]), ("b", ["on-c"])]
    reads = fleet.reads
    d = fleet.replicas["d"] = Replica("d")  # a replica that joined after the last read
    fleet.clock.advance(0.3)
    s = asyncio.run(fwd.report("digits", labels(d.serve(3)), "alice"))
    assert s.joined == 1 and fleet.reads == reads + 1
    fleet.clock.advance(0.1)
    asyncio.run(fwd.report("digits", labels("client-x"), "alice"))
    assert fleet.reads == reads + 1  # within REFRESH_S: the same list
    fleet.registry_down = True
    fleet.clock.advance(2.0)
    s = asyncio.run(fwd.report("digits", labels(b.serve(3), "client-y"), "alice"))
    assert s.results[0].status == "joined"  # the last list, while the registry is down
    assert "could not be listed: the registry is unavailable" in s.results[1].message
