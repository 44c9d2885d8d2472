"""The network fuzz target: raw bytes sent as gRPC messages to real ``swapserve serve`` processes,
one on the native (grpc++) front end and one on grpc.aio, both on 127.0.0.1.

One input: ``data[0]`` picks the method (every method of the inference and feedback services,
health, reflection, and an unknown path), ``data[1]`` how a streaming call splits the rest into
messages; the rest is sent as the message bytes, unparsed (generic calls, no serializer). Each
input goes to both servers.

A crash: a server process exits; a call answered UNKNOWN (a handler raised: both front ends
answer that way); INTERNAL for bytes that do parse as the method's request; a server that logs
a traceback; no answer within ``HANG_S`` (a hang); and, checked every ``CHECK_EVERY`` inputs, a
server whose health check is not SERVING or that cannot answer a valid ModelInfer.
"""
from __future__ import annotations

import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import grpc

from tests.fuzz.mutate import mutate_bytes
from tests.fuzz.targets import FuzzCrash, InferTarget, Target

HANG_S = 10.0
CHECK_EVERY = 200
#: What a server logs for an exception it did not expect (status_of, the front end, asyncio).
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|unexpected error in|raised$|failed to start|"
                        r"Exception in callback|Task exception was never retrieved")


def _methods() -> list[tuple[str, bool, bool, Any]]:
    """(path, client streaming, server streaming, request class) of every method fuzzed."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2
    from google.protobuf import message_factory

    from swapserve._proto import feedback_pb2
    from swapserve._proto import grpc_service_pb2 as pb

    out = []
    for fd in (pb.DESCRIPTOR, feedback_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        for service in fd.services_by_name.values():
            for m in service.methods:
                if service.name == "Health" and m.name == "Watch":
                    continue  # a watch never ends by design
                cls = message_factory.GetMessageClass(m.input_type)
                out.append((f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming, cls))
    out.append(("/inference.GRPCInferenceService/NoSuchMethod", False, False, None))
    out.append(("/no.such.Service/ModelInfer", False, False, None))
    return out


class NetTarget(Target):
    name = "net"
    max_len = 20480

    def __init__(self) -> None:
        self.servers: dict[str, Any] = {}
        self.channels: dict[str, grpc.Channel] = {}
        self.count = 0
        self.seen: dict[str, int] = {}
        self.infer = InferTarget()
        #: Tracebacks grpc.aio logged for messages it could not parse, per server.
        self.decode_tracebacks: dict[str, int] = {}

    def watched_pids(self) -> dict[str, int]:
        return {f"{label}_server": s.proc.pid for label, s in self.servers.items() if s.proc is not None}

    def setup(self) -> None:
        from tests.e2e.serverproc import ServerProcess, build_example_repo, copy_models

        self.methods = _methods()
        self.infer.seeds()  # loads the protobuf module it mutates with
        self.scratch = tempfile.TemporaryDirectory(prefix="swapserve-netfuzz-")
        tmp = Path(self.scratch.name)
        repo = copy_models(build_example_repo(tmp / "examples"), tmp / "repo", ["simple", "digits"])
        for label in ("native", "python"):
            home = tmp / f"home-{label}"
            s = ServerProcess(repo, "--frontend", label, "--log-level", "ERROR", "--torch-threads", "1",
                              env={"SWAPSERVE_HOME": str(home)})
            s.start()
            self.servers[label] = s
            self.channels[label] = grpc.insecure_channel(s.url, options=[
                ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
            self.seen[label] = len(s.lines)
        self.health_check()

    def close(self) -> None:
        for c in self.channels.values():
            c.close()
        for s in self.servers.values():
            s.stop()
        self.scratch.cleanup()

    # -- one input --------------------------------------------------------------------------

    def _split(self, payload: bytes, how: int) -> list[bytes]:
        parts = how % 4 + 1 if payload else how % 2
        if parts <= 1:
            return [payload] * parts
        step = max(1, len(payload) // parts)
        return [payload[i:i + step] for i in range(0, len(payload), step)][:parts] or [b""]

    def _call(self, label: str, path: str, client_stream: bool, server_stream: bool, payload: bytes,
              how: int) -> tuple[grpc.StatusCode, str]:
        ch = self.channels[label]
        try:
            if client_stream or server_stream:
                messages = self._split(payload, how) if client_stream else [payload]
                if client_stream and server_stream:
                    call = ch.stream_stream(path)(iter(messages), timeout=HANG_S)
                elif client_stream:
                    return grpc.StatusCode.OK, bool(ch.stream_unary(path)(iter(messages), timeout=HANG_S)) and ""
                else:
                    call = ch.unary_stream(path)(payload, timeout=HANG_S)
                for _ in call:
                    pass
            else:
                ch.unary_unary(path)(payload, timeout=HANG_S)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""

    def _parses(self, cls: Any, payload: bytes) -> bool:
        if cls is None:
            return False
        try:
            cls.FromString(payload)
        except Exception:  # noqa: BLE001 - DecodeError and friends
            return False
        return True

    def one_input(self, data: bytes) -> None:
        if len(data) < 2:
            return
        path, cstream, sstream, cls = self.methods[data[0] % len(self.methods)]
        payload = data[2:]
        messages = self._split(payload, data[1]) if cstream else [payload]
        # Bytes that are not the method's request: the transport refuses them before any servicer
        # runs (the native front end with INTERNAL, grpc.aio with UNKNOWN "Unexpected DecodeError").
        parse = all(self._parses(cls, m) for m in messages)
        for label in self.servers:
            code, details = self._call(label, path, cstream, sstream, payload, data[1])
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise FuzzCrash(f"{label} front end: {path} gave no answer within {HANG_S} s (hang)")
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and parse:
                raise FuzzCrash(f"{label} front end: {path} answered {code.name} for a parseable request: {details}")
            if code == grpc.StatusCode.UNAVAILABLE:
                self._alive(label)
                raise FuzzCrash(f"{label} front end: {path} UNAVAILABLE: {details}")
        self.count += 1
        if self.count % CHECK_EVERY == 0:
            self.health_check()
        else:
            for label in self.servers:
                self._log(label)

    def _alive(self, label: str) -> None:
        s = self.servers[label]
        if s.proc.poll() is not None:
            raise FuzzCrash(f"the {label} server exited ({s.proc.returncode}):\n" + "\n".join(s.lines[-30:]))

    def _log(self, label: str) -> None:
        s = self.servers[label]
        new = s.lines[self.seen[label]:]
        self.seen[label] += len(new)
        for i, line in enumerate(new):
            if _TRACEBACK.search(line):
                block = new[i:i + 40]
                end = next((j for j, b in enumerate(block) if j and not b.startswith((" ", "Traceback"))), len(block))
                if any("cygrpc.deserialize" in b for b in block[:end]) and "DecodeError" in block[min(end, len(block) - 1)]:
                    # grpc.aio logs every message it cannot parse with a traceback (then answers
                    # UNKNOWN): the transport's behaviour, counted, not a swapserve crash.
                    self.decode_tracebacks[label] = self.decode_tracebacks.get(label, 0) + 1
                    continue
                raise FuzzCrash(f"the {label} server logged an unexpected exception:\n" + "\n".join(block))

    def health_check(self) -> None:
        """Both servers up: health SERVING, and a valid ModelInfer answered by a named version."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from swapserve._proto import grpc_service_pb2 as pb

        request = self.infer.valid_request("simple", random.Random(self.count), batch=1).SerializeToString()
        for label, ch in self.channels.items():
            self._alive(label)
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            if status.status != health_pb2.HealthCheckResponse.SERVING:
                raise FuzzCrash(f"the {label} server's health is {status.status}")
            raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(request, timeout=5)
            if not pb.ModelInferResponse.FromString(raw).model_version:
                raise FuzzCrash(f"the {label} server answered a valid request without model_version")
            self._log(label)

    # -- corpus and mutation -----------------------------------------------------------------

    def seeds(self) -> list[bytes]:
        from grpc_health.v1 import health_pb2
        from grpc_reflection.v1alpha import reflection_pb2

        from swapserve._proto import feedback_pb2
        from swapserve._proto import grpc_service_pb2 as pb

        methods = _methods()
        index = {p.rsplit("/", 1)[1]: i for i, (p, *_rest) in enumerate(methods)}
        infer = [pb.ModelInferRequest.FromString(s) for s in self.infer.seeds()[:6]]
        out = [bytes([index["ModelInfer"], 0]) + r.SerializeToString() for r in infer]
        out += [bytes([index["ModelStreamInfer"], k]) + r.SerializeToString() for k, r in enumerate(infer[:4])]
        for name, msg in (("ModelMetadata", pb.ModelMetadataRequest(name="simple")),
                          ("ModelConfig", pb.ModelConfigRequest(name="digits", version="2")),
                          ("ModelReady", pb.ModelReadyRequest(name="simple", version="1")),
                          ("ModelStatistics", pb.ModelStatisticsRequest(name="digits")),
                          ("RepositoryIndex", pb.RepositoryIndexRequest(ready=True)),
                          ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="../simple")),
                          ("ServerLive", pb.ServerLiveRequest()), ("ServerMetadata", pb.ServerMetadataRequest()),
                          ("Report", feedback_pb2.DESCRIPTOR.message_types_by_name and None),
                          ("Check", health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")),
                          ("ServerReflectionInfo", reflection_pb2.ServerReflectionRequest(list_services="")),
                          ("NoSuchMethod", pb.ServerLiveRequest())):
            if msg is not None:
                out.append(bytes([index[name], 0]) + msg.SerializeToString())
        return out

    def mutate(self, data: bytes, max_size: int, rng: random.Random) -> bytes:
        if len(data) < 2 or rng.random() < 0.1:
            return bytes([rng.randrange(256), rng.randrange(256)]) + data[2:]
        head, payload = data[:2], data[2:]
        if rng.random() < 0.4:
            payload = self.infer.mutate(payload, max_size - 2, rng)
        else:
            payload = mutate_bytes(payload, max_size - 2, rng)
        if rng.random() < 0.05:
            head = bytes([rng.randrange(256), head[1]])
        return head + payload
