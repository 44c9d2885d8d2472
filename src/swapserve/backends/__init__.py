"""Backends: load a model version onto a device, run a batch, report memory.

``backend_class(platform_or_backend)`` picks the implementation for a config's
``platform`` ("pytorch_libtorch", "onnxruntime_onnx") or Triton ``backend`` name
("pytorch", "onnxruntime"). The ONNX Runtime backend imports ``onnxruntime`` only when
a model is loaded, so the extra stays optional.
"""
from __future__ import annotations

from swapserve import errors
from swapserve.backends.base import Backend
from swapserve.backends.device import device_free_bytes, resolve_device
from swapserve.backends.onnx import OnnxRuntimeBackend
from swapserve.backends.torchscript import TorchScriptBackend

__all__ = [
    "Backend",
    "OnnxRuntimeBackend",
    "TorchScriptBackend",
    "backend_class",
    "device_free_bytes",
    "resolve_device",
]

_BACKENDS: tuple[type[Backend], ...] = (TorchScriptBackend, OnnxRuntimeBackend)


def backend_class(platform_or_backend: str) -> type[Backend]:
    """The backend for a platform or Triton backend name; ConfigError naming the supported ones."""
    key = (platform_or_backend or "").strip()
    for cls in _BACKENDS:
        if key in (cls.platform, cls.backend_name):
            return cls
    supported = ", ".join(f"'{c.platform}' (backend '{c.backend_name}')" for c in _BACKENDS)
    raise errors.ConfigError(
        f"unsupported platform/backend '{platform_or_backend}'; supported: {supported}"
    )
