"""tritonclient worker: ``tritonclient.grpc.aio.InferenceServerClient.infer`` per request.

The convenience path users write; it costs several times the raw worker's CPU per request
(measured by ``swapserve bench --client tritonclient``). Never imports ``swapserve._proto``:
the request payloads are parsed with tritonclient's own (wire-identical) messages and
turned into ``InferInput`` objects once, before the run.
"""
from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from swapserve.bench.loop import CLIENT_ERROR, Call, Outcome, WorkerSpec, worker_main

_CODES = {f"StatusCode.{name}": code for code, name in enumerate(
    ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
     "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
     "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"])}


def _param(p: Any) -> Any:
    return getattr(p, p.WhichOneof("parameter_choice"))


def _request(payload: bytes) -> dict[str, Any]:
    req = service_pb2.ModelInferRequest.FromString(payload)
    inputs = []
    for k, t in enumerate(req.inputs):
        inp = aioclient.InferInput(t.name, list(t.shape), t.datatype)
        raw = req.raw_input_contents[k]
        if t.datatype == "BYTES":
            inp._raw_content = raw  # already length-prefixed; no numpy round trip exists for it
        else:
            inp.set_data_from_numpy(np.frombuffer(raw, dtype=triton_to_np_dtype(t.datatype)).reshape(list(t.shape)))
        inputs.append(inp)
    return {"model_name": req.model_name, "model_version": req.model_version, "inputs": inputs,
            "parameters": {k: _param(v) for k, v in req.parameters.items()} or None}


async def make_call(spec: WorkerSpec) -> tuple[Call, Callable[[], Awaitable[None]]]:
    tls = spec.tls
    if tls is None:
        client = aioclient.InferenceServerClient(spec.url)
    else:  # tritonclient reads the files itself
        client = aioclient.InferenceServerClient(
            spec.url, ssl=True, root_certificates=str(tls.ca) if tls.ca else None,
            private_key=str(tls.key) if tls.key else None, certificate_chain=str(tls.cert) if tls.cert else None)
    requests = [_request(p) for p in spec.payloads]
    timeout = spec.timeout_s
    headers = dict(spec.metadata() or ()) or None

    async def call(i: int) -> Outcome:
        try:
            result = await client.infer(**requests[i], headers=headers, client_timeout=timeout)
            return 0, result.get_response().model_version
        except InferenceServerException as exc:
            return _CODES.get(str(exc.status()), CLIENT_ERROR), ""
        except Exception:  # noqa: BLE001
            return CLIENT_ERROR, ""

    return call, client.close


if __name__ == "__main__":
    sys.exit(worker_main(make_call))
