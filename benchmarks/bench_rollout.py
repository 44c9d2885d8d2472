#!/usr/bin/env python
"""Rollouts through the real server, driven by the traffic-and-label simulator (issue #6).

    python benchmarks/bench_rollout.py [--repeat 3] [--json out.json]

(a) a challenger 10 points worse on one slice of five (equal elsewhere), 10% canary, 500
    labelled requests/s: time from rollout start to the automatic rollback, and from the
    deciding label to the snapshot publish (the controller records both in the rollout's
    evidence);
(b) A/A: a challenger identical to the champion through a short canary plan: promoted or not;
(c) a better challenger through the same plan: promoted through every stage, or not;
shadow cost: the champion's p99 at a fixed arrival rate on ``digits`` with and without a shadow
    version (alternating runs, ratio within each repeat).

Every scenario starts a fresh ``swapserve serve`` subprocess; medians over ``--repeat``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swapserve.bench.runner import BenchConfig, run_bench  # noqa: E402
from swapserve.bench.simulator import Simulator, build_oracle_model  # noqa: E402
from swapserve.cli.client import ControlClient  # noqa: E402
from tests.e2e.serverproc import ServerProcess  # noqa: E402

SLOW = "stages:\n  - {name: canary, traffic: 10, min_duration: 1h, min_samples: 1000000}\n  - {name: full, traffic: 100}\n"
FAST = """stages:
  - {name: canary, traffic: 10, min_duration: 5s, min_samples: 200}
  - {name: half, traffic: 50, min_duration: 5s, min_samples: 200}
  - {name: full, traffic: 100, min_duration: 2s}
watch: 3s
"""


def wait(c: ControlClient, model: str, timeout: float) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.rollout(model)["rollout"]
        if r and r["state"] not in ("running", "paused", "awaiting_approval"):
            return r  # type: ignore[no-any-return]
        time.sleep(0.2)
    return c.rollout(model)["rollout"]  # type: ignore[no-any-return]


def scenario(errors: list[float], plan: str, rate: float, seed: int) -> dict:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_oracle_model(repo, "oracle", {1: [0.1] * 5, 2: errors})
        with ServerProcess(repo) as srv, ControlClient(srv.control_url) as c:
            c.promote("oracle", 1)
            sim = Simulator(srv.url, "oracle", rate=rate, seed=seed).start()
            time.sleep(2)
            t0 = time.monotonic()
            c.start_rollout("oracle", 2, plan=plan, reason="benchmark")
            r = wait(c, "oracle", 180)
            elapsed = time.monotonic() - t0
            stats = sim.stop()
            rb = r["evidence"].get("rollback") or {}
            return {"state": r["state"], "seconds": elapsed, "label_to_publish_ms": rb.get("label_to_publish_ms"),
                    "slice": rb.get("slice"), "errors": sum(stats.errors.values()), "sent": stats.sent,
                    "labels": stats.joined}


def shadow_cost(repeat: int, rate: float, duration: float) -> dict:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(ROOT / "model_repository" / "digits", repo / "digits")
        ratios, plain, shadowed, shed = [], [], [], []
        with ServerProcess(repo) as srv, ControlClient(srv.control_url) as c:
            assert srv.proc is not None
            for _ in range(repeat):
                p99 = {}
                for mode in ("plain", "shadow"):
                    c.set_traffic("digits", [(2, 10_000)], shadows=[1] if mode == "shadow" else [])
                    s = run_bench(BenchConfig(url=srv.url, model="digits", rate=rate, duration=duration,
                                              warmup=1.0, server_pids=[srv.proc.pid])).summary
                    p99[mode] = s["latency_ms"]["p99"]
                plain.append(p99["plain"])
                shadowed.append(p99["shadow"])
                ratios.append(p99["shadow"] / p99["plain"])
            import urllib.request

            text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
            for line in text.splitlines():
                if line.startswith("swapserve_shadow_requests_total"):
                    shed.append(line)
        return {"rate": rate, "p99_plain_ms": statistics.median(plain), "p99_shadow_ms": statistics.median(shadowed),
                "p99_ratio": statistics.median(ratios), "shadow_counters": shed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    a = [scenario([0.1, 0.1, 0.2, 0.1, 0.1], SLOW, 500, seed) for seed in range(args.repeat)]
    b = [scenario([0.1] * 5, FAST, 300, 100 + seed) for seed in range(args.repeat)]
    c = [scenario([0.05] * 5, FAST, 300, 200 + seed) for seed in range(args.repeat)]
    sh = shadow_cost(args.repeat, rate=300, duration=5)
    med = statistics.median
    print(f"\nmedians of {args.repeat} runs, fresh server each\n")
    print("| scenario | outcome | start -> decision (s) | deciding label -> publish (ms) | request errors |")
    print("|---|---|---:|---:|---:|")
    print(f"| (a) 10 points worse on 1 of 5 slices, 10% canary, 500 labels/s | "
          f"{', '.join(r['state'] for r in a)} (slice {', '.join(str(r['slice']) for r in a)}) | "
          f"{med(r['seconds'] for r in a):.1f} (max {max(r['seconds'] for r in a):.1f}) | "
          f"{med(r['label_to_publish_ms'] or float('nan') for r in a):.0f} | {sum(r['errors'] for r in a)} |")
    print(f"| (b) A/A through canary 10% -> 50% -> 100% + watch | {', '.join(r['state'] for r in b)} | "
          f"{med(r['seconds'] for r in b):.1f} | - | {sum(r['errors'] for r in b)} |")
    print(f"| (c) better challenger through every stage | {', '.join(r['state'] for r in c)} | "
          f"{med(r['seconds'] for r in c):.1f} | - | {sum(r['errors'] for r in c)} |")
    print(f"\nshadow cost on digits at {sh['rate']:g} req/s (open loop): champion p99 {sh['p99_plain_ms']:.2f} ms "
          f"without, {sh['p99_shadow_ms']:.2f} ms with a shadow version; ratio {sh['p99_ratio']:.3f} "
          "(median of per-repeat ratios; target <= 1.05)")
    for line in sh["shadow_counters"]:
        print(f"    {line}")
    if args.json:
        args.json.write_text(json.dumps({"a": a, "b": b, "c": c, "shadow": sh}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
