"""protobuf <-> swapserve.types, for the inference service. Nothing else in here."""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from swapserve import dtypes
from swapserve._proto import grpc_service_pb2 as pb
from swapserve.errors import InvalidInput
from swapserve.types import InferRequest, InferResponse, ParamValue, Tensor

#: Typed ``contents`` field for each wire datatype (FP16/BF16 travel only as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def params_from_pb(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    out: dict[str, ParamValue] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(p, which)
    return out


def params_to_pb(target: Mapping[str, pb.InferParameter], params: Mapping[str, ParamValue]) -> None:
    for key, value in params.items():
        p = target[key]  # type: ignore[index]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)


def _decode_tensor(model: str, t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"model '{model}': input '{t.name}' has a negative dimension in shape {list(shape)}")
    if t.datatype not in dtypes.WIRE_NAMES:
        raise InvalidInput(f"model '{model}': input '{t.name}' has unknown datatype '{t.datatype}'; "
                           f"use one of {sorted(dtypes.WIRE_NAMES)}")
    if t.datatype == "BYTES":
        raise InvalidInput(f"model '{model}': input '{t.name}' is BYTES; this server's models take fixed-size tensors")
    dt = dtypes.numpy_dtype(t.datatype)
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dt.itemsize:
            raise InvalidInput(f"model '{model}': input '{t.name}' has {len(raw)} bytes of raw content but shape "
                               f"{list(shape)} of {t.datatype} needs {count * dt.itemsize} bytes")
        data = np.frombuffer(raw, dtype=dt)
    else:
        field = _CONTENTS_FIELD.get(t.datatype)
        if field is None:
            raise InvalidInput(f"model '{model}': input '{t.name}' of {t.datatype} must be sent as raw_input_contents")
        values = getattr(t.contents, field)
        if len(values) != count:
            raise InvalidInput(f"model '{model}': input '{t.name}' has {len(values)} values in contents.{field} "
                               f"but shape {list(shape)} needs {count}")
        data = np.asarray(values, dtype=dt)
    return Tensor(t.name, t.datatype, shape, data)


def infer_request_from_pb(request: pb.ModelInferRequest) -> InferRequest:
    """Decode a ModelInferRequest; raises InvalidInput for malformed tensors (never a crash)."""
    model = request.model_name
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidInput(f"model '{model}': the request has {len(request.inputs)} inputs but "
                           f"{len(raws)} raw_input_contents; send one raw buffer per input or none")
    inputs = [_decode_tensor(model, t, raws[i] if raws else None) for i, t in enumerate(request.inputs)]
    outputs = [o.name for o in request.outputs] if request.outputs else None
    return InferRequest(model, request.model_version, request.id, params_from_pb(request.parameters), inputs, outputs)


def infer_response_to_pb(resp: InferResponse) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id)
    for t in resp.outputs:
        out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        out.raw_output_contents.append(np.ascontiguousarray(t.data).tobytes())
    if resp.parameters:
        params_to_pb(out.parameters, resp.parameters)
    return out
