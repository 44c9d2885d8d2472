"""A synchronous client for swapserve's control service (``swapserve.v1.Control``).

It imports only the control protos (never the KServe inference ones), so it can live in
a process that also imports ``tritonclient``::

    from swapserve.cli.client import ControlClient, ControlError

    with ControlClient("localhost:8003", token=None) as c:
        c.promote("digits", 2, reason="offline eval +3pp")
        print(c.status("digits")["traffic"])          # {"2": 100.0}
        c.set_traffic("digits", [(2, 9500), (3, 500)])  # basis points in, percent out

Every method returns JSON-safe data: what ``swapserve <verb> --json`` prints. Failures raise
``ControlError`` (``.code`` is the gRPC status name, ``.message`` the server's message);
``ServerUnreachable`` (a ControlError with code UNAVAILABLE) when nothing answers at ``url``.

JSON schemas
------------
Traffic is in **percent**, as floats keyed by the version as a string, in the server's order
(``{"1": 95.0, "2": 5.0}``; 1 basis point = 0.01). Times are ISO 8601 strings (UTC) or null.
Absent values are null: a champion, parent version or event version of 0, empty strings for
optional text (training_run, data_ref, times, rollout_state).

``status`` and every mutating call (register, load, unload, promote, rollback, set_traffic)::

    {"name": "digits", "champion": 2 | null, "previous_champions": [1],   # most recent last
     "traffic": {"2": 95.0, "3": 5.0}, "shadows": [4],
     "cohorts": [{"attribute": "country", "value": "de", "version": 3}],
     "key_attribute": "routing_key", "generation": 7,
     "versions": [{"version": 1, "state": "ready", "reason": "", "traffic": 0.0, "shadow": false,
                   "resident": true, "memory_bytes": 123456, "sha256": "ab12...", "stage": "staging",
                   "source_path": "/models/digits/1", "registered_at": "2025-01-01T00:00:00+00:00" | null,
                   "training_run": "run-42" | null, "data_ref": "s3://..." | null,
                   "parent_version": 1 | null, "last_used_at": "..." | null}, ...],
     "memory_budget_bytes": 0, "memory_used_bytes": 0,
     "warnings": ["version 1 was evicted; preloaded it again"],
     "rollout": {...} | null, "live": {...}, "drift": {...},
     "registry_generation": 7,                                           # 0: the registry is down
     "replicas": [{"replica_id": "pod-a", "address": "10.0.0.5:8001", "generation": 7,
                   "converged": true, "reason": "", "heartbeat_at": "...", "stale": false,
                   "this": true}, ...]}                                  # the fleet, per replica

``list_models``: a list of ``{"name", "state" ("READY" | "UNAVAILABLE"), "champion": int | null,
"traffic": {version: percent}, "resident_versions": [int], "rollout_state": str | null}``.

``events``: an iterator of ``{"id": int, "at": str, "kind": str, "model": str | null,
"version": int | null, "message": str, "data": {...}}`` (``--json --follow`` prints one per line).

``audit_log``: a list of ``{"id": int, "at": str, "actor": "alice@box (ipv4:127.0.0.1:50412)",
"action": str, "model": str | null, "version": int | null, "before": any, "after": any,
"reason": str}``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from swapserve._proto import control_pb2 as pb
from swapserve._proto import control_pb2_grpc as pb_grpc
from swapserve.tls import ClientTls, channel

DEFAULT_URL = "localhost:8003"
#: How long to wait for a connection before calling a failed call "unreachable" rather than the server's answer.
_PROBE_S = 1.0


class ControlError(Exception):
    """A control call failed: ``code`` is the gRPC status name (``"NOT_FOUND"``), ``message`` the server's text."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ServerUnreachable(ControlError):
    """Nothing answered at the URL (connection refused, unknown host, ...)."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__("UNAVAILABLE", f"cannot reach the swapserve control service at {url} ({detail}); is "
                                        "`swapserve serve` running there? Point --url or SWAPSERVE_URL at its "
                                        "control address")
        self.url = url


# -- protobuf -> JSON-safe dicts ------------------------------------------------------------------


def _opt_str(s: str) -> str | None:
    return s or None


def _opt_int(i: int) -> int | None:
    return i or None


def _loads(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # keep what the server sent rather than lose it


def traffic_to_percent(traffic: Iterable[pb.TrafficShare]) -> dict[str, float]:
    """Basis points -> ``{"version": percent}`` (9500 -> 95.0; 3333 -> 33.33)."""
    return {str(t.version): t.weight_bp / 100 for t in traffic}


def version_to_dict(v: pb.VersionStatus) -> dict[str, Any]:
    return {
        "version": v.version, "state": v.state, "reason": v.reason, "traffic": v.traffic_bp / 100,
        "shadow": v.shadow, "resident": v.resident, "memory_bytes": v.memory_bytes, "sha256": v.sha256,
        "stage": v.stage, "source_path": v.source_path, "registered_at": _opt_str(v.registered_at),
        "training_run": _opt_str(v.training_run), "data_ref": _opt_str(v.data_ref),
        "parent_version": _opt_int(v.parent_version), "last_used_at": _opt_str(v.last_used_at),
    }


def status_to_dict(m: pb.ModelStatus) -> dict[str, Any]:
    return {
        "name": m.name,
        "champion": _opt_int(m.champion),
        "previous_champions": list(m.previous_champions),
        "traffic": traffic_to_percent(m.traffic),
        "shadows": list(m.shadows),
        "cohorts": [{"attribute": c.attribute, "value": c.value, "version": c.version} for c in m.cohorts],
        "key_attribute": m.key_attribute,
        "generation": m.generation,
        "versions": [version_to_dict(v) for v in m.versions],
        "memory_budget_bytes": m.memory_budget_bytes,
        "memory_used_bytes": m.memory_used_bytes,
        "warnings": list(m.warnings),
        "rollout": _loads(m.rollout_json),
        "live": _loads(m.live_json) or {},
        "drift": _loads(m.drift_json) or {},
        "registry_generation": m.registry_generation,
        "replicas": [{"replica_id": r.replica_id, "address": r.address, "generation": r.generation,
                      "converged": r.converged, "reason": r.reason, "heartbeat_at": r.heartbeat_at,
                      "stale": r.stale, "this": r.this} for r in m.replicas],
    }


def rollout_to_dict(r: pb.RolloutStatus) -> dict[str, Any]:
    return {"rollout": _loads(r.rollout_json), "model": status_to_dict(r.model)}


def summary_to_dict(s: pb.ModelSummary) -> dict[str, Any]:
    return {"name": s.name, "state": s.state, "champion": _opt_int(s.champion),
            "traffic": traffic_to_percent(s.traffic), "resident_versions": list(s.resident_versions),
            "rollout_state": _opt_str(s.rollout_state)}


def event_to_dict(e: pb.Event) -> dict[str, Any]:
    return {"id": e.id, "at": e.at, "kind": e.kind, "model": _opt_str(e.model), "version": _opt_int(e.version),
            "message": e.message, "data": _loads(e.data_json) or {}}


def audit_to_dict(a: pb.AuditEntry) -> dict[str, Any]:
    return {"id": a.id, "at": a.at, "actor": a.actor, "action": a.action, "model": _opt_str(a.model),
            "version": _opt_int(a.version), "before": _loads(a.before_json), "after": _loads(a.after_json),
            "reason": a.reason}


def token_to_dict(t: pb.TokenInfo) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "roles": list(t.roles), "models": list(t.models), "created_at": t.created_at,
            "created_by": t.created_by, "expires_at": _opt_str(t.expires_at), "revoked_at": _opt_str(t.revoked_at),
            "revoked_by": _opt_str(t.revoked_by), "sha256_prefix": t.sha256_prefix}


# -- the client ----------------------------------------------------------------------------------


class ControlClient:
    """One channel to one server's control service; thread-safe, use as a context manager.

    ``timeout`` bounds each unary call (and ``events`` without follow); following events has
    no deadline.
    """

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 timeout: float = 60, tls: ClientTls | None = None) -> None:
        """``tls``: the server's CA (and for mTLS this client's certificate and key); None: plaintext."""
        self.url = url
        self.timeout = timeout
        self._channel = channel(url, tls)
        self._stub = pb_grpc.ControlStub(self._channel)
        # Who the audit log names is the principal this token (or the client certificate) proves.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _error(self, exc: grpc.RpcError) -> ControlError:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        detail = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        if code is grpc.StatusCode.UNAVAILABLE:
            # The server answers UNAVAILABLE too (a version not ready); only a channel that cannot
            # connect means nobody is there.
            try:
                grpc.channel_ready_future(self._channel).result(timeout=_PROBE_S)
            except grpc.FutureTimeoutError:
                return ServerUnreachable(self.url, detail)
        return ControlError(code.name, detail)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    # -- reads

    def list_models(self) -> list[dict[str, Any]]:
        return [summary_to_dict(s) for s in self._call(self._stub.ListModels, pb.ListModelsRequest()).models]

    def status(self, model: str) -> dict[str, Any]:
        return status_to_dict(self._call(self._stub.GetStatus, pb.ModelRequest(model=model)))

    def events(self, model: str | None = None, *, after_id: int = 0, limit: int = 100,
               follow: bool = False) -> Iterator[dict[str, Any]]:
        """Past events after ``after_id`` (up to ``limit``), then with ``follow`` new ones until the iterator is closed."""
        request = pb.EventsRequest(model=model or "", after_id=after_id, limit=limit, follow=follow)
        call = self._stub.Events(request, metadata=self._metadata, timeout=None if follow else self.timeout)
        try:
            for e in call:
                yield event_to_dict(e)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    def audit_log(self, model: str | None = None, *, limit: int = 100) -> list[dict[str, Any]]:
        response = self._call(self._stub.AuditLog, pb.AuditLogRequest(model=model or "", limit=limit))
        return [audit_to_dict(a) for a in response.entries]

    # -- tokens (admin)

    def create_token(self, name: str, sha256: str, *, roles: Sequence[str] = (), models: Sequence[str] = (),
                     expires_in_s: float = 0.0, reason: str = "") -> dict[str, Any]:
        return token_to_dict(self._call(self._stub.CreateToken, pb.CreateTokenRequest(
            name=name, sha256=sha256, roles=list(roles), models=list(models), expires_in_s=expires_in_s,
            reason=reason)))

    def list_tokens(self, *, include_inactive: bool = False) -> list[dict[str, Any]]:
        response = self._call(self._stub.ListTokens, pb.ListTokensRequest(include_inactive=include_inactive))
        return [token_to_dict(t) for t in response.tokens]

    def revoke_token(self, name: str, *, reason: str = "") -> list[dict[str, Any]]:
        response = self._call(self._stub.RevokeToken, pb.RevokeTokenRequest(name=name, reason=reason))
        return [token_to_dict(t) for t in response.tokens]

    # -- changes: each returns the model's new status

    def register(self, model: str, version: int, *, reason: str = "", training_run: str | None = None,
                 data_ref: str | None = None, parent_version: int | None = None,
                 metrics: Mapping[str, Mapping[str, float]] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        request = pb.RegisterRequest(
            model=model, version=version, reason=reason, training_run=training_run or "", data_ref=data_ref or "",
            parent_version=parent_version or 0,
            metadata_json=json.dumps(dict(metadata), sort_keys=True) if metadata else "")
        for slice_, values in (metrics or {}).items():
            request.metrics[slice_].values.update({k: float(v) for k, v in values.items()})
        return status_to_dict(self._call(self._stub.Register, request))

    def load(self, model: str, version: int, *, reason: str = "", force: bool = False) -> dict[str, Any]:
        return self._version_call(self._stub.Load, model, version, reason, force)

    def unload(self, model: str, version: int, *, reason: str = "", force: bool = False) -> dict[str, Any]:
        return self._version_call(self._stub.Unload, model, version, reason, force)

    def promote(self, model: str, version: int, *, reason: str = "", force: bool = False) -> dict[str, Any]:
        return self._version_call(self._stub.Promote, model, version, reason, force)

    def rollback(self, model: str, to_version: int | None = None, *, reason: str = "",
                 force: bool = False) -> dict[str, Any]:
        """Back to the previous champion, or to ``to_version`` (which must be registered)."""
        request = pb.RollbackRequest(model=model, to_version=to_version or 0, reason=reason, force=force)
        return status_to_dict(self._call(self._stub.Rollback, request))

    def set_traffic(self, model: str, traffic_bp: Sequence[tuple[int, int]] | Mapping[int, int], *,
                    shadows: Sequence[int] = (), cohorts: Sequence[tuple[str, str, int]] = (),
                    key_attribute: str | None = None, reason: str = "", force: bool = False) -> dict[str, Any]:
        """``traffic_bp``: (version, basis points) pairs summing to 10000; the result reports percent."""
        pairs = list(traffic_bp.items()) if isinstance(traffic_bp, Mapping) else list(traffic_bp)
        request = pb.SetTrafficRequest(
            model=model, traffic=[pb.TrafficShare(version=v, weight_bp=w) for v, w in pairs],
            shadows=list(shadows), cohorts=[pb.CohortRule(attribute=a, value=val, version=ver)
                                            for a, val, ver in cohorts],
            key_attribute=key_attribute or "", reason=reason, force=force)
        return status_to_dict(self._call(self._stub.SetTraffic, request))

    def record_metrics(self, model: str, version: int, metrics: Mapping[str, Mapping[str, float]], *,
                       source: str = "offline", reason: str = "") -> dict[str, Any]:
        request = pb.RecordMetricsRequest(model=model, version=version, source=source, reason=reason)
        for slice_, values in metrics.items():
            request.metrics[slice_].values.update({k: float(v) for k, v in values.items()})
        return status_to_dict(self._call(self._stub.RecordMetrics, request))

    # -- rollouts and drift

    def start_rollout(self, model: str, version: int, *, plan: str = "", strategy: str = "",
                      cohorts: Sequence[tuple[str, str]] = (), reason: str = "", force: bool = False) -> dict[str, Any]:
        """``plan``: YAML/JSON plan text (wins over ``strategy``, a built-in name)."""
        request = pb.StartRolloutRequest(
            model=model, version=version, plan=plan, strategy=strategy, reason=reason, force=force,
            cohorts=[pb.CohortRule(attribute=a, value=v) for a, v in cohorts])
        return rollout_to_dict(self._call(self._stub.StartRollout, request))

    def rollout(self, model: str) -> dict[str, Any]:
        """The active rollout (or the latest one) and the model's status: ``{"rollout": {...}|null, "model": {...}}``."""
        return rollout_to_dict(self._call(self._stub.GetRollout, pb.ModelRequest(model=model)))

    def rollout_action(self, model: str, action: str, *, reason: str = "") -> dict[str, Any]:
        """``action``: pause | resume | approve | abort."""
        request = pb.RolloutActionRequest(model=model, action=action, reason=reason)
        return rollout_to_dict(self._call(self._stub.RolloutAction, request))

    def drift(self, model: str) -> dict[str, Any]:
        return dict(_loads(self._call(self._stub.GetDrift, pb.ModelRequest(model=model)).report_json) or {})

    def _version_call(self, method: Any, model: str, version: int, reason: str, force: bool) -> dict[str, Any]:
        request = pb.VersionRequest(model=model, version=version, reason=reason, force=force)
        return status_to_dict(self._call(method, request))
