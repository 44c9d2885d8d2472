"""The transport of forwarded feedback (``feedback.forward``): ``swapserve.v1.Feedback/Report`` to
another replica's inference port over grpc.aio, one cached channel per peer address.

A forwarded call carries the caller's credential metadata as it came and
``x-swapserve-forwarded: <this replica's id>``; the peer authenticates the reporter itself.
"""
from __future__ import annotations

from collections.abc import Sequence

import grpc

from swapserve._proto import feedback_pb2 as pb
from swapserve._proto import feedback_pb2_grpc as pb_grpc
from swapserve.feedback.forward import FORWARDED_METADATA, ForwardFailed, Peer
from swapserve.feedback.observer import Outcome, OutcomeResult

#: Codes that mean the peer could not be reached in time (anything else: it answered, and refused).
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def outcome_to_pb(o: Outcome) -> pb.Outcome:
    out = pb.Outcome(id=o.id, row=o.row)
    if o.kind == "label":
        out.label = int(o.value or 0)
    elif o.kind == "correct":
        out.correct = bool(o.value)
    elif o.kind == "value":
        out.value = float(o.value or 0.0)
    return out


class GrpcPeers:
    """``send`` for ``feedback.forward.Forwarder``: one Report per call, a channel per address
    (made on first use, kept until ``close``). Use on the server's event loop only."""

    def __init__(self, origin: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        """``origin``: this replica's id, sent as FORWARDED_METADATA. ``credentials``: TLS to the peers
        (the server's own certificate as the client's, its CA as the roots), None for plaintext."""
        self.origin = origin
        self._credentials = credentials
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.FeedbackStub]] = {}

    def _stub(self, address: str) -> pb_grpc.FeedbackStub:
        cached = self._stubs.get(address)
        if cached is None:
            channel = grpc.aio.secure_channel(address, self._credentials) if self._credentials else \
                grpc.aio.insecure_channel(address)
            cached = self._stubs[address] = (channel, pb_grpc.FeedbackStub(channel))
        return cached[1]

    async def send(self, peer: Peer, model: str, outcomes: Sequence[Outcome], credentials: Sequence[tuple[str, str]],
                   timeout_s: float) -> list[OutcomeResult]:
        request = pb.ReportRequest(model=model, outcomes=[outcome_to_pb(o) for o in outcomes])
        metadata = (*credentials, (FORWARDED_METADATA, self.origin))
        try:
            response = await self._stub(peer.address).Report(request, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            reason = f"{code.name}: {exc.details() or 'no details'}"
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = f"no answer within {timeout_s:g} s"
            raise ForwardFailed(reason, refused=code not in _UNREACHABLE) from None
        return [OutcomeResult(r.id, r.status, r.message) for r in response.results]

    async def close(self) -> None:
        stubs, self._stubs = self._stubs, {}
        for channel, _ in stubs.values():
            await channel.close()
