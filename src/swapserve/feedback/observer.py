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
  outcome for the same row is ``duplicate`` and never counts, so retries never double-count and
  the first report of a row is the one that stands.

What counts as rollout evidence (see ``feedback.slices``): only requests the router assigned,
and their labels while the reporter is within the stage's budget. A request that pinned a
version or matched a cohort rule is served, logged and labelled as usual, but it and its labels
are counted apart (``excluded``); so are the client's own bad requests (INVALID_ARGUMENT, and
ALREADY_EXISTS for an id already in the log: ``on_request`` refuses to re-record an id).

Every outcome gets its own result with a message: ``joined`` (counted), ``excluded`` (joined to its
prediction but kept out of gates: pinned, cohort, over the reporter's cap), ``duplicate``,
``unknown``, ``expired``, ``invalid``; a bad outcome never fails the others. Every joined label is
booked under its ``reporter`` (the feedback credential's name, ``anonymous`` without one).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from swapserve.errors import AlreadyExists, InvalidInput, SwapserveError
from swapserve.feedback.predictions import Entry, PredictionLog, PredictionRule, Task
from swapserve.feedback.slices import ANONYMOUS, SliceStats
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
    status: str  # joined | excluded | duplicate | unknown | expired | invalid
    message: str = ""


@dataclass(frozen=True)
class ReportSummary:
    joined: int
    unknown: int
    expired: int
    invalid: int
    results: tuple[OutcomeResult, ...]
    excluded: int = 0
    duplicate: int = 0


def check_report(model: str, n: int) -> None:
    """Raises InvalidInput for a report that cannot be joined as a whole (no model, too many outcomes)."""
    if not model:
        raise InvalidInput("a feedback report needs the model name the requests were sent to")
    if n > MAX_OUTCOMES_PER_REPORT:
        raise InvalidInput(f"a feedback report may carry at most {MAX_OUTCOMES_PER_REPORT} outcomes, this one has "
                           f"{n}; send them in batches (`swapserve feedback --batch`)")


def summarize(results: Sequence[OutcomeResult]) -> ReportSummary:
    """The summary of these results: counts per status, the results in the order given."""
    counts = {"joined": 0, "excluded": 0, "duplicate": 0, "unknown": 0, "expired": 0, "invalid": 0}
    for r in results:
        counts[r.status] += 1
    return ReportSummary(counts["joined"], counts["unknown"], counts["expired"], counts["invalid"], tuple(results),
                         excluded=counts["excluded"], duplicate=counts["duplicate"])


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
        if self.log.on_evict is None:
            self.log.on_evict = self._evicted
        self._rules: dict[str, tuple[ModelSpec, PredictionRule]] = {}

    def _evicted(self, e: Entry) -> None:
        """A prediction pushed out of the full log before any label: its label can no longer count."""
        self.slices.exclude(e.model, e.version, e.slice, "outcome", "evicted")

    def _rule(self, spec: ModelSpec) -> PredictionRule:
        cached = self._rules.get(spec.name)
        if cached is not None and cached[0] is spec:
            return cached[1]
        rule = PredictionRule.for_spec(spec)
        self._rules[spec.name] = (spec, rule)
        return rule

    def _slice(self, req: InferRequest, spec: ModelSpec, rule: PredictionRule) -> str:
        return self.slices.resolve_slice(spec.name, req.parameters.get(rule.slice_parameter), rule.slices)

    # -- RequestObserver ----------------------------------------------------------------------

    def on_request(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray]) -> None:
        """Refuses (AlreadyExists) a request whose id is already in the prediction log: a logged
        prediction is never replaced, so nobody can re-send an id to take over its label."""
        if req.id in self.log:
            raise AlreadyExists(f"request id '{req.id}' was already used for a prediction on this server; ids "
                                f"join predictions with their feedback, so each may be used once. Send a new id, "
                                "or none and the server assigns one (returned in the response)")

    def on_response(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray],
                    outputs: dict[str, np.ndarray], latency_s: float) -> None:
        rule = self._rule(spec)
        slice_ = self._slice(req, spec, rule)
        if req.assignment:
            self.slices.exclude(spec.name, version, slice_, "request", req.assignment)
        else:
            self.slices.record_request(spec.name, version, slice_, latency_s)
        self.log.record(req.id, spec.name, version, slice_, rule.predictions(outputs, spec.batching), req.assignment)

    def on_error(self, req: InferRequest, spec: ModelSpec, version: int, error: SwapserveError,
                 latency_s: float) -> None:
        rule = self._rule(spec)
        slice_ = self._slice(req, spec, rule)
        if req.assignment:
            self.slices.exclude(spec.name, version, slice_, "request", req.assignment)
        elif isinstance(error, InvalidInput | AlreadyExists):  # the client's own bad request
            self.slices.exclude(spec.name, version, slice_, "request", "client_error")
        else:
            self.slices.record_request(spec.name, version, slice_, latency_s, error=True)

    def on_shadow(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray],
                  outputs: dict[str, np.ndarray], latency_s: float) -> None:
        rule = self._rule(spec)
        slice_ = self._slice(req, spec, rule)
        if req.assignment:
            self.slices.exclude(spec.name, version, slice_, "request", req.assignment)
        else:
            self.slices.record_request(spec.name, version, slice_, latency_s)
        self.shadow_log.record(req.id, spec.name, version, slice_, rule.predictions(outputs, spec.batching),
                               req.assignment)

    def _score_shadow(self, model: str, o: Outcome, task: Task | None, reporter: str) -> None:
        """The same label scores a shadow's answer to that request, if one was logged (and the
        reporter is within its budget on the shadow's version)."""
        if o.kind == CORRECT:
            return
        e = self.shadow_log.join(o.id).entry
        if e is None or e.model != model or o.row < 0 or o.row >= e.rows or e.labelled & (1 << o.row):
            return
        pred = e.row(o.row)
        if pred is None or e.exclude:
            return
        if not self.slices.admit(model, e.version, e.slice, reporter):
            self.slices.exclude(e.model, e.version, e.slice, "outcome", "reporter_cap")
            self.slices.note_label(model, e.version, e.slice, reporter, "reporter_cap")
            self.shadow_log.mark_labelled(e, o.row)
            return
        if o.kind == LABEL and task is Task.CLASSIFICATION:
            self.slices.record_outcome(e.model, e.version, e.slice, LABEL, correct=int(pred) == int(o.value or 0))
        elif o.kind == VALUE and task is Task.REGRESSION:
            self.slices.record_outcome(e.model, e.version, e.slice, VALUE, error=float(pred) - float(o.value or 0.0))
        else:
            return
        self.slices.note_label(model, e.version, e.slice, reporter, "counted")
        self.shadow_log.mark_labelled(e, o.row)

    # -- the feedback service -----------------------------------------------------------------

    def report(self, model: str, outcomes: Sequence[Outcome], reporter: str = ANONYMOUS, *,
               count: bool = True) -> ReportSummary:
        """Join each outcome with its logged prediction and count it; one result per outcome, in order.

        ``reporter`` is who vouches for the outcomes (authenticated by the feedback service); every
        joined label is booked under it, and its share of a rollout stage's evidence is capped
        when the plan says so. Raises InvalidInput only for the request as a whole (no model, too
        many outcomes). ``count=False`` leaves the results out of ``swapserve_feedback_outcomes_total``
        (the joins themselves are booked as ever): for a report forwarded by another replica, which
        counts the final result of each outcome itself (``count_results``).
        """
        check_report(model, len(outcomes))
        summary = summarize([self._join(model, o, reporter) for o in outcomes])
        if count:
            self.count_results(model, summary)
        return summary

    def count_results(self, model: str, summary: ReportSummary) -> None:
        """Count a report's results in ``swapserve_feedback_outcomes_total{model,result}``."""
        for status, n in (("joined", summary.joined), ("excluded", summary.excluded),
                          ("duplicate", summary.duplicate), ("unknown", summary.unknown),
                          ("expired", summary.expired), ("invalid", summary.invalid)):
            if n:
                self.slices.count_result(model, status, n)

    def _join(self, model: str, o: Outcome, reporter: str) -> OutcomeResult:
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
            self.slices.exclude(e.model, e.version, e.slice, "outcome", "duplicate")
            self.slices.note_label(model, e.version, e.slice, reporter, "duplicate")
            return OutcomeResult(o.id, "duplicate", f"an outcome for request '{o.id}' row {o.row} was already "
                                 "reported; the first report counts, this one does not")
        pred = e.row(o.row)
        rule = self._rules.get(model)
        task = rule[1].task if rule is not None else None
        if o.kind == LABEL and (task is not Task.CLASSIFICATION or pred is None):
            return invalid(f"model '{model}' is not a classification model (or has no class prediction); "
                           "report `correct` or `value` instead of `label`")
        if o.kind == VALUE and (task is not Task.REGRESSION or pred is None):
            return invalid(f"model '{model}' does not predict a single number per row; report `label` or "
                           "`correct` instead of `value`")
        why = e.exclude or ("" if self.slices.admit(model, e.version, e.slice, reporter) else "reporter_cap")
        if why:
            self.slices.exclude(e.model, e.version, e.slice, "outcome", why)
            self.slices.note_label(model, e.version, e.slice, reporter, why)
            self.log.mark_labelled(e, o.row)
            return OutcomeResult(o.id, "excluded", _EXCLUDED_MESSAGES[why].format(id=o.id, version=e.version,
                                                                                   reporter=reporter))
        if o.kind == CORRECT:
            self.slices.record_outcome(e.model, e.version, e.slice, CORRECT, correct=bool(o.value))
        elif o.kind == LABEL:
            self.slices.record_outcome(e.model, e.version, e.slice, LABEL, correct=int(pred) == int(o.value or 0))
        else:
            self.slices.record_outcome(e.model, e.version, e.slice, VALUE, error=float(pred) - float(o.value or 0.0))
        self.slices.note_label(model, e.version, e.slice, reporter, "counted")
        self.log.mark_labelled(e, o.row)
        self._score_shadow(model, o, task, reporter)
        return OutcomeResult(o.id, "joined")


_EXCLUDED_MESSAGES = {
    "pinned": "recorded, not counted in rollout gates: request '{id}' pinned version {version} (model_version)",
    "cohort": "recorded, not counted in rollout gates: request '{id}' chose version {version} through a cohort "
              "parameter",
    "reporter_cap": "recorded, not counted in rollout gates: reporter '{reporter}' is over the rollout plan's "
                    "max_reporter_share on version {version} in this stage",
}
