"""Build the request payloads: pre-serialised ``ModelInferRequest`` bytes, one per distinct request.

Inputs come from ``--input-data`` (JSON or npz, one entry per request, used round-robin)
or, without it, from random tensors shaped by the server's model metadata (any KServe v2
server: dynamic dimensions (-1) become 1). ``--param KEY=VALUE`` adds request parameters.

Input data, JSON::

    {"requests": [
        {"inputs": {"pixels": {"data": [[0.1, ...]], "shape": [1, 64], "datatype": "FP32"}},
         "parameters": {"routing_key": "user-7", "slice": "night"},
         "model_version": ""},
        {"inputs": {"pixels": [[0.3, ...]]}}, ...]}

    ``inputs`` maps input name -> {"data", "shape"?, "datatype"?} or directly -> nested list;
    missing shape/datatype come from the model metadata. perf_analyzer's layout
    ``{"data": [{"pixels": {"content": [...], "shape": [...]}}, ...]}`` is accepted too.

Input data, npz: one array per input name whose first axis is the request index (each
request gets one row, with a batch dimension of 1 added), optional ``parameters.KEY``
arrays (one value per request) and an optional ``model_version`` array of strings.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from swapserve import tls as _tls
from swapserve._proto import grpc_service_pb2 as pb

if TYPE_CHECKING:
    from swapserve.tls import ClientTls

NP_DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}


class WorkloadError(ValueError):
    """The input data, the parameters or the model metadata cannot make a request."""


def parse_value(text: str) -> bool | int | float | str:
    """``--param`` values: true/false -> bool, integer -> int, number -> float, otherwise the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)  # type: ignore[no-any-return]
        except ValueError:
            pass
    return text


def parse_params(items: list[str]) -> dict[str, bool | int | float | str]:
    out: dict[str, bool | int | float | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WorkloadError(f"--param {item!r}: expected KEY=VALUE, e.g. --param routing_key=user-7")
        out[key] = parse_value(value)
    return out


def model_metadata(url: str, model: str, version: str = "", timeout: float = 10.0, *,
                   tls: ClientTls | None = None, token: str = "") -> dict[str, Any]:
    """ModelMetadata over a plain generic call: {name, versions, platform, inputs:[{name, datatype, shape}]}.

    ``tls`` and ``token`` as the workers use them (a server that closes inference asks for
    the token here too).
    """
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with _tls.channel(url, tls) as channel:
        rpc = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                                  request_serializer=pb.ModelMetadataRequest.SerializeToString,
                                  response_deserializer=pb.ModelMetadataResponse.FromString)
        try:
            m = rpc(pb.ModelMetadataRequest(name=model, version=version), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise WorkloadError(f"cannot read metadata of model '{model}' from {url}: "
                                f"{exc.code().name}: {exc.details()}") from exc
    return {"name": m.name, "platform": m.platform, "versions": list(m.versions),
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in m.inputs]}


def _encode(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode()
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    if datatype not in NP_DTYPES:
        raise WorkloadError(f"datatype {datatype} is not supported by the bench harness")
    return np.ascontiguousarray(array, dtype=NP_DTYPES[datatype]).tobytes()


def _set_param(target: Any, key: str, value: Any) -> None:
    p = target[key]
    if isinstance(value, (bool, np.bool_)):
        p.bool_param = bool(value)
    elif isinstance(value, (int, np.integer)):
        p.int64_param = int(value)
    elif isinstance(value, (float, np.floating)):
        p.double_param = float(value)
    else:
        p.string_param = str(value)


def encode_request(model: str, tensors: dict[str, tuple[np.ndarray, str]], params: dict[str, Any],
                   version: str = "") -> bytes:
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, (array, datatype) in tensors.items():
        req.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        req.raw_input_contents.append(_encode(array, datatype))
    for key, value in params.items():
        _set_param(req.parameters, key, value)
    return req.SerializeToString()


def _random(shape: list[int], datatype: str, rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([f"x{v}".encode() for v in rng.integers(0, 1000, size=int(np.prod(shape)))],
                        dtype=object).reshape(shape)
    dtype = NP_DTYPES.get(datatype)
    if dtype is None:
        raise WorkloadError(f"datatype {datatype} is not supported by the bench harness")
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.random(size=shape, dtype=np.float64).astype(dtype)


def _from_json(path: Path, meta_inputs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text())
    entries = doc.get("requests") if isinstance(doc, dict) else doc
    if entries is None and isinstance(doc, dict) and "data" in doc:  # perf_analyzer layout
        entries = [{"inputs": {k: ({"data": v["content"], "shape": v.get("shape")} if isinstance(v, dict) else v)
                               for k, v in e.items()}} for e in doc["data"]]
    if not isinstance(entries, list) or not entries:
        raise WorkloadError(f"{path}: expected {{\"requests\": [...]}} with at least one request")
    out = []
    for n, e in enumerate(entries):
        tensors = {}
        for name, spec in e.get("inputs", {}).items():
            if not isinstance(spec, dict):
                spec = {"data": spec}
            meta = meta_inputs.get(name, {})
            datatype = spec.get("datatype") or meta.get("datatype")
            if not datatype:
                raise WorkloadError(f"{path}: request {n} input '{name}': no datatype and the model has no such input")
            array = np.array(spec["data"], dtype=object if datatype == "BYTES" else NP_DTYPES.get(datatype))
            shape = spec.get("shape")
            if shape is None and meta and len(meta["shape"]) == array.ndim + 1:
                shape = [1, *array.shape]  # one sample without the batch dimension
            tensors[name] = (array.reshape(shape) if shape is not None else array, datatype)
        out.append({"tensors": tensors, "parameters": e.get("parameters", {}),
                    "version": str(e.get("model_version", ""))})
    return out


def _from_npz(path: Path, meta_inputs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    names = [k for k in arrays if k in meta_inputs]
    if not names:
        raise WorkloadError(f"{path}: no array named after an input of the model "
                            f"(inputs: {sorted(meta_inputs)}; arrays: {sorted(arrays)})")
    count = len(arrays[names[0]])
    out = []
    for i in range(count):
        tensors = {n: (arrays[n][i][None, ...], meta_inputs[n]["datatype"]) for n in names}
        params = {k.split(".", 1)[1]: arrays[k][i].item() for k in arrays if k.startswith("parameters.")}
        version = str(arrays["model_version"][i]) if "model_version" in arrays else ""
        out.append({"tensors": tensors, "parameters": params, "version": version})
    return out


def build_payloads(url: str, model: str, *, input_data: Path | None = None, params: dict[str, Any] | None = None,
                   version: str = "", count: int = 64, seed: int = 0, tls: ClientTls | None = None,
                   token: str = "") -> tuple[list[bytes], dict[str, Any]]:
    """The distinct request messages of a run and the model metadata they were built from.

    Explicit per-request parameters in the input data override ``params`` (the ``--param`` values).
    The metadata is read over ``tls`` with ``token`` (see ``model_metadata``).
    """
    meta = model_metadata(url, model, version, tls=tls, token=token)
    meta_inputs = {t["name"]: t for t in meta["inputs"]}
    params = params or {}
    if input_data is not None:
        suffix = input_data.suffix.lower()
        entries = _from_npz(input_data, meta_inputs) if suffix == ".npz" else _from_json(input_data, meta_inputs)
        payloads = [encode_request(model, e["tensors"], {**params, **e["parameters"]}, e["version"] or version)
                    for e in entries]
        return payloads, meta
    if not meta["inputs"]:
        raise WorkloadError(f"the metadata of model '{model}' at {url} lists no inputs, so the harness cannot "
                            "make random ones: describe the requests with --input-data")
    rng = np.random.default_rng(seed)
    payloads = []
    for _ in range(count):
        tensors = {t["name"]: (_random([1 if d < 0 else d for d in t["shape"]], t["datatype"], rng), t["datatype"])
                   for t in meta["inputs"]}
        payloads.append(encode_request(model, tensors, params, version))
    return payloads, meta
