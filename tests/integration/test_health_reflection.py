"""The standard gRPC health service, server reflection and transport edge cases on the inference port."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from swapserve._proto import control_pb2, control_pb2_grpc
from swapserve._proto import grpc_service_pb2 as pb
from swapserve.server.transport import native as native_frontend
from tests.e2e.serverproc import copy_models
from tests.integration.test_batching_routing import make_slow, slow_request


def test_health_and_reflection(example_repo: Path, tmp_path: Path, make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(copy_models(example_repo, tmp_path / "repo", ["simple"]))
    health = health_pb2_grpc.HealthStub(srv.channel)
    for service in ("", "inference.GRPCInferenceService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "swapserve.v1.Feedback", "grpc.health.v1.Health"} <= names


def test_health_not_serving_while_a_model_is_unavailable(tmp_path: Path, example_repo: Path,
                                                          make_server) -> None:  # type: ignore[no-untyped-def]
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    (repo / "broken").mkdir()
    (repo / "broken" / "config.pbtxt").write_text("max_batch_size: -3\n")
    srv = make_server(repo)
    health = health_pb2_grpc.HealthStub(srv.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("frontend", ["native-polled", "native", "python"])
def test_transport_edges(frontend: str, example_repo: Path, tmp_path: Path,
                         make_server) -> None:  # type: ignore[no-untyped-def]
    """What the native front end's adapter must do as grpc.aio does: streams, unknown methods, cancels.

    ``native-polled`` is the native front end on the loop ``swapserve serve`` runs (its completion
    queue runs in the loop's thread), ``native`` the same on a plain loop (its own thread).
    """
    if frontend.startswith("native") and not native_frontend.available():
        pytest.skip("the native front end is not built (no grpc++ at install)")
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    make_slow(repo, queue=16)
    srv = make_server(repo, polled=frontend == "native-polled", frontend=frontend.split("-")[0])
    assert getattr(srv.server.grpc_server, "polled", False) is (frontend == "native-polled")

    # A server-streaming call written through context.write (grpcio's health Watch).
    watch = health_pb2_grpc.HealthStub(srv.channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()

    # An unknown method is UNIMPLEMENTED; the server stays healthy.
    unknown = srv.channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as err:
        unknown(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # A client that gives up is answered CANCELLED/DEADLINE_EXCEEDED and counted, never lost.
    # 16 requests make four batches of ~15 ms each: the last ones are still queued when cancelled.
    futures = [srv.stub.ModelInfer.future(slow_request(), timeout=30) for _ in range(16)]
    time.sleep(0.01)
    cancelled = sum(1 for f in futures[1:] if f.cancel())
    assert futures[0].result(timeout=30).model_name == "slow"
    assert cancelled >= 1
    # Counted once each when the handler saw them (grpc.aio drops a call cancelled before its handler
    # starts without running it); the cancelled ones that were waiting are failures (CANCELED).
    time.sleep(1.0)
    s = srv.stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow")).model_stats[0]
    assert 1 <= s.inference_stats.success.count
    assert s.inference_stats.success.count + s.inference_stats.fail.count <= 16
    assert s.inference_stats.fail.count >= 1
    assert srv.stub.ModelInfer(slow_request(), timeout=30).model_name == "slow"


def test_polled_front_end_leaves_the_loop_responsive(example_repo: Path, tmp_path: Path,
                                                     make_server) -> None:  # type: ignore[no-untyped-def]
    """On the loop ``swapserve serve`` runs, the loop's thread waits in the front end's queue.

    Whatever else the loop serves must still run while it waits there: calls from other threads
    (call_soon_threadsafe), timers, and the control service (grpc.aio, reaching the loop through a
    descriptor), between and during inference requests.
    """
    if not native_frontend.available():
        pytest.skip("the native front end is not built (no grpc++ at install)")
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    srv = make_server(repo, polled=True, frontend="native")
    assert srv.server.grpc_server.polled
    request = pb.ModelInferRequest(model_name="simple")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16]).contents.int_contents.extend(range(16))
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16]).contents.int_contents.extend([1] * 16)

    # Idle: a callback from another thread and a timer both run.
    for _ in range(3):
        ran = threading.Event()
        srv.loop.call_soon_threadsafe(ran.set)
        assert ran.wait(10)
        srv.call(asyncio.sleep(0.05), timeout=10)

    # The control service answers while inference requests flow, and every request is answered.
    control = control_pb2_grpc.ControlStub(grpc.insecure_channel(f"127.0.0.1:{srv.server.control_port}"))
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(srv.stub.ModelInfer, request, timeout=30) for _ in range(200)]
        for _ in range(10):
            names = [m.name for m in control.ListModels(control_pb2.ListModelsRequest(), timeout=10).models]
            assert names == ["simple"]
        outputs = [a.result(timeout=30) for a in answers]
    assert all(o.model_name == "simple" and len(o.raw_output_contents) == 2 for o in outputs)
    assert all(o.raw_output_contents[0] == outputs[0].raw_output_contents[0] for o in outputs)


def test_one_polled_front_end_per_loop() -> None:
    """A second native server on the same FrontendLoop keeps a thread of its own; both answer,
    and a grpc.aio client on that loop (reaching it through a descriptor) gets its answers."""
    if not native_frontend.available():
        pytest.skip("the native front end is not built (no grpc++ at install)")
    from grpc_health.v1 import health

    async def main() -> list[int]:
        servers = [native_frontend.NativeServer(1 << 20) for _ in range(2)]
        ports = []
        for s in servers:
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), s)
            ports.append(s.add_insecure_port("127.0.0.1:0"))
            await s.start()
        assert [s.polled for s in servers] == [True, False]
        statuses = []
        try:
            for port in ports:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    for _ in range(20):
                        reply = await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(service=""), timeout=10)
                        statuses.append(reply.status)
        finally:
            for s in servers:
                await s.stop(1.0)
        return statuses

    statuses = native_frontend.run(main())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 40
