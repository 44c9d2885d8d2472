from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.serverproc import ServerProcess, build_example_repo, copy_models


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example_repo(tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="module", params=["native", "python"])
def server(request: pytest.FixtureRequest, example_repo: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server on each inference-port transport: grpc++ (the default when built) and grpc.aio."""
    if request.param == "native":
        if importlib.util.find_spec("swapserve._frontend") is None:  # not native_frontend: no _proto here
            if os.environ.get("CI"):
                pytest.fail("the native front end is not built; scripts/dev setup installs grpc++ and builds it")
            pytest.skip("the native front end is not built (no grpc++ at install)")
    repo = copy_models(example_repo, tmp_path_factory.mktemp("repo"), ["simple", "digits", "digits_onnx"])
    with ServerProcess(repo, "--frontend", request.param) as proc:
        assert f"({request.param} front end)" in proc.log()
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()
