"""Rollout plans: what a rollout does, stage by stage, parsed and validated once.

A plan is a list of stages and the gates that guard every stage::

    stages:
      - {name: shadow,  traffic: 0,  shadow: true, min_duration: 10m, min_samples: 2000}
      - {name: canary,  traffic: 5,  min_duration: 1h, min_samples: 1000}
      - {name: half,    traffic: 50, min_duration: 1h, approve: true}
      - {name: full,    traffic: 100}
    gates: {max_slice_accuracy_drop: 0.01, max_error_rate_increase: 0.005, p99_ms: 50, confidence: 0.99}
    watch: 24h
    require_offline_eval: true

Schema (every key optional unless marked; unknown keys are refused with a suggestion):

``stages`` (required, at least one)
    ``name`` (required)     unique, non-empty text.
    ``traffic``             the challenger's percent, 0..100 with at most two decimals
                            (stored exactly as basis points: 12.34 -> 1234). Default 0.
                            Traffic never decreases from one stage to the next (raising a
                            share only moves keys from champion to challenger).
    ``shadow``              true: the challenger gets a copy of live requests, its outputs are
                            compared and logged, never returned. Only with ``traffic: 0`` and no
                            ``cohorts``. Default false.
    ``cohorts``             ``[{attribute: country, value: NL}]``: requests whose attribute equals
                            the value are served by the challenger (sticky), on top of ``traffic``.
                            Quote values YAML would read as booleans (``value: 'NO'``).
    ``min_duration``        seconds before the stage may advance: ``90``, ``90s``, ``10m``,
                            ``1h``, ``1h30m``, ``1.5h``, ``500ms`` (:mod:`swapserve.units`). Default 0.
    ``min_samples``         labelled outcomes on the challenger before the stage may advance.
                            Default 0.
    ``approve``             true: advancing past this stage waits for ``swapserve rollout
                            approve``. Default false.
``gates``                   see :class:`Gates` (defaults: 1 point accuracy drop per slice,
                            0.5 point error-rate increase, no p99 limit, confidence 0.99).
``watch``                   how long after promotion the previous champion stays resident and
                            the rollback gate stays armed. Default 1h.
``require_offline_eval``    refuse to start unless the challenger passed ``swapserve evaluate``.
                            Default false.
``rollback_approval_window`` the final stage always needs approval when the model was rolled
                            back within this window (the controller enforces it). Default 24h.
``webhook``                 an http(s) URL called on rollback and promotion. Default none.

The A/B form ``{strategy: ab, split: 50, duration: 1h}`` (plus optional ``gates``, ``watch``,
``webhook``, ...) is a single fixed split kept for ``duration``; it ends in a report, never in
an automatic promotion (:attr:`RolloutPlan.auto_promote` is False).

Semantics the controller relies on: gates are checked from the first labelled outcome in every
stage; advancing past the *last* stage promotes the challenger to champion (100%) and starts the
watch period, during which the same gates stay armed (:meth:`RolloutPlan.watch_stage`).

Every parse error is :class:`~swapserve.errors.InvalidInput` whose message starts with
``rollout plan:`` and names the field (``stages[1].traffic``) and the fix.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from swapserve import units
from swapserve.errors import InvalidInput

Strategy = Literal["staged", "ab"]

DEFAULT_WATCH_S = 3600.0
DEFAULT_ROLLBACK_APPROVAL_WINDOW_S = 24 * 3600.0

#: Built-in plans, for ``swapserve rollout start --strategy NAME``.
BUILTIN_PLANS: tuple[str, ...] = ("shadow", "canary", "blue-green", "cohort", "ab")
#: Built-in stage length. Short enough for a demo (a whole canary takes ~4 minutes with enough
#: labels); override with ``builtin_plan(..., stage_duration=...)`` for production.
BUILTIN_STAGE_S = 60.0
#: Built-in labelled outcomes on the challenger per stage (a few seconds at demo label rates).
BUILTIN_MIN_SAMPLES = 200
#: Built-in watch period after promotion.
BUILTIN_WATCH_S = 300.0
#: Built-in A/B duration.
BUILTIN_AB_S = 600.0


def _bad(path: str, problem: str) -> InvalidInput:
    return InvalidInput(f"rollout plan: {path}: {problem}")


# -- durations, percentages (the grammar is swapserve.units'; these name the plan's field) -----------


def _seconds(value: object, path: str) -> float:
    try:
        return units.parse_duration(value)
    except units.UnitError as exc:
        raise _bad(path, str(exc)) from None


def _bp(value: object, path: str) -> int:
    try:
        return units.percent_to_bp(value)
    except units.UnitError as exc:
        raise _bad(path, str(exc)) from None


# -- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortMatch:
    """Requests whose ``attribute`` equals ``value`` (canonical text, as the router compares)."""

    attribute: str
    value: str


@dataclass(frozen=True)
class Stage:
    """One rollout stage. ``traffic_bp`` is the challenger's share in basis points (exact)."""

    name: str
    traffic_bp: int = 0
    shadow: bool = False
    cohorts: tuple[CohortMatch, ...] = ()
    min_duration_s: float = 0.0
    min_samples: int = 0
    approve: bool = False

    @property
    def traffic(self) -> float:
        """The challenger's percent (``traffic_bp / 100``)."""
        return self.traffic_bp / 100


@dataclass(frozen=True)
class Gates:
    """Live gate thresholds (challenger vs champion), checked every stage and through the watch.

    ``max_slice_accuracy_drop``: fail when some slice's accuracy is lower than the champion's by
    more than this (a fraction: 0.01 = 1 percentage point), with ``confidence``.
    ``max_error_rate_increase``: the same for the overall request error rate (0.005 = 0.5 point).
    ``p99_ms``: fail when the challenger's overall p99 latency exceeds this, once it served
    ``p99_min_requests`` requests (None: no latency gate).
    ``max_relative_mae_increase``: for numeric targets, fail when a slice's mean absolute error
    is higher than the champion's by more than this fraction of the champion's MAE.
    ``confidence``: 1 - the family-wise false-rollback rate over all slices and gates of a stage.
    ``max_reporter_share``: the most of a stage's labels on one version and slice that one reporter
    (feedback credential) may contribute, a fraction in (0, 1]; its labels beyond that are
    recorded but kept out of the gates (counted as ``reporter_cap``). A lying reporter within the
    cap moves a slice's observed accuracy difference by at most about this fraction, so a cap at
    or below ``max_slice_accuracy_drop`` keeps one liar alone from failing an A/A canary beyond the
    gates' own error rate. It needs at least ``1 / share`` reporters for every label to count.
    None (the default): no cap.
    """

    max_slice_accuracy_drop: float = 0.01
    max_error_rate_increase: float = 0.005
    p99_ms: float | None = None
    confidence: float = 0.99
    max_relative_mae_increase: float = 0.05
    p99_min_requests: int = 100
    max_reporter_share: float | None = None

    @property
    def alpha(self) -> float:
        """The family-wise error budget, ``1 - confidence``."""
        return 1.0 - self.confidence


@dataclass(frozen=True)
class RolloutPlan:
    """A validated, immutable rollout plan. Build with :func:`parse_plan`, :func:`load_plan`,
    :meth:`from_dict` or :func:`builtin_plan`; ``from_dict(p.to_dict()) == p`` always holds."""

    stages: tuple[Stage, ...]
    gates: Gates = Gates()
    watch_s: float = DEFAULT_WATCH_S
    require_offline_eval: bool = False
    rollback_approval_window_s: float = DEFAULT_ROLLBACK_APPROVAL_WINDOW_S
    webhook: str | None = None
    strategy: Strategy = "staged"

    @property
    def auto_promote(self) -> bool:
        """False for A/B plans: finishing the last stage ends in a report, not a promotion."""
        return self.strategy != "ab"

    def stage(self, name: str) -> Stage:
        """The stage called ``name``; InvalidInput naming the known stages otherwise."""
        for s in self.stages:
            if s.name == name:
                return s
        raise InvalidInput(f"rollout plan has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def watch_stage(self) -> Stage:
        """The post-promotion watch as a stage (100%, ``min_duration`` = watch) so that the same
        :func:`swapserve.rollout.gates.evaluate` guards it; "advance" means the watch is over."""
        return Stage(name="watch", traffic_bp=units.BASIS_POINTS, min_duration_s=self.watch_s)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict in the canonical (always full, ``stages``) form."""
        stages: list[dict[str, Any]] = []
        for s in self.stages:
            d: dict[str, Any] = {"name": s.name, "traffic": units.bp_to_percent(s.traffic_bp)}
            if s.shadow:
                d["shadow"] = True
            if s.cohorts:
                d["cohorts"] = [{"attribute": c.attribute, "value": c.value} for c in s.cohorts]
            d["min_duration"] = s.min_duration_s
            d["min_samples"] = s.min_samples
            if s.approve:
                d["approve"] = True
            stages.append(d)
        g = self.gates
        gates: dict[str, Any] = {
            "max_slice_accuracy_drop": g.max_slice_accuracy_drop,
            "max_error_rate_increase": g.max_error_rate_increase,
            "p99_ms": g.p99_ms,
            "confidence": g.confidence,
            "max_relative_mae_increase": g.max_relative_mae_increase,
            "p99_min_requests": g.p99_min_requests,
        }
        if g.max_reporter_share is not None:
            gates["max_reporter_share"] = g.max_reporter_share
        return {
            "strategy": self.strategy,
            "stages": stages,
            "gates": gates,
            "watch": self.watch_s,
            "require_offline_eval": self.require_offline_eval,
            "rollback_approval_window": self.rollback_approval_window_s,
            "webhook": self.webhook,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutPlan:
        """Validate a plan given as a mapping (the parsed YAML/JSON, or :meth:`to_dict` output)."""
        return _plan_from_mapping(data)


# -- validation ---------------------------------------------------------------------------------

_PLAN_KEYS = ("stages", "gates", "watch", "require_offline_eval", "rollback_approval_window", "webhook", "strategy")
_AB_KEYS = ("strategy", "split", "duration", "gates", "watch", "require_offline_eval",
            "rollback_approval_window", "webhook", "stages")
_STAGE_KEYS = ("name", "traffic", "shadow", "cohorts", "min_duration", "min_samples", "approve")
_GATE_KEYS = ("max_slice_accuracy_drop", "max_error_rate_increase", "p99_ms", "confidence",
              "max_relative_mae_increase", "p99_min_requests", "max_reporter_share")
_COHORT_KEYS = ("attribute", "value")


def _mapping(value: object, path: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(path, f"expected a mapping ({what}), got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise _bad(path, f"key {k!r} is not text")
    return value


def _check_keys(d: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for k in d:
        if k not in allowed:
            near = difflib.get_close_matches(k, allowed, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            where = f"{path}." if path else ""
            raise InvalidInput(f"rollout plan: {where}{k}: unknown key{hint} (known keys: {', '.join(allowed)})")


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(path, f"{value!r} is not true or false")
    return value


def _int(value: object, path: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise _bad(path, f"{value!r} is not a whole number")
    n = int(value)
    if n < minimum:
        raise _bad(path, f"{value!r} is negative; give a whole number >= {minimum}")
    return n


def _finite(value: object) -> bool:
    """Whether ``value`` is a number (not a bool) that a float holds finitely; a YAML/JSON integer
    too large for a float is not (``math.isfinite`` would raise OverflowError on it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _fraction(value: object, path: str, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(path, f"{value!r} is not a number; {hint}")
    if not _finite(value):
        raise _bad(path, f"{value!r} is outside 0..1; {hint}")
    x = float(value)
    if not math.isfinite(x) or x < 0 or x > 1:
        raise _bad(path, f"{value!r} is outside 0..1; {hint}")
    return x


def _text(value: object, path: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad(path, f"{value!r} is not text; quote it (YAML reads yes/no/on/off as booleans)")
    text = str(value)
    if not text.strip():
        raise _bad(path, "is empty; give a non-empty name")
    if any("\ud800" <= ch <= "\udfff" for ch in text):  # YAML's "\ud83d\ude00" escapes: not one character
        raise _bad(path, f"{text!r} holds a lone UTF-16 surrogate; write the character itself (or \\U0001F600)")
    return text


def _gates(value: object) -> Gates:
    d = _mapping(value, "gates", "gate thresholds")
    _check_keys(d, _GATE_KEYS, "gates")
    g = Gates()
    acc = _fraction(d.get("max_slice_accuracy_drop", g.max_slice_accuracy_drop), "gates.max_slice_accuracy_drop",
                    "a fraction: 0.01 is one percentage point")
    err = _fraction(d.get("max_error_rate_increase", g.max_error_rate_increase), "gates.max_error_rate_increase",
                    "a fraction: 0.005 is half a percentage point")
    mae = d.get("max_relative_mae_increase", g.max_relative_mae_increase)
    if not _finite(mae) or mae < 0:
        raise _bad("gates.max_relative_mae_increase", f"{mae!r} must be a number >= 0 (0.05 = 5% of the champion's MAE)")
    p99 = d.get("p99_ms")
    if p99 is not None and (not _finite(p99) or p99 <= 0):
        raise _bad("gates.p99_ms", f"{p99!r} must be a positive number of milliseconds, or omitted for no latency gate")
    conf = d.get("confidence", g.confidence)
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.5 <= conf < 1:
        raise _bad("gates.confidence", f"{conf!r} must be in [0.5, 1), e.g. 0.99 for a 1% false-rollback rate")
    share = d.get("max_reporter_share")
    if share is not None and (not _finite(share) or not 0 < share <= 1):
        raise _bad("gates.max_reporter_share", f"{share!r} must be a fraction in (0, 1], e.g. 0.2: one reporter's "
                   "labels count up to 20% of a stage's labels on a version; omit it for no cap")
    return Gates(
        max_slice_accuracy_drop=acc,
        max_error_rate_increase=err,
        p99_ms=None if p99 is None else float(p99),
        confidence=float(conf),
        max_relative_mae_increase=float(mae),
        p99_min_requests=_int(d.get("p99_min_requests", g.p99_min_requests), "gates.p99_min_requests"),
        max_reporter_share=None if share is None else float(share),
    )


def _cohort(value: object, path: str) -> CohortMatch:
    d = _mapping(value, path, "{attribute: NAME, value: VALUE}")
    _check_keys(d, _COHORT_KEYS, path)
    for k in _COHORT_KEYS:
        if k not in d:
            raise _bad(f"{path}.{k}", "is required: a cohort rule is {attribute: NAME, value: VALUE}")
    return CohortMatch(attribute=_text(d["attribute"], f"{path}.attribute"), value=_text(d["value"], f"{path}.value"))


def _stage(value: object, i: int) -> Stage:
    path = f"stages[{i}]"
    d = _mapping(value, path, "a stage such as {name: canary, traffic: 5}")
    _check_keys(d, _STAGE_KEYS, path)
    if "name" not in d:
        raise _bad(f"{path}.name", "is required: every stage needs a unique name")
    cohorts_raw = d.get("cohorts", [])
    if not isinstance(cohorts_raw, list):
        raise _bad(f"{path}.cohorts", "expected a list such as [{attribute: country, value: NL}]")
    stage = Stage(
        name=_text(d["name"], f"{path}.name"),
        traffic_bp=_bp(d.get("traffic", 0), f"{path}.traffic"),
        shadow=_bool(d.get("shadow", False), f"{path}.shadow"),
        cohorts=tuple(_cohort(c, f"{path}.cohorts[{j}]") for j, c in enumerate(cohorts_raw)),
        min_duration_s=_seconds(d.get("min_duration", 0), f"{path}.min_duration"),
        min_samples=_int(d.get("min_samples", 0), f"{path}.min_samples"),
        approve=_bool(d.get("approve", False), f"{path}.approve"),
    )
    if stage.shadow and stage.traffic_bp > 0:
        raise _bad(f"{path}.shadow", f"a shadow stage serves no clients, but traffic is {stage.traffic}%; "
                                     "set traffic: 0 or drop shadow: true")
    if stage.shadow and stage.cohorts:
        raise _bad(f"{path}.shadow", "a shadow stage serves no clients, but it has cohorts; "
                                     "put the cohorts in their own stage")
    return stage


def _plan_from_mapping(data: object) -> RolloutPlan:
    d = _mapping(data, "plan", "a rollout plan with 'stages'")
    strategy = d.get("strategy", "staged")
    if strategy not in ("staged", "ab"):
        raise _bad("strategy", f"{strategy!r} is not a plan strategy; use 'ab' for an A/B test or omit it "
                               "(for the built-ins use --strategy shadow|canary|blue-green|cohort|ab)")
    if strategy == "ab":
        _check_keys(d, _AB_KEYS, "")
        if "stages" in d:
            if "split" in d or "duration" in d:
                raise _bad("stages", "an A/B plan gives either split/duration or stages, not both")
            stages_raw = d["stages"]
        else:
            if "split" not in d:
                raise _bad("split", "is required for strategy ab: the challenger's percent, e.g. split: 50")
            stages_raw = [{"name": "ab", "traffic": d["split"], "min_duration": d.get("duration", BUILTIN_AB_S),
                           "approve": True}]
            if "duration" in d:
                _seconds(d["duration"], "duration")  # name the right field on error
            _bp(d["split"], "split")
    else:
        _check_keys(d, _PLAN_KEYS, "")
        if "stages" not in d:
            raise _bad("stages", "is required: list the stages, e.g. [{name: canary, traffic: 5}, "
                                 "{name: full, traffic: 100}]")
        stages_raw = d["stages"]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise _bad("stages", "expected a non-empty list of stages")
    stages = tuple(_stage(s, i) for i, s in enumerate(stages_raw))
    if strategy == "ab" and (len(stages) != 1 or stages[0].traffic_bp == 0 or stages[0].shadow):
        raise _bad("stages", "an A/B plan has exactly one stage with a split above 0 and no shadow")
    seen: set[str] = set()
    for i, s in enumerate(stages):
        if s.name in seen:
            raise _bad(f"stages[{i}].name", f"{s.name!r} is used twice; stage names must be unique")
        seen.add(s.name)
        if i and s.traffic_bp < stages[i - 1].traffic_bp:
            raise _bad(f"stages[{i}].traffic", f"{s.traffic}% is below the previous stage's "
                                               f"{stages[i - 1].traffic}%; traffic never decreases within a plan")
    webhook = d.get("webhook")
    if webhook is not None and (not isinstance(webhook, str) or not re.match(r"^https?://\S+$", webhook)):
        raise _bad("webhook", f"{webhook!r} is not an http(s) URL")
    return RolloutPlan(
        stages=stages,
        gates=_gates(d.get("gates", {})),
        watch_s=_seconds(d.get("watch", DEFAULT_WATCH_S), "watch"),
        require_offline_eval=_bool(d.get("require_offline_eval", False), "require_offline_eval"),
        rollback_approval_window_s=_seconds(
            d.get("rollback_approval_window", DEFAULT_ROLLBACK_APPROVAL_WINDOW_S), "rollback_approval_window"),
        webhook=webhook,
        strategy="ab" if strategy == "ab" else "staged",
    )


def _load_json(text: str) -> object:
    """JSON text -> data; json.JSONDecodeError when it is not JSON, InvalidInput for JSON no plan can be."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as e:  # an integer of more than 4300 digits; absurd nesting
        raise InvalidInput(f"rollout plan: not a usable JSON document: {e}") from None


def parse_plan(text: str) -> RolloutPlan:
    """Parse and validate a plan from YAML or JSON text. InvalidInput on any error."""
    if text.lstrip().startswith("{"):
        try:  # JSON first: YAML 1.1 mis-reads JSON's surrogate-pair escapes for non-BMP characters
            return _plan_from_mapping(_load_json(text))
        except json.JSONDecodeError:
            pass  # YAML flow style, e.g. {strategy: ab, split: 50}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidInput(f"rollout plan: not valid YAML or JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # PyYAML's int() of a >4300-digit integer; block nesting
        raise InvalidInput(f"rollout plan: not a usable YAML document: {e}") from None
    return _plan_from_mapping(data)


def load_plan(path: str | Path) -> RolloutPlan:
    """Parse and validate a plan file (``.yaml``, ``.yml`` or ``.json``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidInput(f"rollout plan: cannot read {str(p)!r}: {e.strerror}; check the --plan path") from None
    if p.suffix == ".json":
        try:
            return _plan_from_mapping(_load_json(text))
        except json.JSONDecodeError as e:
            raise InvalidInput(f"rollout plan: {str(p)!r} is not valid JSON: {e}") from None
    return parse_plan(text)


# -- built-ins ----------------------------------------------------------------------------------


def builtin_plan(
    name: str,
    *,
    cohorts: Sequence[CohortMatch] | Sequence[tuple[str, str]] = (),
    split: float = 50,
    stage_duration: float | str | None = None,
    min_samples: int | None = None,
    watch: float | str | None = None,
    gates: Gates | None = None,
) -> RolloutPlan:
    """A built-in plan (``BUILTIN_PLANS``), with demo-sized durations unless overridden.

    - ``shadow``: shadow (challenger gets copies; gates compare it against ground truth)
      -> canary 5% -> full 100%. Shadow alone proves little about serving, so the plan goes on
      to a small canary instead of stopping; every stage is gated.
    - ``canary``: 5% -> 25% -> 50% -> 100%, each gated.
    - ``blue-green``: one stage at 100% (green preloaded and warmed by the controller before the
      switch); blue stays resident through ``watch`` for instant switch-back.
    - ``cohort``: ``cohorts`` (required) go to the challenger first -> full 100%. The cohort stage
      waits only for its duration: requests routed by a cohort rule chose their version through a
      parameter the client sets, so they are never gate evidence (issue 14) and it gathers none.
    - ``ab``: ``split``% for ``stage_duration`` (default ``BUILTIN_AB_S``), ending in a report.

    Defaults: ``BUILTIN_STAGE_S`` per stage, ``BUILTIN_MIN_SAMPLES`` labelled outcomes per gated
    stage before advancing, ``BUILTIN_WATCH_S`` watch, default :class:`Gates`.
    """
    dur = BUILTIN_STAGE_S if stage_duration is None else _seconds(stage_duration, "stage_duration")
    samples = BUILTIN_MIN_SAMPLES if min_samples is None else _int(min_samples, "min_samples")
    watch_s = BUILTIN_WATCH_S if watch is None else _seconds(watch, "watch")
    g = gates if gates is not None else Gates()

    def st(stage_name: str, pct: float, **kw: Any) -> Stage:
        return Stage(name=stage_name, traffic_bp=_bp(pct, "traffic"),
                     min_duration_s=dur, min_samples=samples, **kw)

    if name == "shadow":
        stages: tuple[Stage, ...] = (st("shadow", 0, shadow=True), st("canary", 5), st("full", 100))
    elif name == "canary":
        stages = (st("canary-5", 5), st("canary-25", 25), st("canary-50", 50), st("full", 100))
    elif name == "blue-green":
        stages = (st("green", 100),)
    elif name == "cohort":
        rules = tuple(c if isinstance(c, CohortMatch) else CohortMatch(str(c[0]), str(c[1])) for c in cohorts)
        if not rules:
            raise InvalidInput("rollout plan: cohorts: the cohort strategy needs at least one rule, "
                               "e.g. --cohort country=NL")
        exposure = Stage(name="cohort", traffic_bp=0, min_duration_s=dur, min_samples=0, cohorts=rules)
        stages = (exposure, st("full", 100))
    elif name == "ab":
        ab_dur = BUILTIN_AB_S if stage_duration is None else dur
        stages = (Stage(name="ab", traffic_bp=_bp(split, "split"), min_duration_s=ab_dur,
                        min_samples=0, approve=True),)
        if stages[0].traffic_bp == 0:
            raise _bad("split", "must be above 0 for an A/B test")
        return RolloutPlan(stages=stages, gates=g, watch_s=watch_s, strategy="ab")
    else:
        near = difflib.get_close_matches(name, BUILTIN_PLANS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise InvalidInput(f"rollout plan: strategy {name!r} is not built in; {hint}"
                           f"choose one of {', '.join(BUILTIN_PLANS)} or pass --plan FILE")
    return RolloutPlan(stages=stages, gates=g, watch_s=watch_s)


__all__ = [
    "BUILTIN_PLANS", "CohortMatch", "Gates", "RolloutPlan", "Stage", "Strategy",
    "builtin_plan", "load_plan", "parse_plan",
]
