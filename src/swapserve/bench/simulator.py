"""A traffic-and-label simulator for rollouts: real requests, real labels, a real server.

Models with a known, controllable accuracy per slice stand in for champion and challenger:
an ``oracle`` TorchScript classifier reads ``[label, slice_id, u]`` (the true class, the slice
index and a uniform draw) and answers the true class unless ``u`` falls under that slice's
error rate, in which case it answers the next class. So "version 2 is 10 points worse on
slice 3" is exactly that, and the simulator knows every ground truth.

``Simulator`` sends requests open-loop at a fixed rate (raw generic gRPC calls; each request
gets a random ``routing_key`` so a canary's share of keys is its share of traffic, and a
``slice`` parameter), and reports every answer's true label through the Feedback service in
small batches (labels arrive ``label_delay_s`` late; with ``token``, as that feedback
credential's reporter; with several tokens, each report batch uses the next). Request ids are left to the server (unguessable, unique). It runs in its own thread and counts
requests, errors, labels and answers per version. Against a TLS server pass ``tls`` (a
``swapserve.tls.ClientTls``), and ``inference_token`` where the inference port is closed.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from swapserve._proto import feedback_pb2 as fpb
from swapserve._proto import grpc_service_pb2 as pb

if TYPE_CHECKING:
    from swapserve.tls import ClientTls

INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT = "/swapserve.v1.Feedback/Report"
SLICES = ("a", "b", "c", "d", "e")

ORACLE_CONFIG = """name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 64
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ 3 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ }}
version_policy {{ all {{ }} }}
"""


def build_oracle(path: Path, error_by_slice: Sequence[float]) -> None:
    """Write a TorchScript oracle whose error rate on slice i is ``error_by_slice[i]``."""
    import torch

    class Oracle(torch.nn.Module):
        def __init__(self, errors: list[float]) -> None:
            super().__init__()
            self.register_buffer("errors", torch.tensor(errors, dtype=torch.float32))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            label = features[:, 0].long()
            slice_id = features[:, 1].long()
            wrong = features[:, 2] < self.errors[slice_id]
            answer = torch.where(wrong, (label + 1) % 10, label)
            return torch.nn.functional.one_hot(answer, 10).float()

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Oracle(list(error_by_slice))).save(str(path))


def build_oracle_model(repo: Path, name: str, versions: dict[int, Sequence[float]]) -> Path:
    """A model directory with one oracle per version: {version: error rate per slice}."""
    model = repo / name
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(ORACLE_CONFIG.format(name=name))
    for v, errors in versions.items():
        build_oracle(model / str(v) / "model.pt", errors)
    return model


@dataclass
class SimStats:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    by_version: Counter[str] = field(default_factory=Counter)
    labels_sent: int = 0
    joined: int = 0


class Simulator:
    """Open-loop traffic plus labels against ``url`` for ``model``; start(), then stop()."""

    def __init__(self, url: str, model: str, *, rate: float = 200.0, label_delay_s: float = 0.05,
                 slices: Sequence[str] = SLICES, seed: int = 0, concurrency_cap: int = 256,
                 token: str | Sequence[str] | None = None, tls: ClientTls | None = None,
                 inference_token: str | None = None) -> None:
        """``token``: feedback credential(s); ``inference_token``: the bearer token on every request;
        ``tls``: the channel's TLS (None: plaintext)."""
        self.url, self.model, self.rate, self.label_delay_s = url, model, rate, label_delay_s
        self.tls = tls
        self.infer_metadata = (("authorization", f"Bearer {inference_token}"),) if inference_token else None
        tokens = [token] if isinstance(token, str) else list(token or ())
        #: Feedback metadata per report, in turn (a fleet of labellers, one credential each).
        self.metadata = [(("authorization", f"Bearer {t}"),) for t in tokens] or [None]
        self._reports = 0
        self.slices = list(slices)
        self.rng = random.Random(seed)
        self.cap = concurrency_cap
        self.stats = SimStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Simulator:
        self._thread.start()
        return self

    def stop(self) -> SimStats:
        self._stop.set()
        self._thread.join(60)
        return self.stats

    def _request(self, i: int) -> tuple[bytes, int]:
        label = self.rng.randrange(10)
        s = self.rng.randrange(len(self.slices))
        req = pb.ModelInferRequest(model_name=self.model)
        req.inputs.add(name="features", datatype="FP32", shape=[1, 3])
        req.raw_input_contents.append(np.array([[label, s, self.rng.random()]], np.float32).tobytes())
        req.parameters["slice"].string_param = self.slices[s]
        req.parameters["routing_key"].int64_param = self.rng.getrandbits(62)
        return req.SerializeToString(), label

    async def _main(self) -> None:
        channel = (grpc.aio.insecure_channel(self.url) if self.tls is None
                   else grpc.aio.secure_channel(self.url, self.tls.channel_credentials()))
        async with channel as ch:
            infer = ch.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            report = ch.unary_unary(REPORT, request_serializer=fpb.ReportRequest.SerializeToString,
                                    response_deserializer=fpb.ReportResponse.FromString)
            pending: list[tuple[float, str, int]] = []
            sem = asyncio.Semaphore(self.cap)
            tasks: set[asyncio.Task[None]] = set()

            async def one(i: int) -> None:
                payload, label = self._request(i)
                try:
                    raw = await infer(payload, timeout=30, metadata=self.infer_metadata)
                    resp = pb.ModelInferResponse.FromString(raw)
                    self.stats.ok += 1
                    self.stats.by_version[resp.model_version] += 1
                    pending.append((time.monotonic() + self.label_delay_s, resp.id, label))
                except grpc.aio.AioRpcError as exc:
                    self.stats.errors[exc.code().name] += 1
                finally:
                    sem.release()

            async def labeller() -> None:
                while not self._stop.is_set() or pending:
                    await asyncio.sleep(0.05)
                    now = time.monotonic()
                    due = [p for p in pending if p[0] <= now]
                    if not due:
                        continue
                    del pending[:len(due)]
                    req = fpb.ReportRequest(model=self.model,
                                            outcomes=[fpb.Outcome(id=rid, label=lab) for _, rid, lab in due])
                    try:
                        metadata = self.metadata[self._reports % len(self.metadata)]
                        self._reports += 1
                        resp = await report(req, timeout=30, metadata=metadata)
                        self.stats.labels_sent += len(due)
                        self.stats.joined += resp.joined
                    except grpc.aio.AioRpcError as exc:
                        self.stats.errors["feedback:" + exc.code().name] += 1

            lab = asyncio.create_task(labeller())
            start = time.monotonic()
            i = 0
            while not self._stop.is_set():
                due = start + i / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await sem.acquire()
                self.stats.sent += 1
                t = asyncio.create_task(one(i))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await lab
