"""Ground-truth feedback: log every prediction, join reported outcomes, count per slice.

``FeedbackObserver`` is a ``RequestObserver`` (see ``monitoring.observer``): on each response it
logs the prediction(s) under the request id in the ``PredictionLog`` and counts the request and
its latency in ``SliceStats``; on an error it counts the error. ``report`` joins outcomes sent to
the feedback service with that log and counts them per (model, version, slice).

Outcomes (one per request row, keyed by the inference request's ``id``):

- ``label``: the true class id. Classification models only; correct when it equals the argmax.
- ``correct``: a correct/incorrect flag judged by the client; any model.
- ``value``: the true number. Regression models only; adds |prediction - value| (and its square).
- ``row``: which row of a multi-row request (default 0). Each row joins at most once: a second
  outcome for the same row is ``invalid`` ("already reported"), so retries never double-count.

Every outcome gets its own result (joined, unknown, expired, invalid) with a message; a bad
outcome never fails the others.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from swapserve.errors import InvalidInput, SwapserveError
from swapserve.feedback.predictions import PredictionLog, PredictionRule, Task
from swapserve.feedback.slices import SliceStats
from swapserve.types import InferRequest, ModelSpec

#: Outcomes per ``report`` call: bounds the time one call holds the event loop (~5 ms per 1,000).
MAX_OUTCOMES_PER_REPORT = 10_000
#: Rows the shadow log keeps (shadow copies are shed under load, so they are fewer than requests).
SHADOW_CAPACITY = 200_000

LABEL, CORRECT, VALUE = "label", "correct", "value"


@dataclass(frozen=True)
class Outcome:
    """A reported truth: ``kind`` is label | correct | value ("" when the sender set none)."""

    id: str
    kind: str
    value: int | bool | float | None = None
    row: int = 0


@dataclass(frozen=True)
class OutcomeResult:
    id: str
    status: str  # joined | unknown | expired | invalid
    message: str = ""


@dataclass(frozen=True)
class ReportSummary:
    joined: int
    unknown: int
    expired: int
    invalid: int
    results: tuple[OutcomeResult, ...]


class FeedbackObserver:
    """The prediction log and per-slice counters behind the feedback service.

    ``slices`` is shared with the rollout controller (``snapshot``/``subscribe``) and exports the
    Prometheus metrics; ``log`` defaults to a ``PredictionLog()`` (1,000,000 rows, 1 h window).
    Everything runs on the server's event loop.
    """

    def __init__(self, slices: SliceStats, log: PredictionLog | None = None,
                 shadow_log: PredictionLog | None = None) -> None:
        self.slices = slices
        self.log = log if log is not None else PredictionLog()
        #: Shadow versions' answers, by the same request id (one shadow per id: the last one wins).
        #: A label for the id scores the served version and the shadow alike, which is how a shadow
        #: stage gathers labelled evidence without serving anyone. A ``correct`` flag refers to the
        #: served answer, so it does not score the shadow.
        self.shadow_log = shadow_log if shadow_log is not None else PredictionLog(capacity=SHADOW_CAPACITY)
        self._rules: dict[str, tuple[ModelSpec, PredictionRule]] = {}

    def _rule(self, spec: ModelSpec) -> PredictionRule:
        cached = self._rules.get(spec.name)
        if cached is not None and cached[0] is spec:
            return cached[1]
        rule = PredictionRule.for_spec(spec)
        self._rules[spec.name] = (spec, rule)
        return rule

    def _slice(self, req: InferRequest, spec: ModelSpec, rule: PredictionRule) -> str:
        return self.slices.resolve_slice(spec.name, req.parameters.get(rule.slice_parameter))

    # -- RequestObserver ----------------------------------------------------------------------

    def on_request(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray]) -> None:
        pass

    def on_response(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray],
                    outputs: dict[str, np.ndarray], latency_s: float) -> None:
        rule = self._rule(spec)
        slice_ = self._slice(req, spec, rule)
        self.slices.record_request(spec.name, version, slice_, latency_s)
        self.log.record(req.id, spec.name, version, slice_, rule.predictions(outputs, spec.batching))

    def on_error(self, req: InferRequest, spec: ModelSpec, version: int, error: SwapserveError,
                 latency_s: float) -> None:
        rule = self._rule(spec)
        self.slices.record_request(spec.name, version, self._slice(req, spec, rule), latency_s, error=True)

    def on_shadow(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray],
                  outputs: dict[str, np.ndarray], latency_s: float) -> None:
        rule = self._rule(spec)
        slice_ = self._slice(req, spec, rule)
        self.slices.record_request(spec.name, version, slice_, latency_s)
        self.shadow_log.record(req.id, spec.name, version, slice_, rule.predictions(outputs, spec.batching))

    def _score_shadow(self, model: str, o: Outcome, task: Task | None) -> None:
        """The same label scores a shadow's answer to that request, if one was logged."""
        if o.kind == CORRECT:
            return
        e = self.shadow_log.join(o.id).entry
        if e is None or e.model != model or o.row < 0 or o.row >= e.rows or e.labelled & (1 << o.row):
            return
        pred = e.row(o.row)
        if pred is None:
            return
        if o.kind == LABEL and task is Task.CLASSIFICATION:
            self.slices.record_outcome(e.model, e.version, e.slice, LABEL, correct=int(pred) == int(o.value or 0))
        elif o.kind == VALUE and task is Task.REGRESSION:
            self.slices.record_outcome(e.model, e.version, e.slice, VALUE, error=float(pred) - float(o.value or 0.0))
        else:
            return
        self.shadow_log.mark_labelled(e, o.row)

    # -- the feedback service -----------------------------------------------------------------

    def report(self, model: str, outcomes: Sequence[Outcome]) -> ReportSummary:
        """Join each outcome with its logged prediction and count it; one result per outcome, in order.

        Raises InvalidInput only for the request as a whole (no model, too many outcomes).
        """
        if not model:
            raise InvalidInput("a feedback report needs the model name the requests were sent to")
        if len(outcomes) > MAX_OUTCOMES_PER_REPORT:
            raise InvalidInput(f"a feedback report may carry at most {MAX_OUTCOMES_PER_REPORT} outcomes, this one has "
                               f"{len(outcomes)}; send them in batches (`swapserve feedback --batch`)")
        results = [self._join(model, o) for o in outcomes]
        counts = {"joined": 0, "unknown": 0, "expired": 0, "invalid": 0}
        for r in results:
            counts[r.status] += 1
        for status, n in counts.items():
            if n:
                self.slices.count_result(model, status, n)
        return ReportSummary(counts["joined"], counts["unknown"], counts["expired"], counts["invalid"], tuple(results))

    def _join(self, model: str, o: Outcome) -> OutcomeResult:
        def invalid(message: str) -> OutcomeResult:
            return OutcomeResult(o.id, "invalid", message)

        if not o.id:
            return invalid("the outcome has no request id; use the id returned in the inference response")
        if o.kind not in (LABEL, CORRECT, VALUE):
            return invalid(f"the outcome for request '{o.id}' carries no label, correct flag or value")
        if o.kind == VALUE and not (isinstance(o.value, float | int) and math.isfinite(o.value)):
            return invalid(f"the value reported for request '{o.id}' is not a finite number")
        found = self.log.join(o.id)
        if found.entry is None:
            if found.status == "expired":
                return OutcomeResult(o.id, "expired", f"the prediction for request '{o.id}' is older than the "
                                     f"join window ({self.log.window_s:g} s) or was pushed out of a full log")
            return OutcomeResult(o.id, "unknown", f"no prediction of model '{model}' was logged with request id "
                                 f"'{o.id}' (was the id returned by the server used?)")
        e = found.entry
        if e.model != model:
            return invalid(f"request '{o.id}' was sent to model '{e.model}', not '{model}'")
        if o.row < 0 or o.row >= e.rows:
            return invalid(f"request '{o.id}' had {e.rows} row(s); row {o.row} does not exist")
        bit = 1 << o.row
        if e.labelled & bit:
            return invalid(f"an outcome for request '{o.id}' row {o.row} was already reported; it counts once")
        pred = e.row(o.row)
        rule = self._rules.get(model)
        task = rule[1].task if rule is not None else None
        if o.kind == CORRECT:
            self.slices.record_outcome(e.model, e.version, e.slice, CORRECT, correct=bool(o.value))
        elif o.kind == LABEL:
            if task is not Task.CLASSIFICATION or pred is None:
                return invalid(f"model '{model}' is not a classification model (or has no class prediction); "
                               "report `correct` or `value` instead of `label`")
            self.slices.record_outcome(e.model, e.version, e.slice, LABEL, correct=int(pred) == int(o.value or 0))
        else:
            if task is not Task.REGRESSION or pred is None:
                return invalid(f"model '{model}' does not predict a single number per row; report `label` or "
                               "`correct` instead of `value`")
            self.slices.record_outcome(e.model, e.version, e.slice, VALUE, error=float(pred) - float(o.value or 0.0))
        self.log.mark_labelled(e, o.row)
        self._score_shadow(model, o, task)
        return OutcomeResult(o.id, "joined")
