"""Run swapserve's fuzz targets for N inputs each and report inputs, crashes, hangs and RSS growth.

    nice python benchmarks/fuzz_run.py --runs infer=4000000,config=2000000,plan=2000000,monitoring=2000000,net=50000 \
        --engine atheris --parallel 2 --json benchmarks/results/fuzz.json

Each target runs in its own process (``python -m tests.fuzz.run_target``; the targets and what a
crash is for each are in tests/fuzz/targets.py and tests/fuzz/netfuzz.py). ``--engine atheris``
needs the ``fuzz`` extra (``pip install -e '.[fuzz]'``); ``builtin`` runs the same mutators without
coverage feedback. A run fails (exit 1) on any crash or hang, or when RSS still grows after
warm-up: the growth between the middle and the end of a target's run must stay under
``--max-growth-mib`` (the server processes' RSS too, for ``net``). Crashing inputs and each
target's log are left in ``--artifacts``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("infer", "config", "plan", "monitoring", "net")


def _parse_runs(text: str, default: int) -> dict[str, int]:
    """``infer=4000000,plan=1000`` or ``infer,plan`` (each ``default``)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, n = part.partition("=")
        if name not in TARGETS:
            raise SystemExit(f"fuzz_run: unknown target {name!r}; targets: {', '.join(TARGETS)}")
        out[name] = int(float(n)) if n else default
    return out


def _at(samples: list[list[float]], fraction: float) -> float:
    """RSS (MiB) at the first sample at or past ``fraction`` of the run's inputs."""
    if not samples:
        return 0.0
    last = samples[-1][0]
    for n, mib in samples:
        if n >= fraction * last:
            return mib
    return samples[-1][1]


def summarize(stats: dict[str, Any], rc: int, log: str) -> dict[str, Any]:
    rss = stats.get("rss", [])
    row: dict[str, Any] = {
        "target": stats["target"], "engine": stats["engine"], "inputs": stats["inputs"], "seconds": stats["seconds"],
        "inputs_per_s": round(stats["inputs"] / stats["seconds"]) if stats["seconds"] else 0,
        "crashes": 1 if stats.get("crash") and not stats.get("hang") else 0,
        "hangs": 1 if stats.get("hang") else 0, "crash": stats.get("crash"), "rc": rc,
        "rss_start_mib": rss[0][1] if rss else 0.0,
        "rss_warm_mib": _at(rss, 0.1), "rss_mid_mib": _at(rss, 0.5),
        "rss_end_mib": rss[-1][1] if rss else 0.0,
        "rss_peak_mib": max((m for _, m in rss), default=0.0),
    }
    row["growth_after_warmup_mib"] = round(row["rss_end_mib"] - row["rss_warm_mib"], 2)
    row["growth_second_half_mib"] = round(row["rss_end_mib"] - row["rss_mid_mib"], 2)
    for label, samples in stats.get("server_rss", {}).items():
        row[f"{label}_rss_warm_mib"] = _at(samples, 0.1)
        row[f"{label}_rss_end_mib"] = samples[-1][1] if samples else 0.0
        row[f"{label}_growth_second_half_mib"] = round((samples[-1][1] if samples else 0.0) - _at(samples, 0.5), 2)
    if rc not in (0, 70, 77) and not row["crashes"] and not row["hangs"]:
        # libFuzzer's own verdicts (out-of-memory, a leak, a signal) end the process without our stats
        row["crashes"] = 1
        row["crash"] = f"exit status {rc}: " + (log.strip().splitlines() or ["(no output)"])[-1]
    if rc == 70 and not row["hangs"]:
        row["hangs"], row["crash"] = 1, "libFuzzer timeout: " + (log.strip().splitlines() or [""])[-1]
    if not stats.get("done") and not row["crashes"] and not row["hangs"]:
        row["crashes"], row["crash"] = 1, f"the run ended after {stats['inputs']} inputs without finishing (rc {rc})"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="infer,config,plan,monitoring,net",
                    help="targets, each optionally =N inputs (default --default-runs)")
    ap.add_argument("--default-runs", type=int, default=100_000)
    ap.add_argument("--engine", choices=("atheris", "builtin"), default="atheris")
    ap.add_argument("--parallel", type=int, default=1, help="targets run at the same time")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds one input may take before it is a hang")
    ap.add_argument("--max-growth-mib", type=float, default=32.0,
                    help="most RSS growth allowed between the middle and the end of a target's run")
    ap.add_argument("--artifacts", type=Path, default=ROOT / "fuzz-artifacts")
    ap.add_argument("--json", type=Path, help="write the per-target results here")
    a = ap.parse_args(argv)
    runs = _parse_runs(a.runs, a.default_runs)
    a.artifacts.mkdir(parents=True, exist_ok=True)
    pending = list(runs.items())
    running: dict[str, tuple[subprocess.Popen[bytes], Path, Path, Any]] = {}
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    while pending or running:
        while pending and len(running) < a.parallel:
            name, n = pending.pop(0)
            stats, log = a.artifacts / f"{name}.stats.json", a.artifacts / f"{name}.log"
            stats.unlink(missing_ok=True)
            out = log.open("wb")
            cmd = [sys.executable, "-m", "tests.fuzz.run_target", name, "--engine", a.engine, "--runs", str(n),
                   "--seed", str(a.seed), "--timeout", str(a.timeout), "--stats", str(stats),
                   "--artifacts", str(a.artifacts)]
            print(f"fuzz_run: {name}: {n} inputs ({a.engine}) -> {log}", flush=True)
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT),
                             stats, log, out)
        time.sleep(1.0)
        for name, (proc, stats, log, out) in list(running.items()):
            if proc.poll() is None:
                continue
            out.close()
            del running[name]
            data = json.loads(stats.read_text()) if stats.exists() else {
                "target": name, "engine": a.engine, "inputs": 0, "seconds": 0, "rss": [], "done": False}
            row = summarize(data, proc.returncode, log.read_text(errors="replace")[-4000:])
            rows.append(row)
            print(f"fuzz_run: {name}: {row['inputs']} inputs in {row['seconds']} s ({row['inputs_per_s']}/s), "
                  f"crashes {row['crashes']}, hangs {row['hangs']}, RSS {row['rss_warm_mib']} -> "
                  f"{row['rss_end_mib']} MiB (peak {row['rss_peak_mib']})"
                  + (f"\n  {row['crash']}" if row["crash"] else ""), flush=True)
    total = sum(r["inputs"] for r in rows)
    growth = [r for r in rows if any(v > a.max_growth_mib for k, v in r.items() if k.endswith("second_half_mib"))]
    failed = sum(r["crashes"] + r["hangs"] for r in rows)
    summary = {"engine": a.engine, "total_inputs": total, "crashes": sum(r["crashes"] for r in rows),
               "hangs": sum(r["hangs"] for r in rows), "growth_over_limit": [r["target"] for r in growth],
               "wall_s": round(time.monotonic() - started, 1), "command": " ".join([sys.executable, *sys.argv]),
               "targets": sorted(rows, key=lambda r: TARGETS.index(r["target"]))}
    print(f"\n| target | inputs | inputs/s | crashes | hangs | RSS warm -> end (MiB) | peak | growth 2nd half |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for r in summary["targets"]:
        print(f"| {r['target']} | {r['inputs']:,} | {r['inputs_per_s']:,} | {r['crashes']} | {r['hangs']} | "
              f"{r['rss_warm_mib']:.1f} -> {r['rss_end_mib']:.1f} | {r['rss_peak_mib']:.1f} | "
              f"{r['growth_second_half_mib']:+.1f} |")
    print(f"\ntotal {total:,} inputs in {summary['wall_s']} s; crashes {summary['crashes']}, hangs {summary['hangs']}, "
          f"RSS growth over {a.max_growth_mib} MiB: {summary['growth_over_limit'] or 'none'}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if failed or growth else 0


if __name__ == "__main__":
    sys.exit(main())
