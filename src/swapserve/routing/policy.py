"""A model's routing policy (who serves what share) and its compilation to a native snapshot.

The registry stores policies as deployments; the native router serves compiled
snapshots. This module is the one translation between the two.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from swapserve.errors import InvalidInput
from swapserve.native import CohortRule, RoutingSpec
from swapserve.units import BASIS_POINTS


@dataclass(frozen=True)
class RoutingPolicy:
    """Immutable. ``traffic`` is ((version, basis points), ...) in a fixed order (champion first)."""

    champion: int
    traffic: tuple[tuple[int, int], ...]
    shadows: tuple[int, ...] = ()
    cohorts: tuple[tuple[str, str, int], ...] = ()
    key_attribute: str = "routing_key"
    previous_champions: tuple[int, ...] = ()
    #: The registry deployment generation; 0 for Triton's default (highest ready version), never recorded.
    generation: int = 0

    @classmethod
    def single(cls, version: int) -> RoutingPolicy:
        return cls(champion=version, traffic=((version, BASIS_POINTS),))

    @classmethod
    def from_deployment(cls, d: object) -> RoutingPolicy:
        """From a registry ``Deployment`` record."""
        return cls(
            champion=d.champion,  # type: ignore[attr-defined]
            traffic=tuple((t.version, t.weight_bp) for t in d.traffic),  # type: ignore[attr-defined]
            shadows=tuple(d.shadows),  # type: ignore[attr-defined]
            cohorts=tuple((c.attribute, c.value, c.version) for c in d.cohorts),  # type: ignore[attr-defined]
            key_attribute=d.key_attribute,  # type: ignore[attr-defined]
            previous_champions=tuple(d.previous_champions),  # type: ignore[attr-defined]
            generation=d.generation,  # type: ignore[attr-defined]
        )

    @property
    def pinned(self) -> bool:
        """True when an operator (or rollout) chose this policy; False for the default routing."""
        return self.generation > 0

    def serving_versions(self) -> set[int]:
        """Versions that receive requests: positive weight, shadow or cohort target."""
        return {v for v, w in self.traffic if w > 0} | set(self.shadows) | {v for _, _, v in self.cohorts}

    def weight_of(self, version: int) -> int:
        return sum(w for v, w in self.traffic if v == version)

    def validate(self, model: str, resident: Iterable[int]) -> None:
        """Raise InvalidInput unless weights sum to 100% and every version it names is resident."""
        versions = [v for v, _ in self.traffic]
        if len(set(versions)) != len(versions):
            raise InvalidInput(f"model '{model}': traffic names a version twice: {versions}")
        if any(w < 0 for _, w in self.traffic):
            raise InvalidInput(f"model '{model}': traffic weights must not be negative")
        total = sum(w for _, w in self.traffic)
        if total != BASIS_POINTS:
            raise InvalidInput(f"model '{model}': traffic weights sum to {total / 100:g}%, they must sum to 100%")
        ready = set(resident)
        missing = sorted(self.serving_versions() - ready)
        if missing:
            raise InvalidInput(f"model '{model}': version(s) {missing} are not resident; load them first "
                               f"(swapserve load {model} VERSION). Resident: {sorted(ready)}")

    def compile(self, router_generation: int) -> RoutingSpec:
        """The native snapshot for this policy (zero-weight entries kept: they keep bucket order stable)."""
        return RoutingSpec(
            generation=router_generation,
            versions=tuple(v for v, _ in self.traffic),
            weights_bp=tuple(w for _, w in self.traffic),
            shadows=tuple(self.shadows),
            cohorts=tuple(CohortRule(a, val, v) for a, val, v in self.cohorts),
            key_attribute=self.key_attribute,
        )
