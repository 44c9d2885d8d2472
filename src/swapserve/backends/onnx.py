"""ONNX Runtime backend (platform ``onnxruntime_onnx``, Triton backend ``onnxruntime``).

``onnxruntime`` is an optional extra (``pip install swapserve[onnx]``) and is imported
only when a model is loaded. Inputs and outputs bind by name; at load every config name
must exist in the model, with a matching element type and a compatible shape (else
``ConfigError`` listing what the model has).

Execution providers: ``CUDAExecutionProvider`` (with ``device_id`` N for ``cuda:N``) when
the device is a GPU, else ``CPUExecutionProvider``.

Threads: a server runs many sessions side by side, so each session gets one intra-op
and one inter-op thread unless the model's config says otherwise, with Triton's
parameter names::

    parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
    parameters { key: "inter_op_thread_count" value: { string_value: "1" } }

(0 means ONNX Runtime's own default: one thread per core.)

BF16 is not supported here (numpy cannot hand ONNX Runtime bfloat16 buffers); such a
config is refused at load.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from swapserve import dtypes, errors
from swapserve.backends import base
from swapserve.types import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

#: ONNX Runtime type string -> wire datatype.
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}
_SUPPORTED = frozenset(ORT_TYPES.values()) - {"BF16", "BYTES"}

#: spec.parameters key -> (SessionOptions attribute, default)
THREAD_PARAMETERS: dict[str, tuple[str, int]] = {
    "intra_op_thread_count": ("intra_op_num_threads", 1),
    "inter_op_thread_count": ("inter_op_num_threads", 1),
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise errors.ConfigError(
            "the ONNX Runtime backend needs onnxruntime: install swapserve[onnx] "
            "(or onnxruntime-gpu for CUDA)"
        ) from e
    return onnxruntime


def _describe(args: list[Any]) -> str:
    return ", ".join(f"{a.name} {a.type} {list(a.shape)}" for a in args)


class OnnxRuntimeBackend(base.Backend):
    platform = "onnxruntime_onnx"
    backend_name = "onnxruntime"
    default_filename = "model.onnx"

    def __init__(self, spec: ModelSpec, session: Any, where: str, nbytes: int) -> None:
        self._spec = spec
        self._session: Any | None = session
        self._where = where
        self._nbytes = nbytes
        self._output_names = [t.name for t in spec.outputs]

    @classmethod
    def load(cls, spec: ModelSpec, model_file: Path, device: str) -> OnnxRuntimeBackend:
        ort = _import_ort()
        path = base.check_model_file(spec, model_file)
        where = f"model '{spec.name}' version {path.parent.name}"
        for t in (*spec.inputs, *spec.outputs):
            if t.datatype not in _SUPPORTED:
                raise errors.ConfigError(
                    f"{where}: tensor '{t.name}' has datatype {dtypes.to_config(t.datatype)}, "
                    "which the ONNX Runtime backend does not support; supported: "
                    f"{', '.join(sorted(dtypes.to_config(w) for w in _SUPPORTED))}"
                )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; warnings go to stderr unformatted
        for key, (attr, default) in THREAD_PARAMETERS.items():
            raw = spec.parameters.get(key)
            try:
                value = default if raw is None else int(raw)
                if value < 0:
                    raise ValueError
            except ValueError:
                raise errors.ConfigError(
                    f"{where}: parameter '{key}' must be a non-negative integer, got '{raw}'"
                ) from None
            setattr(options, attr, value)
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise errors.ConfigError(
                    f"{where}: device {device} needs onnxruntime's CUDAExecutionProvider, "
                    f"but this onnxruntime offers {ort.get_available_providers()}; "
                    "install onnxruntime-gpu"
                )
            index = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:
            raise errors.VersionNotReady(
                f"{where}: cannot load {path} as an ONNX model ({e})"
            ) from e
        cls._check_tensors(spec, where, path, "input", spec.inputs, session.get_inputs())
        cls._check_tensors(spec, where, path, "output", spec.outputs, session.get_outputs())
        return cls(spec, session, where, _file_bytes(path))

    @staticmethod
    def _check_tensors(
        spec: ModelSpec,
        where: str,
        path: Path,
        kind: str,
        configured: tuple[TensorSpec, ...],
        actual: list[Any],
    ) -> None:
        by_name = {a.name: a for a in actual}
        missing = [t.name for t in configured if t.name not in by_name]
        if missing:
            raise errors.ConfigError(
                f"{where}: config.pbtxt {kind}(s) {missing} do not exist in {path.name}; "
                f"the model's {kind}s are: {_describe(actual)}"
            )
        for t in configured:
            a = by_name[t.name]
            model_type = ORT_TYPES.get(a.type, a.type)
            if model_type != t.datatype:
                raise errors.ConfigError(
                    f"{where}: {kind} '{t.name}' is {dtypes.to_config(t.datatype)} in config.pbtxt "
                    f"but {a.type} in {path.name}"
                )
            expected = ([-1] if spec.batching else []) + list(base.model_shape(spec, t))
            shape = list(a.shape) if a.shape is not None else None
            if shape is None:
                continue  # rank unknown to the model: nothing to check
            ok = len(shape) == len(expected) and all(
                not isinstance(d, int) or d < 0 or e < 0 or d == e
                for d, e in zip(shape, expected)
            )
            if not ok:
                config_shape = (["batch"] if spec.batching else []) + list(base.model_shape(spec, t))
                raise errors.ConfigError(
                    f"{where}: {kind} '{t.name}' has shape {config_shape} in config.pbtxt "
                    f"but {shape} in {path.name}"
                )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise errors.VersionNotReady(f"{self._where} is unloaded")
        spec = self._spec
        batch = base.batch_size(spec, inputs)
        feed: dict[str, np.ndarray] = {}
        for t in spec.inputs:  # validated inputs (swapserve.dataplane.validation): names, dtypes and shapes hold
            arr = inputs.get(t.name)
            if arr is None:
                continue
            feed[t.name] = np.ascontiguousarray(base.to_model_shape(spec, t, arr))
        try:
            results = session.run(self._output_names, feed)
        except Exception as e:
            log.debug("%s raised", self._where, exc_info=True)
            raise errors.ModelExecutionError(f"{self._where} failed: {e}") from e
        return {
            t.name: base.from_model_output(spec, t, np.asarray(r), batch)
            for t, r in zip(spec.outputs, results)
        }

    def memory_bytes(self) -> int:
        return self._nbytes

    def close(self) -> None:
        self._session = None


def _file_bytes(path: Path) -> int:
    """Estimate of a session's resident size: the model file plus external-data files.

    Initializers dominate an ONNX model's footprint and are stored in these files; ONNX
    Runtime's arena for activations is not counted (it depends on the batch).
    """
    total = path.stat().st_size
    for sibling in path.parent.iterdir():
        if sibling != path and sibling.is_file() and sibling.suffix in {".data", ".bin", ".weights"}:
            total += sibling.stat().st_size
    return total
