"""protobuf <-> swapserve.types, for the inference service. Nothing else in here."""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from swapserve import dtypes
from swapserve._proto import grpc_service_pb2 as pb
from swapserve.errors import InvalidInput, ResourceExhausted
from swapserve.types import InferRequest, InferResponse, ParamValue, Tensor

#: Typed ``contents`` field for each wire datatype (FP16/BF16 travel only as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}

#: Most tensor data one request may carry in typed ``contents`` (decoded size, all inputs together;
#: docs/serving.md "Limits"). Typed values are Python-level protobuf scalars: decoding costs
#: ~40-70 ns per value (8 MB of fp32 ~140 ms), where raw_input_contents costs nothing. Beyond this
#: the request is RESOURCE_EXHAUSTED, suggesting raw_input_contents.
MAX_TYPED_CONTENTS_BYTES = 4 * 1024 * 1024
#: Typed contents up to this size (all inputs) are decoded on the event loop (< ~1 ms); larger ones
#: are checked against the model first, then decoded in a thread (``decode_typed_inputs``).
INLINE_TYPED_CONTENTS_BYTES = 64 * 1024
#: Values decoded per step off the event loop: the thread gives the GIL back between steps, so
#: the event loop never waits for more than about one step (~1 ms) or the switch interval.
_DECODE_STEP = 16384


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
    """The tensor of ``raw`` bytes; with ``raw`` None, of typed contents, with a stand-in for its data
    (the right dtype and element count, no memory: ``_typed_values`` decodes the values)."""
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
        return Tensor(t.name, t.datatype, shape, np.frombuffer(raw, dtype=dt))
    field = _CONTENTS_FIELD.get(t.datatype)
    if field is None:
        raise InvalidInput(f"model '{model}': input '{t.name}' of {t.datatype} must be sent as raw_input_contents")
    n = len(getattr(t.contents, field))
    if n != count:
        raise InvalidInput(f"model '{model}': input '{t.name}' has {n} values in contents.{field} "
                           f"but shape {list(shape)} needs {count}")
    return Tensor(t.name, t.datatype, shape, np.broadcast_to(np.zeros((), dt), (count,)))


def _typed_values(model: str, t: pb.ModelInferRequest.InferInputTensor, dt: np.dtype, count: int) -> np.ndarray:
    values = getattr(t.contents, _CONTENTS_FIELD[t.datatype])
    try:
        if count <= _DECODE_STEP:
            return np.fromiter(values, dt, count)
        out = np.empty(count, dt)
        it = iter(values)
        for start in range(0, count, _DECODE_STEP):  # a bytecode boundary per step: the GIL can move
            n = min(_DECODE_STEP, count - start)
            out[start:start + n] = np.fromiter(it, dt, n)
        return out
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"model '{model}': input '{t.name}' has a value that does not fit "
                           f"{t.datatype} ({exc})") from None


def _typed_inputs(model: str, request: pb.ModelInferRequest) -> list[Tensor]:
    """The inputs of a request without raw contents, with stand-in data, after the size limit."""
    inputs = [_decode_tensor(model, t, None) for t in request.inputs]
    total = typed_contents_bytes(inputs)
    if total > MAX_TYPED_CONTENTS_BYTES:
        raise ResourceExhausted(
            f"model '{model}': the request carries {total} bytes of tensor data as typed contents "
            f"(InferTensorContents), over the server's limit of {MAX_TYPED_CONTENTS_BYTES} bytes for that "
            "encoding; send large tensors as raw_input_contents (tritonclient's set_data_from_numpy does)")
    return inputs


def typed_contents_bytes(inputs: list[Tensor]) -> int:
    """Decoded size of the tensors of a request (what its typed contents decode to)."""
    return sum(t.data.size * t.data.itemsize for t in inputs)


def decode_typed_inputs(request: pb.ModelInferRequest, stubs: list[Tensor]) -> list[Tensor]:
    """The values of typed contents, for ``stubs`` (the tensors ``infer_request_from_pb(request,
    decode=False)`` made). Safe to run in a thread: it reads ``request`` only, and gives the GIL
    back every ``_DECODE_STEP`` values."""
    model = request.model_name
    return [Tensor(s.name, s.datatype, s.shape, _typed_values(model, t, s.data.dtype, s.data.size))
            for s, t in zip(stubs, request.inputs)]


def infer_request_from_pb(request: pb.ModelInferRequest, *, decode: bool = True) -> InferRequest:
    """Decode a ModelInferRequest; raises InvalidInput for malformed tensors (never a crash).

    Raw inputs are views of the message's bytes (no copy). Typed contents are size-checked first
    (RESOURCE_EXHAUSTED over ``MAX_TYPED_CONTENTS_BYTES``, before any value is decoded); with
    ``decode=False`` their tensors hold stand-ins (dtype and element count only) for
    ``decode_typed_inputs`` to replace.
    """
    model = request.model_name
    raws = request.raw_input_contents
    if raws:
        if len(raws) != len(request.inputs):
            raise InvalidInput(f"model '{model}': the request has {len(request.inputs)} inputs but "
                               f"{len(raws)} raw_input_contents; send one raw buffer per input or none")
        inputs = [_decode_tensor(model, t, raws[i]) for i, t in enumerate(request.inputs)]
    else:
        inputs = _typed_inputs(model, request)
        if decode:
            inputs = decode_typed_inputs(request, inputs)
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
