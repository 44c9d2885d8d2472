from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.serverproc import ROOT, ServerProcess, copy_models

MODELS = ("simple", "digits", "convnet", "digits_onnx")


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example repository with its weights: the set-up's build, or a fresh deterministic build."""
    repo = ROOT / "model_repository"
    if all(any((repo / m).glob("[0-9]*/model.*")) for m in MODELS):
        return repo
    out = tmp_path_factory.mktemp("examples")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_examples.py"), "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = copy_models(example_repo, tmp_path_factory.mktemp("repo"), ["simple", "digits", "digits_onnx"])
    with ServerProcess(repo) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()
