#!/usr/bin/env python
"""The fleet acts as one: convergence time and the request-path cost of following the registry (issue 15).

    python benchmarks/bench_fleet.py [--promotes 20] [--seconds 5] [--repeat 3] [--json out.json]

A throwaway PostgreSQL (tests/pg.py) and 3 ``swapserve serve`` replicas (subprocesses, loopback,
the example ``digits`` with both versions preloaded) share one registry.

* convergence: ``--promotes`` promotes alternating between versions 1 and 2, each issued through
  replica A's control service; from the moment the call is issued, every replica is probed
  (pinned-free inference, ``model_version`` of the response) until all three serve the new
  champion. Reports the median and p99 of "issued -> served by all 3", and of "A answered ->
  served by B and C" (what the fleet adds to A's own publish).
* request-path cost: steady closed-loop throughput against replica A (``--seconds`` per repeat,
  generic gRPC calls with a pre-serialised request) with B and C up and idle-listening, with B and
  C frozen (SIGSTOP, interleaved with the former), and with B and C stopped (A alone). Following
  the registry runs off the request path: what the idle replicas cost A is only the CPU they use
  on the shared cores (reported as ``idle_replica_cpu_fraction``, of one core each).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swapserve._proto import grpc_service_pb2 as pb  # noqa: E402
from swapserve.cli.client import ControlClient  # noqa: E402
from tests.e2e.serverproc import ServerProcess, build_example_repo, copy_models  # noqa: E402
from tests.pg import PostgresServer, find_pg_bindir  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def payload(repo: Path) -> bytes:
    x = np.load(repo / "digits" / "holdout.npz")["x"][:1].astype(np.float32)
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="pixels", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req.SerializeToString()


class Prober:
    """A blocking channel to one replica: ``version()`` is the model_version of one routed request."""

    def __init__(self, url: str, body: bytes) -> None:
        self.channel = grpc.insecure_channel(url)
        self.call = self.channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        self.body = body

    def version(self) -> str:
        return pb.ModelInferResponse.FromString(self.call(self.body, timeout=10)).model_version


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def converge(ctl: ControlClient, probers: list[Prober], promotes: int) -> dict[str, float]:
    issued_all: list[float] = []
    answered_rest: list[float] = []
    current = probers[0].version()
    for i in range(promotes):
        target = "1" if current == "2" else "2"
        done: dict[int, float] = {}
        t0 = time.perf_counter()
        result: dict[str, float] = {}

        def promote() -> None:
            ctl.promote("digits", int(target), reason=f"bench_fleet {i}")
            result["answered"] = time.perf_counter()

        th = threading.Thread(target=promote)
        th.start()
        deadline = t0 + 30
        while len(done) < len(probers) and time.perf_counter() < deadline:
            for j, p in enumerate(probers):
                if j not in done and p.version() == target:
                    done[j] = time.perf_counter()
        th.join(30)
        if len(done) < len(probers):
            raise RuntimeError(f"promote {i} to v{target} did not converge in 30 s: {done}")
        issued_all.append((max(done.values()) - t0) * 1e3)
        answered_rest.append((max(done[j] for j in range(1, len(probers))) - result["answered"]) * 1e3)
        current = target
        time.sleep(0.2)
    return {"promotes": promotes,
            "issued_to_all_ms_median": statistics.median(issued_all), "issued_to_all_ms_p99": pct(issued_all, 99),
            "answered_to_others_ms_median": statistics.median(answered_rest),
            "answered_to_others_ms_p99": pct(answered_rest, 99)}


def throughput(url: str, body: bytes, seconds: float, concurrency: int = 8) -> float:
    async def run() -> int:
        count = 0
        stop = time.perf_counter() + seconds
        async with grpc.aio.insecure_channel(url) as ch:
            call = ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

            async def loop() -> None:
                nonlocal count
                while time.perf_counter() < stop:
                    await call(body, timeout=10)
                    count += 1

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        return count

    return asyncio.run(run()) / seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--promotes", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    bindir = find_pg_bindir()
    if bindir is None:
        print("bench_fleet: PostgreSQL binaries not found; run scripts/ensure-postgres.sh", file=sys.stderr)
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    src = build_example_repo(scratch / "examples")
    pg = PostgresServer(bindir)
    pg.start()
    replicas: list[ServerProcess] = []
    try:
        registry = pg.create_database("bench")
        for name in ("a", "b", "c"):
            repo = copy_models(src, scratch / f"repo-{name}", ["digits"])
            replicas.append(ServerProcess(repo, "--registry", registry, "--replica-id", name,
                                          env={"SWAPSERVE_HOME": str(scratch / f"home-{name}")}).start())
        body = payload(src)
        probers = [Prober(r.url, body) for r in replicas]
        with ControlClient(replicas[0].control_url) as ctl:
            ctl.promote("digits", 2, reason="bench_fleet: baseline")
            time.sleep(1.0)
            conv = converge(ctl, probers, args.promotes)
        throughput(replicas[0].url, body, 1.0)  # warm
        # Interleaved, so that drift of the shared machine's load hits both sides alike: B and C up
        # and idle-listening, then frozen (SIGSTOP: A alone on the cores; A's own sync still runs).
        fleet, frozen, idle_cpu = [], [], []
        others = [r.proc for r in replicas[1:] if r.proc is not None]
        for _ in range(args.repeat):
            cpu0 = sum(cpu_s(p.pid) for p in others)
            fleet.append(throughput(replicas[0].url, body, args.seconds))
            idle_cpu.append((sum(cpu_s(p.pid) for p in others) - cpu0) / args.seconds / len(others))
            for p in others:
                p.send_signal(signal.SIGSTOP)
            try:
                frozen.append(throughput(replicas[0].url, body, args.seconds))
            finally:
                for p in others:
                    p.send_signal(signal.SIGCONT)
        for r in replicas[1:]:
            r.stop()
        alone = [throughput(replicas[0].url, body, args.seconds) for _ in range(args.repeat)]
        out: dict[str, Any] = dict(conv)
        out.update({"rps_with_3_replicas_idle_listening": statistics.median(fleet),
                    "rps_others_frozen": statistics.median(frozen),
                    "rps_alone_others_stopped": statistics.median(alone),
                    "ratio_fleet_vs_frozen": statistics.median(fleet) / statistics.median(frozen),
                    "ratio_fleet_vs_alone": statistics.median(fleet) / statistics.median(alone),
                    "idle_replica_cpu_fraction": statistics.median(idle_cpu)})
    finally:
        for r in replicas:
            r.stop()
        pg.cleanup()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
