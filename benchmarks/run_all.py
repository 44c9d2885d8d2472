"""Run every benchmark and regenerate benchmarks/RESULTS.md.

    python benchmarks/run_all.py [--repeats 3] [--duration 5] [--quick] [--no-install] [--closed-only]

1. Peers: swapserve, KServe 0.21 (Python model server), MLServer 1.7.1 and a no-op grpc.aio
   floor all serve the TorchScript ``digits`` model on 127.0.0.1, all running at once; the same
   ``swapserve bench`` (its default client) runs against each in turn, alternating the order on every
   repeat, closed loop at concurrency 1, 8 and 32; medians of the repeats.
2. Server CPU per request at a fixed arrival rate that swapserve and the best peer both sustain.
3. A version change every 5 s under load (swapserve: promote through the control service;
   peers: their own reload API), beside steady runs of the same length (alternating, repeated;
   medians); errors counted.
4. The harness' own cost (benchmarks/bench_harness.py), and the sections of the other benchmark
   scripts when present (``OTHER_SCRIPTS``: bench_native, bench_batching, bench_swap,
   bench_monitoring, bench_gates, bench_rollout), each run with ``--json`` and rendered generically.

The machine is small and shared: RESULTS.md gives medians and ratios measured in this run,
never a lone absolute time as a claim. Raw per-run JSON goes to benchmarks/out/run_all.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))

import peers  # noqa: E402

from swapserve.bench.runner import BenchConfig, resolve_client, run_bench  # noqa: E402

#: swapserve-aio: swapserve with --frontend python (grpc.aio on the inference port), for the record.
#: swapserve-base (not by default): the same server from a baseline checkout (SWAPSERVE_BASE_SRC).
SERVERS = ("swapserve", "swapserve-aio", "kserve", "mlserver", "noop")
OURS = ("swapserve", "swapserve-aio", "swapserve-base")
#: Other benchmark scripts rendered into RESULTS.md when present: title, args, --quick args, timeout (s).
OTHER_SCRIPTS: dict[str, tuple[str, list[str], list[str], float]] = {
    "bench_native.py": ("Native core microbenchmarks (issue #3)", ["--repeat", "5"], ["--repeat", "3"], 600),
    "bench_batching.py": ("Dynamic batching vs one at a time (issue #3)", ["--repeat", "2", "--duration", "4"],
                          ["--repeat", "1", "--duration", "3"], 600),
    "bench_swap.py": ("No-cold-start swap benchmark (issue #4)", [], ["--repeat", "2"], 900),
    "bench_monitoring.py": ("Monitoring hot-path cost", [], ["--repeat", "2", "--seeds", "50"], 600),
    "bench_gates.py": ("Rollout gates: false rollbacks and detection delay", [],
                       ["--streams", "200", "--delay-streams", "50"], 600),
    "bench_rollout.py": ("Rollouts through the real server: simulator scenarios and shadow cost (issue #6)",
                         ["--repeat", "3"], ["--repeat", "1"], 1500),
}
CONCURRENCY = (1, 8, 32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import grpc
    import numpy
    import torch

    import swapserve

    load = os.getloadavg()
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu,
            "kernel": platform.release(), "python": platform.python_version(),
            "packages": {"swapserve": swapserve.__version__, "torch": torch.__version__, "grpcio": grpc.__version__,
                         "numpy": numpy.__version__},
            "loadavg_at_start": [round(x, 2) for x in load]}


def _frontend_kind() -> str:
    import importlib.util

    return "native (grpc++)" if importlib.util.find_spec("swapserve._frontend") else "grpc.aio (native not built)"


def bench(peer: peers.Peer, **kw: Any) -> dict[str, Any]:
    cfg = BenchConfig(url=peer.url, model=peers.MODEL, server_pids=[peer.pid], **kw)
    return run_bench(cfg).summary


def med(runs: list[dict[str, Any]], path: str) -> float | None:
    vals = []
    for r in runs:
        v: Any = r
        for k in path.split("."):
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            vals.append(float(v))
    return statistics.median(vals) if vals else None


def row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(runs), "throughput_rps": med(runs, "throughput_rps"), "p50_ms": med(runs, "latency_ms.p50"),
            "p99_ms": med(runs, "latency_ms.p99"), "server_cpu_us": med(runs, "server.cpu_us_per_request"),
            "client_cpu_us": med(runs, "client.cpu_us_per_request"), "errors": sum(r["errors"] for r in runs),
            "sent": sum(r["sent"] for r in runs)}


def digits_compute_ms() -> float:
    """The model's own time per request: digits v1, batch 1, one torch thread, in this process."""
    import torch

    torch.set_num_threads(1)
    m = torch.jit.load(str(ROOT / "model_repository" / "digits" / "1" / "model.pt")).eval()
    x = torch.rand(1, 64)
    with torch.inference_mode():
        for _ in range(200):
            m(x)
        samples = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(500):
                m(x)
            samples.append((time.perf_counter() - t0) / 500 * 1e3)
    return statistics.median(samples)


def run_script(name: str, args: list[str], timeout: float) -> dict[str, Any] | None:
    script = HERE / name
    if not script.exists():
        return None
    out = OUT / (script.stem + ".json")
    cmd = [sys.executable, str(script), *args, "--json", str(out)]
    shown = shlex.join(["python", str(script.relative_to(ROOT)), *args, "--json", str(out.relative_to(ROOT))])
    log(f"running {shown}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"command": shown, "error": f"did not finish in {timeout:.0f}s"}
    if proc.returncode != 0 or not out.exists():
        return {"command": shown, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}
    return {"command": shown, "result": json.loads(out.read_text()), "stdout": proc.stdout}


def fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_json(doc: Any) -> str:
    """A generic rendering of another script's JSON: a table for a list of flat dicts, else a code block."""
    if isinstance(doc, dict) and isinstance(doc.get("median"), dict):
        n = len(doc["runs"]) if isinstance(doc.get("runs"), list) else "?"
        return f"Medians of {n} runs:\n\n" + render_json(doc["median"])
    if isinstance(doc, dict) and doc and all(not isinstance(v, (dict, list)) for v in doc.values()):
        return "\n".join(["| metric | value |", "|---|---|"]
                         + [f"| {k} | {_cell(v)} |" for k, v in doc.items()])
    if isinstance(doc, dict):
        for key in ("results", "rows", "benchmarks"):
            if isinstance(doc.get(key), list):
                return render_json(doc[key])
    if isinstance(doc, list) and doc and all(isinstance(r, dict) for r in doc):
        keys = list(dict.fromkeys(k for r in doc for k in r if not isinstance(r[k], (dict, list))))
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in doc]
        return "\n".join(lines)
    return "```json\n" + json.dumps(doc, indent=2)[:6000] + "\n```"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per closed-loop run")
    ap.add_argument("--swap-duration", type=float, default=20.0, help="seconds of the version-change scenario")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--quick", action="store_true", help="1 repeat, 3 s runs, 10 s swap scenario (a smoke run)")
    ap.add_argument("--no-install", action="store_true", help="do not run peers/setup_peers.sh")
    ap.add_argument("--closed-only", action="store_true",
                    help="only the closed-loop matrix (step 1): checks a request-path change; use with --out")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.duration, args.swap_duration = 1, 3.0, 10.0
    command = shlex.join(["python", "benchmarks/run_all.py", *sys.argv[1:]])
    OUT.mkdir(exist_ok=True)
    t_start = time.monotonic()
    info = machine()
    log(f"machine: {info}")
    if not args.no_install:
        log("installing peers (idempotent): benchmarks/peers/setup_peers.sh")
        subprocess.run(["bash", str(HERE / "peers" / "setup_peers.sh")], check=False)
    compute_ms = digits_compute_ms()

    work = Path(tempfile.mkdtemp(prefix="run-all-", dir=OUT))
    running: dict[str, peers.Peer] = {}
    unavailable: dict[str, str] = {}
    raw: dict[str, Any] = {"machine": info, "command": command, "digits_compute_ms": compute_ms,
                           "client": resolve_client("auto"), "frontend": _frontend_kind(), "unavailable": unavailable, "closed": {},
                           "fixed_rate": {}, "swap": {}, "steady": {}}

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Background jobs ignore SIGINT; either signal must still stop the peers' process groups.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        for kind in args.servers.split(","):
            try:
                log(f"starting {kind}")
                running[kind] = peers.start(kind, work)
            except peers.PeerUnavailable as exc:
                unavailable[kind] = str(exc)
                log(f"{kind} unavailable: {exc}")
        names = list(running)
        # 1. closed loop matrix, alternating order per repeat
        closed: dict[str, dict[int, list[dict[str, Any]]]] = {n: {c: [] for c in CONCURRENCY} for n in names}
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for c in CONCURRENCY:
                for n in order:
                    s = bench(running[n], concurrency=c, duration=args.duration, warmup=1.0)
                    closed[n][c].append(s)
                    log(f"rep {rep} c={c} {n}: {s['throughput_rps']:.0f} req/s p99 {s['latency_ms']['p99']} ms "
                        f"errors {s['errors']}")
        raw["closed"] = {n: {str(c): v for c, v in d.items()} for n, d in closed.items()}
        table = {n: {c: row(closed[n][c]) for c in CONCURRENCY} for n in names}
        peer_names = [n for n in names if n not in (*OURS, "noop")]
        best = max(peer_names, key=lambda n: table[n][32]["throughput_rps"] or 0.0) if peer_names else None

        # 2. a fixed arrival rate both sustain: 40% of the smaller c=32 throughput
        fixed: dict[str, dict[str, Any]] = {}
        if best and "swapserve" in running and not args.closed_only:
            rate = round(0.4 * min(table[best][32]["throughput_rps"], table["swapserve"][32]["throughput_rps"]), -1)
            rate = max(rate, 20.0)
            fixed_servers = [n for n in ("swapserve", best, "swapserve-aio") if n in running]
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in fixed_servers}
            for rep in range(args.repeats):
                for n in (fixed_servers if rep % 2 == 0 else fixed_servers[::-1]):
                    runs[n].append(bench(running[n], rate=rate, duration=args.duration, warmup=1.0))
                    log(f"rate {rate:g}/s {n}: server CPU {runs[n][-1]['server']['cpu_us_per_request']} µs/req")
            fixed = {"rate": rate, **{n: row(v) for n, v in runs.items()}}
            raw["fixed_rate"] = {n: v for n, v in runs.items()} | {"rate": rate}

        # 3. version change every 5 s vs steady, same length, concurrency 8
        # A run's p99 moves by tens of percent on this machine: steady and swap runs alternate
        # (steady first, then swap first, ...) and the ratio is between their medians.
        swap_rows: dict[str, dict[str, Any]] = {}
        for n in [x for x in names if x != "noop" and not args.closed_only]:
            p = running[n]
            common = dict(concurrency=8, duration=args.swap_duration, warmup=1.0)
            steady_runs: list[dict[str, Any]] = []
            swapped_runs: list[dict[str, Any]] = []
            for rep in range(args.repeats):
                for mode in (("steady", "swap") if rep % 2 == 0 else ("swap", "steady")):
                    if mode == "steady":
                        steady_runs.append(bench(p, **common))
                    else:
                        swapped_runs.append(bench(p, **common, swap_every=5.0, versions=["1", "2"],
                                                  control_url=p.control_url, swap_command=p.swap_command))
                log(f"swap {n} rep {rep}: errors {swapped_runs[-1]['errors']} p99 "
                    f"{swapped_runs[-1]['latency_ms']['p99']} vs steady {steady_runs[-1]['latency_ms']['p99']}")
            raw["steady"][n], raw["swap"][n] = steady_runs, swapped_runs
            swaps = [e for r in swapped_runs for e in r["swaps"]]
            by_status = dict(sum((Counter(r["errors_by_status"]) for r in swapped_runs), Counter()))
            versions = dict(sum((Counter(r["versions"]) for r in swapped_runs), Counter()))
            swap_rows[n] = {"steady": row(steady_runs), "swap": row(swapped_runs), "swaps": len(swaps),
                            "failed_swaps": sum(1 for e in swaps if not e["ok"]),
                            "swap_errors": [e["error"] for e in swaps if e["error"]][:2],
                            "errors_by_status": by_status, "versions": versions}
        # 4. the harness' own cost, against the no-op floor
        harness = None
        if "noop" in running and not args.closed_only:
            import bench_harness

            harness = bench_harness.measure(running["noop"].url, running["noop"].pid, repeats=args.repeats,
                                            duration=min(args.duration, 4.0))
            raw["harness"] = harness
    finally:
        for p in running.values():
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    others = {name: run_script(name, quick_args if args.quick else full_args, timeout)
              for name, (_title, full_args, quick_args, timeout) in OTHER_SCRIPTS.items() if not args.closed_only}
    raw["others"] = others
    (OUT / "run_all.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    elapsed = time.monotonic() - t_start
    args.out.write_text(render(raw, table, best, fixed, swap_rows, harness, compute_ms, others, running, elapsed))
    log(f"wrote {args.out} in {elapsed:.0f}s")
    return 0


def render(raw: dict[str, Any], table: dict[str, Any], best: str | None, fixed: dict[str, Any],
           swap_rows: dict[str, Any], harness: dict[str, Any] | None, compute_ms: float,
           others: dict[str, Any], running: dict[str, peers.Peer], elapsed: float) -> str:
    m = raw["machine"]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    peer_versions = "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in p.versions.items())
                              for n, p in running.items() if n not in OURS)
    L = ["# Benchmark results", "",
         f"Regenerated by `{raw['command']}` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
         f"({elapsed / 60:.1f} min).", "",
         f"- Machine: {m['nproc']} CPUs ({m['affinity']} usable), {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; "
         f"load average at start {m['loadavg_at_start']} (a shared machine: read ratios, not absolute times)",
         f"- swapserve side: {pk}; `swapserve` serves the inference port with its "
         f"{raw.get('frontend', 'native')} front end, `swapserve-aio` is the same server with `--frontend python` "
         "(grpc.aio)", f"- Peers: {peer_versions or 'none'}",
         f"- Client: `swapserve bench --client {raw['client']}` (pre-serialised requests, generic gRPC calls"
         f"{' from C++: swapserve-loadgen' if raw['client'] == 'native' else ' from Python'}), on the same cores as "
         "the servers; every figure is a median of the repeats, and every ratio is between figures of this run.",
         f"- Model: `digits` (TorchScript MLP), batch 1; its own compute time here: {compute_ms * 1000:.0f} µs "
         "per request (one torch thread).", ""]
    if raw["unavailable"]:
        L += ["**Not measured:**", ""] + [f"- {n}: {why}" for n, why in raw["unavailable"].items()] + [""]

    sw = table.get("swapserve")
    L += ["## Targets (issue #5)", "", "| target | measured in this run | met |", "|---|---|---|"]

    def line(target: str, value: float | None, goal: float, lower_is_better: bool, what: str) -> None:
        ok = None if value is None else (value <= goal if lower_is_better else value >= goal)
        L.append(f"| {target} | {what.format(fmt(value, 2))} | {'–' if ok is None else ('yes' if ok else 'no')} |")

    if sw and best:
        b = table[best][32]
        line(f"throughput ≥ 1.5x best peer ({best}) at c=32", ratio(sw[32]["throughput_rps"], b["throughput_rps"]),
             1.5, False, "{}x")
        line(f"p99 ≤ 0.7x best peer ({best}) at c=32", ratio(sw[32]["p99_ms"], b["p99_ms"]), 0.7, True, "{}x")
    if fixed and best:
        line(f"server CPU/request ≤ 0.6x {best} at {fixed['rate']:g} req/s",
             ratio(fixed["swapserve"]["server_cpu_us"], fixed[best]["server_cpu_us"]), 0.6, True, "{}x")
    if sw and "noop" in table:
        floor = (table["noop"][1]["p50_ms"] or 0.0) + compute_ms
        line("p50 at c=1 ≤ 1.3x (no-op floor p50 + model compute)", ratio(sw[1]["p50_ms"], floor), 1.3, True, "{}x")
    if "swapserve" in swap_rows:
        r = swap_rows["swapserve"]
        line("errors with a version change every 5 s = 0", float(r["swap"]["errors"]), 0, True, "{}")
        line("p99 with version changes ≤ 1.1x steady", ratio(r["swap"]["p99_ms"], r["steady"]["p99_ms"]), 1.1, True,
             "{}x")
    if harness:
        default = harness["default_client"]
        line(f"harness client CPU ≤ 150 µs/request at c=32 ({default})",
             harness["closed_c32"][default]["client_cpu_us_per_request"], 150, True, "{} µs")
    L.append("")

    L += ["## Closed loop, by concurrency", "",
          "| c | server | req/s | p50 ms | p99 ms | server CPU µs/req | client CPU µs/req | errors / sent | req/s vs swapserve |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in CONCURRENCY:
        for n, t in table.items():
            r = t[c]
            rel = ratio(r["throughput_rps"], sw[c]["throughput_rps"]) if sw else None
            L.append(f"| {c} | {n} | {fmt(r['throughput_rps'], 0)} | {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} | "
                     f"{fmt(r['server_cpu_us'], 0)} | {fmt(r['client_cpu_us'], 0)} | {r['errors']} / {r['sent']} | "
                     f"{fmt(rel, 2)}x |")
    L.append("")
    if fixed:
        L += [f"## Fixed arrival rate {fixed['rate']:g} req/s (open loop): server CPU per request", "",
              "| server | server CPU µs/req | achieved req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
        for n in [x for x in fixed if x != "rate"]:
            r = fixed[n]
            L.append(f"| {n} | {fmt(r['server_cpu_us'], 0)} | {fmt(r['throughput_rps'], 0)} | {fmt(r['p50_ms'], 2)} | "
                     f"{fmt(r['p99_ms'], 2)} | {r['errors']} |")
        L.append("")
    if swap_rows:
        L += ["## A version change every 5 s (concurrency 8)", "",
              "swapserve: promote through the control service (in-process control client); KServe: write the "
              "version, `POST /v2/repository/models/digits/load`; MLServer: point model-settings.json at the "
              "version, same endpoint (peers/peer_swap.py). Each repeat is a steady run and a run with "
              "changes of the same length, in alternating order; p99 columns are medians of the repeats, errors "
              "and responses are summed over all runs with changes.", "",
              "| server | swaps (failed) | errors | errors by status | p99 steady ms | p99 with swaps ms | ratio | "
              "responses per version |", "|---|---|---|---|---|---|---|---|"]
        for n, r in swap_rows.items():
            L.append(f"| {n} | {r['swaps']} ({r['failed_swaps']}) | {r['swap']['errors']} / {r['swap']['sent']} | "
                     f"{r['errors_by_status'] or '–'} | {fmt(r['steady']['p99_ms'], 2)} | {fmt(r['swap']['p99_ms'], 2)} | "
                     f"{fmt(ratio(r['swap']['p99_ms'], r['steady']['p99_ms']), 2)}x | {r['versions']} |")
            for e in r["swap_errors"]:
                L.append(f"|  | swap failure: {str(e)[:200]} | | | | | | |")
        L.append("")
    if harness:
        import bench_harness

        L += ["## The harness itself (against the no-op floor)", "", bench_harness.markdown(harness), ""]
    for name, res in others.items():
        title = OTHER_SCRIPTS[name][0]
        if res is None:
            L += [f"## {title}", "", f"benchmarks/{name} is not in this tree yet.", ""]
        elif "error" in res:
            L += [f"## {title}", "", f"`{res['command']}` failed: {res['error']}", ""]
        else:
            L += [f"## {title}", "", f"`{res['command']}`", "", render_json(res["result"]), ""]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
