"""Pure-Python reference router: the executable specification of ``swapserve.native.Router``.

Same canonical key bytes, same hash, same buckets, same version choice, same validation
outcome (the messages may differ). Readable rather than fast; used by the property tests
and as documentation:

    canonical(key)  str -> UTF-8 | bool -> b"true"/b"false" | int -> decimal | float -> repr
    hash64(key)     = mix64(fnv1a64(canonical(key)))
    bucket_of(key)  = hash64(key) % 10000
    version         = first live version whose cumulative weight exceeds the bucket
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from swapserve.errors import FailedPrecondition, InvalidInput, ModelNotFound
from swapserve.native import AttrValue, Route, RoutingSpec

MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
BUCKETS = 10000


def canonical(value: AttrValue) -> bytes:
    """The bytes a routing key or cohort value is compared and hashed as."""
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return int.__str__(int(value)).encode()
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"key {value!r} is not valid UTF-8; send UTF-8 text") from None
    if isinstance(value, float):
        return float.__repr__(value).encode()
    raise InvalidInput(f"key has type {type(value).__name__}; use str, int, bool or float")


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & MASK64
    return h


def mix64(z: int) -> int:
    """The splitmix64 finaliser (without the gamma increment)."""
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & MASK64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z


def hash64(key: AttrValue) -> int:
    return mix64(fnv1a64(canonical(key)))


def bucket_of(key: AttrValue) -> int:
    return hash64(key) % BUCKETS


def version_for_bucket(spec: RoutingSpec, bucket: int) -> int:
    cumulative = 0
    for version, weight in zip(spec.versions, spec.weights_bp):
        cumulative += weight
        if bucket < cumulative:
            return version
    return spec.versions[-1]


def validate(model: str, spec: RoutingSpec) -> None:
    """Raise InvalidInput when the native router would refuse ``spec``."""

    def bad(what: str) -> InvalidInput:
        return InvalidInput(f"routing spec for model '{model}' is invalid: {what}")

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not model:
        raise InvalidInput("routing spec has an empty model name")
    if not is_int(spec.generation) or spec.generation < 0:
        raise bad("generation must be a non-negative integer")
    if not spec.versions:
        raise bad("no live versions")
    if len(spec.versions) != len(spec.weights_bp):
        raise bad("one weight per version")
    if not spec.key_attribute:
        raise bad("key_attribute is empty")
    if not all(is_int(v) and v >= 0 for v in spec.versions):
        raise bad("versions must be non-negative integers")
    if len(set(spec.versions)) != len(spec.versions):
        raise bad("a version is listed twice")
    if not all(is_int(w) and 0 <= w <= BUCKETS for w in spec.weights_bp):
        raise bad("weights must be integers in [0, 10000]")
    if sum(spec.weights_bp) != BUCKETS:
        raise bad(f"weights_bp sum to {sum(spec.weights_bp)}, not 10000")
    if not all(is_int(s) and s >= 0 for s in spec.shadows) or len(set(spec.shadows)) != len(spec.shadows):
        raise bad("shadows must be distinct non-negative integers")
    for rule in spec.cohorts:
        if not rule.attribute or not isinstance(rule.value, (str, int, bool)):
            raise bad(f"cohort rule {rule!r} needs an attribute and a str, int or bool value")
        if not is_int(rule.version) or rule.version < 0:
            raise bad(f"cohort rule {rule!r} routes to a negative version")


class ReferenceRouter:
    """Dict-based router with the native router's semantics (not thread-safe)."""

    def __init__(self) -> None:
        self._tables: dict[str, RoutingSpec] = {}

    def publish(self, model: str, spec: RoutingSpec) -> None:
        validate(model, spec)
        current = self._tables.get(model)
        if current is not None and spec.generation <= current.generation:
            raise FailedPrecondition(
                f"stale routing snapshot for model '{model}': generation {spec.generation} <= {current.generation}"
            )
        self._tables[model] = spec

    def remove(self, model: str) -> bool:
        return self._tables.pop(model, None) is not None

    def snapshot(self, model: str) -> RoutingSpec | None:
        return self._tables.get(model)

    def models(self) -> list[str]:
        return sorted(self._tables)

    def _spec(self, model: str) -> RoutingSpec:
        spec = self._tables.get(model)
        if spec is None:
            raise ModelNotFound(f"model '{model}' has no routing snapshot")
        return spec

    def route(self, model: str, attributes: Mapping[str, AttrValue] | None = None, request_id: str = "") -> Route:
        spec = self._spec(model)
        attributes = attributes or {}
        version = -1
        for rule in spec.cohorts:
            if rule.attribute in attributes and canonical(attributes[rule.attribute]) == canonical(rule.value):
                version = rule.version
                break
        if version < 0:
            if spec.key_attribute in attributes:
                bucket = bucket_of(attributes[spec.key_attribute])
            elif request_id:
                bucket = bucket_of(request_id)
            else:
                bucket = random.randrange(BUCKETS)
            version = version_for_bucket(spec, bucket)
        shadows = tuple(s for s in spec.shadows if s != version)
        return Route(version, shadows, spec.generation)

    def route_batch(self, model: str, keys: Iterable[AttrValue]) -> list[int]:
        spec = self._spec(model)
        return [version_for_bucket(spec, bucket_of(k)) for k in keys]
