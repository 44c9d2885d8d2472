"""``swapserve.v1.Feedback`` on the inference port: authenticate the reporter, convert, delegate
to FeedbackObserver, convert back.

Who may report (``FeedbackAuth``), in this order:

- a call carrying a feedback token (metadata ``authorization: Bearer TOKEN`` or
  ``x-swapserve-feedback-token: TOKEN``) that matches a configured one reports as that token's
  name; a token that matches none is UNAUTHENTICATED, whatever else is allowed;
- a call without a token reports as ``anonymous`` with ``--feedback-open``, or from a loopback
  peer while no feedback token is configured; any other is UNAUTHENTICATED.

A token is found by its SHA-256 among every principal the server knows (``server.auth``): a
feedback token, or any token or mapped client certificate whose principal has the ``feedback``
role (another principal is PERMISSION_DENIED).

In a fleet (``forwarder``), outcomes for predictions another replica logged are forwarded to it
with the caller's credential metadata, and that replica applies these same rules to the caller
(``feedback.forward``): identity is never vouched for by the forwarding replica.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from swapserve._proto import feedback_pb2 as pb
from swapserve._proto import feedback_pb2_grpc as pb_grpc
from swapserve.errors import ConfigError, PermissionDenied, Unauthenticated
from swapserve.feedback.forward import FORWARDED_METADATA, Forwarder
from swapserve.feedback.observer import FeedbackObserver, Outcome, ReportSummary
from swapserve.feedback.slices import ANONYMOUS
from swapserve.identity import Role
from swapserve.server.auth import Authenticator, credentials_of, is_loopback_peer
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
    """Decides who reports a feedback call (the module docstring has the rules).

    ``authenticator``: the server's, which knows every principal (its feedback tokens included);
    without one, the feedback tokens alone."""

    def __init__(self, tokens: Iterable[tuple[str, str]] = (), *, open_feedback: bool = False,
                 authenticator: Authenticator | None = None) -> None:
        pairs = list(tokens)
        names: set[str] = set()
        secrets: set[str] = set()
        for name, token in pairs:
            if not name or name == ANONYMOUS:
                raise ConfigError(f"a feedback token needs a name other than '{ANONYMOUS}' (it names the reporter)")
            if name in names or token in secrets:
                raise ConfigError(f"feedback token '{name}': each name and each token may appear once")
            if len(token) < 16:
                raise ConfigError(f"feedback token '{name}' is {len(token)} characters; use at least 16 random "
                                  "characters (e.g. `python -c 'import secrets; print(secrets.token_hex(16))'`)")
            names.add(name)
            secrets.add(token)
        self._names = [name for name, _ in pairs]
        self._auth = authenticator if authenticator is not None else Authenticator(feedback_tokens=pairs)
        self.open = open_feedback

    @classmethod
    def from_settings(cls, token_file: Path | None, token: str | None, open_feedback: bool,
                      authenticator: Authenticator | None = None) -> FeedbackAuth:
        return cls(feedback_pairs(token_file, token), open_feedback=open_feedback, authenticator=authenticator)

    @property
    def names(self) -> list[str]:
        """The configured reporters' names (never the tokens)."""
        return list(self._names)

    def reporter(self, metadata: Iterable[tuple[str, object]], peer: str,
                 auth_context: Mapping[str, Iterable[Any]] | None = None) -> str:
        """The reporter a call with this metadata from this peer reports as; raises Unauthenticated
        (no or an unknown credential) or PermissionDenied (a principal without the feedback role)."""
        creds = credentials_of(metadata, peer, auth_context)
        try:
            principal = self._auth.identify(creds)
        except Unauthenticated:
            raise Unauthenticated("the feedback token this call carried is not one the server accepts; check "
                                  "the token (metadata 'authorization: Bearer TOKEN') against the server's "
                                  "--feedback-token-file or `swapserve token list`") from None
        if principal is not None:
            if not principal.has(Role.FEEDBACK):
                raise PermissionDenied(f"'{principal.name}' ({principal.source}) may not report labels: it lacks "
                                       "the 'feedback' role")
            return principal.name
        if self.open or (not self._names and is_loopback_peer(peer)):
            return ANONYMOUS
        why = ("this server requires a feedback token" if self._names else
               "feedback without a token is accepted only from loopback peers")
        raise Unauthenticated(f"{why}, and this call carried none; send the token as metadata "
                              "'authorization: Bearer TOKEN' (swapserve feedback --token TOKEN), or start the server "
                              "with --feedback-open to accept anonymous feedback")


def feedback_pairs(token_file: Path | None, token: str | None) -> list[tuple[str, str]]:
    """The feedback credentials of ``--feedback-token-file`` and ``--feedback-token`` (reporter 'default')."""
    pairs = read_token_file(token_file) if token_file is not None else []
    if token:
        pairs.append((DEFAULT_REPORTER, token))
    return pairs


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
        reporter = self._auth.reporter(metadata, context.peer() or "", context.auth_context() or {})
        outcomes = [outcome_from_pb(o) for o in request.outcomes]
        forwarded = _forwarded_by(metadata)
        if self._forwarder is None or forwarded:  # the origin counts a forwarded report's final results
            return summary_to_pb(self._feedback.report(request.model, outcomes, reporter, count=not forwarded))
        return summary_to_pb(await self._forwarder.report(request.model, outcomes, reporter, credentials(metadata),
                                                          deadline_s=context.time_remaining()))
