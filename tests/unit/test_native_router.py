"""Native router == pure-Python reference, plus the routing promises (ARCHITECTURE.md #4)."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapserve.errors import FailedPrecondition, InvalidInput, ModelNotFound
from swapserve.native import CohortRule, Route, Router, RoutingSpec, atomics_lock_free, bucket_of, hash64
from swapserve.routing import reference as ref

# Keys: text without lone surrogates (not UTF-8 encodable), any int, bools, floats.
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
keys = st.one_of(texts, st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.booleans(), st.floats())


@st.composite
def weights(draw: st.DrawFn, n: int) -> tuple[int, ...]:
    cuts = sorted(draw(st.lists(st.integers(0, 10000), min_size=n - 1, max_size=n - 1)))
    bounds = [0, *cuts, 10000]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


@st.composite
def specs(draw: st.DrawFn) -> RoutingSpec:
    versions = tuple(draw(st.lists(st.integers(0, 50), min_size=1, max_size=5, unique=True)))
    cohorts = tuple(
        CohortRule(draw(st.sampled_from(["tier", "region", "beta"])), draw(st.one_of(texts, st.integers(-3, 3), st.booleans())), draw(st.integers(0, 60)))
        for _ in range(draw(st.integers(0, 3)))
    )
    return RoutingSpec(
        generation=draw(st.integers(0, 2**40)),
        versions=versions,
        weights_bp=draw(weights(len(versions))),
        shadows=tuple(draw(st.lists(st.integers(0, 60), max_size=3, unique=True))),
        cohorts=cohorts,
        key_attribute=draw(st.sampled_from(["routing_key", "user_id"])),
    )


attr_values = st.one_of(texts, st.integers(-3, 3), st.booleans(), st.floats(allow_nan=False))
attributes = st.dictionaries(st.sampled_from(["tier", "region", "beta", "routing_key", "user_id", "other"]), attr_values, max_size=5)


def both(spec: RoutingSpec, model: str = "m") -> tuple[Router, ref.ReferenceRouter]:
    native, reference = Router(), ref.ReferenceRouter()
    native.publish(model, spec)
    reference.publish(model, spec)
    return native, reference


def test_atomics_are_lock_free() -> None:
    assert atomics_lock_free()


@given(keys)
def test_hash_and_bucket_match_reference(key: object) -> None:
    assert hash64(key) == ref.hash64(key)  # type: ignore[arg-type]
    assert bucket_of(key) == ref.bucket_of(key) == ref.hash64(key) % 10000  # type: ignore[arg-type]


def test_hash_known_values() -> None:
    """Pinned values: changing the hash silently moves every sticky key on every replica."""
    assert hash64("") == ref.mix64(0xCBF29CE484222325)
    assert bucket_of("abc") == 808
    assert hash64(42) == hash64("42") and hash64(True) == hash64("true")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.lists(keys, max_size=40))
def test_route_batch_matches_reference(spec: RoutingSpec, ks: list[object]) -> None:
    native, reference = both(spec)
    assert native.route_batch("m", ks) == reference.route_batch("m", ks)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), attributes, texts.filter(bool))
def test_route_matches_reference(spec: RoutingSpec, attrs: dict[str, object], request_id: str) -> None:
    native, reference = both(spec)
    got = native.route("m", attrs, request_id)  # type: ignore[arg-type]
    assert isinstance(got, Route)
    assert got == reference.route("m", attrs, request_id)  # type: ignore[arg-type]
    assert got.generation == spec.generation


@given(specs())
def test_snapshot_round_trips(spec: RoutingSpec) -> None:
    native, _ = both(spec)
    assert native.snapshot("m") == spec
    assert native.snapshot("other") is None


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 9999), st.integers(1, 10000))
def test_raising_canary_only_moves_keys_from_champion(low: int, extra: int) -> None:
    high = min(10000, low + extra)
    router = Router()
    sample = [f"user-{i}" for i in range(2000)]
    router.publish("m", RoutingSpec(1, (1, 2), (10000 - low, low)))
    before = router.route_batch("m", sample)
    router.publish("m", RoutingSpec(2, (1, 2), (10000 - high, high)))
    after = router.route_batch("m", sample)
    assert all(not (b == 2 and a == 1) for b, a in zip(before, after))  # nothing moves back
    assert sum(a == 2 for a in after) >= sum(b == 2 for b in before)


def test_split_is_roughly_proportional() -> None:
    router = Router()
    router.publish("m", RoutingSpec(1, (1, 2), (9000, 1000)))
    got = router.route_batch("m", range(20000))
    assert 0.08 < got.count(2) / len(got) < 0.12


def test_cohort_rules_win_over_weights_first_match() -> None:
    router = Router()
    spec = RoutingSpec(
        1, (1, 2), (10000, 0), shadows=(2, 7),
        cohorts=(CohortRule("tier", "gold", 2), CohortRule("beta", True, 5), CohortRule("tier", "gold", 9)),
    )
    router.publish("m", spec)
    assert router.route("m", {"tier": "gold", "beta": True}, "r") == Route(2, (7,), 1)  # served version not shadowed
    assert router.route("m", {"tier": "silver", "beta": True}, "r").version == 5
    assert router.route("m", {"beta": "true"}, "r").version == 5  # canonical text comparison
    assert router.route("m", {"beta": False, "routing_key": "k"}, "r") == Route(1, (2, 7), 1)


def test_key_precedence_attribute_then_request_id_then_random() -> None:
    router = Router()
    router.publish("m", RoutingSpec(1, tuple(range(100)), (100,) * 100, key_attribute="user_id"))
    by_key = {router.route("m", {"user_id": "alice"}, f"req-{i}").version for i in range(20)}
    assert len(by_key) == 1 and by_key == {ref.bucket_of("alice") // 100}
    assert router.route("m", {}, "req-7").version == ref.bucket_of("req-7") // 100
    random_versions = {router.route("m", {}, "").version for _ in range(300)}
    assert len(random_versions) > 50


def test_invalid_specs_are_refused_with_model_named() -> None:
    router = Router()
    bad = [
        RoutingSpec(1, (1, 2), (5000, 4000)),  # sum != 10000
        RoutingSpec(1, (1, 1), (5000, 5000)),  # duplicate version
        RoutingSpec(1, (1, 2), (11000, -1000)),  # negative weight
        RoutingSpec(1, (-1,), (10000,)),  # negative version
        RoutingSpec(1, (1,), (10000,), shadows=(-2,)),
        RoutingSpec(1, (1,), (10000,), cohorts=(CohortRule("tier", "gold", -1),)),
        RoutingSpec(1, (1,), (10000,), cohorts=(CohortRule("tier", 0.5, 1),)),  # type: ignore[arg-type]
        RoutingSpec(1, (1, 2), (10000,)),  # length mismatch
        RoutingSpec(1, (), ()),
        RoutingSpec(-1, (1,), (10000,)),
        RoutingSpec(1, (1.0,), (10000,)),  # type: ignore[arg-type]
    ]
    for spec in bad:
        with pytest.raises(InvalidInput, match="'mymodel'"):
            router.publish("mymodel", spec)
        with pytest.raises(InvalidInput):
            ref.ReferenceRouter().publish("mymodel", spec)
    assert router.models() == []


def test_stale_publish_refused_and_previous_stays_live() -> None:
    router = Router()
    router.publish("m", RoutingSpec(5, (1,), (10000,)))
    for gen in (5, 4, 0):
        with pytest.raises(FailedPrecondition, match="stale.*'m'"):
            router.publish("m", RoutingSpec(gen, (2,), (10000,)))
    assert router.route("m", {}, "x") == Route(1, (), 5)
    router.publish("m", RoutingSpec(6, (2,), (10000,)))
    assert router.route("m", {}, "x") == Route(2, (), 6)


def test_models_add_remove_and_unknown_model() -> None:
    router = Router()
    router.publish("b", RoutingSpec(1, (1,), (10000,)))
    router.publish("a", RoutingSpec(1, (3,), (10000,)))
    assert router.models() == ["a", "b"]
    assert router.remove("a") is True and router.remove("a") is False
    with pytest.raises(ModelNotFound, match="'a'"):
        router.route("a", {}, "r")
    with pytest.raises(ModelNotFound):
        router.route_batch("a", ["k"])
    router.publish("a", RoutingSpec(0, (4,), (10000,)))  # re-added: any generation
    assert router.route("a", {}, "r").version == 4


def test_bad_key_type_is_invalid_input() -> None:
    router = Router()
    router.publish("m", RoutingSpec(1, (1,), (10000,)))
    with pytest.raises(InvalidInput, match="routing_key"):
        router.route("m", {"routing_key": [1, 2]}, "r")  # type: ignore[dict-item]
    with pytest.raises(InvalidInput):
        router.route("m", {"routing_key": "\ud800"}, "r")
    assert router.route("m", {"unrelated": object()}, "r").version == 1  # type: ignore[dict-item]


_CHILD = """
import json, sys
from swapserve.native import Router, RoutingSpec
r = Router()
r.publish("m", RoutingSpec(3, (1, 2, 3), (5000, 3000, 2000)))
keys = json.loads(sys.stdin.read())
print(json.dumps(r.route_batch("m", keys)))
"""


def test_deterministic_across_processes() -> None:
    import json

    ks = [f"user-{i}" for i in range(500)] + list(range(500))
    out = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(ks), capture_output=True, text=True, check=True)
    router = Router()
    router.publish("m", RoutingSpec(3, (1, 2, 3), (5000, 3000, 2000)))
    assert json.loads(out.stdout) == router.route_batch("m", ks)


def test_readers_never_see_a_torn_or_missing_snapshot_while_publishing() -> None:
    """Readers route while a writer republishes: every answer matches one published generation."""
    router = Router()
    router.publish("m", RoutingSpec(1, (1, 1001), (5000, 5000)))
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            got = router.route_batch("m", ["a", "b", "c"] * 50)
            r = router.route("m", {"routing_key": "a"}, "")
            if any(v % 1000 != 1 for v in [*got, r.version]) or r.generation < 1:
                errors.append(repr(r))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for gen in range(2, 3000):
        router.publish("m", RoutingSpec(gen, (gen * 1000 + 1, 1001 + gen * 1000), (5000, 5000)))
        if gen % 7 == 0:
            router.publish(f"tmp{gen}", RoutingSpec(1, (1,), (10000,)))
            router.remove(f"tmp{gen}")
    stop.set()
    for t in threads:
        t.join()
    assert not errors
