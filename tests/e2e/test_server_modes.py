"""Model control modes, failure isolation, message limits and graceful shutdown, end to end."""
from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.serverproc import ServerProcess, copy_models, wait_until

FAULTY_CONFIG = """
name: "faulty"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
"""


class Faulty(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("negative input is not allowed")
        return x * 2


def make_faulty(repo: Path) -> None:
    (repo / "faulty" / "1").mkdir(parents=True)
    (repo / "faulty" / "config.pbtxt").write_text(FAULTY_CONFIG)
    torch.jit.script(Faulty()).save(str(repo / "faulty" / "1" / "model.pt"))


def vec(x: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32))
    return [inp]


def simple(n: int = 1) -> list[grpcclient.InferInput]:
    a = np.ones((n, 16), dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [n, 16], "INT32"), grpcclient.InferInput("INPUT1", [n, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    return inputs


def index(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], dict[str, str]]:
    return {(e["name"], e.get("version", "")): e for e in client.get_model_repository_index(as_json=True)["models"]}


def test_explicit_mode_load_unload(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["simple", "digits"])
    with ServerProcess(repo, "--model-control-mode", "explicit", "--load-model", "simple", "--repository-api") as srv:
        c = grpcclient.InferenceServerClient(srv.url)
        assert c.is_model_ready("simple") and not c.is_model_ready("digits")
        with pytest.raises(InferenceServerException) as err:
            c.infer("digits", vec(np.zeros((1, 4))))
        assert "UNAVAILABLE" in str(err.value.status()) and "digits" in err.value.message()
        c.load_model("digits")
        assert c.is_model_ready("digits")
        assert index(c)[("digits", "2")]["state"] == "READY"
        c.unload_model("simple")
        assert not c.is_model_ready("simple")
        with pytest.raises(InferenceServerException) as err:
            c.infer("simple", simple())
        assert "UNAVAILABLE" in str(err.value.status())
        with pytest.raises(InferenceServerException) as err:
            c.load_model("does_not_exist")
        assert "NOT_FOUND" in str(err.value.status()) and "does_not_exist" in err.value.message()
        c.load_model("simple")
        assert c.infer("simple", simple()).as_numpy("OUTPUT0")[0, 0] == 2


def test_the_repository_rpcs_are_refused_by_default(server: ServerProcess) -> None:
    """Closed by default (tests/e2e/test_repository_api.py has the rest), on both transports."""
    c = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as err:
        c.unload_model("simple")
    assert "PERMISSION_DENIED" in str(err.value.status()) and "--repository-api" in err.value.message()
    assert c.is_model_ready("simple")


def test_none_mode_refuses_repository_rpcs_even_when_the_api_is_enabled(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--repository-api") as srv:
        c = grpcclient.InferenceServerClient(srv.url)
        with pytest.raises(InferenceServerException) as err:
            c.unload_model("simple")
        assert "FAILED_PRECONDITION" in str(err.value.status()) and "explicit" in err.value.message()
        assert c.is_model_ready("simple")


def test_invalid_config_and_model_failure_are_isolated(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    make_faulty(repo)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('platform: "pytorch_libtorch"\nmax_batch_size: oops\n')
    (repo / "corrupt" / "1").mkdir(parents=True)
    shutil.copy(repo / "simple" / "config.pbtxt", repo / "corrupt" / "config.pbtxt")
    (repo / "corrupt" / "config.pbtxt").write_text((repo / "corrupt" / "config.pbtxt").read_text()
                                                   .replace('"simple"', '"corrupt"'))
    (repo / "corrupt" / "1" / "model.pt").write_bytes(b"not a torchscript file")
    with ServerProcess(repo) as srv:
        c = grpcclient.InferenceServerClient(srv.url)
        idx = index(c)
        assert idx[("broken", "")]["state"] == "UNAVAILABLE" and "max_batch_size" in idx[("broken", "")]["reason"]
        assert idx[("corrupt", "1")]["state"] == "UNAVAILABLE" and idx[("corrupt", "1")]["reason"]
        assert not c.is_server_ready()  # a model that should be loaded is not
        assert c.is_model_ready("simple") and c.is_model_ready("faulty")

        # A model exception fails only its own request, even when batched with good ones.
        results: dict[int, object] = {}

        def call(i: int) -> None:
            x = np.full((1, 4), -1.0 if i == 3 else float(i))
            try:
                results[i] = c.infer("faulty", vec(x)).as_numpy("y")
            except InferenceServerException as exc:
                results[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad = results[3]
        assert isinstance(bad, InferenceServerException)
        assert "INTERNAL" in str(bad.status()) and "negative input is not allowed" in bad.message()
        for i in (0, 1, 2, 4, 5, 6, 7):
            np.testing.assert_array_equal(results[i], np.full((1, 4), 2.0 * i))
        assert c.infer("simple", simple()).as_numpy("OUTPUT0")[0, 0] == 2
        assert c.is_server_live()


def test_message_over_limit_is_resource_exhausted(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["digits"])
    with ServerProcess(repo, "--grpc-max-message-bytes", str(64 * 1024)) as srv:
        c = grpcclient.InferenceServerClient(srv.url)
        big = np.zeros((64, 64), np.float32)  # 16 KiB: fine
        inp = grpcclient.InferInput("pixels", [64, 64], "FP32")
        inp.set_data_from_numpy(big)
        assert c.infer("digits", [inp]).as_numpy("probabilities").shape == (64, 10)
        huge = grpcclient.InferInput("pixels", [64, 64], "FP32")
        huge._raw_content = b"\x00" * (128 * 1024)  # over the server's limit
        with pytest.raises(InferenceServerException) as err:
            c.infer("digits", [huge])
        assert "RESOURCE_EXHAUSTED" in str(err.value.status())
        assert c.infer("digits", [inp]).as_numpy("probabilities").shape == (64, 10)


def test_poll_mode_picks_up_new_version(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.5") as srv:
        c = grpcclient.InferenceServerClient(srv.url)
        assert c.infer("simple", simple()).get_response().model_version == "1"
        shutil.copytree(repo / "simple" / "1", repo / "simple" / "2")
        wait_until(lambda: c.infer("simple", simple()).get_response().model_version == "2", timeout=30)
        # latest-1 policy: version 1 is unloaded once 2 serves
        wait_until(lambda: not c.is_model_ready("simple", "1"), timeout=30)


def test_sigterm_finishes_in_flight_requests(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["convnet"])
    srv = ServerProcess(repo).start()
    try:
        c = grpcclient.InferenceServerClient(srv.url)
        x = np.random.default_rng(0).random((8, 1, 32, 32), dtype=np.float32)
        outcomes: list[object] = []
        lock = threading.Lock()

        def callback(result: object, error: object) -> None:
            with lock:
                outcomes.append(error if error is not None else result)

        inp = grpcclient.InferInput("image", [8, 1, 32, 32], "FP32")
        inp.set_data_from_numpy(x)
        n = 40
        for _ in range(n):
            c.async_infer("convnet", [inp], callback)
        time.sleep(0.05)
        srv.signal(signal.SIGTERM)
        assert srv.wait(120) == 0
        wait_until(lambda: len(outcomes) == n, timeout=30)
        errors = [o for o in outcomes if isinstance(o, Exception)]
        assert not errors, errors[:3]
    finally:
        srv.stop()
