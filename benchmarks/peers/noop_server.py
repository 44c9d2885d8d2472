"""The floor: a minimal grpc.aio KServe v2 server that parses each request and returns a fixed response.

No model, no batching, no validation: what Python gRPC itself costs per request on this machine.
Prints ``noop ready: grpc=127.0.0.1:PORT`` when serving; SIGTERM stops it.

    python benchmarks/peers/noop_server.py [--port 0] [--model digits] [--version 1]
"""
from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import numpy as np

from swapserve._proto import grpc_service_pb2 as pb
from swapserve._proto import grpc_service_pb2_grpc as pb_grpc


class Noop(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: str, version: str) -> None:
        self.model, self.version = model, version
        out = pb.ModelInferResponse(model_name=model, model_version=version)
        out.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
        out.raw_output_contents.append(np.full(10, 0.1, np.float32).tobytes())
        self.response = out

    async def ServerLive(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ModelReadyResponse(ready=request.name == self.model)

    async def ModelMetadata(self, request, context):  # type: ignore[no-untyped-def]
        m = pb.ModelMetadataResponse(name=self.model, platform="noop", versions=[self.version])
        m.inputs.add(name="pixels", datatype="FP32", shape=[-1, 64])
        m.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 10])
        return m

    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        return self.response


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--version", default="1")
    args = ap.parse_args()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Noop(args.model, args.version), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"noop ready: grpc=127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
