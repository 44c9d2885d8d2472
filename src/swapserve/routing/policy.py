"""A model's routing policy (who serves what share), its transitions and its compilation to a native snapshot.

The registry stores policies as deployments; the native router serves compiled
snapshots. This module is the one translation between the two, and the one home of

* **the shape rules** of a policy (:meth:`RoutingPolicy.check`, with :func:`check_split` for
  the traffic split alone): distinct versions, weights in basis points summing to 100%, no
  shadow that is also the champion, one cohort rule per attribute value, a routing key;
* **the transitions** an operator or a rollout makes (:meth:`~RoutingPolicy.promoted`,
  :meth:`~RoutingPolicy.rolled_back`, :meth:`~RoutingPolicy.with_split`,
  :meth:`~RoutingPolicy.for_stage`): each returns a whole new policy computed from the current
  one; nothing else computes a new champion, split, shadows, cohorts or champion history.

Every transition keeps the routing key and the shadows it is not about (a shadow serves
nobody, so no change of the served traffic contradicts it; only a shadow of the new or the
replaced champion goes). A champion change (promote, rollback, a rollout's 100% stage) gives
the new champion all served traffic, so the split and the cohort rules go with it; a rollout's
other stages replace only the challenger's routes and keep the operator's cohort rules. A transition's result
keeps the ``generation`` of the policy it came from; the registry assigns the new one when the
control plane publishes it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from swapserve.errors import FailedPrecondition, InvalidInput
from swapserve.units import BASIS_POINTS, bp_to_percent

if TYPE_CHECKING:
    from swapserve.native import RoutingSpec


def _largest(traffic: Sequence[tuple[int, int]]) -> int:
    """The version with the largest share (the first of equals): the champion when the old one gets nothing."""
    return max(traffic, key=lambda t: t[1])[0]


def _prefix(model: str | None) -> str:
    return f"model '{model}': " if model else ""


def check_split(traffic: Sequence[tuple[int, int]], model: str | None = None) -> None:
    """Raise InvalidInput unless ``traffic`` is a split: distinct versions (ints >= 0), weights 0..10000 bp,
    summing to exactly 10000. The message names ``model`` when given (the CLI checks before it knows one)."""
    at = _prefix(model)
    if not traffic:
        raise InvalidInput(f"{at}traffic is empty; give at least one VERSION=PERCENT")
    seen: set[int] = set()
    for version, weight in traffic:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidInput(f"{at}version {version!r} is not a version number; use an int >= 0")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= BASIS_POINTS:
            raise InvalidInput(f"{at}version {version} has weight {weight!r} bp; weights are basis points "
                               f"between 0 and {BASIS_POINTS} (0% to 100%)")
        if version in seen:
            raise InvalidInput(f"{at}version {version} is given twice in the traffic split; "
                               "give each version one weight")
        seen.add(version)
    total = sum(w for _, w in traffic)
    if total != BASIS_POINTS:
        given = " + ".join(f"{v}={bp_to_percent(w)}%" for v, w in traffic)
        raise InvalidInput(f"{at}traffic weights must sum to 100%, these sum to {bp_to_percent(total)}% ({given})")


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

    # -- the shape rules ---------------------------------------------------------------------------

    def check(self, model: str) -> None:
        """Raise InvalidInput unless this is a well-formed policy (residency aside: see :meth:`validate`).

        The split passes :func:`check_split`; the champion is a version number; shadows are
        distinct version numbers and never the champion; cohort rules have an attribute, route
        to a version number and match each attribute value once; the routing key is named.
        """
        at = _prefix(model)
        check_split(self.traffic, model)
        for v in (self.champion, *self.shadows, *(v for _, _, v in self.cohorts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidInput(f"{at}version {v!r} is not a version number; use an int >= 0")
        if len(set(self.shadows)) != len(self.shadows):
            raise InvalidInput(f"{at}shadow versions {list(self.shadows)} repeat a version; list each shadow once")
        if self.champion in self.shadows:
            raise InvalidInput(f"{at}version {self.champion} cannot be both champion and shadow; "
                               "remove it from the shadows")
        seen: set[tuple[str, str]] = set()
        for attribute, value, _ in self.cohorts:
            if not attribute:
                raise InvalidInput(f"{at}a cohort rule has an empty attribute name")
            if (attribute, value) in seen:
                raise InvalidInput(f"{at}two cohort rules match {attribute}={value!r}; "
                                   "keep one rule per attribute value")
            seen.add((attribute, value))
        if not self.key_attribute:
            raise InvalidInput(f"{at}key_attribute is empty; name the routing key parameter")

    def validate(self, model: str, resident: Iterable[int]) -> None:
        """Raise InvalidInput unless :meth:`check` passes and every version it names is resident."""
        self.check(model)
        ready = set(resident)
        missing = sorted(self.serving_versions() - ready)
        if missing:
            raise InvalidInput(f"model '{model}': version(s) {missing} are not resident; load them first "
                               f"(swapserve load {model} VERSION). Resident: {sorted(ready)}")

    # -- the transitions ----------------------------------------------------------------------------

    def _crowned(self, champion: int, history: Sequence[int]) -> tuple[int, ...]:
        """The champion history after ``champion`` takes over from this policy's champion (pushed if it changes)."""
        return (*history, self.champion) if champion != self.champion else tuple(history)

    def promoted(self, version: int) -> RoutingPolicy:
        """All served traffic to ``version``, which becomes champion; the old champion goes on the history.

        Like every champion change (:meth:`rolled_back` too): the split and the cohort rules go
        (they would serve part of the traffic elsewhere), the shadows stay (they serve nobody)
        except a shadow of either champion, and the routing key stays.
        """
        gone = {self.champion, version}
        return dataclasses.replace(
            self, champion=version, traffic=((version, BASIS_POINTS),),
            shadows=tuple(v for v in self.shadows if v not in gone), cohorts=(),
            previous_champions=self._crowned(version, self.previous_champions))

    def rolled_back(self, to: int | None = None) -> RoutingPolicy:
        """All traffic back to the previous champion (one step down the history), or to ``to``.

        Without ``to`` the history is popped; with ``to``, ``to`` leaves the history and the
        demoted champion is pushed. As in :meth:`promoted`, the split and the cohort rules go and
        the shadows stay, except a shadow of the demoted champion or the target. Raises FailedPrecondition without ``to`` and without a history.
        """
        history = list(self.previous_champions)
        if to is None:
            if not history:
                raise FailedPrecondition(f"champion v{self.champion} has no previous champion to roll back to; "
                                         "promote a version instead")
            target = history.pop()
        else:
            target = to
            history = list(self._crowned(target, [v for v in history if v != target]))
        gone = {self.champion, target}
        return dataclasses.replace(
            self, champion=target, traffic=((target, BASIS_POINTS),),
            shadows=tuple(v for v in self.shadows if v not in gone), cohorts=(), previous_champions=tuple(history))

    def with_split(self, traffic: Sequence[tuple[int, int]], *, shadows: Iterable[int] = (),
                   cohorts: Iterable[tuple[str, str, int]] = (), key_attribute: str | None = None) -> RoutingPolicy:
        """An operator's whole routing spec: this split, these shadows and cohort rules (replacing the old ones).

        The champion stays unless it gets no traffic; then the version with the largest share
        becomes champion and the old one goes on the history. Versions already in the split
        keep their order (so existing keys keep their buckets); new versions follow.
        """
        weights = dict(traffic)
        champion = self.champion if weights.get(self.champion, 0) > 0 else _largest(traffic)
        order = [v for v, _ in self.traffic if v in weights]
        order += [v for v, _ in traffic if v not in order]
        return dataclasses.replace(
            self, champion=champion, traffic=tuple((v, int(weights[v])) for v in order),
            shadows=tuple(dict.fromkeys(shadows)), cohorts=tuple((a, str(val), int(v)) for a, val, v in cohorts),
            key_attribute=key_attribute or self.key_attribute,
            previous_champions=self._crowned(champion, self.previous_champions))

    @classmethod
    def first_split(cls, traffic: Sequence[tuple[int, int]], *, shadows: Iterable[int] = (),
                    cohorts: Iterable[tuple[str, str, int]] = (), key_attribute: str | None = None) -> RoutingPolicy:
        """:meth:`with_split` for a model nothing routes yet: the largest share is champion, in the order given."""
        return cls(champion=_largest(traffic), traffic=()).with_split(
            traffic, shadows=shadows, cohorts=cohorts, key_attribute=key_attribute)

    def for_stage(self, champion: int, challenger: int, *, traffic_bp: int, shadow: bool = False,
                  cohorts: Iterable[tuple[str, str]] = ()) -> RoutingPolicy:
        """A rollout stage of ``challenger`` against ``champion``: the challenger gets ``traffic_bp``
        (a shadow copy of all traffic with ``shadow``; the ``(attribute, value)`` cohorts).

        ``traffic_bp == 0`` without shadow or cohorts returns all traffic to the champion (abort,
        rollback, end of an A/B test); ``traffic_bp == BASIS_POINTS`` promotes the challenger. A
        policy on which the challenger was already promoted over ``champion`` (a resumed rollout)
        is first stepped back. The rollout replaces the split and the challenger's shadow and
        cohort rules; other shadows and cohort rules stay. The champion keeps the lower buckets,
        so raising the share only moves keys from champion to challenger.
        """
        base = self
        if self.champion == challenger:
            history = list(self.previous_champions)
            if history and history[-1] == champion:
                history.pop()  # undo the promotion step, as if it never happened
            base = dataclasses.replace(self, champion=champion, previous_champions=tuple(history))
        if traffic_bp >= BASIS_POINTS:
            return base.promoted(challenger)
        traffic: tuple[tuple[int, int], ...] = ((champion, BASIS_POINTS - traffic_bp),)
        if traffic_bp > 0:
            traffic += ((challenger, traffic_bp),)
        stage_cohorts = tuple((a, val, challenger) for a, val in cohorts)
        taken = {(a, val) for a, val, _ in stage_cohorts}
        return dataclasses.replace(
            base, champion=champion, traffic=traffic,
            shadows=tuple(v for v in base.shadows if v not in (champion, challenger)) + ((challenger,) if shadow else ()),
            cohorts=tuple(c for c in base.cohorts if c[2] != challenger and (c[0], c[1]) not in taken) + stage_cohorts,
            previous_champions=base._crowned(champion, base.previous_champions))

    # -- the native snapshot ------------------------------------------------------------------------

    def compile(self, router_generation: int) -> RoutingSpec:
        """The native snapshot for this policy (zero-weight entries kept: they keep bucket order stable)."""
        from swapserve.native import CohortRule, RoutingSpec  # the control path only: checks need no native code

        return RoutingSpec(
            generation=router_generation,
            versions=tuple(v for v, _ in self.traffic),
            weights_bp=tuple(w for _, w in self.traffic),
            shadows=tuple(self.shadows),
            cohorts=tuple(CohortRule(a, val, v) for a, val, v in self.cohorts),
            key_attribute=self.key_attribute,
        )
