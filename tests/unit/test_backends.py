"""Backends: binding rules, dtypes, reshape, errors, ONNX Runtime parity, devices.

Every model here is a tiny module scripted into ``tmp_path``; no sockets, no example
repository needed.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from swapserve import errors
from swapserve.backends import OnnxRuntimeBackend, TorchScriptBackend, backend_class, device_free_bytes, resolve_device
from swapserve.dataplane.validation import validate
from swapserve.types import InferRequest, ModelSpec, Tensor, TensorSpec

# --------------------------------------------------------------------------- helpers


def spec(
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    *,
    max_batch_size: int = 8,
    platform: str = "pytorch_libtorch",
    parameters: dict[str, str] | None = None,
) -> ModelSpec:
    return ModelSpec(
        name="m",
        platform=platform,
        max_batch_size=max_batch_size,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        parameters=dict(parameters or {}),
    )


def t(name: str, datatype: str = "FP32", dims: tuple[int, ...] = (4,), **kw: object) -> TensorSpec:
    return TensorSpec(name, datatype, dims, **kw)  # type: ignore[arg-type]


def save(module: nn.Module, tmp_path: Path) -> Path:
    path = tmp_path / "1" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def load(module: nn.Module, s: ModelSpec, tmp_path: Path) -> TorchScriptBackend:
    backend = TorchScriptBackend.load(s, save(module, tmp_path), "cpu")
    assert isinstance(backend, TorchScriptBackend)
    return backend


def f32(*shape: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(int(np.prod(shape)), dtype=np.float32) + start).reshape(shape)


# --------------------------------------------------------------------------- modules


class Sub(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x - y


class NamedSub(nn.Module):
    def forward(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return a - b


class SumDiff(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + y, x - y


class SumDiffList(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        return [x + y, x - y]


class SumDiffDict(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"diff": x - y, "sum": x + y}


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Negate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logical_not(x)


class WithDefault(nn.Module):
    def forward(self, x: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
        return x * scale


class Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() < 0):
            raise ValueError("inputs must be non-negative, got a negative sum")
        return x


class ToFloat64(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


class Truncate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3]


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 3, "expected [batch, 2, 3]"
        return x.transpose(1, 2).contiguous()


class InPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1.0)
        return x


# --------------------------------------------------------------------------- registry / devices


def test_backend_class_accepts_platform_and_backend_names() -> None:
    assert backend_class("pytorch_libtorch") is TorchScriptBackend
    assert backend_class("pytorch") is TorchScriptBackend
    assert backend_class("onnxruntime_onnx") is OnnxRuntimeBackend
    assert backend_class("onnxruntime") is OnnxRuntimeBackend
    assert TorchScriptBackend.default_filename == "model.pt"
    assert OnnxRuntimeBackend.default_filename == "model.onnx"


def test_backend_class_unknown_names_supported_ones() -> None:
    with pytest.raises(errors.ConfigError) as e:
        backend_class("tensorrt_plan")
    assert "tensorrt_plan" in e.value.message
    assert "pytorch_libtorch" in e.value.message and "onnxruntime_onnx" in e.value.message


def test_model_file_uses_config_filename_or_default(tmp_path: Path) -> None:
    s = spec([t("x")], [t("y")])
    assert TorchScriptBackend.model_file(s, tmp_path / "3") == tmp_path / "3" / "model.pt"
    custom = ModelSpec(**{**s.__dict__, "default_model_filename": "net.pt"})
    assert TorchScriptBackend.model_file(custom, tmp_path / "3") == tmp_path / "3" / "net.pt"


@pytest.mark.skipif(torch.cuda.is_available(), reason="expects a host without a GPU")
def test_resolve_device_without_gpu() -> None:
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("CPU") == "cpu"
    for pref in ("cuda", "cuda:0"):
        with pytest.raises(errors.ConfigError, match="no CUDA GPU"):
            resolve_device(pref)


def test_resolve_device_rejects_nonsense() -> None:
    with pytest.raises(errors.ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_device_free_bytes_cpu() -> None:
    assert device_free_bytes("cpu") > 0


# --------------------------------------------------------------------------- input binding


def test_inputs_bind_to_forward_argument_names(tmp_path: Path) -> None:
    # forward(b, a) returns a - b; the config lists a first.
    b = load(NamedSub(), spec([t("a"), t("b")], [t("out")]), tmp_path)
    out = b.infer({"a": f32(2, 4, start=10), "b": f32(2, 4)})
    np.testing.assert_array_equal(out["out"], np.full((2, 4), 10, np.float32))


def test_inputs_bind_by_index_suffix(tmp_path: Path) -> None:
    # INPUT__0 -> x, INPUT__1 -> y whatever the config order.
    b = load(Sub(), spec([t("INPUT__1"), t("INPUT__0")], [t("OUTPUT__0")]), tmp_path)
    out = b.infer({"INPUT__0": f32(2, 4, start=5), "INPUT__1": f32(2, 4)})
    np.testing.assert_array_equal(out["OUTPUT__0"], np.full((2, 4), 5, np.float32))


def test_inputs_bind_in_config_order_otherwise(tmp_path: Path) -> None:
    b = load(Sub(), spec([t("first"), t("second")], [t("out")]), tmp_path)
    out = b.infer({"second": f32(1, 4), "first": f32(1, 4, start=7)})
    np.testing.assert_array_equal(out["out"], np.full((1, 4), 7, np.float32))


def test_name_binding_takes_precedence_and_the_rest_fill_in_order(tmp_path: Path) -> None:
    # "y" binds by name to argument 1, so "other" fills argument 0 (x).
    b = load(Sub(), spec([t("y"), t("other")], [t("out")]), tmp_path)
    out = b.infer({"other": f32(1, 4, start=3), "y": f32(1, 4)})
    np.testing.assert_array_equal(out["out"], np.full((1, 4), 3, np.float32))


def test_argument_with_default_may_stay_unbound(tmp_path: Path) -> None:
    b = load(WithDefault(), spec([t("x")], [t("y")]), tmp_path)
    np.testing.assert_array_equal(b.infer({"x": f32(1, 4)})["y"], f32(1, 4) * 3)


def test_unbound_required_argument_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match=r"forward\(x, y\).*\['y'\]"):
        load(Sub(), spec([t("x")], [t("out")]), tmp_path)


def test_index_past_the_last_argument_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="INPUT__5"):
        load(Sub(), spec([t("INPUT__0"), t("INPUT__5")], [t("out")]), tmp_path)


def test_two_inputs_on_one_argument_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="both map to argument"):
        load(Sub(), spec([t("x"), t("IN__0")], [t("out")]), tmp_path)


# --------------------------------------------------------------------------- output binding


def test_tuple_outputs_in_config_order(tmp_path: Path) -> None:
    b = load(SumDiff(), spec([t("x"), t("y")], [t("sum"), t("diff")]), tmp_path)
    out = b.infer({"x": f32(2, 4, start=3), "y": f32(2, 4)})
    np.testing.assert_array_equal(out["sum"], f32(2, 4, start=3) + f32(2, 4))
    np.testing.assert_array_equal(out["diff"], np.full((2, 4), 3, np.float32))


def test_tuple_outputs_by_index_suffix(tmp_path: Path) -> None:
    b = load(SumDiff(), spec([t("x"), t("y")], [t("OUT__1"), t("OUT__0")]), tmp_path)
    out = b.infer({"x": f32(1, 4, start=3), "y": f32(1, 4)})
    np.testing.assert_array_equal(out["OUT__1"], np.full((1, 4), 3, np.float32))
    np.testing.assert_array_equal(out["OUT__0"], f32(1, 4, start=3) + f32(1, 4))


def test_list_outputs(tmp_path: Path) -> None:
    b = load(SumDiffList(), spec([t("x"), t("y")], [t("sum"), t("diff")]), tmp_path)
    out = b.infer({"x": f32(1, 4, start=1), "y": f32(1, 4)})
    np.testing.assert_array_equal(out["diff"], np.ones((1, 4), np.float32))


def test_dict_outputs_by_key(tmp_path: Path) -> None:
    b = load(SumDiffDict(), spec([t("x"), t("y")], [t("sum"), t("diff")]), tmp_path)
    out = b.infer({"x": f32(1, 4, start=2), "y": f32(1, 4)})
    np.testing.assert_array_equal(out["diff"], np.full((1, 4), 2, np.float32))
    np.testing.assert_array_equal(out["sum"], f32(1, 4, start=2) + f32(1, 4))


def test_dict_without_a_configured_key_names_it(tmp_path: Path) -> None:
    b = load(SumDiffDict(), spec([t("x"), t("y")], [t("sum"), t("product")]), tmp_path)
    with pytest.raises(errors.InvalidInput, match="'product'"):
        b.infer({"x": f32(1, 4), "y": f32(1, 4)})


def test_single_tensor_to_single_output(tmp_path: Path) -> None:
    b = load(Double(), spec([t("x")], [t("whatever")]), tmp_path)
    np.testing.assert_array_equal(b.infer({"x": f32(3, 4)})["whatever"], f32(3, 4) * 2)


def test_single_tensor_with_two_outputs_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="single tensor"):
        load(Double(), spec([t("x")], [t("a"), t("b")]), tmp_path)


def test_tuple_too_short_for_outputs_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="OUT__2"):
        load(SumDiff(), spec([t("x"), t("y")], [t("OUT__0"), t("OUT__2")]), tmp_path)


# --------------------------------------------------------------------------- dtypes

_ROUND_TRIP = {
    "BOOL": np.array([[True, False, True, False]]),
    "UINT8": np.array([[0, 1, 200, 255]], np.uint8),
    "INT8": np.array([[-128, -1, 0, 127]], np.int8),
    "INT16": np.array([[-32768, -1, 0, 32767]], np.int16),
    "INT32": np.array([[-(2**31), -1, 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), -1, 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504.0, np.inf]], np.float16),
    "FP32": np.array([[-1.5, 0.0, 3.4e38, np.nan]], np.float32),
    "FP64": np.array([[-1.5, 0.0, 1e300, -np.inf]], np.float64),
    # bfloat16 bit patterns of 1.0, -2.0, 0.5, 3.0
    "BF16": np.array([[0x3F80, 0xC000, 0x3F00, 0x4040]], np.uint16),
    "UINT16": np.array([[0, 1, 40000, 65535]], np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1, 7]], np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1, 7]], np.uint64),
}


@pytest.mark.parametrize("datatype", sorted(_ROUND_TRIP))
def test_dtype_round_trip(datatype: str, tmp_path: Path) -> None:
    b = load(Identity(), spec([t("x", datatype)], [t("y", datatype)]), tmp_path)
    x = _ROUND_TRIP[datatype]
    y = b.infer({"x": x})["y"]
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_bf16_is_bfloat16_inside_the_model(tmp_path: Path) -> None:
    b = load(Double(), spec([t("x", "BF16")], [t("y", "BF16")]), tmp_path)
    bits = _ROUND_TRIP["BF16"]
    y = b.infer({"x": bits})["y"]
    assert y.dtype == np.uint16
    as_f32 = (y.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(as_f32, [[2.0, -4.0, 1.0, 6.0]])


def test_fp16_and_bool_math(tmp_path: Path) -> None:
    half = load(Double(), spec([t("x", "FP16")], [t("y", "FP16")]), tmp_path / "h")
    np.testing.assert_array_equal(
        half.infer({"x": np.array([[0.5, 1, 2, -3]], np.float16)})["y"],
        np.array([[1, 2, 4, -6]], np.float16),
    )
    flags = load(Negate(), spec([t("x", "BOOL")], [t("y", "BOOL")]), tmp_path / "b")
    np.testing.assert_array_equal(
        flags.infer({"x": np.array([[True, False, False, True]])})["y"], [[False, True, True, False]]
    )


def test_read_only_wire_buffers_are_accepted_and_not_written(tmp_path: Path) -> None:
    # Arrays decoded from a request are read-only views of its bytes; torch would warn
    # (and a model writing in place would corrupt the request) without a copy.
    raw = f32(2, 4).tobytes()
    x = np.frombuffer(raw, np.float32).reshape(2, 4)
    assert not x.flags.writeable
    b = load(InPlace(), spec([t("x")], [t("y")]), tmp_path)
    np.testing.assert_array_equal(b.infer({"x": x})["y"], f32(2, 4) + 1)
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(2, 4), f32(2, 4))


def test_input_of_the_wrong_dtype_is_invalid_input(tmp_path: Path) -> None:
    # Refused by the one validator, before any backend sees it (backends trust its output).
    s = spec([t("x", "FP32")], [t("y", "FP32")])
    with pytest.raises(errors.InvalidInput, match="'x'"):
        validate(s, 1, InferRequest(s.name, inputs=[Tensor("x", "FP32", (1, 4), np.zeros((1, 4), np.float64))]))


def test_bytes_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="TYPE_STRING"):
        load(Identity(), spec([t("x", "BYTES")], [t("y", "BYTES")]), tmp_path)


# --------------------------------------------------------------------------- shapes


def test_reshape_both_ways(tmp_path: Path) -> None:
    # The client sends [batch, 6]; the model sees [batch, 2, 3] and returns
    # [batch, 3, 2], which goes back to the client as [batch, 6].
    s = spec([t("x", dims=(6,), reshape=(2, 3))], [t("y", dims=(6,), reshape=(3, 2))])
    b = load(Transpose(), s, tmp_path)
    x = f32(2, 6)
    y = b.infer({"x": x})["y"]
    assert y.shape == (2, 6)
    np.testing.assert_array_equal(y, x.reshape(2, 2, 3).transpose(0, 2, 1).reshape(2, 6))


def test_non_batching_model_has_no_batch_dimension(tmp_path: Path) -> None:
    b = load(Double(), spec([t("x", dims=(2, 3))], [t("y", dims=(2, 3))], max_batch_size=0), tmp_path)
    np.testing.assert_array_equal(b.infer({"x": f32(2, 3)})["y"], f32(2, 3) * 2)


def test_variable_dims_accept_any_size(tmp_path: Path) -> None:
    b = load(Double(), spec([t("x", dims=(-1,))], [t("y", dims=(-1,))]), tmp_path)
    assert b.infer({"x": f32(3, 7)})["y"].shape == (3, 7)


def test_output_of_wrong_dtype_is_invalid_input_naming_it(tmp_path: Path) -> None:
    b = load(ToFloat64(), spec([t("x")], [t("scores")]), tmp_path)
    with pytest.raises(errors.InvalidInput, match=r"output 'scores'.*torch.float64.*TYPE_FP32"):
        b.infer({"x": f32(1, 4)})


def test_output_of_wrong_shape_is_invalid_input_naming_it(tmp_path: Path) -> None:
    b = load(Truncate(), spec([t("x")], [t("scores")]), tmp_path)
    with pytest.raises(errors.InvalidInput, match=r"output 'scores' has shape \[2, 3\].*\[2, 4\]"):
        b.infer({"x": f32(2, 4)})


# --------------------------------------------------------------------------- failures


def test_model_exception_is_model_execution_error_with_its_message(tmp_path: Path) -> None:
    b = load(Raises(), spec([t("x")], [t("y")]), tmp_path)
    with pytest.raises(errors.ModelExecutionError) as e:
        b.infer({"x": -f32(1, 4, start=1)})
    assert "inputs must be non-negative, got a negative sum" in e.value.message
    assert "model 'm' version 1" in e.value.message
    assert "Traceback" not in e.value.message
    # The failure is per batch: the next good batch runs.
    np.testing.assert_array_equal(b.infer({"x": f32(1, 4)})["y"], f32(1, 4))


def test_torch_op_failure_keeps_only_the_error_line(tmp_path: Path) -> None:
    path = tmp_path / "1" / "model.pt"
    path.parent.mkdir()
    traced = torch.jit.trace(nn.Linear(4, 2), torch.zeros(1, 4))  # type: ignore[no-untyped-call]
    torch.jit.save(traced, str(path))
    s = spec([t("input", dims=(-1,))], [t("y", dims=(2,))])
    b = TorchScriptBackend.load(s, path, "cpu")
    with pytest.raises(errors.ModelExecutionError) as e:
        b.infer({"input": np.zeros((2, 3), np.float32)})
    assert e.value.message.startswith("model 'm' version 1 failed: RuntimeError: mat1 and mat2")
    assert "Traceback" not in e.value.message and ".py" not in e.value.message


def test_missing_model_file_names_it(tmp_path: Path) -> None:
    s = spec([t("x")], [t("y")])
    missing = tmp_path / "1" / "model.pt"
    with pytest.raises(errors.VersionNotReady, match=r"model 'm'.*model\.pt does not exist"):
        TorchScriptBackend.load(s, missing, "cpu")


def test_corrupt_model_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "1" / "model.pt"
    path.parent.mkdir()
    path.write_bytes(b"this is not a torchscript archive")
    with pytest.raises(errors.VersionNotReady, match=r"cannot load .*model\.pt as TorchScript"):
        TorchScriptBackend.load(spec([t("x")], [t("y")]), path, "cpu")


def test_state_dict_instead_of_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "1" / "model.pt"
    path.parent.mkdir()
    torch.save(nn.Linear(4, 4).state_dict(), str(path))
    with pytest.raises(errors.VersionNotReady, match="torch.jit.save"):
        TorchScriptBackend.load(spec([t("x")], [t("y")]), path, "cpu")


def test_memory_bytes_and_close(tmp_path: Path) -> None:
    b = load(nn.Linear(64, 10), spec([t("input", dims=(64,))], [t("y", dims=(10,))]), tmp_path)
    assert b.memory_bytes() == (64 * 10 + 10) * 4
    assert b.infer({"input": np.zeros((1, 64), np.float32)})["y"].shape == (1, 10)
    b.close()
    b.close()  # idempotent
    with pytest.raises(errors.VersionNotReady, match="unloaded"):
        b.infer({"input": np.zeros((1, 64), np.float32)})


# --------------------------------------------------------------------------- ONNX Runtime


class MLP(nn.Module):
    """Same shape as the digits example: pixels [b, 64] -> probabilities [b, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.out(torch.relu(self.hidden(pixels))), dim=-1)


def _onnx_mlp(net: MLP, path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str, p: torch.Tensor) -> Any:
        return numpy_helper.from_array(p.detach().numpy(), name)

    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["pixels", "w1", "b1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], transB=1),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            init("w1", net.hidden.weight), init("b1", net.hidden.bias),
            init("w2", net.out.weight), init("b2", net.out.bias),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def onnx_spec(**kw: object) -> ModelSpec:
    return spec(
        [t("pixels", dims=(64,))], [t("probabilities", dims=(10,))],
        platform="onnxruntime_onnx", max_batch_size=64, **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def mlp() -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MLP().eval()


def test_onnx_matches_torchscript(tmp_path: Path, mlp: MLP) -> None:
    pytest.importorskip("onnxruntime")
    s_pt = spec([t("pixels", dims=(64,))], [t("probabilities", dims=(10,))], max_batch_size=64)
    pt = TorchScriptBackend.load(s_pt, save(mlp, tmp_path / "pt"), "cpu")
    ort = OnnxRuntimeBackend.load(onnx_spec(), _onnx_mlp(mlp, tmp_path / "onnx" / "1" / "model.onnx"), "cpu")
    x = np.random.default_rng(0).random((33, 64), dtype=np.float32)
    p_pt, p_ort = pt.infer({"pixels": x})["probabilities"], ort.infer({"pixels": x})["probabilities"]
    assert p_ort.dtype == np.float32 and p_ort.shape == (33, 10)
    np.testing.assert_allclose(p_ort, p_pt, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(p_ort.argmax(1), p_pt.argmax(1))
    assert ort.memory_bytes() >= (64 * 16 + 16 + 16 * 10 + 10) * 4
    ort.close()
    with pytest.raises(errors.VersionNotReady):
        ort.infer({"pixels": x})


def test_onnx_thread_parameter(tmp_path: Path, mlp: MLP) -> None:
    pytest.importorskip("onnxruntime")
    path = _onnx_mlp(mlp, tmp_path / "1" / "model.onnx")
    two = OnnxRuntimeBackend.load(onnx_spec(parameters={"intra_op_thread_count": "2"}), path, "cpu")
    assert two.infer({"pixels": np.zeros((2, 64), np.float32)})["probabilities"].shape == (2, 10)
    with pytest.raises(errors.ConfigError, match="intra_op_thread_count.*'lots'"):
        OnnxRuntimeBackend.load(onnx_spec(parameters={"intra_op_thread_count": "lots"}), path, "cpu")


def test_onnx_config_names_must_exist_in_model(tmp_path: Path, mlp: MLP) -> None:
    pytest.importorskip("onnxruntime")
    path = _onnx_mlp(mlp, tmp_path / "1" / "model.onnx")
    s = spec([t("image", dims=(64,))], [t("probabilities", dims=(10,))], platform="onnxruntime_onnx")
    with pytest.raises(errors.ConfigError, match=r"\['image'\].*pixels"):
        OnnxRuntimeBackend.load(s, path, "cpu")


def test_onnx_config_type_and_shape_must_match(tmp_path: Path, mlp: MLP) -> None:
    pytest.importorskip("onnxruntime")
    path = _onnx_mlp(mlp, tmp_path / "1" / "model.onnx")
    wrong_type = spec([t("pixels", "FP64", (64,))], [t("probabilities", dims=(10,))], platform="onnxruntime_onnx")
    with pytest.raises(errors.ConfigError, match="'pixels' is TYPE_FP64.*tensor\\(float\\)"):
        OnnxRuntimeBackend.load(wrong_type, path, "cpu")
    wrong_shape = spec([t("pixels", dims=(32,))], [t("probabilities", dims=(10,))], platform="onnxruntime_onnx")
    with pytest.raises(errors.ConfigError, match="'pixels' has shape"):
        OnnxRuntimeBackend.load(wrong_shape, path, "cpu")


def test_onnx_runtime_failure_is_model_execution_error(tmp_path: Path, mlp: MLP) -> None:
    pytest.importorskip("onnxruntime")
    s = spec([t("pixels", dims=(-1,))], [t("probabilities", dims=(10,))],
             platform="onnxruntime_onnx", max_batch_size=64)
    b = OnnxRuntimeBackend.load(s, _onnx_mlp(mlp, tmp_path / "1" / "model.onnx"), "cpu")
    with pytest.raises(errors.ModelExecutionError, match="model 'm' version 1 failed"):
        b.infer({"pixels": np.zeros((2, 63), np.float32)})


def test_onnx_corrupt_and_missing_files(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = tmp_path / "1" / "model.onnx"
    with pytest.raises(errors.VersionNotReady, match="does not exist"):
        OnnxRuntimeBackend.load(onnx_spec(), path, "cpu")
    path.parent.mkdir()
    path.write_bytes(b"\x00garbage")
    with pytest.raises(errors.VersionNotReady, match=r"cannot load .*model\.onnx"):
        OnnxRuntimeBackend.load(onnx_spec(), path, "cpu")


def test_onnx_bf16_is_refused(tmp_path: Path, mlp: MLP) -> None:
    path = tmp_path / "1" / "model.onnx"
    s = spec([t("pixels", "BF16", (64,))], [t("probabilities", dims=(10,))], platform="onnxruntime_onnx")
    with pytest.raises(errors.ConfigError, match="TYPE_BF16"):
        OnnxRuntimeBackend.load(s, _onnx_mlp(mlp, path), "cpu")


def test_onnx_without_onnxruntime_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(errors.ConfigError, match=r"swapserve\[onnx\]"):
        OnnxRuntimeBackend.load(onnx_spec(), tmp_path / "1" / "model.onnx", "cpu")
