"""tritonclient against a real `swapserve serve` subprocess: the calls Triton users make."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from tests.e2e.serverproc import ServerProcess


def simple_inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), "INT32"), grpcclient.InferInput("INPUT1", list(b.shape), "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def digits_input(x: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32))
    return [inp]


def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert client.is_model_ready("digits", "1") and client.is_model_ready("digits", "2")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "swapserve" and "model_repository" in meta["extensions"]
    m = client.get_model_metadata("simple", as_json=True)
    assert m["platform"] == "pytorch_libtorch" and m["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in m["inputs"]] == [("INPUT0", "INT32", ["-1", "16"]),
                                                                           ("INPUT1", "INT32", ["-1", "16"])]
    cfg = client.get_model_config("simple", as_json=True)["config"]
    assert cfg["name"] == "simple" and cfg["max_batch_size"] == 8
    assert [o["name"] for o in cfg["output"]] == ["OUTPUT0", "OUTPUT1"]
    index = {(e["name"], e.get("version", "")): e for e in client.get_model_repository_index(as_json=True)["models"]}
    assert index[("simple", "1")]["state"] == "READY"
    assert index[("digits", "1")]["state"] == "READY" and index[("digits", "2")]["state"] == "READY"


def test_infer_simple_raw(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    result = client.infer("simple", simple_inputs(a, b), request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    resp = result.get_response()
    assert resp.id == "req-7" and resp.model_version == "1"


def test_infer_assigns_id_and_selects_outputs(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((2, 16), dtype=np.int32)
    result = client.infer("simple", simple_inputs(a, a), outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((2, 16), np.int32))
    first = result.get_response().id
    second = client.infer("simple", simple_inputs(a, a)).get_response().id
    assert first and second and first != second  # the server assigned unique ids


def test_infer_typed_contents(client: grpcclient.InferenceServerClient) -> None:
    """Inputs in InferTensorContents (not raw bytes), through tritonclient's own stub and messages."""
    req = service_pb2.ModelInferRequest(model_name="simple", id="typed")
    for name, values in (("INPUT0", list(range(16))), ("INPUT1", [2] * 16)):
        t = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        t.contents.int_contents.extend(values)
    resp = client._client_stub.ModelInfer(req)
    out0 = np.frombuffer(resp.raw_output_contents[0], dtype=np.int32)
    np.testing.assert_array_equal(out0, np.arange(16) + 2)
    assert resp.id == "typed" and resp.model_version == "1"


def test_version_pinning_and_default(client: grpcclient.InferenceServerClient, example_repo: Path) -> None:
    x = np.load(example_repo / "digits" / "holdout.npz")["x"][:4]
    assert client.infer("digits", digits_input(x)).get_response().model_version == "2"
    assert client.infer("digits", digits_input(x), model_version="1").get_response().model_version == "1"


def test_digits_accuracy_matches_offline(client: grpcclient.InferenceServerClient, example_repo: Path) -> None:
    data = np.load(example_repo / "digits" / "holdout.npz")
    x, y = data["x"].astype(np.float32), data["y"]
    for version in ("1", "2"):
        model = torch.jit.load(str(example_repo / "digits" / version / "model.pt"))
        with torch.inference_mode():
            offline = model(torch.from_numpy(x)).argmax(1).numpy()
        served = np.concatenate([
            client.infer("digits", digits_input(x[i:i + 64]), model_version=version).as_numpy("probabilities").argmax(1)
            for i in range(0, len(x), 64)])
        np.testing.assert_array_equal(served, offline)
        assert (served == y).mean() == pytest.approx((offline == y).mean())
    # The two versions really differ in quality, so "which version answered" matters.
    assert (served == y).mean() > 0.9


def test_onnx_model_matches_torchscript(client: grpcclient.InferenceServerClient, example_repo: Path) -> None:
    x = np.load(example_repo / "digits" / "holdout.npz")["x"][:32].astype(np.float32)
    a = client.infer("digits_onnx", digits_input(x)).as_numpy("probabilities")
    b = client.infer("digits", digits_input(x), model_version="2").as_numpy("probabilities")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_stream_of_100_interleaved_requests(client: grpcclient.InferenceServerClient, example_repo: Path) -> None:
    x = np.load(example_repo / "digits" / "holdout.npz")["x"][:50].astype(np.float32)
    results: dict[str, object] = {}
    done = threading.Event()

    def callback(result: object, error: object) -> None:
        if error is not None:
            results[f"error-{len(results)}"] = error
        else:
            results[result.get_response().id] = result  # type: ignore[attr-defined]
        if len(results) == 100:
            done.set()

    client.start_stream(callback=callback)
    try:
        for i in range(50):
            a = np.full((1, 16), i, dtype=np.int32)
            client.async_stream_infer("simple", simple_inputs(a, a), request_id=f"s{i}")
            client.async_stream_infer("digits", digits_input(x[i:i + 1]), request_id=f"d{i}")
        assert done.wait(60), f"only {len(results)} of 100 responses"
    finally:
        client.stop_stream()
    assert not [k for k in results if k.startswith("error")]
    for i in range(50):
        np.testing.assert_array_equal(results[f"s{i}"].as_numpy("OUTPUT0"), np.full((1, 16), 2 * i))  # type: ignore[attr-defined]
        assert results[f"d{i}"].as_numpy("probabilities").shape == (1, 10)  # type: ignore[attr-defined]


def test_stream_error_keeps_stream_open(client: grpcclient.InferenceServerClient) -> None:
    got: list[tuple[object, object]] = []
    done = threading.Event()

    def callback(result: object, error: object) -> None:
        got.append((result, error))
        if len(got) == 3:
            done.set()

    client.start_stream(callback=callback)
    try:
        a = np.ones((1, 16), dtype=np.int32)
        client.async_stream_infer("simple", simple_inputs(a, a), request_id="ok-1")
        bad = grpcclient.InferInput("INPUT0", [1, 15], "INT32")
        bad.set_data_from_numpy(np.ones((1, 15), np.int32))
        client.async_stream_infer("simple", [bad, simple_inputs(a, a)[1]], request_id="bad-1")
        client.async_stream_infer("simple", simple_inputs(a, a), request_id="ok-2")
        assert done.wait(30)
    finally:
        client.stop_stream()
    errors = [e for _, e in got if e is not None]
    oks = sorted(r.get_response().id for r, e in got if e is None)  # type: ignore[attr-defined]
    assert oks == ["ok-1", "ok-2"]
    assert len(errors) == 1 and "INPUT0" in str(errors[0]) and "[1, 15]" in str(errors[0])


def test_async_infer_concurrency_64(server: ServerProcess, example_repo: Path) -> None:
    x = np.load(example_repo / "digits" / "holdout.npz")["x"].astype(np.float32)[:256]
    expected = None

    async def run() -> list[tuple[int, np.ndarray, str]]:
        async with aioclient.InferenceServerClient(server.url) as c:
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> tuple[int, np.ndarray, str]:
                async with sem:
                    inp = aioclient.InferInput("pixels", [1, 64], "FP32")
                    inp.set_data_from_numpy(x[i:i + 1])
                    r = await c.infer("digits", [inp], request_id=str(i), model_version="2")
                    return i, r.as_numpy("probabilities")[0], r.get_response().id

            return await asyncio.gather(*(one(i) for i in range(len(x))))

    answers = asyncio.run(run())
    model = torch.jit.load(str(example_repo / "digits" / "2" / "model.pt"))
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    assert len(answers) == len(x)
    for i, probs, rid in answers:
        assert rid == str(i)
        np.testing.assert_allclose(probs, expected[i], rtol=1e-4, atol=1e-6)


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


@pytest.mark.parametrize("case,code,needle", [
    ("unknown_model", "NOT_FOUND", "nope"),
    ("unknown_version", "NOT_FOUND", "version 9"),
    ("wrong_dtype", "INVALID_ARGUMENT", "datatype FP32, expected INT32"),
    ("wrong_shape", "INVALID_ARGUMENT", "[1, 15]"),
    ("missing_input", "INVALID_ARGUMENT", "INPUT1"),
    ("unexpected_input", "INVALID_ARGUMENT", "EXTRA"),
    ("batch_too_large", "INVALID_ARGUMENT", "max_batch_size 8"),
    ("unknown_output", "INVALID_ARGUMENT", "NOPE"),
])
def test_errors_then_success(client: grpcclient.InferenceServerClient, case: str, code: str, needle: str) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    model, version, inputs, outputs = "simple", "", simple_inputs(a, a), None
    if case == "unknown_model":
        model = "nope"
    elif case == "unknown_version":
        version = "9"
    elif case == "wrong_dtype":
        f = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        f.set_data_from_numpy(np.ones((1, 16), np.float32))
        inputs = [f, inputs[1]]
    elif case == "wrong_shape":
        f = grpcclient.InferInput("INPUT0", [1, 15], "INT32")
        f.set_data_from_numpy(np.ones((1, 15), np.int32))
        inputs = [f, inputs[1]]
    elif case == "missing_input":
        inputs = inputs[:1]
    elif case == "unexpected_input":
        e = grpcclient.InferInput("EXTRA", [1, 16], "INT32")
        e.set_data_from_numpy(a)
        inputs = inputs + [e]
    elif case == "batch_too_large":
        big = np.ones((9, 16), dtype=np.int32)
        inputs = simple_inputs(big, big)
    elif case == "unknown_output":
        outputs = [grpcclient.InferRequestedOutput("NOPE")]
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, inputs, model_version=version, outputs=outputs)
    assert code in _status(err.value)
    assert needle in err.value.message()
    # The server is unharmed: the next request succeeds.
    ok = client.infer("simple", simple_inputs(a, a))
    np.testing.assert_array_equal(ok.as_numpy("OUTPUT0"), a * 2)
    assert client.is_server_ready()


def test_raw_byte_size_mismatch(client: grpcclient.InferenceServerClient) -> None:
    """A truncated raw buffer, as a buggy client would send it."""
    import grpc

    req = service_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
    req.raw_input_contents.extend([b"\x00" * 64, b"\x00" * 10])
    with pytest.raises(grpc.RpcError) as err:
        client._client_stub.ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT1" in err.value.details() and "10 bytes" in err.value.details() and "64 bytes" in err.value.details()
    a = np.ones((1, 16), dtype=np.int32)
    assert client.infer("simple", simple_inputs(a, a)).as_numpy("OUTPUT0") is not None


def test_statistics_match_requests(client: grpcclient.InferenceServerClient) -> None:
    def counts() -> tuple[int, int, int]:
        s = client.get_inference_statistics("simple", "1", as_json=True)["model_stats"][0]
        st = s["inference_stats"]
        return int(st["success"].get("count", 0)), int(st["fail"].get("count", 0)), int(s.get("inference_count", 0))

    s0, f0, n0 = counts()
    a = np.ones((3, 16), dtype=np.int32)
    for _ in range(5):
        client.infer("simple", simple_inputs(a, a))
    with pytest.raises(InferenceServerException):
        client.infer("simple", simple_inputs(a, a)[:1])
    s1, f1, n1 = counts()
    assert (s1 - s0, f1 - f0, n1 - n0) == (5, 1, 15)
    stats = client.get_inference_statistics("digits", as_json=True)["model_stats"]
    assert sorted(s["version"] for s in stats) == ["1", "2"]  # one entry per version


def test_metrics_endpoint(server: ServerProcess, client: grpcclient.InferenceServerClient) -> None:
    import urllib.request

    a = np.ones((1, 16), dtype=np.int32)
    client.infer("simple", simple_inputs(a, a))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('nv_inference_request_success{model="simple",version="1"}'))
    assert float(line.split()[-1]) >= 1
    assert "nv_inference_request_success_total" not in text
    assert 'nv_inference_request_failure{model="simple",reason="REJECTED",version="1"}' in text
    assert "nv_inference_exec_count" in text and "nv_inference_compute_infer_duration_us" in text
