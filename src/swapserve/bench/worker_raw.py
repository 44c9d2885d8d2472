"""Raw-bytes worker: generic gRPC calls on pre-serialised ModelInferRequest bytes.

The cheapest client path measured here: no per-request protobuf building, and from each
response only ``model_version`` is read, by a small wire-format scanner, not a full parse.
"""
from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

import grpc

from swapserve.bench.loop import CLIENT_ERROR, Call, Outcome, WorkerSpec, worker_main

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"

#: Channel options: no retries (a retried request would hide an error) and no proxy lookup.
CHANNEL_OPTIONS = [("grpc.enable_retries", 0), ("grpc.enable_http_proxy", 0),
                   ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def response_version(buf: bytes) -> str:
    """``ModelInferResponse.model_version`` (field 2) from the wire bytes, scanning top-level fields only."""
    pos, n, version = 0, len(buf), b""
    while pos < n:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 2:
            size, pos = _varint(buf, pos)
            if key >> 3 == 2:
                version = buf[pos:pos + size]
            pos += size
        elif wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # groups never appear in these messages
            break
    return version.decode()


async def make_call(spec: WorkerSpec) -> tuple[Call, Callable[[], Awaitable[None]]]:
    if spec.tls is None:
        channel = grpc.aio.insecure_channel(spec.url, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.aio.secure_channel(spec.url, spec.tls.channel_credentials(), options=CHANNEL_OPTIONS)
    rpc = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
    payloads = spec.payloads
    timeout = spec.timeout_s
    metadata = spec.metadata()

    async def call(i: int) -> Outcome:
        try:
            return 0, response_version(await rpc(payloads[i], timeout=timeout, metadata=metadata))
        except grpc.aio.AioRpcError as exc:
            return exc.code().value[0], ""
        except Exception:  # noqa: BLE001 - any client-side failure is this request's error
            return CLIENT_ERROR, ""

    return call, channel.close


if __name__ == "__main__":
    sys.exit(worker_main(make_call))
