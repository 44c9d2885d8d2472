"""Control-path work stays off the request path: monitoring is prepared and forgotten by the
lifecycle's load/unload workers, and a request for an unknown model does not list the repository."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from swapserve.monitoring import drift_observer
from swapserve.repository import ModelRepository
from swapserve._proto import grpc_service_pb2 as pb
from tests.e2e.serverproc import copy_models


def digits_request(x: np.ndarray, version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="digits", model_version=version)
    req.inputs.add(name="pixels", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype(np.float32).tobytes())
    return req


def test_monitoring_is_prepared_on_the_load_worker_and_forgotten_on_unload(
        example_repo: Path, tmp_path: Path, make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    for name in ("load_monitoring_config", "load_reference"):
        real = getattr(drift_observer, name)
        monkeypatch.setattr(drift_observer, name,
                            lambda *a, _real=real, **kw: (threads.append(threading.get_ident()), _real(*a, **kw))[1])
    srv = make_server(copy_models(example_repo, tmp_path / "repo", ["digits"]))
    monitor, control = srv.server.monitor, srv.server.control
    assert monitor.report("digits", 2).version == 2  # ready before any request was served
    loads = len(threads)
    assert loads >= 2  # monitoring.yaml and reference.npz of every loaded version
    x = np.load(example_repo / "digits" / "holdout.npz")["x"][:4]
    for version in ("1", "2", ""):
        assert srv.stub.ModelInfer(digits_request(x, version), timeout=30).outputs
    assert len(threads) == loads  # requests loaded nothing
    assert srv.thread.ident not in threads  # and nothing was loaded on the event loop

    srv.call(control.unload("digits", 1, actor="test"))
    with pytest.raises(Exception, match="no drift data yet"):
        monitor.report("digits", 1)
    srv.call(control.load("digits", 1, actor="test"))
    assert monitor.report("digits", 1).version == 1
    assert srv.thread.ident not in threads


def test_a_request_for_an_unknown_model_does_not_list_the_repository(
        example_repo: Path, tmp_path: Path, make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = make_server(copy_models(example_repo, tmp_path / "repo", ["digits"]))
    listings: list[int] = []
    real = ModelRepository.names
    monkeypatch.setattr(ModelRepository, "names", lambda self: (listings.append(1), real(self))[1])
    req = pb.ModelInferRequest(model_name="nope")
    req.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.ModelInfer(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == ("model 'nope' is not in the model repository; RepositoryIndex lists "
                                       "the models")
    assert listings == []
