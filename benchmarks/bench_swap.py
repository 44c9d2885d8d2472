#!/usr/bin/env python
"""No cold start: what a cutover costs the requests right after it (issue #4).

    python benchmarks/bench_swap.py [--repeat 5] [--concurrency 4] [--json out.json]

For each repeat, a fresh ``swapserve serve`` (subprocess, loopback, explicit mode) serves
``convnet`` (the compute-heavier example) twice: ``hot`` with swapserve's defaults and
``cold`` with the config parameter ``swapserve.warmup: false``. A closed-loop client
(``--concurrency`` tasks, generic gRPC calls with pre-serialised requests) runs throughout
and records (sent, received, model_version) for every request.

* steady state: latencies of version 1 before any change;
* preloaded cutover (swapserve): ``load convnet 2`` in the background, then ``promote``;
  we measure the first 100 responses by version 2 and the time from the promote call to
  the first response by version 2;
* rollback: the same for ``rollback`` back to version 1;
* "load, then route" without preload: on ``cold``, ``load`` + ``promote`` issued together at the
  moment of the change, version 2 never warmed: the first 100 responses and the time from
  the load call to the first response by version 2.

Reports medians over repeats of each figure, and ratios to the steady state measured in the
same run (the machine is small and noisy; never read a lone absolute time).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swapserve._proto import grpc_service_pb2 as pb  # noqa: E402
from swapserve.cli.client import ControlClient  # noqa: E402
from tests.e2e.serverproc import ServerProcess  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def make_repo(src: Path, dst: Path) -> None:
    for name, cold in (("hot", False), ("cold", True)):
        model = dst / name
        model.mkdir(parents=True)
        for v in ("1", "2"):
            shutil.copytree(src / "convnet" / "1", model / v)
        cfg = (src / "convnet" / "config.pbtxt").read_text().replace('"convnet"', f'"{name}"')
        cfg += '\nversion_policy { specific { versions: [ 1 ] } }\n'
        if cold:
            cfg += 'parameters { key: "swapserve.warmup" value: { string_value: "false" } }\n'
        (model / "config.pbtxt").write_text(cfg)


class Client:
    """Closed-loop load on one model on a background thread; records every request."""

    def __init__(self, url: str, model: str, concurrency: int) -> None:
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="image", datatype="FP32", shape=[1, 1, 32, 32])
        req.raw_input_contents.append(np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32).tobytes())
        self.payload = req.SerializeToString()
        self.url, self.concurrency = url, concurrency
        self.records: list[tuple[float, float, str]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.url) as ch:
            call = ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

            async def loop() -> None:
                while not self._stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        raw = await call(self.payload, timeout=60)
                    except grpc.aio.AioRpcError:
                        self.errors += 1
                        continue
                    version = pb.ModelInferResponse.FromString(raw).model_version
                    self.records.append((t0, time.perf_counter(), version))

            await asyncio.gather(*(loop() for _ in range(self.concurrency)))

    def start(self) -> Client:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.01)


def after(records: list[tuple[float, float, str]], t_call: float, version: str, n: int = 100) -> tuple[list[float], float]:
    """Latencies (ms) of the first n responses by ``version`` sent after t_call, and the time (ms)
    from t_call to the first response by ``version``."""
    hits = sorted((r for r in records if r[2] == version and r[0] >= t_call), key=lambda r: r[0])[:n]
    first = min((r[1] for r in records if r[2] == version and r[1] >= t_call), default=float("nan"))
    return [(r[1] - r[0]) * 1e3 for r in hits], (first - t_call) * 1e3


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def one_run(src: Path, concurrency: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        make_repo(src, repo)
        out: dict[str, float] = {}
        with ServerProcess(repo, "--model-control-mode", "explicit", "--load-model", "hot", "--load-model",
                           "cold") as srv, ControlClient(srv.control_url) as ctl:
            for model, preload in (("hot", True), ("cold", False)):
                client = Client(srv.url, model, concurrency).start()
                try:
                    client.wait_for(300)
                    t_steady = time.perf_counter()
                    client.wait_for(len(client.records) + 300)
                    steady = [(r[1] - r[0]) * 1e3 for r in client.records if r[0] >= t_steady]
                    if preload:
                        ctl.load(model, 2, reason="bench: preload")
                        t = time.perf_counter()
                        ctl.promote(model, 2, reason="bench: cutover")
                        client.wait_for(len(client.records) + 200)
                        lat, first = after(client.records, t, "2")
                        t = time.perf_counter()
                        ctl.rollback(model, reason="bench: rollback")
                        client.wait_for(len(client.records) + 200)
                        rlat, rfirst = after(client.records, t, "1")
                        out.update({"steady_p50_ms": pct(steady, 50), "steady_p99_ms": pct(steady, 99),
                                    "cutover_p50_ms": pct(lat, 50), "cutover_p99_ms": pct(lat, 99),
                                    "promote_to_first_ms": first, "rollback_p50_ms": pct(rlat, 50),
                                    "rollback_p99_ms": pct(rlat, 99), "rollback_to_first_ms": rfirst})
                    else:
                        t = time.perf_counter()
                        ctl.load(model, 2, reason="bench: load at the moment of the change")
                        ctl.promote(model, 2, reason="bench: route to it")
                        client.wait_for(len(client.records) + 200)
                        lat, first = after(client.records, t, "2")
                        out.update({"cold_steady_p50_ms": pct(steady, 50), "cold_steady_p99_ms": pct(steady, 99),
                                    "cold_p50_ms": pct(lat, 50), "cold_p99_ms": pct(lat, 99),
                                    "cold_load_to_first_ms": first})
                    out[f"{model}_errors"] = client.errors
                finally:
                    client.stop()
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = [one_run(args.repository, args.concurrency) for _ in range(args.repeat)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ratios = {
        "cutover_p99 / steady_p99": statistics.median(r["cutover_p99_ms"] / r["steady_p99_ms"] for r in runs),
        "cutover_p50 / steady_p50": statistics.median(r["cutover_p50_ms"] / r["steady_p50_ms"] for r in runs),
        "rollback_p99 / steady_p99": statistics.median(r["rollback_p99_ms"] / r["steady_p99_ms"] for r in runs),
        # The cold model's own "steady state" is not steady (nothing ever warmed it), so its first
        # requests are compared with the warm steady state of the same network in the same run.
        "cold_p99 / steady_p99": statistics.median(r["cold_p99_ms"] / r["steady_p99_ms"] for r in runs),
        "cold_p50 / steady_p50": statistics.median(r["cold_p50_ms"] / r["steady_p50_ms"] for r in runs),
        "cold_load_to_first / promote_to_first": statistics.median(
            r["cold_load_to_first_ms"] / r["promote_to_first_ms"] for r in runs),
    }
    rows = [
        ("steady state (v1)", med["steady_p50_ms"], med["steady_p99_ms"], "", ""),
        ("first 100 after promote (preloaded v2)", med["cutover_p50_ms"], med["cutover_p99_ms"],
         med["promote_to_first_ms"], f"{ratios['cutover_p99 / steady_p99']:.2f}x"),
        ("first 100 after rollback (v1, kept warm)", med["rollback_p50_ms"], med["rollback_p99_ms"],
         med["rollback_to_first_ms"], f"{ratios['rollback_p99 / steady_p99']:.2f}x"),
        ("steady state, cold model (v1)", med["cold_steady_p50_ms"], med["cold_steady_p99_ms"], "", ""),
        ("first 100 after load-then-route (no preload, no warmup)", med["cold_p50_ms"], med["cold_p99_ms"],
         med["cold_load_to_first_ms"], f"{ratios['cold_p99 / steady_p99']:.2f}x"),
    ]
    print(f"\nconvnet, closed loop at concurrency {args.concurrency}, medians of {args.repeat} runs "
          f"(errors: hot {sum(r['hot_errors'] for r in runs)}, cold {sum(r['cold_errors'] for r in runs)})\n")
    print("| phase | p50 ms | p99 ms | call -> first response by target (ms) | p99 vs steady |")
    print("|---|---:|---:|---:|---:|")
    for name, p50, p99, first, ratio in rows:
        first_s = f"{first:.1f}" if first != "" else ""
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {first_s} | {ratio} |")
    print(f"\nload-then-route takes {ratios['cold_load_to_first / promote_to_first']:.1f}x as long from the call to "
          "the first response by the new version as a preloaded promote (same run, medians).")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": med, "ratios": ratios,
                                         "concurrency": args.concurrency, "repeat": args.repeat}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
