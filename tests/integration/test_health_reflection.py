"""The standard gRPC health service, server reflection and transport edge cases on the inference port."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from swapserve.server import native_frontend
from swapserve._proto import grpc_service_pb2 as pb
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


@pytest.mark.parametrize("frontend", ["native", "python"])
def test_transport_edges(frontend: str, example_repo: Path, tmp_path: Path,
                         make_server) -> None:  # type: ignore[no-untyped-def]
    """What the native front end's adapter must do as grpc.aio does: streams, unknown methods, cancels."""
    if frontend == "native" and not native_frontend.available():
        pytest.skip("the native front end is not built (no grpc++ at install)")
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    make_slow(repo, queue=16)
    srv = make_server(repo, frontend=frontend)

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
