"""swapserve.examples: the example repository builds, is deterministic (byte for byte), and serves.

Builds every example model once per module into a temporary directory (~10 s on two
cores) and runs them through the real backends with specs read from the committed
config.pbtxt files.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from swapserve import dtypes
from swapserve.backends import backend_class
from swapserve.types import ModelSpec, TensorSpec

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("simple", "digits", "convnet", "digits_onnx")


def model_spec(config: Path) -> ModelSpec:
    """Just enough of config.pbtxt -> ModelSpec for these tests (Triton's own schema)."""
    from google.protobuf import text_format  # type: ignore[import-untyped]

    from swapserve._proto import model_config_pb2 as mc

    cfg = text_format.Parse(config.read_text(), mc.ModelConfig())

    def tensors(items: Any) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(i.name, dtypes.from_config(mc.DataType.Name(i.data_type)), tuple(i.dims))
            for i in items
        )

    return ModelSpec(
        name=cfg.name,
        platform=cfg.platform,
        max_batch_size=cfg.max_batch_size,
        inputs=tensors(cfg.input),
        outputs=tensors(cfg.output),
        parameters={k: v.string_value for k, v in cfg.parameters.items()},
    )


def backend(repo: Path, model: str, version: int) -> Any:
    spec = model_spec(repo / model / "config.pbtxt")
    cls = backend_class(spec.platform)
    return cls.load(spec, cls.model_file(spec, repo / model / str(version)), "cpu")


@pytest.fixture(scope="module")
def mk() -> ModuleType:
    from swapserve import examples

    return examples


@pytest.fixture(scope="module")
def built(mk: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("repo")
    return out, mk.make(out, MODELS)


def test_layout(built: tuple[Path, dict[str, Any]]) -> None:
    repo, summary = built
    assert sorted(summary) == sorted(MODELS)
    for model in MODELS:
        assert (repo / model / "config.pbtxt").read_text() == (
            ROOT / "model_repository" / model / "config.pbtxt"
        ).read_text()
    assert (repo / "simple" / "1" / "model.pt").is_file()
    assert (repo / "digits" / "1" / "model.pt").is_file()
    assert (repo / "digits" / "2" / "model.pt").is_file()
    assert (repo / "convnet" / "1" / "model.pt").is_file()
    assert (repo / "digits_onnx" / "1" / "model.onnx").is_file()


def test_committed_configs_match_the_brief() -> None:
    specs = {m: model_spec(ROOT / "model_repository" / m / "config.pbtxt") for m in MODELS}
    assert specs["simple"].max_batch_size == 8
    assert [(t.name, t.datatype, t.dims) for t in specs["simple"].inputs] == [
        ("INPUT0", "INT32", (16,)), ("INPUT1", "INT32", (16,))
    ]
    assert [(t.name, t.datatype, t.dims) for t in specs["convnet"].inputs] == [("image", "FP32", (1, 32, 32))]
    for m in ("digits", "digits_onnx"):
        assert [(t.name, t.dims) for t in specs[m].inputs] == [("pixels", (64,))]
        assert [(t.name, t.dims) for t in specs[m].outputs] == [("probabilities", (10,))]
    assert specs["digits_onnx"].platform == "onnxruntime_onnx"


def test_digits_versions_differ_in_quality(built: tuple[Path, dict[str, Any]], mk: ModuleType) -> None:
    repo, summary = built
    acc = summary["digits"]["holdout_accuracy"]
    holdout = np.load(repo / "digits" / "holdout.npz")
    x, y = holdout["x"], holdout["y"]
    assert x.dtype == np.float32 and x.shape[1] == 64 and y.dtype == np.int64 and len(x) == len(y)
    assert set(holdout["slice"]) == {"round", "straight", "curved"}
    v1 = mk.accuracy(repo / "digits" / "1" / "model.pt", x, y)
    v2 = mk.accuracy(repo / "digits" / "2" / "model.pt", x, y)
    assert (v1, v2) == (acc["1"], acc["2"])
    assert v2 >= 0.93
    assert v2 > v1 + 0.03, (v1, v2)


def test_digits_served_by_the_backend(built: tuple[Path, dict[str, Any]]) -> None:
    repo, summary = built
    holdout = np.load(repo / "digits" / "holdout.npz")
    b = backend(repo, "digits", 2)
    probs = b.infer({"pixels": holdout["x"][:64]})["probabilities"]
    assert probs.shape == (64, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_deterministic(built: tuple[Path, dict[str, Any]], mk: ModuleType, tmp_path: Path) -> None:
    repo, summary = built
    again = mk.make(tmp_path, ["digits", "digits_onnx"])
    assert again["digits"] == summary["digits"]
    assert again["digits_onnx"] == summary["digits_onnx"]
    holdout = np.load(repo / "digits" / "holdout.npz")
    for version in (1, 2):
        first = mk.predict(repo / "digits" / str(version) / "model.pt", holdout["x"])
        second = mk.predict(tmp_path / "digits" / str(version) / "model.pt", holdout["x"])
        np.testing.assert_array_equal(first, second)
        a = np.load(repo / "digits" / str(version) / "reference.npz")
        b = np.load(tmp_path / "digits" / str(version) / "reference.npz")
        np.testing.assert_array_equal(a["probabilities"], b["probabilities"])
    assert (tmp_path / "digits" / "holdout.npz").read_bytes() == (repo / "digits" / "holdout.npz").read_bytes()


def test_simple_computes_sum_and_difference(built: tuple[Path, dict[str, Any]]) -> None:
    repo, _ = built
    b = backend(repo, "simple", 1)
    a = np.arange(16, dtype=np.int32).reshape(1, 16).repeat(3, axis=0)
    c = np.full((3, 16), 5, np.int32)
    out = b.infer({"INPUT0": a, "INPUT1": c})
    assert out["OUTPUT0"].dtype == np.int32
    np.testing.assert_array_equal(out["OUTPUT0"], a + c)
    np.testing.assert_array_equal(out["OUTPUT1"], a - c)


def test_convnet_shapes(built: tuple[Path, dict[str, Any]]) -> None:
    repo, _ = built
    b = backend(repo, "convnet", 1)
    out = b.infer({"image": np.zeros((5, 1, 32, 32), np.float32)})["logits"]
    assert out.shape == (5, 10) and out.dtype == np.float32


def test_digits_onnx_matches_torchscript_v2(built: tuple[Path, dict[str, Any]]) -> None:
    pytest.importorskip("onnxruntime")
    repo, summary = built
    x = np.load(repo / "digits" / "holdout.npz")["x"]
    pt = backend(repo, "digits", 2).infer({"pixels": x})["probabilities"]
    ort = backend(repo, "digits_onnx", 1).infer({"pixels": x})["probabilities"]
    np.testing.assert_allclose(ort, pt, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ort.argmax(1), pt.argmax(1))
    assert summary["digits_onnx"]["holdout_accuracy"]["1"] == summary["digits"]["holdout_accuracy"]["2"]


@pytest.mark.parametrize(
    ("model", "version"), [("simple", 1), ("digits", 1), ("digits", 2), ("convnet", 1), ("digits_onnx", 1)]
)
def test_reference_outputs_reproduce(built: tuple[Path, dict[str, Any]], model: str, version: int) -> None:
    repo, _ = built
    b = backend(repo, model, version)
    spec = model_spec(repo / model / "config.pbtxt")
    ref = np.load(repo / model / str(version) / "reference.npz")
    out = b.infer({t.name: ref[t.name] for t in spec.inputs})
    for t in spec.outputs:
        np.testing.assert_allclose(out[t.name], ref[t.name], rtol=1e-4, atol=1e-5)


def test_unknown_model_is_refused(mk: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resnet"):
        mk.make(tmp_path, ["resnet"])


BUILD_FROM = """
import importlib.util, sys
from pathlib import Path
from swapserve import examples as installed  # the configs: wherever this install keeps them
source, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("swapserve.examples", source)
module = importlib.util.module_from_spec(spec)
sys.modules["swapserve.examples"] = module
spec.loader.exec_module(module)
module.config_root = installed.config_root
module.make(out, ["simple", "digits"])
"""


def test_byte_identical_wherever_built(tmp_path: Path) -> None:
    """Two fresh builds, from the package and from a copy of its source elsewhere, write the same bytes.

    (Another checkout or virtualenv puts the traced sources at other paths; the registry
    compares model files by sha256, so the bytes must not depend on them.) Each build runs in
    its own process, as ``swapserve examples`` and ``swapserve serve`` do: TorchScript numbers
    the types it sees within a process.
    """
    import shutil
    import subprocess
    import sys

    from swapserve import examples

    copy = tmp_path / "elsewhere" / "checkout" / "examples_copy.py"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(examples.__file__, copy)
    builds = {}
    for name, source in (("here", Path(examples.__file__)), ("elsewhere", copy)):
        out = tmp_path / f"build-{name}"
        subprocess.run([sys.executable, "-c", BUILD_FROM, str(source), str(out)], check=True, timeout=300)
        builds[name] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert Path("simple/1/model.pt") in builds["here"] and Path("digits/2/reference.npz") in builds["here"]
    assert sorted(builds["here"]) == sorted(builds["elsewhere"])
    for rel, data in builds["here"].items():
        assert builds["elsewhere"][rel] == data, f"{rel} differs between the two builds"


def test_torchscript_files_name_no_source_path(built: tuple[Path, dict[str, Any]]) -> None:
    import zipfile

    repo, _ = built
    with zipfile.ZipFile(repo / "digits" / "2" / "model.pt") as z:
        assert not [n for n in z.namelist() if n.endswith(".debug_pkl")]
        blob = b"".join(z.read(n) for n in z.namelist())
    assert b"site-packages" not in blob and str(ROOT).encode() not in blob


def test_missing_requirements_are_named(mk: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec then reports it absent
    assert mk.buildable() == ["simple", "convnet"]
    with pytest.raises(ValueError, match=r"example 'digits' needs sklearn.*swapserve\[examples\]"):
        mk.make(tmp_path, ["simple", "digits"])
    assert not (tmp_path / "simple").exists()  # refused before anything is written


def test_ensure_writes_once_and_leaves_repositories_alone(mk: ModuleType, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mk, "buildable", lambda: ["simple"])  # keep it fast: one tiny model
    repo = tmp_path / "home" / "model_repository"
    assert mk.ensure(repo) == ["simple"]
    assert (repo / "simple" / "config.pbtxt").is_file() and (repo / "simple" / "1" / "model.pt").is_file()
    assert not list(repo.parent.glob(".*building"))
    model = (repo / "simple" / "1" / "model.pt").read_bytes()
    assert mk.ensure(repo) == []  # already a repository: untouched
    assert (repo / "simple" / "1" / "model.pt").read_bytes() == model
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty but holds no model"):
        mk.ensure(other)
    assert (other / "todo.txt").read_text() == "mine"


def test_the_cli_parser_does_not_import_torch(mk: ModuleType) -> None:
    """Every operator verb builds the whole parser: torch's import (seconds) must wait for the verbs that run models."""
    import subprocess
    import sys

    probe = ("import sys; from swapserve.cli import build_parser; p = build_parser(); "
             "print('torch' in sys.modules); p.parse_args(['examples', 'x', '--help'])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    first, _, help_text = out.stdout.partition("\n")
    assert first == "False", out.stderr
    assert all(m in help_text for m in mk.MODELS), help_text
