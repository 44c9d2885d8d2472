#!/usr/bin/env python
"""Dynamic batching vs one request at a time, through the real gRPC server (issue #3).

    python benchmarks/bench_batching.py [--repeat 3] [--duration 5] [--json out.json]

One ``swapserve serve`` subprocess serves, for each of ``digits`` and ``convnet``, the
example config (with ``dynamic_batching``) and a copy named ``<model>_single`` whose config
has no ``dynamic_batching`` (requests still pass through the same queue and worker, one at
a time). ``swapserve bench`` (closed loop, its default client: native when built) drives each at
concurrency 1, 8 and 32; batched and single runs alternate, every cell is repeated and the
median reported, and the throughput and p99 ratios are taken within each repeat.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swapserve.bench.runner import BenchConfig, run_bench  # noqa: E402
from tests.e2e.serverproc import ServerProcess, copy_models  # noqa: E402

MODELS = ("digits", "convnet")
CONCURRENCY = (1, 8, 32)


def make_repo(src: Path, dst: Path) -> None:
    copy_models(src, dst, list(MODELS))
    for m in MODELS:
        single = dst / f"{m}_single"
        copy_models(src, single.parent / "_tmp", [m])
        (single.parent / "_tmp" / m).rename(single)
        (single.parent / "_tmp").rmdir()
        cfg = (single / "config.pbtxt").read_text().replace(f'"{m}"', f'"{m}_single"')
        cfg = re.sub(r"dynamic_batching\s*\{[^}]*\}", "", cfg, flags=re.S)
        (single / "config.pbtxt").write_text(cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cells: dict[tuple[str, int, str], list[dict]] = {}  # type: ignore[type-arg]
    ratios: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        make_repo(args.repository, repo)
        with ServerProcess(repo) as srv:
            assert srv.proc is not None
            for _ in range(args.repeat):
                for model in MODELS:
                    for c in CONCURRENCY:
                        pair = {}
                        for variant in ("batched", "single"):
                            name = model if variant == "batched" else f"{model}_single"
                            cfg = BenchConfig(url=srv.url, model=name, concurrency=c, duration=args.duration,
                                              warmup=1.0, server_pids=[srv.proc.pid])
                            s = run_bench(cfg).summary
                            if s["errors"]:
                                raise SystemExit(f"{name} c={c}: {s['errors']} errors {s['errors_by_status']}")
                            cells.setdefault((model, c, variant), []).append(s)
                            pair[variant] = s
                        ratios.setdefault((model, c), []).append(
                            (pair["batched"]["throughput_rps"] / pair["single"]["throughput_rps"],
                             pair["batched"]["latency_ms"]["p99"] / pair["single"]["latency_ms"]["p99"]))

    def med(model: str, c: int, variant: str, key: str, sub: str | None = None) -> float:
        vals = [s[key][sub] if sub else s[key] for s in cells[(model, c, variant)]]
        return statistics.median(v for v in vals if v is not None)

    print(f"\nclosed loop, {args.duration:g} s per cell, medians of {args.repeat} repeats; "
          "ratios batched/single taken within each repeat\n")
    print("| model | concurrency | batched rps | single rps | throughput ratio | batched p50/p99 ms | "
          "single p50/p99 ms | p99 ratio | server CPU µs/req (batched, single) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    for model in MODELS:
        for c in CONCURRENCY:
            row = {
                "model": model, "concurrency": c,
                "batched_rps": med(model, c, "batched", "throughput_rps"),
                "single_rps": med(model, c, "single", "throughput_rps"),
                "throughput_ratio": statistics.median(r[0] for r in ratios[(model, c)]),
                "batched_p50_ms": med(model, c, "batched", "latency_ms", "p50"),
                "batched_p99_ms": med(model, c, "batched", "latency_ms", "p99"),
                "single_p50_ms": med(model, c, "single", "latency_ms", "p50"),
                "single_p99_ms": med(model, c, "single", "latency_ms", "p99"),
                "p99_ratio": statistics.median(r[1] for r in ratios[(model, c)]),
                "batched_server_cpu_us": med(model, c, "batched", "server", "cpu_us_per_request"),
                "single_server_cpu_us": med(model, c, "single", "server", "cpu_us_per_request"),
                "client_cpu_us": med(model, c, "batched", "client", "cpu_us_per_request"),
            }
            table.append(row)
            print(f"| {model} | {c} | {row['batched_rps']:.0f} | {row['single_rps']:.0f} | "
                  f"{row['throughput_ratio']:.2f}x | {row['batched_p50_ms']:.2f} / {row['batched_p99_ms']:.2f} | "
                  f"{row['single_p50_ms']:.2f} / {row['single_p99_ms']:.2f} | {row['p99_ratio']:.2f}x | "
                  f"{row['batched_server_cpu_us']:.0f}, {row['single_server_cpu_us']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": table, "repeat": args.repeat, "duration": args.duration}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
