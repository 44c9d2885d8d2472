"""The one request validator (swapserve.dataplane.validation), and a version that trusts it end to end.

Config ``optional`` inputs are honoured as in Triton: a request may leave them out, and such a
request never shares a batch with requests that carry them.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

from swapserve.backends.torchscript import TorchScriptBackend
from swapserve.dataplane.validation import validate
from swapserve.errors import InvalidInput
from swapserve.lifecycle.runtime import VersionRuntime
from swapserve.native import Batcher
from swapserve.telemetry.metrics import Metrics
from swapserve.types import DynamicBatching, InferRequest, ModelSpec, Tensor, TensorSpec

SPEC = ModelSpec(name="m", platform="pytorch_libtorch", max_batch_size=8,
                 inputs=(TensorSpec("x", "FP32", (4,)), TensorSpec("bias", "FP32", (4,), optional=True)),
                 outputs=(TensorSpec("y", "FP32", (4,)),))


def req(*tensors: Tensor, outputs: list[str] | None = None) -> InferRequest:
    return InferRequest("m", inputs=list(tensors), outputs=outputs)


def x(rows: int = 1, value: float = 1.0, name: str = "x") -> Tensor:
    return Tensor(name, "FP32", (rows, 4), np.full(rows * 4, value, np.float32))


def test_an_optional_input_may_be_left_out() -> None:
    arrays, rows = validate(SPEC, 1, req(x(3)))
    assert rows == 3 and arrays[1] is None and arrays[0] is not None and arrays[0].shape == (3, 4)
    arrays, rows = validate(SPEC, 1, req(x(2, name="bias"), x(2)))  # config order, whatever the request's
    assert rows == 2 and [a.shape for a in arrays if a is not None] == [(2, 4), (2, 4)]


@pytest.mark.parametrize(("request_", "message"), [
    (req(x(name="bias")), r"missing input\(s\) \['x'\]; the model's inputs are \['x', 'bias'\]"),
    (req(x(), x(name="z")), r"unexpected input 'z'"),
    (req(x(), x()), r"input 'x' appears twice"),
    (req(Tensor("x", "FP64", (1, 4), np.zeros(4))), r"datatype FP64, expected FP32"),
    (req(Tensor("x", "FP32", (1, 4), np.zeros(4))), r"'x' holds float64 data"),
    (req(x(9)), r"exceeds max_batch_size 8"),
    (req(x(2), x(3, name="bias")), r"disagree on the batch size \(2 vs 3"),
    (req(Tensor("x", "FP32", (1, 4), np.zeros(3, np.float32))), r"carries 3 elements"),
    (req(x(), outputs=["nope"]), r"unknown requested output\(s\) \['nope'\]"),
    (req(x(), outputs=["y", "y", "y"]), r"requested output\(s\) \['y'\] appear more than once; request each output once"),
])
def test_bad_requests_name_the_model_input_and_fix(request_: InferRequest, message: str) -> None:
    with pytest.raises(InvalidInput, match=rf"^model 'm' version 1: .*{message}"):
        validate(SPEC, 1, request_)


class AddBias(nn.Module):
    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP007
        if bias is None:
            return x * 10
        return x + bias


def test_requests_with_and_without_an_optional_input_are_answered_right(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", platform="pytorch_libtorch", max_batch_size=8, inputs=SPEC.inputs,
                     outputs=SPEC.outputs, dynamic_batching=DynamicBatching(max_queue_delay_us=2000),
                     parameters={"swapserve.execution": "thread"})
    path = tmp_path / "1" / "model.pt"
    path.parent.mkdir()
    torch.jit.script(AddBias()).save(str(path))
    backend = TorchScriptBackend.load(spec, path, "cpu")
    runtime = VersionRuntime(spec, 1, path, backend, lambda *a: Batcher(*a), Metrics())
    runtime.start()

    async def one(i: int) -> None:
        with_bias = i % 2 == 0
        tensors = (x(1, float(i)), x(1, 0.5, name="bias")) if with_bias else (x(1, float(i)),)
        arrays, rows = validate(spec, 1, req(*tensors))
        outputs, _ = await runtime.infer(arrays, rows)
        want = i + 0.5 if with_bias else i * 10.0
        np.testing.assert_array_equal(outputs["y"], np.full((1, 4), want, np.float32))

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(40)))

    try:
        asyncio.run(main())
    finally:
        runtime.close()
