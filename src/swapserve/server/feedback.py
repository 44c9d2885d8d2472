"""``swapserve.v1.Feedback`` on the inference port: authenticate the reporter, convert, delegate
to FeedbackObserver, convert back.

Who may report (``FeedbackAuth``), in this order:

- a call carrying a feedback token (metadata ``authorization: Bearer TOKEN`` or
  ``x-swapserve-feedback-token: TOKEN``) that matches a configured one reports as that token's
  name; a token that matches none is UNAUTHENTICATED, whatever else is allowed;
- a call without a token reports as ``anonymous`` with ``--feedback-open``, or from a loopback
  peer while no feedback token is configured; any other is UNAUTHENTICATED.

Tokens are compared in constant time, against every configured token (no early exit).

In a fleet (``forwarder``), outcomes for predictions another replica logged are forwarded to it
with the caller's credential metadata, and that replica applies these same rules to the caller
(``feedback.forward``): identity is never vouched for by the forwarding replica.
"""
from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from pathlib import Path

import grpc

from swapserve._proto import feedback_pb2 as pb
from swapserve._proto import feedback_pb2_grpc as pb_grpc
from swapserve.errors import ConfigError, Unauthenticated
from swapserve.feedback.forward import FORWARDED_METADATA, Forwarder
from swapserve.feedback.observer import FeedbackObserver, Outcome, ReportSummary
from swapserve.feedback.slices import ANONYMOUS
from swapserve.server.errors import map_errors

FEEDBACK_SERVICE = pb.DESCRIPTOR.services_by_name["Feedback"].full_name
#: The metadata key a feedback token may also travel in (beside ``authorization: Bearer``).
TOKEN_METADATA = "x-swapserve-feedback-token"
#: The reporter name of ``--feedback-token`` / SWAPSERVE_FEEDBACK_TOKEN.
DEFAULT_REPORTER = "default"


def outcome_from_pb(o: pb.Outcome) -> Outcome:
    kind = o.WhichOneof("outcome") or ""
    return Outcome(o.id, kind, getattr(o, kind) if kind else None, o.row)


def summary_to_pb(s: ReportSummary) -> pb.ReportResponse:
    return pb.ReportResponse(
        joined=s.joined, unknown=s.unknown, expired=s.expired, invalid=s.invalid, excluded=s.excluded,
        duplicate=s.duplicate, results=[pb.OutcomeResult(id=r.id, status=r.status, message=r.message)
                                        for r in s.results])


def read_token_file(path: Path) -> list[tuple[str, str]]:
    """``(name, token)`` per line ``NAME TOKEN`` (blank lines and ``#`` comments skipped).

    Raises ConfigError naming the line for a malformed one, a repeated name or token, or the
    reserved name ``anonymous``."""
    try:
        text = path.expanduser().read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the feedback token file {path}: {e.strerror}") from None
    pairs: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError(f"{path}:{n}: expected 'NAME TOKEN' (two fields separated by spaces), got "
                              f"{len(fields)} field(s)")
        pairs.append((fields[0], fields[1]))
    return pairs


class FeedbackAuth:
    """Decides who reports a feedback call (the module docstring has the rules)."""

    def __init__(self, tokens: Iterable[tuple[str, str]] = (), *, open_feedback: bool = False) -> None:
        self._tokens: list[tuple[str, bytes]] = []
        names: set[str] = set()
        secrets: set[str] = set()
        for name, token in tokens:
            if not name or name == ANONYMOUS:
                raise ConfigError(f"a feedback token needs a name other than '{ANONYMOUS}' (it names the reporter)")
            if name in names or token in secrets:
                raise ConfigError(f"feedback token '{name}': each name and each token may appear once")
            if len(token) < 16:
                raise ConfigError(f"feedback token '{name}' is {len(token)} characters; use at least 16 random "
                                  "characters (e.g. `python -c 'import secrets; print(secrets.token_hex(16))'`)")
            names.add(name)
            secrets.add(token)
            self._tokens.append((name, token.encode()))
        self.open = open_feedback

    @classmethod
    def from_settings(cls, token_file: Path | None, token: str | None, open_feedback: bool) -> FeedbackAuth:
        pairs = read_token_file(token_file) if token_file is not None else []
        if token:
            pairs.append((DEFAULT_REPORTER, token))
        return cls(pairs, open_feedback=open_feedback)

    @property
    def names(self) -> list[str]:
        """The configured reporters' names (never the tokens)."""
        return [name for name, _ in self._tokens]

    def reporter(self, metadata: Iterable[tuple[str, object]], peer: str) -> str:
        """The reporter a call with this metadata from this peer reports as; raises Unauthenticated."""
        given = ""
        for key, value in metadata:
            if not isinstance(value, str):
                continue
            k = key.lower()
            if k == "authorization" and value.startswith("Bearer "):
                given = value[len("Bearer "):]
            elif k == TOKEN_METADATA and not given:
                given = value
        if given:
            offered = given.encode()
            found = ""
            for name, token in self._tokens:  # every token, so timing tells nothing about which matched
                if hmac.compare_digest(offered, token):
                    found = name
            if not found:
                raise Unauthenticated("the feedback token this call carried is not one the server accepts; check "
                                      "the token (metadata 'authorization: Bearer TOKEN') against the server's "
                                      "--feedback-token-file")
            return found
        if self.open or (not self._tokens and _is_loopback_peer(peer)):
            return ANONYMOUS
        why = ("this server requires a feedback token" if self._tokens else
               "feedback without a token is accepted only from loopback peers")
        raise Unauthenticated(f"{why}, and this call carried none; send the token as metadata "
                              "'authorization: Bearer TOKEN' (swapserve feedback --token TOKEN), or start the server "
                              "with --feedback-open to accept anonymous feedback")


def _is_loopback_peer(peer: str) -> bool:
    """grpc peer strings: ``ipv4:127.0.0.1:5555``, ``ipv6:[::1]:5555``, ``unix:/path`` (local)."""
    if peer.startswith("unix:"):
        return True
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    host = host.replace("%25", "%").split("%")[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credentials(metadata: Iterable[tuple[str, object]]) -> tuple[tuple[str, str], ...]:
    """The call's credential metadata (``authorization``, TOKEN_METADATA), as it came: what a
    forwarded report passes on, so the serving replica authenticates the reporter itself."""
    return tuple((key.lower(), value) for key, value in metadata
                 if isinstance(value, str) and key.lower() in ("authorization", TOKEN_METADATA))


def _forwarded_by(metadata: Iterable[tuple[str, object]]) -> str:
    for key, value in metadata:
        if key.lower() == FORWARDED_METADATA and isinstance(value, str):
            return value or "?"
    return ""


class FeedbackServicer(pb_grpc.FeedbackServicer):
    """``forwarder`` (a fleet): outcomes this replica did not log are joined where they were
    (``feedback.forward``); a call another replica forwarded is joined here and never forwarded."""

    def __init__(self, feedback: FeedbackObserver, auth: FeedbackAuth | None = None,
                 forwarder: Forwarder | None = None) -> None:
        self._feedback = feedback
        self._auth = auth if auth is not None else FeedbackAuth()
        self._forwarder = forwarder

    @map_errors
    async def Report(self, request: pb.ReportRequest, context: grpc.aio.ServicerContext) -> pb.ReportResponse:
        metadata = tuple(context.invocation_metadata() or ())
        reporter = self._auth.reporter(metadata, context.peer() or "")
        outcomes = [outcome_from_pb(o) for o in request.outcomes]
        forwarded = _forwarded_by(metadata)
        if self._forwarder is None or forwarded:  # the origin counts a forwarded report's final results
            return summary_to_pb(self._feedback.report(request.model, outcomes, reporter, count=not forwarded))
        return summary_to_pb(await self._forwarder.report(request.model, outcomes, reporter, credentials(metadata),
                                                          deadline_s=context.time_remaining()))
