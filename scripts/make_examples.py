#!/usr/bin/env python
"""Build the example models of ``model_repository/`` (weights are not committed).

    python scripts/make_examples.py --out model_repository
    python scripts/make_examples.py --out /tmp/repo --models simple,digits

Writes, under ``DIR/<model>/``: the version directories with the model file and a
``reference.npz`` (inputs and the outputs this build produced, keyed by the config's
tensor names, with the batch dimension: for ``digits`` and ``digits_onnx`` a seeded sample
of 1000 training rows, which drift monitoring uses as the version's reference profile;
a few rows for the others), plus ``DIR/digits/holdout.npz``
(``x`` float32 [n, 64], ``y`` int64 [n], ``slice`` str [n]: the digit group "round"
{0,6,8,9}, "straight" {1,4,7} or "curved" {2,3,5}). When ``DIR`` is not the repository's
own ``model_repository/``, each model's committed ``config.pbtxt`` is copied there too.

Everything is seeded and trained on one thread, so two runs give identical weights,
accuracies and predictions. Models are exported with ``torch.jit.trace`` (no source
access needed, so the functions here work when this file is imported by path).

Models:
  simple       TorchScript, INPUT0/INPUT1 INT32 [16] -> OUTPUT0 = sum, OUTPUT1 = difference
  digits       TorchScript MLP on sklearn's 8x8 digits; v1 weak (~88%), v2 strong (~97%)
  convnet      TorchScript CNN + dense head, image FP32 [1,32,32] -> logits FP32 [10], random
               init, ~2.3 ms per image alone but ~0.5 ms per image in a batch of 32 on one
               thread: the batching benchmark model
  digits_onnx  digits v2 as ONNX (built with onnx.helper from the same weights)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

#: The repository's committed configs live here.
REPO_MODELS = Path(__file__).resolve().parent.parent / "model_repository"
MODELS: tuple[str, ...] = ("simple", "digits", "convnet", "digits_onnx")

SPLIT_SEED = 20240601
HOLDOUT_FRACTION = 0.3
SLICES: dict[int, str] = {
    **{d: "round" for d in (0, 6, 8, 9)},
    **{d: "straight" for d in (1, 4, 7)},
    **{d: "curved" for d in (2, 3, 5)},
}


class DigitsRecipe(NamedTuple):
    """How one digits version is trained.

    (A NamedTuple, not a dataclass: dataclasses need the module in sys.modules, and
    tests may load this file by path.)
    """

    hidden: int
    epochs: int
    lr: float
    seed: int


#: v1 is deliberately weak (tiny bottleneck, short training); v2 is a proper MLP.
DIGITS_VERSIONS: dict[int, DigitsRecipe] = {
    1: DigitsRecipe(hidden=4, epochs=100, lr=0.02, seed=1),
    2: DigitsRecipe(hidden=64, epochs=200, lr=0.01, seed=2),
}


# --------------------------------------------------------------------------- utilities


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch, run on one thread, and restore the caller's RNG and thread count."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _trace(module: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* deprecation notices
        traced: torch.jit.ScriptModule = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
    return traced


def _save(module: torch.jit.ScriptModule, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, str(path))


def _reference(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def _version_dir(out: Path, model: str, version: int) -> Path:
    d = out / model / str(version)
    d.mkdir(parents=True, exist_ok=True)
    return d


def copy_config(out: Path, model: str) -> None:
    """Copy the committed config.pbtxt of ``model`` into ``out`` unless it is the repo itself."""
    src = REPO_MODELS / model / "config.pbtxt"
    dst = out / model / "config.pbtxt"
    if dst.resolve() == src.resolve():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


# --------------------------------------------------------------------------- simple


class AddSub(nn.Module):
    """Triton's ``simple``: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""

    def forward(self, INPUT0: torch.Tensor, INPUT1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
        return INPUT0 + INPUT1, INPUT0 - INPUT1


def build_simple(out: Path) -> dict[str, Any]:
    example = (torch.zeros(1, 16, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32))
    traced = _trace(AddSub(), example)
    vdir = _version_dir(out, "simple", 1)
    _save(traced, vdir / "model.pt")
    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, size=(4, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(4, 16), dtype=np.int32)
    _reference(vdir / "reference.npz", INPUT0=a, INPUT1=b, OUTPUT0=a + b, OUTPUT1=a - b)
    return {"versions": [1]}


# --------------------------------------------------------------------------- digits


class DigitsNet(nn.Module):
    """pixels [batch, 64] in [0, 1] -> probabilities [batch, 10] (softmax)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, hidden)
        self.out = nn.Linear(hidden, 10)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(torch.relu(self.hidden(pixels)))
        return logits

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(pixels), dim=-1)


def digits_data() -> dict[str, np.ndarray]:
    """The fixed train/holdout split of sklearn's bundled digits (features scaled to [0, 1])."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_ho, y_tr, y_ho = train_test_split(
        x, y, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return {
        "x_train": np.ascontiguousarray(x_tr),
        "y_train": np.ascontiguousarray(y_tr),
        "x": np.ascontiguousarray(x_ho),
        "y": np.ascontiguousarray(y_ho),
        "slice": np.array([SLICES[int(d)] for d in y_ho]),
    }


def train_digits(recipe: DigitsRecipe, data: dict[str, np.ndarray] | None = None) -> DigitsNet:
    """Train one digits MLP (full-batch Adam, seeded, one thread: bit-reproducible)."""
    data = data if data is not None else digits_data()
    x = torch.from_numpy(data["x_train"])
    y = torch.from_numpy(data["y_train"])
    with deterministic(recipe.seed):
        net = DigitsNet(recipe.hidden)
        opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
        loss_fn = nn.CrossEntropyLoss()
        net.train()
        for _ in range(recipe.epochs):
            opt.zero_grad()
            loss = loss_fn(net.logits(x), y)
            loss.backward()
            opt.step()
    return net.eval()


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    """Class predictions (argmax) of a torch module or TorchScript file on float32 [n, 64]."""
    if isinstance(model, (str, Path)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.load(str(model), map_location="cpu")  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        probs = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    classes: np.ndarray = probs.argmax(dim=-1).numpy().astype(np.int64)
    return classes


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x) == y).mean())


#: Rows of training inputs kept as a version's drift reference (``reference.npz``).
REFERENCE_ROWS = 1000


def training_sample(data: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """A seeded sample of the training inputs: the reference profile drift monitoring compares with."""
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(data["x_train"][rng.choice(len(data["x_train"]), REFERENCE_ROWS, replace=False)])


def build_digits(out: Path, data: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    data = data if data is not None else digits_data()
    (out / "digits").mkdir(parents=True, exist_ok=True)
    np.savez(out / "digits" / "holdout.npz", x=data["x"], y=data["y"], slice=data["slice"])
    acc: dict[str, float] = {}
    for version, recipe in DIGITS_VERSIONS.items():
        net = train_digits(recipe, data)
        with deterministic(0):
            traced = _trace(net, (torch.from_numpy(data["x"][:2]),))
        vdir = _version_dir(out, "digits", version)
        _save(traced, vdir / "model.pt")
        x_ref = training_sample(data, recipe.seed)
        with torch.inference_mode():
            probs = traced(torch.from_numpy(x_ref)).numpy()
        _reference(vdir / "reference.npz", pixels=x_ref, probabilities=probs)
        acc[str(version)] = accuracy(traced, data["x"], data["y"])
    return {"versions": sorted(DIGITS_VERSIONS), "holdout_accuracy": acc, "holdout_size": len(data["y"])}


# --------------------------------------------------------------------------- convnet


class ConvNet(nn.Module):
    """image [batch, 1, 32, 32] -> logits [batch, 10].

    Two small conv blocks, then a dense head with two 2048-wide layers (~8.4 M weights,
    ~33 MB). Like most production networks with large dense layers, one image at a time is
    bound by reading the weights (~2.3 ms per image on one CPU thread), while a batch reuses
    them (~0.5 ms per image at batch 32): the model where server-side batching pays.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16x16
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
        )
        self.head = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(32 * 8 * 8, 2048), nn.ReLU(),
            nn.Linear(2048, 2048), nn.ReLU(),
            nn.Linear(2048, 10),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(image))
        return logits


CONVNET_SEED = 7


def build_convnet(out: Path) -> dict[str, Any]:
    with deterministic(CONVNET_SEED):
        net = ConvNet().eval()
        traced = _trace(net, (torch.zeros(2, 1, 32, 32),))
    vdir = _version_dir(out, "convnet", 1)
    _save(traced, vdir / "model.pt")
    rng = np.random.default_rng(CONVNET_SEED)
    images = rng.random((4, 1, 32, 32), dtype=np.float32)
    with deterministic(0), torch.inference_mode():
        logits = traced(torch.from_numpy(images)).numpy()
    _reference(vdir / "reference.npz", image=images, logits=logits)
    return {"versions": [1]}


# --------------------------------------------------------------------------- digits_onnx


def digits_onnx_model(net: DigitsNet) -> Any:
    """The digits MLP as an ONNX graph (Gemm-Relu-Gemm-Softmax), batch dimension symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str, t: torch.Tensor) -> Any:
        return numpy_helper.from_array(t.detach().numpy().astype(np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["pixels", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            init("w1", net.hidden.weight), init("b1", net.hidden.bias),
            init("w2", net.out.weight), init("b2", net.out.bias),
        ],
    )
    model = helper.make_model(
        graph, producer_name="swapserve-make_examples", opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def build_digits_onnx(out: Path, data: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    import onnx

    data = data if data is not None else digits_data()
    net = train_digits(DIGITS_VERSIONS[2], data)
    vdir = _version_dir(out, "digits_onnx", 1)
    onnx.save(digits_onnx_model(net), str(vdir / "model.onnx"))
    x_ref = training_sample(data, DIGITS_VERSIONS[2].seed)
    with torch.inference_mode():
        probs = net(torch.from_numpy(x_ref)).numpy()
    _reference(vdir / "reference.npz", pixels=x_ref, probabilities=probs)
    return {"versions": [1], "holdout_accuracy": {"1": accuracy(net, data["x"], data["y"])}}


# --------------------------------------------------------------------------- driver


def make(out: Path, models: Sequence[str] = MODELS) -> dict[str, Any]:
    """Build ``models`` under ``out``; returns a JSON-able summary (accuracies, versions)."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown example model(s) {unknown}; choose from {list(MODELS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = digits_data() if {"digits", "digits_onnx"} & set(models) else None
    builders = {
        "simple": lambda: build_simple(out),
        "digits": lambda: build_digits(out, data),
        "convnet": lambda: build_convnet(out),
        "digits_onnx": lambda: build_digits_onnx(out, data),
    }
    summary: dict[str, Any] = {}
    for name in MODELS:
        if name in models:
            summary[name] = builders[name]()
            copy_config(out, name)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_MODELS, help="model repository to write")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        summary = make(args.out, models)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
