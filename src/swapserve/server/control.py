"""``swapserve.v1.Control``: the operator control service. Convert, delegate to the ControlPlane, convert back.

Every RPC is authorised by role (``swapserve.server.auth``): viewer for reads, operator for
traffic, promote, rollback, rollouts and metrics, admin for register, load, unload and tokens.
The audit log records the authenticated principal and the gRPC peer, e.g.
``"alice (token, ipv4:10.0.0.7:50412)"``; nothing the client says about itself.
Weights on the wire are basis points (10000 = 100 %).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import grpc

from swapserve.errors import InvalidInput, Unimplemented
from swapserve.identity import Role
from swapserve.server.auth import Authenticator, call_credentials
from swapserve.rollout.plan import builtin_plan, parse_plan
from swapserve.server.errors import map_errors
from swapserve.types import ModelSummaryView, ModelView, VersionView
from swapserve._proto import control_pb2 as pb
from swapserve._proto import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # the control plane imports the whole server; the servicer needs only its API
    from swapserve.controlplane import ControlPlane
    from swapserve.feedback.slices import SliceStats
    from swapserve.registry.records import RolloutRecord
    from swapserve.rollout.controller import RolloutController
    from swapserve.registry.records import AuditEntry, Event, TokenRecord

log = logging.getLogger(__name__)

#: Past events sent before following when EventsRequest.limit is 0.
DEFAULT_EVENTS_LIMIT = 100
DEFAULT_AUDIT_LIMIT = 100


# -- conversions: views and records -> protobuf --------------------------------------------------


def _json(value: Any) -> str:
    """Compact JSON for the *_json fields; "" for None. Non-JSON values (datetimes, ...) become strings."""
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _iso(value: datetime | str | None) -> str:
    if value is None:
        return ""
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _traffic_pb(traffic: Sequence[tuple[int, int]]) -> list[pb.TrafficShare]:
    return [pb.TrafficShare(version=int(v), weight_bp=int(w)) for v, w in traffic]


def version_view_to_pb(v: VersionView) -> pb.VersionStatus:
    return pb.VersionStatus(
        version=v.version, state=v.state, reason=v.reason, traffic_bp=v.traffic_bp, shadow=v.shadow,
        memory_bytes=v.memory_bytes, sha256=v.sha256, stage=v.stage, source_path=v.source_path,
        registered_at=v.registered_at, training_run=v.training_run or "", data_ref=v.data_ref or "",
        parent_version=v.parent_version or 0, resident=v.resident, last_used_at=v.last_used_at,
    )


def model_view_to_pb(m: ModelView) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=m.name, champion=m.champion, previous_champions=list(m.previous_champions),
        traffic=_traffic_pb(m.traffic), shadows=list(m.shadows),
        cohorts=[pb.CohortRule(attribute=a, value=val, version=ver) for a, val, ver in m.cohorts],
        key_attribute=m.key_attribute, generation=m.generation,
        versions=[version_view_to_pb(v) for v in m.versions],
        memory_budget_bytes=m.memory_budget_bytes, memory_used_bytes=m.memory_used_bytes,
        warnings=list(m.warnings), rollout_json=_json(m.rollout), live_json=_json(m.live or None),
        drift_json=_json(m.drift or None), registry_generation=m.registry_generation,
        replicas=[pb.ReplicaStatus(replica_id=r.replica_id, address=r.address, generation=r.generation,
                                   converged=r.converged, reason=r.reason, heartbeat_at=r.heartbeat_at,
                                   stale=r.stale, this=r.this) for r in m.replicas],
    )


def summary_to_pb(s: ModelSummaryView) -> pb.ModelSummary:
    return pb.ModelSummary(name=s.name, champion=s.champion, traffic=_traffic_pb(s.traffic),
                           resident_versions=list(s.resident_versions), state=s.state,
                           rollout_state=s.rollout_state)


def event_to_pb(e: Event) -> pb.Event:
    return pb.Event(id=e.id, at=_iso(e.at), kind=e.kind, model=e.model or "", version=e.version or 0,
                    message=e.message, data_json=_json(dict(e.data)) if e.data else "")


def audit_to_pb(a: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(id=a.id, at=_iso(a.at), actor=a.actor, action=a.action, model=a.model or "",
                         version=a.version or 0, before_json=_json(a.before), after_json=_json(a.after),
                         reason=a.reason)


def token_to_pb(t: TokenRecord) -> pb.TokenInfo:
    return pb.TokenInfo(id=t.id, name=t.name, roles=list(t.roles), models=list(t.models), created_at=_iso(t.created_at),
                        created_by=t.created_by, expires_at=_iso(t.expires_at), revoked_at=_iso(t.revoked_at),
                        revoked_by=t.revoked_by or "", sha256_prefix=t.sha256[:8])


# -- conversions: protobuf -> arguments ----------------------------------------------------------


def metrics_from_pb(metrics: Mapping[str, pb.SliceMetrics]) -> dict[str, dict[str, float]] | None:
    if not metrics:
        return None
    return {slice_: dict(m.values) for slice_, m in metrics.items()}


def metadata_from_json(text: str) -> dict[str, Any] | None:
    """RegisterRequest.metadata_json -> dict (None when empty); anything but a JSON object is INVALID_ARGUMENT."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"metadata_json is not valid JSON ({exc}); send a JSON object such as "
                           '{"framework": "torch"}') from None
    if not isinstance(value, dict):
        raise InvalidInput(f"metadata_json must be a JSON object, not {type(value).__name__}")
    return value


# -- the servicer --------------------------------------------------------------------------------


class ControlServicer(pb_grpc.ControlServicer):
    """Thin edge over ``ControlPlane``; ``auth`` decides who may call what (None: loopback only)."""

    def __init__(self, control: ControlPlane, auth: Authenticator | None, rollouts: RolloutController | None = None,
                 drift: Callable[[str], dict[str, Any]] | None = None) -> None:
        self._control = control
        self._auth = auth if auth is not None else Authenticator()
        self._rollouts = rollouts
        #: model -> drift report dict (the monitoring observer's); None: drift monitoring is off.
        self.drift = drift

    def _caller(self, context: grpc.aio.ServicerContext, role: Role, what: str) -> str:
        """Authorise the call for ``role`` and return the actor the audit log records.

        UNAUTHENTICATED without a credential the server accepts, PERMISSION_DENIED without the role."""
        return self._auth.control(call_credentials(context), role, what)

    @map_errors
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        self._caller(context, Role.VIEWER, "ListModels")
        return pb.ListModelsResponse(models=[summary_to_pb(s) for s in await self._control.list_models()])

    @map_errors
    async def GetStatus(self, request: pb.ModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        self._caller(context, Role.VIEWER, "GetStatus")
        return model_view_to_pb(await self._control.status(request.model))

    @map_errors
    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        actor = self._caller(context, Role.ADMIN, "Register")
        view = await self._control.register(
            request.model, request.version, actor=actor, reason=request.reason,
            training_run=request.training_run or None, data_ref=request.data_ref or None,
            parent_version=request.parent_version or None, metrics=metrics_from_pb(request.metrics),
            metadata=metadata_from_json(request.metadata_json))
        return model_view_to_pb(view)

    @map_errors
    async def Load(self, request: pb.VersionRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        actor = self._caller(context, Role.ADMIN, "Load")
        return model_view_to_pb(await self._control.load(request.model, request.version, actor=actor,
                                                         reason=request.reason, force=request.force))

    @map_errors
    async def Unload(self, request: pb.VersionRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        actor = self._caller(context, Role.ADMIN, "Unload")
        return model_view_to_pb(await self._control.unload(request.model, request.version, actor=actor,
                                                           reason=request.reason, force=request.force))

    @map_errors
    async def Promote(self, request: pb.VersionRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        actor = self._caller(context, Role.OPERATOR, "Promote")
        return model_view_to_pb(await self._control.promote(request.model, request.version, actor=actor,
                                                            reason=request.reason, force=request.force))

    @map_errors
    async def Rollback(self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        actor = self._caller(context, Role.OPERATOR, "Rollback")
        return model_view_to_pb(await self._control.rollback(
            request.model, request.to_version or None, actor=actor, reason=request.reason, force=request.force))

    @map_errors
    async def SetTraffic(self, request: pb.SetTrafficRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        actor = self._caller(context, Role.OPERATOR, "SetTraffic")
        view = await self._control.set_traffic(
            request.model, [(t.version, t.weight_bp) for t in request.traffic],
            shadows=list(request.shadows), cohorts=[(c.attribute, c.value, c.version) for c in request.cohorts],
            key_attribute=request.key_attribute or None, actor=actor, reason=request.reason, force=request.force)
        return model_view_to_pb(view)

    @map_errors
    async def Events(self, request: pb.EventsRequest, context: grpc.aio.ServicerContext) -> None:
        """Past events after ``after_id`` (up to ``limit``), then with ``follow`` new ones until the client cancels.

        A coroutine writing with ``context.write`` (not an async generator) so that map_errors
        turns a bad request (unknown model, ...) into its status like any unary call.
        """
        self._caller(context, Role.VIEWER, "Events")
        model = request.model or None
        last = request.after_id
        for e in await self._control.events(model, after_id=request.after_id,
                                            limit=request.limit or DEFAULT_EVENTS_LIMIT):
            await context.write(event_to_pb(e))
            last = max(last, e.id)
        if not request.follow:
            return
        stream = self._control.follow_events(model, after_id=last)
        try:
            async for e in stream:
                if e.id <= last:  # an event already sent from the backlog
                    continue
                await context.write(event_to_pb(e))
                last = e.id
        finally:  # the client cancelled (CancelledError) or the plane stopped: release the subscription
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    @map_errors
    async def RecordMetrics(self, request: pb.RecordMetricsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        actor = self._caller(context, Role.OPERATOR, "RecordMetrics")
        metrics = metrics_from_pb(request.metrics)
        if not metrics:
            raise InvalidInput(f"model '{request.model}': no metrics given; send {{slice: {{metric: value}}}}")
        return model_view_to_pb(await self._control.record_metrics(
            request.model, request.version, metrics, source=request.source or "offline", actor=actor,
            reason=request.reason))

    def _rollout_controller(self) -> RolloutController:
        if self._rollouts is None:
            raise Unimplemented("rollouts are not enabled on this server")
        return self._rollouts

    async def _rollout_status(self, model: str) -> pb.RolloutStatus:
        rc = self._rollout_controller()
        r = rc.current(model) or rc.decided(model)  # no registry read: this works while it is down
        if r is None:
            past = await self._control.rollouts(model, 1)
            r = past[0] if past else None
        doc = r.to_dict() if r is not None else None
        if doc is not None and self._control.slices is not None:
            doc["sources"] = evidence_sources(self._control.slices, r)  # type: ignore[arg-type]
        if doc is not None:
            doc["fleet"] = rc.fleet_evidence(r)  # type: ignore[arg-type]
        return pb.RolloutStatus(rollout_json=_json(doc) if doc is not None else "",
                                model=model_view_to_pb(await self._control.status(model)))

    @map_errors
    async def StartRollout(self, request: pb.StartRolloutRequest,
                           context: grpc.aio.ServicerContext) -> pb.RolloutStatus:
        actor = self._caller(context, Role.OPERATOR, "StartRollout")
        cohorts = [(c.attribute, c.value) for c in request.cohorts]
        if request.plan.strip():
            plan = parse_plan(request.plan)
        else:
            plan = builtin_plan(request.strategy or "canary", cohorts=cohorts)
        await self._rollout_controller().start(request.model, request.version, plan, actor=actor,
                                               reason=request.reason, force=request.force)
        return await self._rollout_status(request.model)

    @map_errors
    async def GetRollout(self, request: pb.ModelRequest, context: grpc.aio.ServicerContext) -> pb.RolloutStatus:
        self._caller(context, Role.VIEWER, "GetRollout")
        return await self._rollout_status(request.model)

    @map_errors
    async def RolloutAction(self, request: pb.RolloutActionRequest,
                            context: grpc.aio.ServicerContext) -> pb.RolloutStatus:
        actor = self._caller(context, Role.OPERATOR, "RolloutAction")
        await self._rollout_controller().action(request.model, request.action, actor=actor, reason=request.reason)
        return await self._rollout_status(request.model)

    @map_errors
    async def GetDrift(self, request: pb.ModelRequest, context: grpc.aio.ServicerContext) -> pb.DriftReport:
        self._caller(context, Role.VIEWER, "GetDrift")
        if self.drift is None:
            raise Unimplemented("drift monitoring is not enabled on this server")
        self._control._model(request.model)  # NOT_FOUND for an unknown model
        return pb.DriftReport(report_json=json.dumps(self.drift(request.model), default=str))

    @map_errors
    async def AuditLog(self, request: pb.AuditLogRequest, context: grpc.aio.ServicerContext) -> pb.AuditLogResponse:
        self._caller(context, Role.VIEWER, "AuditLog")
        entries = await self._control.audit_log(request.model or None, limit=request.limit or DEFAULT_AUDIT_LIMIT)
        return pb.AuditLogResponse(entries=[audit_to_pb(a) for a in entries])


    @map_errors
    async def CreateToken(self, request: pb.CreateTokenRequest, context: grpc.aio.ServicerContext) -> pb.TokenInfo:
        actor = self._caller(context, Role.ADMIN, "CreateToken")
        return token_to_pb(await self._control.create_token(
            request.name, request.sha256, roles=list(request.roles), models=list(request.models), actor=actor,
            expires_in_s=request.expires_in_s, reason=request.reason))

    @map_errors
    async def ListTokens(self, request: pb.ListTokensRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListTokensResponse:
        self._caller(context, Role.ADMIN, "ListTokens")
        return pb.ListTokensResponse(tokens=[token_to_pb(t) for t in await self._control.tokens(
            request.include_inactive)])

    @map_errors
    async def RevokeToken(self, request: pb.RevokeTokenRequest,
                          context: grpc.aio.ServicerContext) -> pb.ListTokensResponse:
        actor = self._caller(context, Role.ADMIN, "RevokeToken")
        return pb.ListTokensResponse(tokens=[token_to_pb(t) for t in await self._control.revoke_token(
            request.name, actor=actor, reason=request.reason)])


# -- serving it ----------------------------------------------------------------------------------


def evidence_sources(slices: SliceStats, r: RolloutRecord) -> dict[str, Any]:
    """Where a rollout's evidence came from, live: labels per reporter in the current stage (what
    counted, what was excluded and why) and, per arm since the rollout started, the requests and
    labels kept out of the gates by reason (pinned, cohort, client_error, reporter_cap,
    duplicate, evicted; undeclared_slice: counted, in ``other``). For an ended rollout: the
    reporters of its last stage and the exclusions up to its end."""
    since = r.evidence.get("started_at")
    since_f = float(since) if since is not None else None
    history = r.evidence.get("history") or []
    until = None  # an ended rollout: up to its last event (the controller's clock, like started_at)
    if r.evidence.get("phase") == "done" and history and history[-1].get("at") is not None:
        until = float(history[-1]["at"])
    return {
        "max_reporter_share": slices.reporter_cap(r.model),
        "reporters": slices.reporters(r.model),
        "excluded": {role: {"version": v, **slices.exclusions(r.model, v, since=since_f, until=until)}
                     for role, v in (("champion", r.champion), ("challenger", r.challenger))},
    }
