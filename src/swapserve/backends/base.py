"""The backend contract: load one model version onto a device, run a batch, report memory.

A backend sees numpy arrays only, keyed by the names in config.pbtxt, in wire dtypes
(``swapserve.dtypes``: BF16 travels as ``uint16`` bit patterns), exactly as
``swapserve.dataplane.validation.validate`` checked them: every required input present (an
``optional`` one may be absent), its configured dtype and shape, one batch size. Backends
trust that and do not check requests again. It owns the
translation to and from its framework, including ``TensorSpec.reshape``, and it checks
what the model produced against the config so that a wrong model fails loudly with the
output's name instead of sending the client a tensor it did not ask for.

Guarantees every backend gives (the lifecycle and batcher rely on them):

- ``load`` either returns a ready backend or raises ``VersionNotReady`` (the file is
  missing or unreadable) / ``ConfigError`` (config and model disagree); it never
  returns a half-loaded object.
- ``infer`` returns exactly one array per config output, with the config's dtype and
  shape ``[batch] + dims`` (``dims`` alone when the model does not batch). A model that
  raises -> ``ModelExecutionError`` carrying the model's own message; a model that
  returns the wrong dtype/shape -> ``InvalidInput`` naming the output. Either fails only
  this batch.
- ``infer`` may be called from several threads at once.
- ``close`` is idempotent; ``infer`` after ``close`` raises ``VersionNotReady``.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from swapserve import dtypes, errors
from swapserve.types import ModelSpec, TensorSpec


class Backend(abc.ABC):
    """One loaded model version on one device."""

    #: config.pbtxt ``platform`` this backend serves ("pytorch_libtorch", ...).
    platform: ClassVar[str]
    #: Triton's ``backend`` name for the same thing ("pytorch", ...).
    backend_name: ClassVar[str]
    #: File looked up in the version directory when the config names none.
    default_filename: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def load(cls, spec: ModelSpec, model_file: Path, device: str) -> Backend:
        """Load ``model_file`` for ``spec`` onto ``device`` (already resolved, see device.py)."""

    @abc.abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; see the module docstring for the contract."""

    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """Resident size of the model on its device (parameters/buffers; best estimate)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the model. Idempotent."""

    @classmethod
    def model_file(cls, spec: ModelSpec, version_dir: Path) -> Path:
        """The model file of a version directory: config ``default_model_filename`` or ours."""
        return Path(version_dir) / (spec.default_model_filename or cls.default_filename)


# --------------------------------------------------------------------------- helpers
# Shared by the concrete backends; not part of the public API.


def check_model_file(spec: ModelSpec, model_file: Path) -> Path:
    """Raise VersionNotReady unless ``model_file`` is an existing regular file."""
    path = Path(model_file)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise errors.VersionNotReady(
            f"model '{spec.name}': model file {path} {what}; "
            f"put the {spec.platform} model there or set default_model_filename in config.pbtxt"
        )
    return path


def model_shape(spec: ModelSpec, tensor: TensorSpec) -> tuple[int, ...]:
    """The shape the model sees for ``tensor``, without the batch dimension."""
    return tensor.reshape if tensor.reshape is not None else tensor.dims


def batch_size(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> int | None:
    """The batch size of validated ``inputs`` (None when the model does not batch)."""
    if not spec.batching:
        return None
    for t in spec.inputs:
        arr = inputs.get(t.name)
        if arr is not None:
            return int(arr.shape[0])
    return None


def to_model_shape(spec: ModelSpec, tensor: TensorSpec, arr: np.ndarray) -> np.ndarray:
    """Apply ``tensor.reshape``: ``[batch] + dims`` -> ``[batch] + reshape`` (a view if possible)."""
    if tensor.reshape is None:
        return arr
    lead = (arr.shape[0],) if spec.batching else ()
    try:
        return arr.reshape(lead + tuple(tensor.reshape))
    except ValueError as e:
        raise errors.InvalidInput(
            f"model '{spec.name}': input '{tensor.name}' of shape {list(arr.shape)} "
            f"cannot be reshaped to {list(lead + tuple(tensor.reshape))}: {e}"
        ) from e


def shape_matches(actual: Sequence[int], expected: Sequence[int]) -> bool:
    """``actual`` matches ``expected`` where -1 in ``expected`` matches any size."""
    return len(actual) == len(expected) and all(e < 0 or a == e for a, e in zip(actual, expected))


def _fmt(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def from_model_output(
    spec: ModelSpec, tensor: TensorSpec, arr: np.ndarray, batch: int | None
) -> np.ndarray:
    """Check one model output against the config and bring it to ``[batch] + dims``.

    ``arr`` is already in wire dtype (BF16 as uint16). Raises InvalidInput naming the
    output when dtype or shape disagree with config.pbtxt.
    """
    want = dtypes.numpy_dtype(tensor.datatype)
    if arr.dtype != want:
        raise errors.InvalidInput(
            f"model '{spec.name}': output '{tensor.name}' has dtype {arr.dtype} but config.pbtxt "
            f"declares {dtypes.to_config(tensor.datatype)}; fix the config or the model"
        )
    lead: tuple[int, ...] = (batch,) if batch is not None else ()
    produced = lead + tuple(model_shape(spec, tensor))
    if not shape_matches(arr.shape, produced):
        raise errors.InvalidInput(
            f"model '{spec.name}': output '{tensor.name}' has shape {_fmt(arr.shape)} but "
            f"config.pbtxt declares {_fmt(produced)}"
            + (" (batch dimension first)" if batch is not None else "")
            + "; fix the config or the model"
        )
    if tensor.reshape is None:
        return arr
    target = lead + tuple(tensor.dims)
    if sum(1 for d in target if d < 0) > 1:
        # Several variable dims: the element count cannot pin them down. Accept the model's
        # shape only if it already fits the declared dims.
        if shape_matches(arr.shape, target):
            return arr
        raise errors.InvalidInput(
            f"model '{spec.name}': output '{tensor.name}' of shape {_fmt(arr.shape)} cannot be "
            f"reshaped to {_fmt(target)} (more than one variable dimension)"
        )
    try:
        return arr.reshape(target)
    except ValueError as e:
        raise errors.InvalidInput(
            f"model '{spec.name}': output '{tensor.name}' of shape {_fmt(arr.shape)} cannot be "
            f"reshaped to config dims {_fmt(target)}"
        ) from e
