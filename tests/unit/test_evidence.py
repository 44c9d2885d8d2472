"""What counts as rollout evidence (issue 14): only router-assigned requests and admitted labels.

Pinned and cohort-routed requests, client errors, repeated ids and labels, labels over a
reporter's cap and undeclared slice names are served or recorded but kept out of the gates,
each counted under its reason; feedback needs a credential beyond loopback.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from swapserve.dataplane import DataPlane
from swapserve.errors import AlreadyExists, ConfigError, InvalidInput, ModelExecutionError, Unauthenticated
from swapserve.feedback.observer import FeedbackObserver, Outcome
from swapserve.feedback.predictions import PredictionLog, PredictionRule
from swapserve.feedback.slices import SliceStats
from swapserve.registry.records import RolloutRecord
from swapserve.rollout.plan import parse_plan
from swapserve.routing.policy import RoutingPolicy
from swapserve.server.control import evidence_sources
from swapserve.server.feedback import FeedbackAuth, read_token_file
from swapserve.types import InferRequest, ModelSpec, Tensor, TensorSpec
from tests.fakes import FakeClock, scaled_model
from tests.unit.stack import Stack, make_stack, run

T0 = 1_000_000.0
ALL_VERSIONS = "version_policy: { all: {} }\n"
DIGITS = ModelSpec("digits", "pytorch_libtorch", 64, (TensorSpec("pixels", "FP32", (64,)),),
                   (TensorSpec("probabilities", "FP32", (10,)),))


def probs(cls: int) -> dict[str, np.ndarray]:
    out = np.full((1, 10), 0.01, dtype=np.float32)
    out[0, cls] = 0.9
    return {"probabilities": out}


def x() -> np.ndarray:
    return np.ones((1, 4), dtype=np.float32)


def request(version: str = "", id: str = "", rows: int = 1, width: int = 4, fill: float = 1.0,
            **params: str) -> InferRequest:
    arr = np.full((rows, width), fill, dtype=np.float32)
    return InferRequest("m", version, id, dict(params), [Tensor("x", "FP32", arr.shape, arr)])


async def serving(stack: Stack, policy: RoutingPolicy) -> None:
    await stack.manager.load("m")
    model = stack.manager.models["m"]
    async with model.lock:
        await stack.manager.apply_locked(model, policy)


def fed_stack(tmp_path: Path) -> tuple[Stack, FeedbackObserver, DataPlane]:
    stack = make_stack(tmp_path, (1, 2), extra_config=ALL_VERSIONS)
    stack.loader.behave(1, fn=scaled_model(1.0))
    stack.loader.behave(2, fn=scaled_model(1.0))
    feedback = FeedbackObserver(stack.slices, PredictionLog(capacity=10_000, clock=FakeClock(T0)))
    return stack, feedback, DataPlane(stack.manager, stack.metrics, observers=[feedback])


# -- the request path ---------------------------------------------------------------------------


def test_only_router_assigned_requests_are_evidence(tmp_path: Path) -> None:
    stack, feedback, dp = fed_stack(tmp_path)

    async def scenario() -> None:
        await serving(stack, RoutingPolicy(champion=1, traffic=((1, 5000), (2, 5000)),
                                           cohorts=(("tier", "beta", 2),)))
        for i in range(40):
            await dp.infer(request(routing_key=f"user-{i}"))
        pinned = [await dp.infer(request(version="2")) for _ in range(30)]
        cohort = [await dp.infer(request(tier="beta")) for _ in range(20)]
        assert {r.model_version for r in pinned} == {"2"} and {r.model_version for r in cohort} == {"2"}
        for _ in range(25):  # the client's own bad requests, pinned and not
            with pytest.raises(InvalidInput):
                await dp.infer(request(version="2", width=3))
            with pytest.raises(InvalidInput):
                await dp.infer(request(width=3, routing_key="user-3"))
        served = stack.slices.snapshot("m", 1)["overall"].requests + stack.slices.snapshot("m", 2)["overall"].requests
        assert served == 40  # the gates see exactly the router's 40
        assert stack.slices.snapshot("m", 2)["overall"].errors == 0  # no client error counts against it
        ex = stack.slices.exclusions("m", 2)["request"]
        assert ex["pinned"] == 30 + 25 and ex["cohort"] == 20
        v1, v2 = (stack.slices.exclusions("m", v)["request"].get("client_error", 0) for v in (1, 2))
        assert v1 + v2 == 25
        # The operational (Triton) counters still count every request the version served.
        assert stack.sample("nv_inference_request_success", {"model": "m", "version": "2"}) >= 50
        assert stack.sample("swapserve_evidence_excluded_total", {"model": "m", "version": "2", "kind": "request",
                                                                   "reason": "pinned"}) is None  # not registered here
        summary = feedback.report("m", [Outcome(r.id, "correct", False) for r in pinned + cohort])
        assert summary.excluded == 50 and summary.joined == 0
        assert "pinned version 2" in summary.results[0].message
        assert stack.slices.snapshot("m", 2)["overall"].labelled == 0
        assert stack.slices.exclusions("m", 2)["outcome"] == {"pinned": 30, "cohort": 20}
        await stack.manager.close()

    run(scenario())


def test_a_backend_failure_still_counts_against_the_version(tmp_path: Path) -> None:
    stack, feedback, dp = fed_stack(tmp_path)
    stack.loader.behave(2, fail=lambda inputs: bool((inputs["x"] < 0).any()))

    async def scenario() -> None:
        await serving(stack, RoutingPolicy.single(2))
        with pytest.raises(ModelExecutionError):
            await dp.infer(request(fill=-1.0))
        assert stack.slices.snapshot("m", 2)["overall"].errors == 1
        await stack.manager.close()

    run(scenario())


def test_server_ids_are_128_random_bits_and_a_logged_id_is_refused(tmp_path: Path) -> None:
    stack, feedback, dp = fed_stack(tmp_path)

    async def scenario() -> None:
        await serving(stack, RoutingPolicy.single(1))
        ids = [(await dp.infer(request())).id for _ in range(600)]  # crosses a refill of the id buffer
        assert len(set(ids)) == 600 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        first = await dp.infer(request(id="client-7"))
        with pytest.raises(AlreadyExists, match="request id 'client-7' was already used"):
            await dp.infer(request(id="client-7"))
        with pytest.raises(AlreadyExists):  # nor can a server-assigned id be re-sent
            await dp.infer(request(id=ids[0]))
        assert stack.sample("nv_inference_request_failure", {"model": "m", "version": "1", "reason": "REJECTED"}) == 2
        assert stack.slices.snapshot("m", 1)["overall"].errors == 0  # a client error, not the version's
        assert feedback.report("m", [Outcome("client-7", "correct", True)]).joined == 1  # the first one stands
        assert first.id == "client-7"
        await stack.manager.close()

    run(scenario())


def test_a_flood_of_large_requests_cannot_evict_the_canary_and_evictions_are_counted(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2), extra_config=ALL_VERSIONS)
    feedback = FeedbackObserver(stack.slices, PredictionLog(capacity=200, clock=FakeClock(T0)))
    dp = DataPlane(stack.manager, stack.metrics, observers=[feedback])

    async def scenario() -> None:
        await serving(stack, RoutingPolicy(champion=1, traffic=((1, 9000), (2, 1000))))
        canary: list[str] = []
        i = 0
        while len(canary) < 20:
            r = await dp.infer(request(routing_key=f"k{i}"))
            i += 1
            if r.model_version == "2":
                canary.append(r.id)
        for _ in range(100):  # a flood of 8-row requests on the champion
            await dp.infer(request(rows=8, version="1"))
        summary = feedback.report("m", [Outcome(rid, "correct", True) for rid in canary])
        assert summary.joined == 20
        evicted = stack.slices.exclusions("m", 1)["outcome"].get("evicted", 0)
        assert evicted > 0
        await stack.manager.close()

    run(scenario())


# -- labels: once, by a reporter, within its budget ---------------------------------------------------


def fb_with(*ids: tuple[str, int]) -> FeedbackObserver:
    fb = FeedbackObserver(SliceStats(clock=FakeClock(T0)), PredictionLog(capacity=10_000, clock=FakeClock(T0)))
    for rid, version in ids:
        fb.on_response(InferRequest("digits", id=rid), DIGITS, version, [], probs(3), 0.001)
    return fb


def test_a_label_counts_once_and_names_its_reporter() -> None:
    fb = fb_with(("a", 2))
    first = fb.report("digits", [Outcome("a", "label", 3)], reporter="labeller")
    again = fb.report("digits", [Outcome("a", "label", 4)], reporter="mallory")
    assert first.joined == 1 and again.duplicate == 1 and again.joined == 0
    assert "already reported" in again.results[0].message
    assert fb.slices.snapshot("digits", 2)["overall"].correct == 1  # the second report changed nothing
    assert fb.slices.reporters("digits") == {"labeller": {"2": {"counted": 1}}, "mallory": {"2": {"duplicate": 1}}}
    assert fb.slices.exclusions("digits", 2)["outcome"] == {"duplicate": 1}


def test_the_cap_holds_per_slice_so_a_share_cannot_be_concentrated() -> None:
    stats = SliceStats(clock=FakeClock(T0))
    stats.limit_reporters("m", 0.1)
    for i in range(1000):  # ten honest reporters, spread over two slices
        slice_ = "small" if (i // 10) % 10 == 0 else "big"  # all ten take turns on each slice
        assert stats.admit("m", 2, slice_, f"h{i % 10}")
        stats.note_label("m", 2, slice_, f"h{i % 10}", "counted")
    small = 0
    for _ in range(100):  # the liar puts everything on the small slice
        if stats.admit("m", 2, "small", "liar"):
            stats.note_label("m", 2, "small", "liar", "counted")
            small += 1
    assert small <= 0.1 * (100 + small) + 1  # a tenth of that slice, not a tenth of the version
    assert stats.admit("m", 2, "big", "liar")


def test_one_reporter_cannot_exceed_its_share_of_a_stage() -> None:
    ids = [(f"r{i}", 2) for i in range(400)]
    fb = fb_with(*ids)
    fb.slices.limit_reporters("digits", 0.2)
    honest = [Outcome(f"r{i}", "label", 3) for i in range(0, 400, 2)]  # 200, true labels
    liar = [Outcome(f"r{i}", "label", 0) for i in range(1, 400, 2)]  # 200, false labels
    s_liar_early = fb.report("digits", liar[:100], reporter="mallory")
    assert s_liar_early.joined == 1 and s_liar_early.excluded == 99  # alone: only its first label counts
    for k in range(0, 200, 2):  # six honest labellers take turns; the liar keeps trying
        fb.report("digits", honest[k:k + 2], reporter=f"labeller-{k // 2 % 6}")
        fb.report("digits", liar[100 + k // 2:100 + k // 2 + 1], reporter="mallory")
    book = fb.slices.reporters("digits")
    counted = {r: v["2"].get("counted", 0) for r, v in book.items()}
    total = sum(counted.values())
    assert counted["mallory"] <= 0.2 * total + 1 and counted["mallory"] > 5
    assert book["mallory"]["2"]["reporter_cap"] > 0
    assert total - counted["mallory"] >= 180  # honest labellers within their share all count
    overall = fb.slices.snapshot("digits", 2)["overall"]
    assert overall.labelled == total and overall.labelled - overall.correct == counted["mallory"]
    capped = sum(v["2"].get("reporter_cap", 0) for v in book.values())
    assert fb.slices.exclusions("digits", 2)["outcome"]["reporter_cap"] == capped
    fb.slices.limit_reporters("digits", None)  # the rollout ended: no cap, a fresh book
    assert fb.slices.reporters("digits") == {} and fb.slices.admit("digits", 2, "unlabelled", "mallory")


@pytest.mark.parametrize("share", [0.0, 1.5, -0.1])
def test_a_reporter_cap_outside_0_1_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="max_reporter_share"):
        SliceStats().limit_reporters("m", share)
    with pytest.raises(InvalidInput, match=r"gates\.max_reporter_share"):
        parse_plan(f"stages: [{{name: canary, traffic: 10}}]\ngates: {{max_reporter_share: {share}}}\n")


def test_the_plan_carries_the_reporter_cap() -> None:
    plan = parse_plan("stages: [{name: canary, traffic: 10}]\ngates: {max_reporter_share: 0.25}\n")
    assert plan.gates.max_reporter_share == 0.25
    assert type(plan).from_dict(plan.to_dict()) == plan
    assert parse_plan("stages: [{name: canary, traffic: 10}]\n").gates.max_reporter_share is None


# -- declared slices ----------------------------------------------------------------------------------


def test_declared_slices_cannot_be_displaced_by_junk_names() -> None:
    spec = ModelSpec("digits", "pytorch_libtorch", 64, DIGITS.inputs, DIGITS.outputs,
                     parameters={"swapserve.slices": "round, straight,curved"})
    assert PredictionRule.for_spec(spec).slices == frozenset({"round", "straight", "curved"})
    fb = FeedbackObserver(SliceStats(max_slices=4, clock=FakeClock(T0)), PredictionLog(clock=FakeClock(T0)))
    for i in range(100):  # junk first: first come would have taken every slot
        fb.on_response(InferRequest("digits", id=f"junk-{i}", parameters={"slice": f"junk-{i}"}), spec, 1, [],
                       probs(3), 0.001)
    for name in ("round", "straight", "curved"):
        fb.on_response(InferRequest("digits", id=f"ok-{name}", parameters={"slice": name}), spec, 1, [], probs(3), 0.001)
    snap = fb.slices.snapshot("digits", 1)
    assert set(snap) == {"round", "straight", "curved", "other", "overall"}
    assert snap["other"].requests == 100 and snap["overall"].requests == 103
    assert fb.slices.exclusions("digits", 1)["request"] == {"undeclared_slice": 100}


def test_undeclared_names_over_the_cap_are_counted_as_folded() -> None:
    stats = SliceStats(max_slices=2, clock=FakeClock(T0))
    for name in ("a", "b", "c", "d"):
        stats.record_request("m", 1, stats.resolve_slice("m", name), 0.001)
    assert stats.exclusions("m", 1)["request"] == {"undeclared_slice": 2}


def test_exclusions_are_exported_to_prometheus() -> None:
    registry = CollectorRegistry()
    stats = SliceStats(registry, clock=FakeClock(T0))
    stats.exclude("m", 2, "a", "request", "pinned")
    stats.exclude("m", 2, "a", "outcome", "reporter_cap")
    stats.note_label("m", 2, "a", "mallory", "reporter_cap")
    stats.count_result("m", "excluded")
    get = registry.get_sample_value
    assert get("swapserve_evidence_excluded_total", {"model": "m", "version": "2", "kind": "request",
                                                      "reason": "pinned"}) == 1
    assert get("swapserve_evidence_excluded_total", {"model": "m", "version": "2", "kind": "outcome",
                                                      "reason": "reporter_cap"}) == 1
    assert get("swapserve_feedback_reporter_labels_total", {"model": "m", "reporter": "mallory",
                                                             "result": "reporter_cap"}) == 1
    assert get("swapserve_feedback_outcomes_total", {"model": "m", "result": "excluded"}) == 1


def test_rollout_status_names_reporters_and_exclusions() -> None:
    fb = fb_with(("a", 1), ("b", 2))
    fb.slices.limit_reporters("digits", 0.5)
    fb.report("digits", [Outcome("a", "label", 3), Outcome("b", "label", 3)], reporter="labeller")
    fb.report("digits", [Outcome("b", "label", 3)], reporter="mallory")
    r = RolloutRecord(model="digits", challenger=2, champion=1, plan={}, strategy="staged", stage_index=0,
                      state="running", evidence={"started_at": T0 - 1})
    doc = evidence_sources(fb.slices, r)
    assert doc["max_reporter_share"] == 0.5
    assert doc["reporters"] == {"labeller": {"1": {"counted": 1}, "2": {"counted": 1}},
                                "mallory": {"2": {"duplicate": 1}}}
    assert doc["excluded"]["challenger"] == {"version": 2, "request": {}, "outcome": {"duplicate": 1}}


# -- who may report -------------------------------------------------------------------------------------


TOKEN = "0123456789abcdef0123"


def test_feedback_tokens_name_the_reporter_and_are_required_once_configured() -> None:
    auth = FeedbackAuth([("labeller", TOKEN), ("partner", "f" * 32)])
    assert auth.reporter([("authorization", f"Bearer {TOKEN}")], "ipv4:10.0.0.5:4000") == "labeller"
    assert auth.reporter([("x-swapserve-feedback-token", "f" * 32)], "ipv4:127.0.0.1:4000") == "partner"
    with pytest.raises(Unauthenticated, match="not one the server accepts"):
        auth.reporter([("authorization", "Bearer nope")], "ipv4:127.0.0.1:4000")
    with pytest.raises(Unauthenticated, match="requires a feedback token"):
        auth.reporter([], "ipv4:127.0.0.1:4000")  # tokens configured: loopback is no exemption
    opened = FeedbackAuth([("labeller", TOKEN)], open_feedback=True)
    assert opened.reporter([], "ipv4:10.0.0.5:4000") == "anonymous"
    with pytest.raises(Unauthenticated):  # a wrong token is refused even when feedback is open
        opened.reporter([("authorization", "Bearer wrong-token-0000000")], "ipv4:10.0.0.5:4000")


def test_without_tokens_only_loopback_peers_may_report() -> None:
    auth = FeedbackAuth()
    for peer in ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/tmp/s"):
        assert auth.reporter([], peer) == "anonymous"
    for peer in ("ipv4:10.1.2.3:5000", "ipv6:[2001:db8::1]:5000", ""):
        with pytest.raises(Unauthenticated, match="only from loopback"):
            auth.reporter([], peer)
    assert FeedbackAuth(open_feedback=True).reporter([], "ipv4:10.1.2.3:5000") == "anonymous"


def test_token_file_and_bad_tokens(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# reporters\nlabeller {TOKEN}\n\npartner {'e' * 20}\n")
    assert read_token_file(f) == [("labeller", TOKEN), ("partner", "e" * 20)]
    assert FeedbackAuth.from_settings(f, "d" * 16, False).names == ["labeller", "partner", "default"]
    f.write_text("labeller\n")
    with pytest.raises(ConfigError, match=r"tokens:1: expected 'NAME TOKEN'"):
        read_token_file(f)
    with pytest.raises(ConfigError, match="at least 16"):
        FeedbackAuth([("short", "abc")])
    with pytest.raises(ConfigError, match="other than 'anonymous'"):
        FeedbackAuth([("anonymous", TOKEN)])
    with pytest.raises(ConfigError, match="may appear once"):
        FeedbackAuth([("a", TOKEN), ("b", TOKEN)])


def test_an_ended_rollout_keeps_its_last_stages_reporters_and_exclusions_up_to_its_end() -> None:
    clock = FakeClock(T0)
    fb = FeedbackObserver(SliceStats(clock=clock), PredictionLog(capacity=1000, clock=clock))
    for i in range(4):
        fb.on_response(InferRequest("digits", id=f"p{i}", model_version="2", assignment="pinned"), DIGITS, 2, [],
                       probs(3), 0.001)
    fb.slices.limit_reporters("digits", 0.5)
    fb.report("digits", [Outcome("p0", "label", 3)], reporter="labeller")
    clock.advance(5)
    end = clock.t
    fb.slices.limit_reporters("digits", None, freeze=True)  # the rollout ended
    clock.advance(5)
    fb.on_response(InferRequest("digits", id="late", model_version="2", assignment="pinned"), DIGITS, 2, [],
                   probs(3), 0.001)
    fb.report("digits", [Outcome("p1", "label", 3)], reporter="late-reporter")
    r = RolloutRecord(model="digits", challenger=2, champion=1, plan={}, strategy="staged", stage_index=0,
                      state="rolled_back", evidence={"started_at": T0 - 1, "phase": "done",
                                                     "history": [{"at": end, "event": "rolled_back"}]})
    doc = evidence_sources(fb.slices, r)
    assert doc["reporters"] == {"labeller": {"2": {"pinned": 1}}} and doc["max_reporter_share"] is None
    assert doc["excluded"]["challenger"]["request"] == {"pinned": 4}  # not the late one
    assert doc["excluded"]["challenger"]["outcome"] == {"pinned": 1}
