"""A label reported to any replica joins the prediction it belongs to (issue 15).

Three ``swapserve serve`` replicas on one PostgreSQL registry, each with its own in-memory
prediction log. Requests go to random replicas (server-assigned ids, which name their replica,
and client-chosen ids, which do not); their labels are reported with ``swapserve feedback`` in
batches to random replicas. Every label joins, once fleet-wide, on the replica that served its
request (each replica's metrics say how many); a repeat is ``duplicate``; an unknown id
``unknown``. The serving replica authenticates the reporter itself: C accepts only alice's
token, so bob's labels for C's requests, sent through A (which accepts bob), are refused by C.
A killed replica's ids come back ``unknown`` naming it, while the others' still join.

Replica A runs the default (native, when built) front end, B and C grpc.aio.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.fleetproc import Replica, digits_input, pg  # noqa: F401 (pg: the module's PostgreSQL)
from tests.e2e.serverproc import ROOT, SWAPSERVE, copy_models
from tests.pg import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


@pytest.fixture(scope="module")
def fleet(pg: PostgresServer, example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    registry = pg.create_database("feedback")
    tokens = tmp_path_factory.mktemp("tokens")
    (tokens / "both").write_text(f"alice {ALICE}\nbob {BOB}\n")
    (tokens / "alice").write_text(f"alice {ALICE}\n")
    replicas = []
    for name, frontend, token_file in (("a", "auto", "both"), ("b", "python", "both"), ("c", "python", "alice")):
        repo = copy_models(example_repo, tmp_path_factory.mktemp(f"repo-{name}"), ["digits"])
        replicas.append(Replica(name, repo, tmp_path_factory.mktemp(f"home-{name}"), registry,
                                ["--frontend", frontend, "--feedback-token-file", str(tokens / token_file)]))
    try:
        for r in replicas:  # one after another: three processes importing torch at once on two cores
            r.start()
        yield replicas
    finally:
        for r in replicas:
            r.stop()


def infer(r: Replica, row: int, request_id: str = "") -> tuple[str, int]:
    """(the response's id, the predicted class) of one digits request to ``r``."""
    assert r.client is not None
    result = r.client.infer("digits", digits_input(r.repo, row), request_id=request_id)
    return result.get_response().id, int(result.as_numpy("probabilities").argmax())


def report(r: Replica, labels: list[tuple[str, int]], tmp: Path, token: str = ALICE) -> tuple[int, dict[str, Any]]:
    """``swapserve feedback digits`` to ``r``: (exit code, the --json document)."""
    path = tmp / f"labels-{uuid.uuid4().hex[:8]}.csv"
    path.write_text("id,label\n" + "".join(f"{i},{label}\n" for i, label in labels))
    assert r.proc is not None
    out = subprocess.run([*SWAPSERVE, "feedback", "digits", "--file", str(path), "--url", r.proc.url, "--token",
                          token, "--batch", "16", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    return out.returncode, (json.loads(out.stdout) if out.stdout.strip() else {"stderr": out.stderr})


def metric(r: Replica, name: str, **labels: str) -> float:
    assert r.proc is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{r.proc.metrics_port}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_labels_reported_to_any_replica_join_once_where_their_requests_were_served(
        fleet: list[Replica], tmp_path: Path) -> None:
    if importlib.util.find_spec("swapserve._frontend") is not None:  # the forwarder runs on its loop too
        assert fleet[0].proc is not None and "(native front end)" in fleet[0].proc.log()
    rng = random.Random(15)
    served: dict[str, Replica] = {}
    labels: list[tuple[str, int]] = []
    for n in range(36):
        r = rng.choice(fleet)
        chosen = f"client-{uuid.uuid4().hex[:12]}" if n % 3 == 0 else ""  # tritonclient's request_id
        rid, predicted = infer(r, n, chosen)
        if chosen:
            assert rid == chosen
        else:  # the server's id names the replica that assigned it; 128 random bits follow
            assert len(rid) == 40 and rid[:8] == hashlib.sha256(r.name.encode()).hexdigest()[:8]
        served[rid] = r
        labels.append((rid, predicted if n % 4 else (predicted + 1) % 10))
    assert {r.name for r in served.values()} == {"a", "b", "c"}

    rng.shuffle(labels)
    for i in range(0, len(labels), 12):  # batches of 12 to random replicas
        code, doc = report(rng.choice(fleet), labels[i:i + 12], tmp_path)
        assert code == 0, doc
        assert (doc["joined"], doc["not_joined"]) == (12, []), doc

    # Each label joined exactly once, on the replica that served it, booked under its reporter.
    for r in fleet:
        mine = sum(1 for owner in served.values() if owner is r)
        assert metric(r, "swapserve_feedback_reporter_labels_total", reporter="alice", result="counted") == mine, r.name
        assert metric(r, "swapserve_slice_labelled_total", slice="overall") == mine, r.name
    assert sum(metric(r, "swapserve_feedback_outcomes_total", result="joined") for r in fleet) == len(labels)
    assert sum(metric(r, "swapserve_feedback_outcomes_total", result="unknown") for r in fleet) == 0
    assert sum(metric(r, "swapserve_feedback_forwarded_total", result="joined") for r in fleet) > 0

    # A repeat is a duplicate (the first report stands), wherever it is sent; an unknown id is unknown.
    code, doc = report(fleet[1], [*labels[:6], ("never-served-anywhere", 1)], tmp_path)
    assert code == 0 and (doc["duplicate"], doc["unknown"]) == (6, 1), doc
    assert "on this replica or 'a', 'c'" in doc["not_joined"][-1]["message"]


def test_the_serving_replica_authenticates_the_reporter_and_a_killed_one_is_named(
        fleet: list[Replica], tmp_path: Path) -> None:
    a, b, c = fleet
    on_b = infer(b, 40)
    on_c = [infer(c, 41), infer(c, 42, f"client-{uuid.uuid4().hex[:12]}")]
    # Bob is known to A and B, not to C: C refuses the report A forwards with bob's token.
    code, doc = report(a, [on_b, *on_c], tmp_path, token=BOB)
    assert code == 0 and doc["joined"] == 1, doc
    refused = {o["id"]: o for o in doc["not_joined"]}
    assert refused[on_c[0][0]]["status"] == "unknown"
    assert "replica 'c'" in refused[on_c[0][0]]["message"] and "UNAUTHENTICATED" in refused[on_c[0][0]]["message"]
    assert "no answer from replica 'c'" in refused[on_c[1][0]]["message"]
    assert metric(b, "swapserve_feedback_reporter_labels_total", reporter="bob", result="counted") == 1
    assert metric(a, "swapserve_feedback_forwarded_total", result="refused") == 1
    # A token no replica knows is refused by the replica it reaches, before anything is forwarded.
    code, doc = report(b, on_c, tmp_path, token="not-a-token-of-this-fleet")
    assert code == 1 and "UNAUTHENTICATED" in doc.get("stderr", "") + json.dumps(doc), doc

    c.kill()
    on_a = infer(a, 43)
    code, doc = report(b, [*on_c, on_a], tmp_path)
    assert code == 0 and doc["joined"] == 1 and doc["unknown"] == 2, doc
    gone = {o["id"]: o["message"] for o in doc["not_joined"]}
    assert "served by replica 'c'" in gone[on_c[0][0]] and "did not answer" in gone[on_c[0][0]]
    assert "replica 'c'" in gone[on_c[1][0]]
