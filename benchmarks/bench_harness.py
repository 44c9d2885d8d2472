"""What the load generator itself costs: client CPU per request, native vs raw generic calls vs tritonclient.

    python benchmarks/bench_harness.py [--repeats 3] [--duration 4] [--json out.json]

Starts the no-op floor server (benchmarks/peers/noop_server.py) unless ``--url`` is given, and
runs ``swapserve bench`` against it with ``--client native`` (swapserve-loadgen; skipped when it
is not built), ``--client raw`` and ``--client tritonclient`` in turn, the order alternating on
every repeat, closed loop at concurrency 32 and open loop at a fixed rate all sustain. Reports
medians of the repeats and the ratios between clients from the same run. Target: the default
client (native when built) <= 150 µs/request at c=32.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))

from swapserve.bench import native  # noqa: E402
from swapserve.bench.runner import BenchConfig, resolve_client, run_bench  # noqa: E402

CLIENTS = ("native", "raw", "tritonclient")
#: Ratios of client CPU per request reported, numerator / denominator (when both were measured).
RATIOS = (("native", "raw"), ("native", "tritonclient"), ("raw", "tritonclient"))


def measure(url: str, pid: int | None, *, repeats: int = 3, duration: float = 4.0, rate: float = 600.0,
            model: str = "digits") -> dict[str, Any]:
    """{"clients", "default_client", "closed_c32": {client: {...medians}, "A_over_B_cpu": ratio}, "open_rate": ...}.

    "native" is left out when swapserve-loadgen is not built. Runs alternate between clients.
    """
    clients = tuple(c for c in CLIENTS if c != "native" or native.find_binary() is not None)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"closed_c32": {c: [] for c in clients},
                                                        "open_rate": {c: [] for c in clients}}
    for rep in range(repeats):
        order = clients if rep % 2 == 0 else clients[::-1]
        for client in order:
            for scenario, kw in (("closed_c32", {"concurrency": 32}), ("open_rate", {"rate": rate})):
                s = run_bench(BenchConfig(url=url, model=model, duration=duration, warmup=0.5, client=client,
                                          server_pids=[pid] if pid else [], **kw)).summary  # type: ignore[arg-type]
                runs[scenario][client].append(s)
    out: dict[str, Any] = {"repeats": repeats, "duration_s": duration, "rate": rate, "clients": list(clients),
                           "default_client": resolve_client("auto")}
    for scenario, by_client in runs.items():
        out[scenario] = {c: {"client_cpu_us_per_request": statistics.median(s["client"]["cpu_us_per_request"] for s in ss),
                             "throughput_rps": statistics.median(s["throughput_rps"] for s in ss),
                             "p99_ms": statistics.median(s["latency_ms"]["p99"] or 0.0 for s in ss),
                             "send_lag_p50_ms": statistics.median(s["send_lag_ms"]["p50"] or 0.0 for s in ss),
                             "errors": sum(s["errors"] for s in ss)} for c, ss in by_client.items()}
        for a, b in RATIOS:
            if a in clients and b in clients:
                out[scenario][f"{a}_over_{b}_cpu"] = round(out[scenario][a]["client_cpu_us_per_request"]
                                                           / out[scenario][b]["client_cpu_us_per_request"], 3)
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = ["| scenario | client | client CPU µs/req | throughput req/s | p99 ms | send lag p50 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    for scenario, label in (("closed_c32", "closed, c=32"), ("open_rate", f"open, {res['rate']:g} req/s")):
        for c in res["clients"]:
            r = res[scenario][c]
            lines.append(f"| {label} | {c} | {r['client_cpu_us_per_request']:.0f} | {r['throughput_rps']:.0f} | "
                         f"{r['p99_ms']:.1f} | {r['send_lag_p50_ms']:.2f} | {r['errors']} |")
    lines.append("")
    for a, b in RATIOS:
        key = f"{a}_over_{b}_cpu"
        if key in res["closed_c32"]:
            lines.append(f"- {a} / {b} client CPU per request: closed c=32 **{res['closed_c32'][key]}x**, "
                         f"open loop **{res['open_rate'][key]}x**")
    lines.append("")
    lines.append(f"Medians of {res['repeats']} runs of {res['duration_s']:g} s; `swapserve bench` uses "
                 f"`{res['default_client']}` by default here" +
                 ("" if "native" in res["clients"] else " (swapserve-loadgen is not built)") + ".")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="measure against this server instead of starting the no-op floor")
    ap.add_argument("--server-pid", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--rate", type=float, default=600.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    peer = None
    if args.url:
        url, pid = args.url, args.server_pid
    else:
        import peers

        tmp = tempfile.mkdtemp(prefix="bench-harness-")
        peer = peers.start("noop", Path(tmp))
        url, pid = peer.url, peer.pid
    try:
        res = measure(url, pid, repeats=args.repeats, duration=args.duration, rate=args.rate)
    finally:
        if peer is not None:
            peer.stop()
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
