"""The standard gRPC health service and server reflection on the inference port."""
from __future__ import annotations

from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.e2e.serverproc import copy_models


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
