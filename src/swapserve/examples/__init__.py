"""The example model repository: configs shipped with the package, weights built here (deterministically).

    swapserve examples DIR                      # every example this install can build
    swapserve examples DIR --models simple,digits

``swapserve serve`` without ``--model-repository`` serves ``$SWAPSERVE_HOME/model_repository``
and writes the examples there first when it holds none. In a checkout ``scripts/dev setup``
builds them into ``model_repository/``, where their configs are committed; a wheel carries
those configs as package data (``swapserve/examples/repository/``, copied by ``setup.py``).

Writes, under ``DIR/<model>/``: the version directories with the model file and a
``reference.npz`` (inputs and the outputs this build produced, keyed by the config's
tensor names, with the batch dimension: for ``digits`` and ``digits_onnx`` a seeded sample
of 1000 training rows, which drift monitoring uses as the version's reference profile;
a few rows for the others), plus ``DIR/digits/holdout.npz``
(``x`` float32 [n, 64], ``y`` int64 [n], ``slice`` str [n]: the digit group "round"
{0,6,8,9}, "straight" {1,4,7} or "curved" {2,3,5}), and each model's config files
(``config.pbtxt``, ``monitoring.yaml``) unless ``DIR`` is where they come from.

Everything is seeded and trained on one thread, and every file is written byte for byte
the same wherever it is built: TorchScript archives are saved without their debug records
(which hold the paths of the Python sources that were traced, e.g. the virtualenv's torch)
and with a serialization id derived from their contents; ``.npz`` archives carry a fixed
timestamp. Two builds on two machines or checkouts give files with the same sha256, so
a registry that recorded one accepts the other. Models are exported with
``torch.jit.trace`` (no source access needed).

Models:
  simple       TorchScript, INPUT0/INPUT1 INT32 [16] -> OUTPUT0 = sum, OUTPUT1 = difference
  digits       TorchScript MLP on scikit-learn's bundled 8x8 digits; v1 weak (~88%), v2 strong (~97%)
  convnet      TorchScript CNN + dense head, image FP32 [1,32,32] -> logits FP32 [10], random
               init, ~2.3 ms per image alone but ~0.5 ms per image in a batch of 32 on one
               thread: the batching benchmark model
  digits_onnx  digits v2 as ONNX (built with onnx.helper from the same weights)

``simple`` and ``convnet`` need only torch. ``digits`` needs scikit-learn (its data set);
``digits_onnx`` also needs onnx to build and onnxruntime to serve: ``pip install
'swapserve[examples]'`` brings them. :func:`buildable` says which this install can build.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import shutil
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

MODELS: tuple[str, ...] = ("simple", "digits", "convnet", "digits_onnx")

#: What each example needs beyond torch and numpy, to build it and to serve it.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "simple": (),
    "digits": ("sklearn",),
    "convnet": (),
    "digits_onnx": ("sklearn", "onnx", "onnxruntime"),
}

#: The files of a model directory that are committed (and shipped), as opposed to built.
CONFIG_FILES: tuple[str, ...] = ("config.pbtxt", "monitoring.yaml")


def config_root() -> Path:
    """Where the example configs come from: the installed package's copy, else the checkout's.

    A wheel or sdist install carries them under ``swapserve/examples/repository/``; an editable
    install of a checkout reads the committed ``model_repository/`` directly.
    """
    shipped = Path(__file__).resolve().parent / "repository"
    if (shipped / "simple" / "config.pbtxt").is_file():
        return shipped
    checkout = Path(__file__).resolve().parents[3] / "model_repository"
    if (checkout / "simple" / "config.pbtxt").is_file():
        return checkout
    raise FileNotFoundError(f"the example configs are missing: neither {shipped} nor {checkout} holds them; "
                            "reinstall swapserve")


def missing_requirements(model: str) -> list[str]:
    """The Python modules ``model`` needs that this environment lacks (empty: it can be built and served)."""
    return [m for m in REQUIREMENTS[model] if importlib.util.find_spec(m) is None]


def buildable() -> list[str]:
    """The examples this environment can build and serve, in :data:`MODELS` order."""
    return [m for m in MODELS if not missing_requirements(m)]

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


def trace(module: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``module`` in eval mode, without torch's deprecation notices."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* deprecation notices
        traced: torch.jit.ScriptModule = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
    return traced


#: Zip timestamp of every archive written here (zip's own epoch): builds differ in time, not in bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _write_zip(path: Path, records: Sequence[tuple[str, bytes]]) -> None:
    """Write ``records`` (name, data) uncompressed with a fixed timestamp, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            z.writestr(zipfile.ZipInfo(name, date_time=_ZIP_EPOCH), data)
    tmp.replace(path)


def save(module: torch.jit.ScriptModule, path: Path) -> None:
    """Save a TorchScript module so that the same module gives the same bytes wherever it is saved.

    ``torch.jit.save`` also writes ``*.debug_pkl`` records (source ranges naming the files that
    were traced, e.g. torch inside this virtualenv) and a serialization id hashed from every
    record. The debug records are dropped (TorchScript loads without them; errors inside the
    model then name no Python line) and the id is recomputed from the records that are kept.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, buf)
    with zipfile.ZipFile(buf) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist() if not i.filename.endswith(".debug_pkl")]
    digest = hashlib.sha256()
    for name, data in records:
        if not name.endswith("/.data/serialization_id"):
            digest.update(name.encode() + b"\0" + data)
    sid = str(int.from_bytes(digest.digest()[:16], "big")).zfill(40)[:40].encode()
    _write_zip(path, [(n, sid if n.endswith("/.data/serialization_id") else d) for n, d in records])


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` with the same bytes on every build (numpy's own stamps the current time)."""
    records = []
    for name, array in arrays.items():
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
        records.append((f"{name}.npy", buf.getvalue()))
    _write_zip(path, records)


def _version_dir(out: Path, model: str, version: int) -> Path:
    d = out / model / str(version)
    d.mkdir(parents=True, exist_ok=True)
    return d


def copy_config(out: Path, model: str) -> None:
    """Copy the shipped config files of ``model`` into ``out`` unless ``out`` is where they come from."""
    src_dir = config_root() / model
    dst_dir = out / model
    if dst_dir.resolve() == src_dir.resolve():
        return
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)


# --------------------------------------------------------------------------- simple


class AddSub(nn.Module):
    """Triton's ``simple``: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""

    def forward(self, INPUT0: torch.Tensor, INPUT1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
        return INPUT0 + INPUT1, INPUT0 - INPUT1


def build_simple(out: Path) -> dict[str, Any]:
    example = (torch.zeros(1, 16, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32))
    traced = trace(AddSub(), example)
    vdir = _version_dir(out, "simple", 1)
    save(traced, vdir / "model.pt")
    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, size=(4, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(4, 16), dtype=np.int32)
    save_npz(vdir / "reference.npz", INPUT0=a, INPUT1=b, OUTPUT0=a + b, OUTPUT1=a - b)
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
    save_npz(out / "digits" / "holdout.npz", x=data["x"], y=data["y"], slice=data["slice"])
    acc: dict[str, float] = {}
    for version, recipe in DIGITS_VERSIONS.items():
        net = train_digits(recipe, data)
        with deterministic(0):
            traced = trace(net, (torch.from_numpy(data["x"][:2]),))
        vdir = _version_dir(out, "digits", version)
        save(traced, vdir / "model.pt")
        x_ref = training_sample(data, recipe.seed)
        with torch.inference_mode():
            probs = traced(torch.from_numpy(x_ref)).numpy()
        save_npz(vdir / "reference.npz", pixels=x_ref, probabilities=probs)
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
        traced = trace(net, (torch.zeros(2, 1, 32, 32),))
    vdir = _version_dir(out, "convnet", 1)
    save(traced, vdir / "model.pt")
    rng = np.random.default_rng(CONVNET_SEED)
    images = rng.random((4, 1, 32, 32), dtype=np.float32)
    with deterministic(0), torch.inference_mode():
        logits = traced(torch.from_numpy(images)).numpy()
    save_npz(vdir / "reference.npz", image=images, logits=logits)
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
    save_npz(vdir / "reference.npz", pixels=x_ref, probabilities=probs)
    return {"versions": [1], "holdout_accuracy": {"1": accuracy(net, data["x"], data["y"])}}


# --------------------------------------------------------------------------- driver


def make(out: Path, models: Sequence[str] = MODELS) -> dict[str, Any]:
    """Build ``models`` under ``out``; returns a JSON-able summary (accuracies, versions)."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown example model(s) {unknown}; choose from {list(MODELS)}")
    for name in models:
        if missing := missing_requirements(name):
            raise ValueError(f"example '{name}' needs {', '.join(missing)}, which this environment lacks: "
                             "pip install 'swapserve[examples]'")
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


def ensure(repository: Path) -> list[str]:
    """Make ``repository`` an example repository unless it already holds a model; returns what was built.

    Builds every example this environment can (:func:`buildable`) into a sibling temporary
    directory and renames it into place, so an interrupted first start leaves no half-built
    repository behind. Returns an empty list when ``repository`` already has a model
    directory (anything with a ``config.pbtxt``): an operator's own repository is never touched.
    """
    repository = Path(repository)
    if repository.is_dir() and any(repository.glob("*/config.pbtxt")):
        return []
    if repository.is_dir() and any(repository.iterdir()):
        raise ValueError(f"{repository} is not empty but holds no model (no */config.pbtxt); pass "
                         "--model-repository, or empty it to have the examples written there")
    models = buildable()
    repository.parent.mkdir(parents=True, exist_ok=True)
    tmp = repository.with_name(f".{repository.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp, models)
    if repository.is_dir():
        repository.rmdir()  # empty: checked above
    tmp.rename(repository)
    return models
