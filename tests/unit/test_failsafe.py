"""Fault tolerance of rollouts, in-process: the outbox, a rollback while the registry is locked,
replaying journaled decisions after a "crash", evidence across restarts, signed webhooks with
retries. Real registry (SQLite files), real control plane and controller, fake backends and clock."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from swapserve.controlplane import ControlPlane
from swapserve.registry import engine
from swapserve.registry.outbox import Outbox
from swapserve.rollout.controller import RolloutController
from swapserve.rollout.plan import parse_plan
from swapserve.rollout.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookSender, sign, verify
from tests.fakes import FakeClock
from tests.unit.stack import Stack, make_stack, run

ALICE = "alice"

#: A canary that only a rollback (or an operator) ends.
SLOW = parse_plan("""
stages:
  - {name: canary, traffic: 10, min_duration: 1h, min_samples: 1000000}
  - {name: full, traffic: 100}
webhook: http://hooks.invalid/rollout
""")

#: A canary that advances on a few samples, then a short watch.
QUICK = parse_plan("""
stages:
  - {name: canary, traffic: 10, min_duration: 1s, min_samples: 50}
  - {name: full, traffic: 100, min_duration: 1s}
watch: 30s
webhook: http://hooks.invalid/rollout
""")


def feed(stack: Stack, version: int, n: int, *, accuracy: float = 0.9) -> None:
    stack.clock.advance(0.1)
    for i in range(n):
        stack.slices.record_request("m", version, "a", 0.005)
        stack.slices.record_outcome("m", version, "a", "label", correct=int((i + 1) * accuracy) > int(i * accuracy))


def with_outbox(stack: Stack, path: Path | None) -> Stack:
    stack.control = ControlPlane(stack.manager, stack.registry, stack.slices, outbox=Outbox(path, clock=stack.clock))
    return stack


async def rolling(stack: Stack, plan=SLOW) -> RolloutController:  # type: ignore[no-untyped-def]
    await stack.control.load("m", 1, actor=ALICE)
    await stack.control.promote("m", 1, actor=ALICE)
    rc = RolloutController(stack.control, stack.slices, stack.metrics, clock=stack.clock)
    await rc.start("m", 2, plan, actor=ALICE, reason="test")
    return rc


class Locked:
    """Another process's view: an exclusive transaction on the SQLite file (writers then time out)."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None, timeout=0)

    def __enter__(self) -> Locked:
        self.conn.execute("BEGIN EXCLUSIVE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.fixture(autouse=True)
def short_registry_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "SQLITE_BUSY_TIMEOUT_MS", 300)


# -- the outbox ---------------------------------------------------------------------------------


def test_outbox_entries_survive_reopen_in_order_until_done_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    a, b = box.append([("decision", "m", {"n": 1}), ("webhook", "m", {"n": 2})])
    (c,) = box.append([("decision", "m", {"n": 3})])
    box.done(a.id)
    with open(path, "a") as f:
        f.write('{"op": "add", "entries": [{"id": "x", "kind": "decision"')  # a crash mid-append
    again = Outbox(path)
    assert [e.payload["n"] for e in again.pending()] == [2, 3]
    assert [e.id for e in again.pending("decision", "m")] == [c.id]
    again.done(b.id)
    again.done(c.id)
    assert path.read_text() == ""  # nothing pending: the file is emptied, it never grows unbounded
    assert Outbox(path).pending() == []


# -- a rollback while the registry is unavailable -----------------------------------------------


def test_a_failed_gate_returns_traffic_while_the_registry_is_locked_and_is_recorded_when_it_is_back(
        tmp_path: Path) -> None:
    stack = with_outbox(make_stack(tmp_path), tmp_path / "outbox.jsonl")
    c = stack.control

    async def scenario() -> None:
        rc = await rolling(stack)
        assert c.policy("m").traffic == ((1, 9000), (2, 1000))
        feed(stack, 1, 400, accuracy=0.95)
        feed(stack, 2, 400, accuracy=0.6)
        with Locked(tmp_path / "registry.db"):
            await rc.tick()
            # Routing left the challenger although no registry write could happen.
            assert c.policy("m").traffic == ((1, 10000),)
            assert stack.sample("swapserve_registry_pending_writes", {}) == 1
            view = await c.status("m")
            assert any("registry write pending" in w for w in view.warnings)
            assert view.rollout is not None and view.rollout["state"] == "rolled_back"
            assert rc.decided("m").state == "rolled_back"  # what `rollout status` shows meanwhile
            # A registry-first change cannot overtake the pending rollback.
            with pytest.raises(Exception) as err:
                await c.set_traffic("m", [(1, 5000), (2, 5000)], actor=ALICE)
            assert getattr(err.value, "code", None) is not None and "not yet recorded" in str(err.value)
        assert stack.registry.rollouts("m", 1)[0].state == "running"  # the registry has not heard yet
        assert await c.reconciler.drain()
        r = stack.registry.rollouts("m", 1)[0]
        assert r.state == "rolled_back" and r.evidence["rollback"]["gate"] == "accuracy"
        assert stack.registry.current_deployment("m").champion == 1
        assert [(t.version, t.weight_bp) for t in stack.registry.current_deployment("m").traffic] == [(1, 10000)]
        assert stack.sample("swapserve_registry_pending_writes", {}) == 0
        assert any("rolled back" in e.message for e in stack.registry.events("m", limit=500))
        # The next change is conditional on the generation the rollback was recorded at.
        await c.set_traffic("m", [(1, 5000), (2, 5000)], actor=ALICE)

    run(scenario())


def test_a_manual_rollback_answers_while_the_registry_is_locked(tmp_path: Path) -> None:
    stack = with_outbox(make_stack(tmp_path), tmp_path / "outbox.jsonl")
    c = stack.control

    async def scenario() -> None:
        await c.load("m", 1, actor=ALICE)
        await c.promote("m", 1, actor=ALICE)
        await c.load("m", 2, actor=ALICE)
        await c.promote("m", 2, actor=ALICE)
        with Locked(tmp_path / "registry.db"):
            view = await c.rollback("m", actor=ALICE, reason="bad")
            assert view.champion == 1 and c.policy("m").champion == 1
            assert any("pending" in w for w in view.warnings)
        await c.reconciler.drain()
        assert stack.registry.current_deployment("m").champion == 1

    run(scenario())


# -- crash consistency: journaled decisions are replayed before anything is restored -------------


def test_a_journaled_rollback_is_recorded_after_a_crash_and_the_rollout_is_not_resumed(tmp_path: Path) -> None:
    stack = with_outbox(make_stack(tmp_path), tmp_path / "outbox.jsonl")

    async def crashed() -> None:
        rc = await rolling(stack)
        feed(stack, 1, 400, accuracy=0.95)
        feed(stack, 2, 400, accuracy=0.6)
        with Locked(tmp_path / "registry.db"):
            await rc.tick()  # journaled and published, never recorded: then the process "dies"

    run(crashed())
    assert stack.registry.rollouts("m", 1)[0].state == "running"
    again = with_outbox(stack.restarted(), tmp_path / "outbox.jsonl")

    async def restarted() -> None:
        assert await again.control.reconciler.drain()  # what the server does before restoring
        assert await again.control.reconciler.drain()  # a second replay writes nothing more
        await again.manager.restore()
        rc = RolloutController(again.control, again.slices, again.metrics, clock=again.clock)
        await rc.start_loop()
        try:
            assert rc.current("m") is None
            assert again.control.policy("m").traffic == ((1, 10000),)
            assert again.registry.rollouts("m", 1)[0].state == "rolled_back"
            gens = [d.generation for d in again.registry.deployment_history("m")]
            assert gens == sorted(gens, reverse=True) and len(gens) == 3  # promote, canary, rollback
        finally:
            await rc.stop()

    run(restarted())


# -- evidence across restarts -------------------------------------------------------------------


def test_counts_flushed_before_a_restart_still_count_and_the_watch_starts_over(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)

    async def before() -> None:
        rc = await rolling(stack, QUICK)
        feed(stack, 1, 100)
        feed(stack, 2, 100)
        stack.clock.advance(2)
        await rc.tick()  # canary -> full
        stack.clock.advance(2)
        feed(stack, 2, 10)
        await rc.tick()  # full -> watch
        assert rc.current("m").evidence["phase"] == "watch"
        await rc.flush_evidence()

    run(before())
    again = stack.restarted()

    async def after() -> None:
        await again.manager.restore()
        rc = RolloutController(again.control, again.slices, again.metrics, clock=again.clock)
        await rc.start_loop()
        try:
            r = rc.current("m")
            assert r is not None and r.evidence["phase"] == "watch" and "watch_restarted_at" in r.evidence
            # The restarted server counted nothing yet, but the champion's baseline came back.
            report = rc._report(r)  # noqa: SLF001 - the evidence the gates read
            assert report["champion"]["slices"]["overall"]["labelled"] == 100
            assert report["challenger"]["slices"]["overall"]["labelled"] == 110
            # A worse challenger after the restart is rolled back, not promoted.
            feed(again, 2, 600, accuracy=0.5)
            await rc.tick()
            assert again.registry.rollouts("m", 1)[0].state == "rolled_back"
        finally:
            await rc.stop()

    run(after())


def test_no_champion_data_holds_instead_of_passing(tmp_path: Path) -> None:
    from swapserve.rollout.gates import evaluate
    from swapserve.types import SliceCounts

    stage = QUICK.stages[1]
    chall = {"overall": SliceCounts(requests=500, labelled=500, correct=250)}
    d = evaluate(QUICK.gates, {}, chall, stage=stage, stage_elapsed_s=3600, challenger_labelled=500)
    assert d.verdict == "hold" and "champion" in d.reason
    champ = {"overall": SliceCounts(requests=500)}  # requests but no labels: no accuracy baseline
    d = evaluate(QUICK.gates, champ, chall, stage=stage, stage_elapsed_s=3600, challenger_labelled=500)
    assert d.verdict == "hold" and "labelled outcomes on the champion" in d.reason


# -- webhooks -----------------------------------------------------------------------------------


class Receiver:
    """Fails the first ``fail`` deliveries, then keeps what it gets."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.got: list[tuple[str, bytes, dict[str, str]]] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionRefusedError("receiver down")
        self.got.append((url, body, headers))


def test_webhooks_are_signed_and_retried_with_backoff_across_a_restart(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    path = tmp_path / "outbox.jsonl"
    receiver = Receiver(fail=2)
    sender = WebhookSender(Outbox(path, clock=clock), "s3cret", clock=clock, post=receiver)
    entry = sender.enqueue("http://hooks.invalid/x", "promoted", {"model": "m", "challenger": 2, "champion": 1})

    async def deliver() -> None:
        await sender.deliver_due()
        assert receiver.fail == 1 and sender.due() == []  # backing off
        clock.advance(1.01)
        await sender.deliver_due()
        assert receiver.fail == 0 and sender.due() == []  # the second wait is longer
        clock.advance(1.01)
        assert sender.due() == []
        clock.advance(1.0)
        assert sender.due()

    run(deliver())
    # The process dies before the delivery succeeds: a new server delivers it.
    again = WebhookSender(Outbox(path, clock=clock), "s3cret", clock=clock, post=receiver)
    run(again.deliver_due())
    (url, body, headers), = receiver.got
    assert json.loads(body)["event"] == "promoted" and headers["X-Swapserve-Delivery"] == entry.id
    ts = headers[TIMESTAMP_HEADER]
    assert headers[SIGNATURE_HEADER] == sign("s3cret", ts, body)
    assert verify("s3cret", ts, body, headers[SIGNATURE_HEADER], now=clock.t)
    assert not verify("wrong", ts, body, headers[SIGNATURE_HEADER], now=clock.t)
    assert not verify("s3cret", ts, body + b" ", headers[SIGNATURE_HEADER], now=clock.t)
    assert not verify("s3cret", ts, body, headers[SIGNATURE_HEADER], now=clock.t + 3600)  # replayed later
    assert Outbox(path).pending() == []


def test_promotion_and_rollback_both_owe_a_webhook(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)

    async def scenario() -> None:
        rc = await rolling(stack, QUICK)
        feed(stack, 1, 100)
        feed(stack, 2, 100)
        for _ in range(3):
            stack.clock.advance(31)
            await rc.tick()
        assert stack.registry.rollouts("m", 1)[0].state == "promoted"
        hooks = stack.control.outbox.pending("webhook")
        assert [json.loads(h.payload["body"])["event"] for h in hooks] == ["promoted"]
        assert stack.registry.get_version("m", 2).stage == "production"

        await stack.control.load("m", 1, actor=ALICE)
        rc2 = RolloutController(stack.control, stack.slices, stack.metrics, clock=stack.clock)
        await rc2.start("m", 1, SLOW, actor=ALICE)
        feed(stack, 2, 400, accuracy=0.95)
        feed(stack, 1, 400, accuracy=0.5)
        await rc2.tick()
        events = [json.loads(h.payload["body"])["event"] for h in stack.control.outbox.pending("webhook")]
        assert events == ["promoted", "rollback"]

    run(scenario())


# -- the registry's own guarantees ----------------------------------------------------------------


def test_a_locked_database_is_registry_unavailable_within_the_timeout_on_the_registrys_own_threads(
        tmp_path: Path) -> None:
    import threading
    import time

    import grpc

    from swapserve.errors import RegistryUnavailable

    stack = make_stack(tmp_path)
    reg = stack.registry

    async def scenario() -> None:
        await stack.control.load("m", 1, actor=ALICE)
        assert await reg.call(lambda: threading.current_thread().name.startswith("swapserve-registry"))
        with Locked(tmp_path / "registry.db"):
            t0 = time.monotonic()
            with pytest.raises(RegistryUnavailable) as err:
                await reg.call(reg.set_stage, "m", 1, "staging", actor=ALICE)
            assert time.monotonic() - t0 < 5
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "database is locked" in err.value.message

    run(scenario())


def test_a_decision_is_one_transaction_deployment_and_rollout_together_or_neither(tmp_path: Path) -> None:
    from swapserve.errors import ModelNotFound
    from swapserve.registry import RolloutRecord

    stack = make_stack(tmp_path)
    reg = stack.registry

    async def scenario() -> None:
        await stack.control.load("m", 1, actor=ALICE)
        await stack.control.load("m", 2, actor=ALICE)
        await stack.control.promote("m", 1, actor=ALICE)

    run(scenario())
    before = reg.current_deployment("m")
    ghost = RolloutRecord(model="m", challenger=2, champion=1, id=999, state="running")
    deployment = {"champion": 1, "traffic": [[1, 9000], [2, 1000]], "action": "rollout", "actor": ALICE}
    with pytest.raises(ModelNotFound):  # the rollout write fails after the deployment was written ...
        reg.record_decision("m", deployment=deployment, rollout=ghost)
    assert reg.current_deployment("m") == before  # ... and the deployment went with it
    dep, rec = reg.record_decision("m", deployment=deployment,
                                   rollout=RolloutRecord(model="m", challenger=2, champion=1))
    assert dep is not None and dep.generation == before.generation + 1
    assert rec is not None and reg.active_rollout("m") == rec


def test_a_promotion_webhook_is_delivered_only_once_the_promotion_is_recorded(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    receiver = Receiver()

    async def scenario() -> None:
        sender = WebhookSender(stack.control.outbox, "k", clock=stack.clock, post=receiver)
        await stack.control.load("m", 1, actor=ALICE)
        await stack.control.promote("m", 1, actor=ALICE)
        rc = RolloutController(stack.control, stack.slices, stack.metrics, clock=stack.clock, webhooks=sender)
        r = await rc.start("m", 2, QUICK, actor=ALICE)
        # As journaled just before a promotion's commit: held while the rollout is still running ...
        sender.enqueue("http://hooks.invalid/x", "promoted", r.to_dict(), requires={"rollout": r.id,
                                                                                     "state": "promoted"})
        await sender.deliver_due()
        assert receiver.got == [] and len(stack.control.outbox.pending("webhook")) == 1
        # ... and dropped by a restarted server that resumes the rollout (it journals its own).
        again = RolloutController(stack.control, stack.slices, stack.metrics, clock=stack.clock, webhooks=sender)
        await again.start_loop()
        await again.stop()
        assert stack.control.outbox.pending("webhook") == []
        feed(stack, 1, 100)
        feed(stack, 2, 100)
        for _ in range(3):
            stack.clock.advance(31)
            await rc.tick()
        assert stack.registry.rollouts("m", 1)[0].state == "promoted"
        await sender.deliver_due()
        (_, body, _), = receiver.got
        assert json.loads(body)["event"] == "promoted" and json.loads(body)["rollout"]["state"] == "promoted"

    run(scenario())
