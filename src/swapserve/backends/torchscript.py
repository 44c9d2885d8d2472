"""TorchScript backend (platform ``pytorch_libtorch``, Triton backend ``pytorch``).

Loads ``model.pt`` with ``torch.jit.load(map_location=device)``, puts it in eval mode and
runs batches under ``torch.inference_mode()``. It never calls ``torch.set_num_threads``:
the server owns the thread budget.

How config tensors bind to the model (the rule of Triton's PyTorch backend):

Inputs, decided per input, in this order:
  1. an input whose config name equals a ``forward()`` argument name binds to that
     argument (``forward(self, INPUT0, INPUT1)`` with inputs INPUT0, INPUT1);
  2. otherwise a ``NAME__<i>`` suffix binds it to positional argument ``i``
     (``INPUT__0``, ``INPUT__1``);
  3. otherwise it takes the next argument not bound by 1 or 2, in config order.
  Two inputs on the same argument, an index past the last argument, or a ``forward()``
  argument without a default that no input binds are ``ConfigError`` at load.

Outputs, from what ``forward()`` returns:
  - a single tensor -> the single config output (more than one output: error);
  - a tuple or list -> output ``NAME__<i>`` takes element ``i``; an output without the
    suffix takes the element at its position in the config's output list;
  - a ``Dict[str, Tensor]`` -> each output takes the entry under its config name.

Tensors cross between numpy and torch without copies where possible
(``torch.from_numpy``; BF16 arrives as uint16 bits and is reinterpreted through an int16
view as ``torch.bfloat16``). Read-only arrays (straight off the wire) are copied first:
torch has no read-only tensors and a model that writes to its input in place must not
write into a request buffer. Results come back with ``.cpu().numpy()``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swapserve import dtypes, errors
from swapserve.backends import base
from swapserve.types import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

_INDEXED = re.compile(r"^.+__(\d+)$")

#: Wire datatype -> torch dtype. BYTES has no tensor form and is refused at load.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
# Unsigned 16/32/64-bit tensors exist from torch 2.3 on (as "shell" dtypes: they move,
# view and copy; most math kernels are missing, which then surfaces as the model's error).
for _wire, _attr in (("UINT16", "uint16"), ("UINT32", "uint32"), ("UINT64", "uint64")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_wire] = getattr(torch, _attr)


def _index_suffix(name: str) -> int | None:
    m = _INDEXED.match(name)
    return int(m.group(1)) if m else None


# The line where the model's own error starts, after TorchScript's interpreter traceback.
_ERROR_LINE = re.compile(r"(?:^|\n)(?:builtins\.)?[A-Za-z_][\w.]*(?:Error|Exception): ")


def _model_message(exc: BaseException) -> str:
    """The model's own message (``ValueError: ...``), without TorchScript's traceback.

    The full traceback names source files and is logged at debug level, never returned.
    """
    text = str(exc).strip()
    if "TorchScript" in text and "Traceback" in text:
        tail = list(_ERROR_LINE.finditer(text))
        if tail:
            return text[tail[-1].start():].strip().removeprefix("builtins.")
    return f"{type(exc).__name__}: {text}"


class TorchScriptBackend(base.Backend):
    platform = "pytorch_libtorch"
    backend_name = "pytorch"
    default_filename = "model.pt"

    def __init__(
        self,
        spec: ModelSpec,
        module: torch.jit.ScriptModule,
        device: str,
        where: str,
        input_args: dict[str, str],
        output_index: dict[str, int],
        nbytes: int,
    ) -> None:
        self._spec = spec
        self._module: torch.jit.ScriptModule | None = module
        #: ``module.forward``, looked up once: a ScriptModule's attribute lookup goes through its
        #: Python ``__getattr__`` and costs more than this model's whole forward pass.
        self._forward: Any = module.forward
        self._device = torch.device(device)
        self._where = where
        #: config input name -> forward() argument name
        self._input_args = input_args
        #: config output name -> element index in a returned tuple/list
        self._output_index = output_index
        self._nbytes = nbytes

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, spec: ModelSpec, model_file: Path, device: str) -> TorchScriptBackend:
        path = base.check_model_file(spec, model_file)
        where = f"model '{spec.name}' version {path.parent.name}"
        for t in (*spec.inputs, *spec.outputs):
            if t.datatype not in TORCH_DTYPES:
                raise errors.ConfigError(
                    f"{where}: tensor '{t.name}' has datatype {dtypes.to_config(t.datatype)}, "
                    f"which the TorchScript backend does not support (torch {torch.__version__}); "
                    f"supported: {', '.join(dtypes.to_config(w) for w in TORCH_DTYPES)}"
                )
        try:
            module = torch.jit.load(str(path), map_location=torch.device(device))  # type: ignore[no-untyped-call]
        except Exception as e:  # torch raises RuntimeError/ValueError/zipfile errors alike
            raise errors.VersionNotReady(
                f"{where}: cannot load {path} as TorchScript ({_model_message(e)}); "
                "export the model with torch.jit.script/trace and torch.jit.save"
            ) from e
        module.eval()
        try:
            schema = module.forward.schema
        except Exception as e:
            raise errors.ConfigError(f"{where}: {path} has no forward() method") from e
        args = list(schema.arguments)[1:]  # drop self
        input_args = cls._bind_inputs(spec, where, path, args)
        output_index = cls._bind_outputs(spec, where, path, schema)
        return cls(spec, module, device, where, input_args, output_index, _module_bytes(module))

    @staticmethod
    def _bind_inputs(spec: ModelSpec, where: str, path: Path, args: list[Any]) -> dict[str, str]:
        names = [a.name for a in args]
        described = f"forward({', '.join(names)})"
        bound: dict[str, int] = {}
        taken: dict[int, str] = {}

        def bind(inp: str, pos: int) -> None:
            if pos >= len(args):
                raise errors.ConfigError(
                    f"{where}: input '{inp}' maps to argument {pos} but {path.name} has "
                    f"{described} ({len(args)} argument(s))"
                )
            if pos in taken:
                raise errors.ConfigError(
                    f"{where}: inputs '{taken[pos]}' and '{inp}' both map to argument "
                    f"'{names[pos]}' of {described}"
                )
            bound[inp], taken[pos] = pos, inp

        pending: list[str] = []
        for t in spec.inputs:
            if t.name in names:
                bind(t.name, names.index(t.name))
        for t in spec.inputs:
            if t.name in bound:
                continue
            idx = _index_suffix(t.name)
            if idx is not None:
                bind(t.name, idx)
            else:
                pending.append(t.name)
        free = (i for i in range(len(args)) if i not in taken)
        for name in pending:
            pos = next(free, len(args))
            bind(name, pos)
        unbound = [
            names[i] for i in range(len(args)) if i not in taken and not args[i].has_default_value()
        ]
        if unbound:
            raise errors.ConfigError(
                f"{where}: {path.name} has {described} but no config input binds "
                f"argument(s) {unbound}; config inputs: {[t.name for t in spec.inputs]}"
            )
        return {inp: names[pos] for inp, pos in bound.items()}

    @staticmethod
    def _bind_outputs(spec: ModelSpec, where: str, path: Path, schema: Any) -> dict[str, int]:
        index: dict[str, int] = {}
        owner: dict[int, str] = {}
        for pos, t in enumerate(spec.outputs):
            idx = _index_suffix(t.name)
            i = pos if idx is None else idx
            if i in owner:
                raise errors.ConfigError(
                    f"{where}: outputs '{owner[i]}' and '{t.name}' both map to returned element {i}"
                )
            index[t.name], owner[i] = i, t.name
        returns = list(schema.returns)
        rtype = returns[0].type if len(returns) == 1 else None
        if isinstance(rtype, torch.TensorType) and len(spec.outputs) != 1:
            raise errors.ConfigError(
                f"{where}: {path.name} returns a single tensor but config.pbtxt declares "
                f"{len(spec.outputs)} outputs {[t.name for t in spec.outputs]}"
            )
        if isinstance(rtype, torch.TupleType):
            n = len(rtype.elements())
            beyond = [name for name, i in index.items() if i >= n]
            if beyond:
                raise errors.ConfigError(
                    f"{where}: {path.name} returns a tuple of {n} but output(s) {beyond} map "
                    "past its end"
                )
        return index

    # ------------------------------------------------------------------ infer
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        forward = self._forward
        if forward is None:
            raise errors.VersionNotReady(f"{self._where} is unloaded")
        spec = self._spec  # validated inputs (swapserve.dataplane.validation): names, dtypes and shapes hold
        batch = base.batch_size(spec, inputs)
        kwargs: dict[str, torch.Tensor] = {}
        for t in spec.inputs:
            arr = inputs.get(t.name)
            if arr is not None:
                kwargs[self._input_args[t.name]] = self._to_torch(t, arr)
        try:
            with torch.inference_mode():
                result = forward(**kwargs)  # a ScriptModule has no hooks for __call__ to run
        except Exception as e:
            log.debug("%s raised", self._where, exc_info=True)
            raise errors.ModelExecutionError(f"{self._where} failed: {_model_message(e)}") from e
        return {t.name: self._from_torch(t, self._pick(t, result), batch) for t in spec.outputs}

    def _to_torch(self, t: TensorSpec, arr: np.ndarray) -> torch.Tensor:
        arr = base.to_model_shape(self._spec, t, arr)
        if not arr.flags.writeable or any(s < 0 for s in arr.strides):
            arr = np.array(arr, copy=True)
        if t.datatype == "BF16":
            tensor = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(arr)
        if self._device.type != "cpu":
            tensor = tensor.to(self._device, non_blocking=False)
        return tensor

    def _pick(self, t: TensorSpec, result: Any) -> Any:
        if isinstance(result, dict):
            if t.name not in result:
                raise errors.InvalidInput(
                    f"{self._where}: the model returned a dict without output '{t.name}' "
                    f"(keys: {sorted(result)})"
                )
            return result[t.name]
        if isinstance(result, (tuple, list)):
            i = self._output_index[t.name]
            if i >= len(result):
                raise errors.InvalidInput(
                    f"{self._where}: output '{t.name}' maps to returned element {i} but the "
                    f"model returned {len(result)} element(s)"
                )
            return result[i]
        if len(self._spec.outputs) != 1:
            raise errors.InvalidInput(
                f"{self._where}: the model returned one {type(result).__name__} but config.pbtxt "
                f"declares outputs {[o.name for o in self._spec.outputs]}"
            )
        return result

    def _from_torch(self, t: TensorSpec, value: Any, batch: int | None) -> np.ndarray:
        if not isinstance(value, torch.Tensor):
            raise errors.InvalidInput(
                f"{self._where}: output '{t.name}' is a {type(value).__name__}, not a tensor"
            )
        want = TORCH_DTYPES[t.datatype]
        if value.dtype != want:
            raise errors.InvalidInput(
                f"{self._where}: output '{t.name}' has dtype {value.dtype} but config.pbtxt "
                f"declares {dtypes.to_config(t.datatype)} ({want}); fix the config or the model"
            )
        value = value.cpu()
        if t.datatype == "BF16":
            arr = value.view(torch.int16).numpy().view(np.uint16)
        else:
            arr = value.numpy()
        return base.from_model_output(self._spec, t, arr, batch)

    # ------------------------------------------------------------------ resources
    def memory_bytes(self) -> int:
        return self._nbytes

    def close(self) -> None:
        if self._module is None:
            return
        self._module = self._forward = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def _module_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct storages behind parameters and buffers (shared weights count once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += storage.nbytes()
    return total
