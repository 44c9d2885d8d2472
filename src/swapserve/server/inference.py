"""KServe v2 / Triton ``inference.GRPCInferenceService``: convert, delegate, convert back."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from swapserve import __version__
from swapserve._proto import grpc_service_pb2 as pb
from swapserve._proto import grpc_service_pb2_grpc as pb_grpc
from swapserve.config import ControlMode
from swapserve.controlplane import ControlPlane
from swapserve.dataplane import DataPlane
from swapserve.errors import FailedPrecondition, ModelNotFound, ResourceExhausted, SwapserveError, Unimplemented
from swapserve.identity import Principal
from swapserve.lifecycle.manager import ModelManager
from swapserve.repository.paths import check_model_name
from swapserve.server.access import RepositoryAccess
from swapserve.server.auth import Credentials, InferenceGate, call_credentials
from swapserve.server import converters
from swapserve.server.errors import map_errors, status_of
from swapserve.server.streams import ResponseStream, StreamLimits
from swapserve.types import InferRequest

log = logging.getLogger(__name__)

#: KServe v2 extensions this server implements (reported by ServerMetadata).
EXTENSIONS = ["model_repository", "statistics", "binary_tensor_data", "schedule_policy"]


def _deadline_ns(context: grpc.aio.ServicerContext) -> int:
    remaining = context.time_remaining()
    if remaining is None:
        return 0
    return time.monotonic_ns() + int(remaining * 1e9)


def _byte_size(response: pb.ModelStreamInferResponse) -> int:
    return response.ByteSize()  # type: ignore[no-any-return]


def _stats_pb(s: object) -> pb.ModelStatistics:
    from swapserve.telemetry.statistics import StatsSnapshot

    assert isinstance(s, StatsSnapshot)

    def d(x: object) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=x.count, ns=x.ns)  # type: ignore[attr-defined]

    out = pb.ModelStatistics(
        name=s.model, version=s.version, last_inference=s.last_inference_ms, inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(success=d(s.success), fail=d(s.fail), queue=d(s.queue),
                                           compute_input=d(s.compute_input), compute_infer=d(s.compute_infer),
                                           compute_output=d(s.compute_output)),
    )
    for b in s.batches:
        out.batch_stats.add(batch_size=b.batch_size, compute_input=d(b.compute_input),
                            compute_infer=d(b.compute_infer), compute_output=d(b.compute_output))
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, manager: ModelManager, mode: ControlMode,
                 control: ControlPlane | None = None, access: RepositoryAccess | None = None,
                 gate: InferenceGate | None = None, stream_limits: StreamLimits | None = None) -> None:
        self._dataplane = dataplane
        self._manager = manager
        self._mode = mode
        #: Where the repository API's load/unload go when ``access`` allows them.
        self._control = control
        self._access = access or RepositoryAccess()
        #: Per-model access and rate limits (``server.auth``); None: open, nothing to check per request.
        self._gate = gate
        self._stream_limits = stream_limits or StreamLimits()
        self.live = True

    def _authorize(self, context: grpc.aio.ServicerContext, *models: str) -> None:
        if self._gate is not None:
            self._gate.authorize(context, models)

    @map_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.live)

    @map_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.live and self._manager.server_ready())

    @map_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._manager.is_ready(request.name, request.version))

    @map_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="swapserve", version=__version__, extensions=EXTENSIONS)

    def _spec_for(self, name: str, version: str):  # type: ignore[no-untyped-def]
        m = self._manager.model(name)
        if version:
            rt = self._manager.runtime(name, version)
            return m, rt.spec
        if m.entry.spec is None:
            raise ModelNotFound(f"model '{name}' has no valid configuration: {m.entry.error}")
        return m, m.entry.spec

    @map_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        self._authorize(context, request.name)
        m, spec = self._spec_for(request.name, request.version)
        out = pb.ModelMetadataResponse(name=spec.name, platform=spec.platform,
                                       versions=[str(v) for v in m.resident_versions()])
        lead = [-1] if spec.batching else []
        for t in spec.inputs:
            out.inputs.add(name=t.name, datatype=t.datatype, shape=lead + list(t.dims))
        for t in spec.outputs:
            out.outputs.add(name=t.name, datatype=t.datatype, shape=lead + list(t.dims))
        return out

    @map_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        self._authorize(context, request.name)
        m = self._manager.model(request.name)
        if request.version:
            self._manager.runtime(request.name, request.version)  # NOT_FOUND / UNAVAILABLE as for inference
        if m.entry.config is None or m.entry.error:
            raise ModelNotFound(f"model '{request.name}' has no valid configuration: {m.entry.error}")
        return pb.ModelConfigResponse(config=m.entry.config)

    @map_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        out = pb.ModelStatisticsResponse()
        names = [request.name] if request.name else sorted(self._manager.models)
        self._authorize(context, *names)
        for name in names:
            m = self._manager.model(name)
            for v, slot in sorted(m.slots.items()):
                if request.version and str(v) != request.version:
                    continue
                if slot.runtime is not None:
                    out.model_stats.append(_stats_pb(slot.runtime.stats.snapshot()))
        if request.version and not out.model_stats:
            raise ModelNotFound(f"model '{request.name}' version {request.version} is not loaded")
        return out

    @map_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        if self._gate is not None:
            self._gate.principal(call_credentials(context))  # any identity may list the models
        out = pb.RepositoryIndexResponse()
        for e in self._manager.index(ready_only=request.ready):
            out.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
        return out

    def _repository_call(self, rpc: str, verb: str, context: grpc.aio.ServicerContext) -> tuple[ControlPlane, str]:
        """The control plane and the audited actor for a repository load/unload, or the refusal:
        PERMISSION_DENIED unless the repository API is enabled, FAILED_PRECONDITION outside explicit mode."""
        actor = self._access.authorize(rpc, context)
        if self._mode is not ControlMode.EXPLICIT or self._control is None:
            raise FailedPrecondition(
                f"model {verb} by RPC needs --model-control-mode explicit (the server runs in "
                f"'{self._mode.value}' mode); operators can use the swapserve control service instead")
        return self._control, actor

    @map_errors
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        control, actor = self._repository_call("RepositoryModelLoad", "load", context)
        if request.parameters:
            raise Unimplemented("RepositoryModelLoad parameters (config override, file upload) are not supported; "
                                "put the model in the repository and load it by name")
        await control.load_model(check_model_name(request.model_name), actor=actor)
        return pb.RepositoryModelLoadResponse()

    @map_errors
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        control, actor = self._repository_call("RepositoryModelUnload", "unload", context)
        await control.unload_model(check_model_name(request.model_name), actor=actor)
        return pb.RepositoryModelUnloadResponse()

    async def _typed_request(self, request: pb.ModelInferRequest) -> InferRequest:
        """A request whose inputs come as typed contents (not raw bytes), decoded without stalling the loop.

        Size-capped first (``converters.MAX_TYPED_CONTENTS_BYTES``); beyond the inline size the
        request is checked against its model (NOT_FOUND, INVALID_ARGUMENT) before any value is
        decoded, and the values are decoded in a thread that gives the GIL back every few thousand.
        """
        req = converters.infer_request_from_pb(request, decode=False)
        if converters.typed_contents_bytes(req.inputs) <= converters.INLINE_TYPED_CONTENTS_BYTES:
            req.inputs = converters.decode_typed_inputs(request, req.inputs)
            return req
        self._dataplane.check(req)
        req.inputs = await asyncio.to_thread(converters.decode_typed_inputs, request, req.inputs)
        return req

    @map_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        if self._gate is not None:
            self._gate.authorize(context, (request.model_name,))
        if not request.raw_input_contents and request.inputs:  # typed contents (raw: the hot path)
            req = await self._typed_request(request)
        else:
            req = converters.infer_request_from_pb(request)
        return converters.infer_response_to_pb(await self._dataplane.infer(req, _deadline_ns(context)))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional stream. Requests run concurrently; responses come back as they finish.

        A failed request yields a response with ``error_message`` (and the request's id), and the
        stream stays open for the requests that follow. Bounded per stream (``StreamLimits``,
        server/streams.py): at the in-flight limit the stream is not read until its client takes a
        response; unread responses past the byte limit end it RESOURCE_EXHAUSTED.
        """
        gate, creds, principal = self._gate, None, None
        if gate is not None:  # who calls is fixed for the stream; each request's model and rate are checked
            creds = call_credentials(context)
            try:
                principal = gate.principal(creds)
            except SwapserveError as exc:
                await context.abort(*status_of(exc, "ModelStreamInfer"))
        stream = ResponseStream(request_iterator, lambda request: self._stream_answer(request, principal, creds),
                                _byte_size, self._stream_limits)
        try:
            while (response := await stream.next()) is not None:
                yield response
        except ResourceExhausted as exc:
            await context.abort(exc.code, exc.message)
        finally:
            stream.close()

    async def _stream_answer(self, request: pb.ModelInferRequest, principal: Principal | None,
                             creds: Credentials | None) -> pb.ModelStreamInferResponse:
        """One streamed request's response: its answer, or its error as ``error_message``.

        With a gate, ``principal`` (fixed for the stream) must be allowed the request's model and
        within its rate; a refusal is this request's error, the stream stays open.
        """
        try:
            if self._gate is not None:
                self._gate.check(principal, creds, request.model_name)  # type: ignore[arg-type]
            if not request.raw_input_contents and request.inputs:
                req = await self._typed_request(request)
            else:
                req = converters.infer_request_from_pb(request)
            resp = converters.infer_response_to_pb(await self._dataplane.infer(req))
            return pb.ModelStreamInferResponse(infer_response=resp)
        except Exception as exc:  # noqa: BLE001 - becomes this request's error message
            _, message = status_of(exc, "ModelStreamInfer")
            failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                           id=request.id)
            return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)

    # Shared memory, trace and log settings are not implemented: answer precisely instead of hanging.
    async def _unimplemented(self, what: str, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{what} is not supported by swapserve; send tensors in the request "
                            "(raw_input_contents) instead")

    async def SystemSharedMemoryStatus(self, request, context):  # type: ignore[no-untyped-def]
        await self._unimplemented("system shared memory", context)

    async def SystemSharedMemoryRegister(self, request, context):  # type: ignore[no-untyped-def]
        await self._unimplemented("system shared memory", context)

    async def SystemSharedMemoryUnregister(self, request, context):  # type: ignore[no-untyped-def]
        await self._unimplemented("system shared memory", context)

    async def CudaSharedMemoryStatus(self, request, context):  # type: ignore[no-untyped-def]
        await self._unimplemented("CUDA shared memory", context)

    async def CudaSharedMemoryRegister(self, request, context):  # type: ignore[no-untyped-def]
        await self._unimplemented("CUDA shared memory", context)

    async def CudaSharedMemoryUnregister(self, request, context):  # type: ignore[no-untyped-def]
        await self._unimplemented("CUDA shared memory", context)

    async def TraceSetting(self, request, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "trace settings are not supported by swapserve; "
                            "use the Prometheus metrics on the metrics port for latency breakdowns")

    async def LogSettings(self, request, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "log settings cannot be changed at run time; "
                            "restart with --log-level")
