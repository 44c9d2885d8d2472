"""The fuzz targets: each turns one input (bytes) into one call of a swapserve entry point and
raises when the outcome is a crash.

A *crash* is whatever the entry point's contract does not allow:

- ``infer``: a serialized ModelInferRequest through ``InferenceServicer.ModelInfer`` (one input
  in eight through ``ModelStreamInfer``). Allowed: the servicer's own statuses (a
  ``SwapserveError`` mapped by ``status_of``) other than INTERNAL. A crash: INTERNAL, any
  exception the servicer logs with a traceback (``status_of``'s unknown-exception path, a failing
  observer), a successful response that does not name a resident version or whose outputs do not
  match their shapes, a stream that does not answer its request exactly once, or no answer
  within ``HANG_S``.
- ``config``: config.pbtxt text through ``parse_config`` + ``spec_from_config`` (what
  ``ModelRepository.entry`` runs); only ``ConfigError`` may come out, and an accepted spec must
  be servable (its batcher can be made, its warmup sizes are bounded).
- ``plan``: rollout plan text through ``parse_plan``; only ``InvalidInput``, and an accepted plan
  survives ``to_dict``/``from_dict`` and JSON unchanged (its documented guarantee).
- ``monitoring``: monitoring.yaml text through ``load_monitoring_config``; only ``ConfigError``.

The network target (``netfuzz``) sends raw bytes to a running server instead; it lives in its
own module because it needs server processes.

A target object: ``setup()`` once, ``one_input(data)`` per input, ``mutate(data, max_size, rng)``
(structure-aware; falls back to byte edits), ``seeds()`` (the inputs ``corpus/<name>/`` is made
from), ``close()``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tests.fuzz.mutate import INTERESTING_INTS, mutate_bytes, mutate_text

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
#: An input that has not answered after this long is a hang.
HANG_S = 10.0


class FuzzCrash(AssertionError):
    """An outcome the entry point's contract does not allow (the message says which)."""


class TracebackLog(logging.Handler):
    """Collects ERROR records that carry a traceback from ``swapserve.*``: the server logs every
    exception it did not expect that way (``status_of``, observers, the native front end)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)

    def check(self) -> None:
        if self.records:
            record, self.records = self.records[0], []
            text = self.format(record)
            raise FuzzCrash(f"the server logged an unexpected exception: {text}")


def install_log_guard() -> TracebackLog:
    """Route swapserve's ERROR records with a traceback into a ``TracebackLog`` (and keep the
    rest quiet: fuzzed inputs make the server log every refusal)."""
    guard = TracebackLog()
    guard.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("swapserve")
    for h in list(logger.handlers):
        if isinstance(h, TracebackLog):
            logger.removeHandler(h)
    logger.addHandler(guard)
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    return guard


def _decode_text(data: bytes) -> str:
    """Fuzz bytes as the text a file holds (the readers decode UTF-8; see each target)."""
    return data.decode("utf-8", "replace")


class Target:
    name = ""
    #: libFuzzer's -max_len for this target.
    max_len = 4096

    def setup(self) -> None:
        pass

    def one_input(self, data: bytes) -> None:
        raise NotImplementedError

    def mutate(self, data: bytes, max_size: int, rng: random.Random) -> bytes:
        return mutate_bytes(data, max_size, rng)

    def seeds(self) -> list[bytes]:
        return []

    def close(self) -> None:
        pass


# -- infer ---------------------------------------------------------------------------------------

#: Model -> (max_batch_size, [(input name, wire datatype, dims)], [output names]); the example models.
_SHAPES: dict[str, tuple[int, list[tuple[str, str, tuple[int, ...]]], list[str]]] = {
    "simple": (8, [("INPUT0", "INT32", (16,)), ("INPUT1", "INT32", (16,))], ["OUTPUT0", "OUTPUT1"]),
    "digits": (64, [("pixels", "FP32", (64,))], ["probabilities"]),
    "convnet": (32, [("image", "FP32", (1, 32, 32))], ["logits"]),
    "digits_onnx": (64, [("pixels", "FP32", (64,))], ["probabilities"]),
}
_NAMES = ("simple", "digits", "convnet", "digits_onnx", "", "nope", "../simple", "simple/1", "s" * 300, "Simple",
          "digits\x00", "ü")
_VERSIONS = ("", "", "", "1", "2", "3", "0", "-1", "01", "99999999999999999999", "abc", " 1")
_DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
              "FP64", "BF16", "BYTES", "", "fp32", "INT128", "TYPE_FP32")
_TENSOR_NAMES = ("INPUT0", "INPUT1", "pixels", "image", "OUTPUT0", "OUTPUT1", "probabilities", "logits", "", "x",
                 "INPUT0 ")
_PARAM_KEYS = ("routing_key", "slice", "user_id", "country", "priority", "timeout", "sequence_id", "binary_data",
               "binary_data_output", "classification", "x" * 100, "")
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_NP = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1", "INT16": "<i2",
       "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "BF16": "<u2"}


def _itemsize(datatype: str) -> int:
    return np.dtype(_NP[datatype]).itemsize if datatype in _NP else 1


class InferTarget(Target):
    """Serialized ModelInferRequests through the in-process inference servicer."""

    name = "infer"
    max_len = 20480

    def __init__(self) -> None:
        self.stack: Any = None
        self.guard: TracebackLog | None = None

    def setup(self) -> None:
        from tests.fuzz.stack import build_stack

        self.guard = install_log_guard()
        self.stack = build_stack()
        from swapserve._proto import grpc_service_pb2 as pb

        self.pb = pb

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
            self.stack = None

    # one input ----------------------------------------------------------------------------

    def one_input(self, data: bytes) -> None:
        from google.protobuf.message import DecodeError

        from tests.fuzz.stack import Aborted, FakeContext

        request = self.pb.ModelInferRequest()
        try:
            request.ParseFromString(data)
        except DecodeError:
            return  # the transport answers these before any servicer runs (the network target's job)
        assert self.guard is not None
        streamed = zlib.crc32(data) & 7 == 0
        try:
            if streamed:
                self._stream(request)
            else:
                try:
                    response = self.stack.call(self.stack.servicer.ModelInfer(request, FakeContext()), HANG_S)
                except Aborted as exc:
                    if exc.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                        self.guard.check()
                        raise FuzzCrash(f"ModelInfer answered {exc.code.name}: {exc.details}") from None
                else:
                    self._check_response(request, response)
        except asyncio.TimeoutError:
            raise FuzzCrash(f"no answer within {HANG_S} s (hang)") from None
        self.guard.check()

    def _stream(self, request: Any) -> None:
        from tests.fuzz.stack import FakeContext

        async def requests() -> AsyncIterator[Any]:
            yield request

        async def collect() -> list[Any]:
            return [r async for r in self.stack.servicer.ModelStreamInfer(requests(), FakeContext())]

        responses = self.stack.call(collect(), HANG_S)
        if len(responses) != 1:
            raise FuzzCrash(f"ModelStreamInfer answered one request with {len(responses)} responses")
        r = responses[0]
        if r.error_message:
            if "internal error" in r.error_message:
                self.guard.check()  # type: ignore[union-attr]
                raise FuzzCrash(f"ModelStreamInfer error: {r.error_message}")
            if r.infer_response.id != request.id:
                raise FuzzCrash(f"stream error response id {r.infer_response.id!r} != request id {request.id!r}")
            return
        self._check_response(request, r.infer_response)

    def _check_response(self, request: Any, response: Any) -> None:
        """Promise 2 and the wire format: a successful response names a resident version, and
        every output's raw bytes match its shape and datatype."""
        m = self.stack.manager.models.get(response.model_name)
        if m is None or response.model_name != request.model_name:
            raise FuzzCrash(f"response names model {response.model_name!r} for a request to {request.model_name!r}")
        if not response.model_version or int(response.model_version) not in m.resident_versions():
            raise FuzzCrash(f"response model_version {response.model_version!r} is not a resident version")
        if request.model_version and int(response.model_version) != int(request.model_version):
            raise FuzzCrash(f"pinned version {request.model_version!r} answered by {response.model_version!r}")
        if request.id and response.id != request.id:
            raise FuzzCrash(f"response id {response.id!r} != request id {request.id!r}")
        if len(response.raw_output_contents) != len(response.outputs):
            raise FuzzCrash("response has a different number of outputs and raw_output_contents")
        if request.outputs and [o.name for o in response.outputs] != [o.name for o in request.outputs]:
            raise FuzzCrash(f"outputs {[o.name for o in response.outputs]} for requested "
                            f"{[o.name for o in request.outputs]}")
        for o, raw in zip(response.outputs, response.raw_output_contents):
            if len(raw) != math.prod(o.shape) * _itemsize(o.datatype):
                raise FuzzCrash(f"output {o.name} has {len(raw)} bytes for shape {list(o.shape)} of {o.datatype}")

    # corpus and mutation ------------------------------------------------------------------

    def valid_request(self, model: str, rng: random.Random, batch: int | None = None, typed: bool = False) -> Any:
        """A request the model accepts: the right names, dtypes and shapes, random values."""
        pb = self.pb
        max_batch, inputs, outputs = _SHAPES[model]
        batch = batch or rng.randint(1, min(max_batch, 4))
        req = pb.ModelInferRequest(model_name=model)
        if rng.random() < 0.3:
            req.id = f"req-{rng.randrange(1 << 30)}"
        for name, datatype, dims in inputs:
            shape = [batch, *dims]
            t = req.inputs.add(name=name, datatype=datatype, shape=shape)
            count = math.prod(shape)
            if datatype == "INT32":
                values = np.array([rng.randint(-1000, 1000) for _ in range(count)], dtype="<i4")
            else:
                values = np.array([rng.random() for _ in range(count)], dtype="<f4")
            if typed:
                getattr(t.contents, _CONTENTS[datatype]).extend(values.tolist())
            else:
                req.raw_input_contents.append(values.tobytes())
        if rng.random() < 0.5:
            for name in rng.sample(outputs, rng.randint(1, len(outputs))):
                req.outputs.add(name=name)
        if rng.random() < 0.3:
            req.parameters["routing_key"].string_param = f"user-{rng.randrange(100)}"
        if rng.random() < 0.2:
            req.parameters["slice"].string_param = rng.choice(("a", "b", "night"))
        return req

    def seeds(self) -> list[bytes]:
        from swapserve._proto import grpc_service_pb2 as pb

        self.pb = pb
        rng = random.Random(0)
        out = []
        for model in _SHAPES:
            out.append(self.valid_request(model, rng, batch=1))
            out.append(self.valid_request(model, rng, batch=min(_SHAPES[model][0], 64 if model == "digits" else 3)))
            out.append(self.valid_request(model, rng, batch=2, typed=True))
        bad = self.valid_request("simple", rng, batch=1)
        bad.inputs[0].shape[:] = [1, 15]
        out.append(bad)
        dup = self.valid_request("digits", rng, batch=1)
        dup.outputs.add(name="probabilities")
        dup.outputs.add(name="probabilities")
        out.append(dup)
        pinned = self.valid_request("digits", rng, batch=3)
        pinned.model_version = "2"
        out.append(pinned)
        unknown = self.valid_request("simple", rng, batch=1)
        unknown.model_name = "nope"
        out.append(unknown)
        # BYTES parses to Tensor data the models cannot take; typed ints out of range.
        r = pb.ModelInferRequest(model_name="simple")
        t = r.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
        t.contents.int64_contents.extend([1 << 40] * 16)
        out.append(r)
        return [m.SerializeToString() for m in out]

    def mutate(self, data: bytes, max_size: int, rng: random.Random) -> bytes:
        from google.protobuf.message import DecodeError

        if rng.random() < 0.3:
            return mutate_bytes(data, max_size, rng)
        req = self.pb.ModelInferRequest()
        try:
            req.ParseFromString(data)
        except DecodeError:
            req = self.valid_request(rng.choice(list(_SHAPES)), rng)
        if rng.random() < 0.05:
            req = self.valid_request(rng.choice(list(_SHAPES)), rng, typed=rng.random() < 0.2)
        for _ in range(rng.randint(1, 3)):
            self._edit(req, rng)
        out = req.SerializeToString()
        return out if len(out) <= max_size else mutate_bytes(data, max_size, rng)

    def _edit(self, req: Any, rng: random.Random) -> None:
        op = rng.randrange(14)
        if op == 0:
            req.model_name = rng.choice(_NAMES)
        elif op == 1:
            req.model_version = rng.choice(_VERSIONS)
        elif op == 2 and req.inputs:
            t = rng.choice(req.inputs)
            dims = list(t.shape)
            sub = rng.randrange(5)
            if sub == 0 and dims:
                dims[rng.randrange(len(dims))] = rng.choice(INTERESTING_INTS[:-1])
            elif sub == 1:
                dims.insert(rng.randint(0, len(dims)), rng.choice((1, 0, 2, 16)))
            elif sub == 2 and dims:
                del dims[rng.randrange(len(dims))]
            elif sub == 3 and dims:
                dims[0] = rng.choice((0, 1, 2, 8, 9, 32, 33, 64, 65, 1 << 20))
            else:
                dims = []
            del t.shape[:]
            t.shape.extend(max(min(d, (1 << 63) - 1), -(1 << 63)) for d in dims)
        elif op == 3 and req.inputs:
            rng.choice(req.inputs).datatype = rng.choice(_DATATYPES)
        elif op == 4 and req.inputs:
            rng.choice(req.inputs).name = rng.choice(_TENSOR_NAMES)
        elif op == 5 and req.raw_input_contents:
            i = rng.randrange(len(req.raw_input_contents))
            raw = bytes(req.raw_input_contents[i])
            sub = rng.randrange(4)
            if sub == 0:
                raw = raw[:rng.randint(0, len(raw))]
            elif sub == 1:
                raw += bytes(rng.randint(1, 8))
            elif sub == 2:  # NaN / inf / huge values in floats
                arr = bytearray(raw)
                for _ in range(rng.randint(1, 4)):
                    if len(arr) >= 4:
                        k = rng.randrange(len(arr) // 4) * 4
                        arr[k:k + 4] = rng.choice((b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f",
                                                   b"\x00\x00\x80\xff", b"\x01\x00\x00\x00"))
                raw = bytes(arr)
            else:
                raw = b""
            req.raw_input_contents[i] = raw
        elif op == 6:
            if req.raw_input_contents and rng.random() < 0.5:
                del req.raw_input_contents[rng.randrange(len(req.raw_input_contents))]
            elif req.raw_input_contents:
                req.raw_input_contents.append(req.raw_input_contents[0])
            else:
                req.raw_input_contents.append(bytes(rng.randint(0, 256)))
        elif op == 7:
            if req.inputs and rng.random() < 0.5:
                del req.inputs[rng.randrange(len(req.inputs))]
            elif req.inputs:
                t = req.inputs.add()
                t.CopyFrom(rng.choice(req.inputs))
            else:
                req.inputs.add(name=rng.choice(_TENSOR_NAMES), datatype=rng.choice(_DATATYPES), shape=[1, 16])
        elif op == 8:  # typed contents instead of raw
            del req.raw_input_contents[:]
            for t in req.inputs:
                field = _CONTENTS.get(t.datatype, rng.choice(list(_CONTENTS.values())))
                n = max(0, min(math.prod(t.shape) if all(d >= 0 for d in t.shape) else 1, 4096))
                n += rng.choice((0, 0, 0, 1, -1)) if n else 0
                values: list[Any]
                if field == "bool_contents":
                    values = [rng.random() < 0.5 for _ in range(n)]
                elif field == "bytes_contents":
                    values = [bytes(rng.randint(0, 4)) for _ in range(n)]
                elif field in ("fp32_contents", "fp64_contents"):
                    values = [rng.choice((0.0, 1.5, -1.0, math.nan, math.inf, 3e38, 1e-45)) for _ in range(n)]
                elif field.startswith("uint"):
                    values = [rng.choice((0, 1, 255, 256, 65536, (1 << 32) - 1)) for _ in range(n)]
                else:
                    values = [rng.choice((0, 1, -1, 127, 128, -129, 1 << 31, -(1 << 31) - 1)) for _ in range(n)]
                if field == "int_contents":
                    values = [max(min(v, (1 << 31) - 1), -(1 << 31)) for v in values]
                getattr(t.contents, field).extend(values)
        elif op == 9:
            if req.outputs and rng.random() < 0.4:
                del req.outputs[rng.randrange(len(req.outputs))]
            else:
                o = req.outputs.add(name=rng.choice(_TENSOR_NAMES))
                if rng.random() < 0.2:
                    o.parameters["binary_data"].bool_param = True
                if rng.random() < 0.1:
                    o.parameters["classification"].int64_param = rng.choice((0, 1, 3, -1, 1 << 40))
        elif op == 10:
            key = rng.choice(_PARAM_KEYS)
            p = req.parameters[key]
            kind = rng.randrange(5)
            if kind == 0:
                p.string_param = rng.choice(("", "a", "NL", "x" * 1000, "\x00", "user-1"))
            elif kind == 1:
                p.int64_param = rng.choice(INTERESTING_INTS[:-1])
            elif kind == 2:
                p.bool_param = rng.random() < 0.5
            elif kind == 3:
                p.double_param = rng.choice((0.0, -1.0, math.nan, math.inf, 1e300))
            else:
                p.uint64_param = rng.choice((0, 1, (1 << 64) - 1))
        elif op == 11 and req.inputs:
            t = rng.choice(req.inputs)
            t.parameters[rng.choice(("binary_data_size", "shared_memory_region", "x"))].int64_param = \
                rng.choice((0, 4, -1, 1 << 40))
        elif op == 12:
            req.id = rng.choice(("", "a", "x" * 2000, "\x00", "req-1", "ü" * 10))
        else:
            src = self.valid_request(rng.choice(list(_SHAPES)), rng)  # splice another model's inputs
            del req.inputs[:]
            req.inputs.extend(src.inputs)
            del req.raw_input_contents[:]
            req.raw_input_contents.extend(src.raw_input_contents)


# -- config.pbtxt -------------------------------------------------------------------------------

_PBTXT_VALUES = ("0", "1", "-1", "8", "64", "2147483647", "-2147483648", "4294967296", "9223372036854775807",
                 "18446744073709551615", "99999999999999999999999", "1e10", "TYPE_FP32", "TYPE_INT32",
                 "TYPE_STRING", "TYPE_INVALID", "TYPE_BF16", "TYPE_BOOL", "999", "KIND_GPU", "KIND_CPU", "KIND_MODEL",
                 "77", "\"\"", "\"x\"", "\"../x\"", "\"/etc/passwd\"", "\"model.pt\"", "\"simple\"",
                 "\"pytorch_libtorch\"", "\"onnxruntime_onnx\"", "\"tensorflow\"", "\"pytorch\"", "true", "false",
                 "[ ]", "[ -1 ]", "[ 0 ]", "[ 16 ]", "[ 4, 4 ]", "{ }", "\"\\xff\"")
_PBTXT_KEYS = ("name", "platform", "backend", "max_batch_size", "dims", "data_type", "reshape", "shape",
               "input", "output", "optional", "version_policy", "dynamic_batching", "preferred_batch_size",
               "max_queue_delay_microseconds", "instance_group", "count", "kind", "default_model_filename",
               "model_warmup", "batch_size", "inputs", "random_data", "zero_data", "input_data_file",
               "parameters", "sequence_batching", "ensemble_scheduling", "latest", "num_versions", "specific",
               "versions", "all", "default_queue_policy", "max_queue_size")
_PBTXT_SNIPPETS = (
    "dynamic_batching { preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 100 }",
    "dynamic_batching { max_queue_delay_microseconds: 18446744073709551615 }",
    "dynamic_batching { default_queue_policy { max_queue_size: 2147483647 } }",
    "instance_group [ { count: 2 kind: KIND_CPU } ]",
    "instance_group [ { count: 2147483647 } ]",
    "instance_group [ { kind: 77 } ]",
    "version_policy: { latest { num_versions: 0 } }",
    "version_policy: { specific { versions: [ 1, -1, 99 ] } }",
    "version_policy: { all { } }",
    "sequence_batching { }",
    "ensemble_scheduling { }",
    "default_model_filename: \"../../etc/passwd\"",
    "default_model_filename: \"model.pt\"",
    "parameters { key: \"intra_op_thread_count\" value: { string_value: \"1\" } }",
    "model_warmup [ { name: \"w\" batch_size: 1 inputs { key: \"INPUT0\" value: { data_type: TYPE_INT32 dims: [ 16 ] "
    "random_data: true } } } ]",
    "model_warmup [ { name: \"w\" batch_size: 8 inputs { key: \"INPUT0\" value: { data_type: TYPE_INT32 dims: [ 16 ] "
    "zero_data: true } } count: 1001 } ]",
    "model_warmup [ { name: \"w\" inputs { key: \"INPUT0\" value: { data_type: TYPE_STRING dims: [ 16 ] "
    "zero_data: true } } } ]",
    "model_warmup [ { name: \"w\" inputs { key: \"INPUT0\" value: { data_type: 999 dims: [ 16 ] } } } ]",
    "model_warmup [ { name: \"w\" inputs { key: \"INPUT0\" value: { data_type: TYPE_INT32 dims: [ 16 ] "
    "input_data_file: \"../../config.pbtxt\" } } } ]",
    "model_warmup [ { name: \"w\" batch_size: 1 inputs { key: \"INPUT0\" value: { data_type: TYPE_INT32 dims: "
    "[ 99999999, 99999999 ] random_data: true } } } ]",
    "input [ { name: \"EXTRA\" data_type: TYPE_FP32 dims: [ -1 ] optional: true } ]",
    "output [ { name: \"OUT\" data_type: TYPE_FP16 dims: [ 2 ] reshape: { shape: [ 1, 2 ] } } ]",
    "input [ { name: \"INPUT0\" data_type: TYPE_INT32 dims: [ 16 ] } ]",
    "input [ { name: \"A\" data_type: 999 dims: [ 1 ] } ]",
    "platform: \"onnxruntime_onnx\"",
    "backend: \"pytorch\"",
    "max_batch_size: 0",
)


class ConfigTarget(Target):
    """config.pbtxt bytes, written where a model's config lives, through the repository's parser."""

    name = "config"
    max_len = 8192

    def setup(self) -> None:
        from swapserve.repository.config import DEFAULT_FILENAMES

        self.guard = install_log_guard()
        self.scratch = tempfile.TemporaryDirectory(prefix="swapserve-fuzz-config-")
        # The directory is named like the model the seeds mostly are; a fuzzed name must match it.
        self.model_dir = Path(self.scratch.name) / "simple"
        (self.model_dir / "1").mkdir(parents=True)
        (self.model_dir / "1" / DEFAULT_FILENAMES["pytorch_libtorch"]).write_bytes(b"not a model")
        (self.model_dir / "warmup").mkdir()
        (self.model_dir / "warmup" / "INPUT0").write_bytes(bytes(64))
        self.config_path = self.model_dir / "config.pbtxt"

    def close(self) -> None:
        self.scratch.cleanup()

    def one_input(self, data: bytes) -> None:
        from swapserve.errors import ConfigError
        from swapserve.repository.config import MAX_INSTANCE_COUNT, MAX_WARMUP_SAMPLE_BYTES, parse_config, \
            spec_from_config

        self.config_path.write_bytes(data)
        try:
            spec = spec_from_config(parse_config(self.model_dir), self.model_dir)
        except ConfigError as exc:
            if not exc.message.startswith("model 'simple'"):
                raise FuzzCrash(f"ConfigError does not name the model: {exc.message}") from None
            return
        # Accepted: the runtime can be built from it.
        if spec.instance_count > MAX_INSTANCE_COUNT or spec.instance_count < 1:
            raise FuzzCrash(f"accepted instance_count {spec.instance_count}")
        for w in spec.warmup:
            size = sum(a.nbytes for a in w.inputs.values())
            if size > MAX_WARMUP_SAMPLE_BYTES:
                raise FuzzCrash(f"accepted a warmup sample of {size} bytes")
        db = spec.dynamic_batching
        from swapserve.lifecycle.runtime import DEFAULT_MAX_QUEUE_SIZE
        from swapserve.native import Batcher

        max_rows = spec.max_batch_size if spec.max_batch_size > 0 else 1
        batcher = Batcher(max_rows, list(db.preferred_batch_sizes) if db else [], db.max_queue_delay_us if db else 0,
                          (db.max_queue_size if db and db.max_queue_size else DEFAULT_MAX_QUEUE_SIZE), name="fuzz")
        del batcher
        self.guard.check()

    def seeds(self) -> list[bytes]:
        out = [p.read_bytes() for p in sorted((ROOT / "model_repository").glob("*/config.pbtxt"))]
        simple = (ROOT / "model_repository" / "simple" / "config.pbtxt").read_text()
        out += [(simple + "\n" + s + "\n").encode() for s in _PBTXT_SNIPPETS]
        out.append(b"")
        out.append(b"name: \"\xff\"\n")
        return out

    def mutate(self, data: bytes, max_size: int, rng: random.Random) -> bytes:
        if rng.random() < 0.3:
            return mutate_bytes(data, max_size, rng)
        text = mutate_text(_decode_text(data), rng, _PBTXT_VALUES, _PBTXT_KEYS, _PBTXT_SNIPPETS)
        return text.encode()[:max_size]


# -- rollout plans ------------------------------------------------------------------------------

_YAML_VALUES = ("0", "1", "-1", "5", "50", "100", "101", "33.33", "33.333", "7%", "1e400", "-0", "0.5", "1.0",
                "2", ".nan", ".inf", "-.inf", "~", "null", "yes", "no", "on", "true", "false", "''", "\"\"", "[]",
                "{}", "[1, 2]", "{a: 1}", "1h", "1h30m", "500ms", "10m", "1.5h", "90s", "1d", "0s", "-1s", "1y",
                "1" * 400, "1" * 4400, "0x10", "0o7", "1_000", "2024-01-01", "!!binary aGk=", "!!set {a}",
                "&a [1]", "*a", "\"\\ud83d\\ude00\"", "http://x", "https://h/ook", "ftp://x", "NL", "'NO'",
                "0.99", "0.4999", "0.9999999999", "1e-9", "[{attribute: country, value: NL}]",
                "[{attribute: a}]", "x" * 300)
_PLAN_KEYS = ("stages", "name", "traffic", "shadow", "cohorts", "min_duration", "min_samples", "approve", "gates",
              "max_slice_accuracy_drop", "max_error_rate_increase", "p99_ms", "confidence",
              "max_relative_mae_increase", "p99_min_requests", "max_reporter_share", "watch",
              "require_offline_eval", "rollback_approval_window", "webhook", "strategy", "ab", "staged", "split",
              "duration", "attribute", "value", "stagse")
_PLAN_SNIPPETS = (
    "  - {name: canary, traffic: 5, min_duration: 1h, min_samples: 1000}",
    "  - {name: shadow, traffic: 0, shadow: true}",
    "  - {name: full, traffic: 100, approve: true}",
    "  - {name: c, cohorts: [{attribute: country, value: NL}]}",
    "gates: {max_slice_accuracy_drop: 0.01, p99_ms: 50, confidence: 0.99, max_reporter_share: 0.2}",
    "watch: 24h",
    "strategy: ab",
    "split: 50",
    "duration: 1h",
    "webhook: https://hooks.example/rollout",
    "require_offline_eval: true",
    "rollback_approval_window: 0",
    "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]",
    "stages: *c",
    "? [a, b]\n: 1",
    "[" * 50,
)


def _plan_seeds() -> list[str]:
    from swapserve.rollout.plan import BUILTIN_PLANS, builtin_plan, CohortMatch

    out = [
        "stages:\n  - {name: shadow,  traffic: 0,  shadow: true, min_duration: 10m, min_samples: 2000}\n"
        "  - {name: canary,  traffic: 5,  min_duration: 1h, min_samples: 1000}\n"
        "  - {name: half,    traffic: 50, min_duration: 1h, approve: true}\n  - {name: full,    traffic: 100}\n"
        "gates: {max_slice_accuracy_drop: 0.01, max_error_rate_increase: 0.005, p99_ms: 50, confidence: 0.99}\n"
        "watch: 24h\nrequire_offline_eval: true\n",
        "{strategy: ab, split: 50, duration: 1h}\n",
        "strategy: ab\nsplit: 12.5\nduration: 30m\ngates: {max_reporter_share: 0.25}\nwebhook: http://h/x\n",
        "stages:\n  - name: nl\n    cohorts:\n      - {attribute: country, value: 'NO'}\n  - name: full\n    traffic: 100\n",
        "stages: []\n",
        "",
    ]
    for name in BUILTIN_PLANS:
        plan = builtin_plan(name, cohorts=[CohortMatch("country", "NL")])
        out.append(json.dumps(plan.to_dict()))
    return out


class PlanTarget(Target):
    name = "plan"

    def setup(self) -> None:
        self.guard = install_log_guard()

    def one_input(self, data: bytes) -> None:
        from swapserve.errors import InvalidInput
        from swapserve.rollout.plan import RolloutPlan, parse_plan

        try:
            plan = parse_plan(_decode_text(data))
        except InvalidInput as exc:
            if not exc.message.startswith("rollout plan"):
                raise FuzzCrash(f"plan error without 'rollout plan:': {exc.message}") from None
            return
        d = plan.to_dict()
        if RolloutPlan.from_dict(d) != plan:
            raise FuzzCrash(f"from_dict(to_dict(p)) != p for {d}")
        if parse_plan(json.dumps(d, allow_nan=False)) != plan:
            raise FuzzCrash(f"the plan's JSON does not parse back to it: {d}")

    def seeds(self) -> list[bytes]:
        return [s.encode() for s in _plan_seeds()]

    def mutate(self, data: bytes, max_size: int, rng: random.Random) -> bytes:
        if rng.random() < 0.3:
            return mutate_bytes(data, max_size, rng)
        return mutate_text(_decode_text(data), rng, _YAML_VALUES, _PLAN_KEYS, _PLAN_SNIPPETS).encode()[:max_size]


# -- monitoring.yaml ----------------------------------------------------------------------------

_MON_KEYS = ("enabled", "windows", "slots", "profile", "reference_file", "min_reference_rows", "capture", "bins",
             "max_features", "data_quality", "policy", "reject_kinds", "range_margin", "ranges", "drift",
             "min_samples", "psi", "prediction_psi", "warn", "alert", "p_value", "top_k", "trigger", "command",
             "webhook", "webhook_timeout", "on_drift", "accuracy_floor", "min_labelled", "schedule",
             "min_interval", "timeout", "kill_grace", "pass_env", "env", "count", "reject", "nan", "inf",
             "out_of_range", "constant", "pixels", "pixels[17]", "pixels[x]")
_MON_SNIPPETS = (
    "windows: [5m, 1h]", "windows: [10s, 10s]", "windows: [0.5]", "slots: 600", "slots: 601",
    "profile: {reference_file: ../../etc/passwd, capture: 10, bins: 2, max_features: 4096}",
    "data_quality: {policy: reject, reject_kinds: [nan, inf, out_of_range, constant], range_margin: 10.0}",
    "data_quality:\n  ranges: {pixels: [0.0, 1.0], \"pixels[17]\": [0.0, 0.5]}",
    "drift: {min_samples: 1, psi: {warn: 0.3, alert: 0.2}, prediction_psi: {warn: 0, alert: 0}, p_value: 1, top_k: 100}",
    "trigger:\n  command: [python, retrain.py, --context, \"{context}\"]\n  min_interval: 1h\n  timeout: 1h",
    "trigger: {webhook: http://h/x, webhook_timeout: 1ms, on_drift: false, accuracy_floor: 0.9, min_labelled: 1}",
    "trigger: {schedule: 24h, min_interval: 59s, kill_grace: 0, pass_env: [AWS_PROFILE, 'MLFLOW_*'], "
    "env: {RETRAIN_EPOCHS: '5', N: 1}}",
    "trigger: {pass_env: ['1BAD'], env: {'bad name': 1}}",
    "enabled: false",
)


class MonitoringTarget(Target):
    name = "monitoring"

    def setup(self) -> None:
        self.guard = install_log_guard()
        self.scratch = tempfile.TemporaryDirectory(prefix="swapserve-fuzz-monitoring-")
        self.model_dir = Path(self.scratch.name) / "digits"
        self.model_dir.mkdir()

    def close(self) -> None:
        self.scratch.cleanup()

    def one_input(self, data: bytes) -> None:
        from swapserve.errors import ConfigError
        from swapserve.monitoring.monitor_config import FILENAME, MIN_INTERVAL_FLOOR_S, load_monitoring_config

        (self.model_dir / FILENAME).write_bytes(data)
        try:
            config = load_monitoring_config(self.model_dir)
        except ConfigError as exc:
            if "digits" not in exc.message:
                raise FuzzCrash(f"ConfigError does not name the model: {exc.message}") from None
            return
        if not all(math.isfinite(w) and w >= 1 for w in config.windows_s):
            raise FuzzCrash(f"accepted windows {config.windows_s}")
        if config.trigger.min_interval_s < MIN_INTERVAL_FLOOR_S:
            raise FuzzCrash(f"accepted min_interval {config.trigger.min_interval_s}")
        self.guard.check()

    def seeds(self) -> list[bytes]:
        from swapserve.monitoring import monitor_config

        doc = monitor_config.__doc__ or ""
        example = "\n".join(line[4:] for line in doc.split("\n") if line.startswith("    "))
        out = [(ROOT / "model_repository" / "digits" / "monitoring.yaml").read_bytes(), example.encode(), b""]
        out += [s.encode() for s in _MON_SNIPPETS]
        return out

    def mutate(self, data: bytes, max_size: int, rng: random.Random) -> bytes:
        if rng.random() < 0.3:
            return mutate_bytes(data, max_size, rng)
        return mutate_text(_decode_text(data), rng, _YAML_VALUES, _MON_KEYS, _MON_SNIPPETS).encode()[:max_size]


TARGETS: dict[str, Callable[[], Target]] = {
    "infer": InferTarget,
    "config": ConfigTarget,
    "plan": PlanTarget,
    "monitoring": MonitoringTarget,
}


def make_target(name: str) -> Target:
    if name == "net":
        from tests.fuzz.netfuzz import NetTarget

        return NetTarget()
    return TARGETS[name]()


def corpus(name: str) -> list[tuple[Path, bytes]]:
    """The saved corpus of a target (``corpus/<name>/``), sorted by file name."""
    d = CORPUS / name
    return [(p, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()] if d.is_dir() else []
