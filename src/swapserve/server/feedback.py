"""``swapserve.v1.Feedback`` on the inference port: convert, delegate to FeedbackObserver, convert back."""
from __future__ import annotations

import grpc

from swapserve._proto import feedback_pb2 as pb
from swapserve._proto import feedback_pb2_grpc as pb_grpc
from swapserve.feedback.observer import FeedbackObserver, Outcome, ReportSummary
from swapserve.server.errors import map_errors

FEEDBACK_SERVICE = pb.DESCRIPTOR.services_by_name["Feedback"].full_name


def outcome_from_pb(o: pb.Outcome) -> Outcome:
    kind = o.WhichOneof("outcome") or ""
    return Outcome(o.id, kind, getattr(o, kind) if kind else None, o.row)


def summary_to_pb(s: ReportSummary) -> pb.ReportResponse:
    return pb.ReportResponse(
        joined=s.joined, unknown=s.unknown, expired=s.expired, invalid=s.invalid,
        results=[pb.OutcomeResult(id=r.id, status=r.status, message=r.message) for r in s.results])


class FeedbackServicer(pb_grpc.FeedbackServicer):
    def __init__(self, feedback: FeedbackObserver) -> None:
        self._feedback = feedback

    @map_errors
    async def Report(self, request: pb.ReportRequest, context: grpc.aio.ServicerContext) -> pb.ReportResponse:
        outcomes = [outcome_from_pb(o) for o in request.outcomes]
        return summary_to_pb(self._feedback.report(request.model, outcomes))
