"""Turn per-request records into the run's summary (the ``--json`` document), a table and a plot."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

#: Version of the JSON document layout; bump it when a key changes meaning or disappears.
SCHEMA = "swapserve.bench/1"

#: Percentiles reported, and the numpy.percentile method they are computed with.
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
PERCENTILE_METHOD = "linear"

_STATUS_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


@dataclass
class Records:
    """All requests of the measured window, one row each (times in monotonic ns)."""

    sched: np.ndarray     # when the request was due (closed loop: when it was sent)
    sent: np.ndarray      # when the harness sent it
    done: np.ndarray      # when the response or the error arrived
    status: np.ndarray    # gRPC status code, 0 = OK
    version: np.ndarray   # index into version_table, -1 for errors
    version_table: list[str]

    @property
    def latency_ms(self) -> np.ndarray:
        """Latency of every successful request: done - sched (includes any wait for the harness)."""
        ok = self.status == 0
        return (self.done[ok] - self.sched[ok]) / 1e6

    @staticmethod
    def merge(parts: list[dict[str, np.ndarray]], window_start: int) -> Records:
        table: list[str] = []
        index: dict[str, int] = {}
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("sched", "sent", "done", "status", "version")}
        for p in parts:
            remap = np.array([index.setdefault(str(v), len(index)) for v in p["version_table"]] + [-1], dtype=np.int16)
            for k in ("sched", "sent", "done", "status"):
                cols[k].append(p[k])
            cols["version"].append(remap[p["version"]] if len(p["version"]) else p["version"])  # -1 -> last = -1
        table = sorted(index, key=index.__getitem__)
        merged = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
        keep = merged["sched"] >= window_start
        order = np.argsort(merged["sched"][keep], kind="stable")
        return Records(*(merged[k][keep][order] for k in ("sched", "sent", "done", "status", "version")),
                       version_table=table)


def _pcts(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {k: None for k in PERCENTILES}
    got = np.percentile(values, list(PERCENTILES.values()), method=PERCENTILE_METHOD)
    return {k: round(float(v), 4) for k, v in zip(PERCENTILES, got)}


def _per_request_us(cpu_s: float | None, requests: int) -> float | None:
    return None if cpu_s is None or requests == 0 else round(cpu_s / requests * 1e6, 2)


def summarize(rec: Records, *, config: dict[str, Any], window_start: int, duration_s: float,
              swaps: list[dict[str, Any]], client_cpu_s: float, server_cpu_s: float | None,
              processes: int, started_at: str) -> dict[str, Any]:
    ok = rec.status == 0
    lat = rec.latency_ms
    sent = int(len(rec.status))
    completed = int(ok.sum())
    last = int(rec.done.max()) if sent else window_start
    elapsed = max(duration_s, (last - window_start) / 1e9)
    codes, counts = np.unique(rec.status[~ok], return_counts=True)
    versions = {rec.version_table[int(v)]: int(n) for v, n in zip(*np.unique(rec.version[ok], return_counts=True))}
    lag = (rec.sent - rec.sched) / 1e6

    series = []
    buckets = max(1, math.ceil(elapsed))
    done_s = np.clip((rec.done - window_start) // 1_000_000_000, 0, buckets - 1)
    sent_per_s = np.bincount(np.clip((rec.sched - window_start) // 1_000_000_000, 0, buckets - 1),
                             minlength=buckets)
    err_per_s = np.bincount(done_s[~ok], minlength=buckets)
    ok_idx = np.flatnonzero(ok)
    ok_idx = ok_idx[np.argsort(done_s[ok_idx], kind="stable")]
    bounds = np.searchsorted(done_s[ok_idx], np.arange(buckets + 1))
    for t in range(buckets):
        sel = ok_idx[bounds[t]:bounds[t + 1]]
        vals = (rec.done[sel] - rec.sched[sel]) / 1e6
        p = _pcts(vals)
        vs, vn = np.unique(rec.version[sel], return_counts=True)
        series.append({"t": t, "sent": int(sent_per_s[t]), "completed": int(len(sel)), "errors": int(err_per_s[t]),
                       "p50_ms": p["p50"], "p99_ms": p["p99"],
                       "max_ms": round(float(vals.max()), 4) if len(vals) else None,
                       "versions": {rec.version_table[int(v)]: int(n) for v, n in zip(vs, vn)}})

    return {
        "schema": SCHEMA,
        "started_at": started_at,
        "config": config,
        "duration_s": round(elapsed, 4),
        "sent": sent,
        "completed": completed,
        "errors": sent - completed,
        "errors_by_status": {_STATUS_NAMES.get(int(c), str(int(c))): int(n) for c, n in zip(codes, counts)},
        "throughput_rps": round(completed / elapsed, 3),
        "latency_ms": {**_pcts(lat), "mean": round(float(lat.mean()), 4) if len(lat) else None,
                       "min": round(float(lat.min()), 4) if len(lat) else None,
                       "max": round(float(lat.max()), 4) if len(lat) else None},
        "percentile_method": f"numpy.percentile(method='{PERCENTILE_METHOD}') over successful requests, "
                             "latency = response time - scheduled send time",
        "send_lag_ms": {"p50": _pcts(lag)["p50"], "p99": _pcts(lag)["p99"],
                        "max": round(float(lag.max()), 4) if sent else None},
        "versions": versions,
        "swaps": swaps,
        "client": {"processes": processes, "cpu_s": round(client_cpu_s, 4),
                   "cpu_us_per_request": _per_request_us(client_cpu_s, sent)},
        "server": {"pids": config.get("server_pids", []),
                   "cpu_s": None if server_cpu_s is None else round(server_cpu_s, 4),
                   "cpu_us_per_request": _per_request_us(server_cpu_s, sent)},
        "timeseries": series,
    }


def write_json(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def _security(cfg: dict[str, Any]) -> str:
    """", mTLS + token" and the like for the table's title; "" for plaintext without credentials."""
    tls = cfg.get("tls")
    parts = (["mTLS" if tls.get("cert") else "TLS"] if tls else []) + (["token"] if cfg.get("token") else [])
    return ", " + " + ".join(parts) if parts else ""


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = summary["config"]
    load = f"rate {cfg['rate']:g}/s (open loop)" if cfg["rate"] else f"concurrency {cfg['concurrency']} (closed loop)"
    t = Table(title=f"swapserve bench: {cfg['model']} @ {cfg['url']}, {load}, {summary['duration_s']:.1f}s, "
                    f"client={cfg['client']}{_security(cfg)}", show_header=False)
    t.add_column("metric", style="bold")
    t.add_column("value", justify="right")
    lat = summary["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f} ms"

    t.add_row("throughput", f"{summary['throughput_rps']:.1f} req/s")
    t.add_row("sent / completed / errors", f"{summary['sent']} / {summary['completed']} / {summary['errors']}")
    for code, n in summary["errors_by_status"].items():
        t.add_row(f"  errors {code}", str(n))
    for k in ("p50", "p90", "p99", "p99.9", "max"):
        t.add_row(f"latency {k}", ms(lat[k]))
    if cfg["rate"]:
        t.add_row("send lag p99 (harness)", ms(summary["send_lag_ms"]["p99"]))
    for v, n in sorted(summary["versions"].items()):
        t.add_row(f"model_version {v or '(empty)'}", str(n))
    t.add_row("client CPU / request", f"{summary['client']['cpu_us_per_request']} µs "
                                      f"({summary['client']['processes']} process(es))")
    s = summary["server"]["cpu_us_per_request"]
    t.add_row("server CPU / request", "- (pass --server-pid)" if s is None else f"{s} µs")
    if summary["swaps"]:
        bad = sum(1 for s in summary["swaps"] if not s["ok"])
        t.add_row("swaps (failed)", f"{len(summary['swaps'])} ({bad})")
    console.print(t)
    for s in summary["swaps"]:
        if not s["ok"]:
            console.print(f"[red]swap to {s['version']} at {s['t']:.2f}s failed:[/red] {s['error']}")


def plot(rec: Records, summary: dict[str, Any], window_start: int, path: Path) -> None:
    """Latency over time: every request (by completion time), per-second p99, errors, and a line per swap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    ok = rec.status == 0
    t = (rec.done - window_start) / 1e9
    lat = (rec.done - rec.sched) / 1e6
    step = max(1, int(ok.sum()) // 50_000)  # keep the file small on long runs
    for v, name in enumerate(rec.version_table):
        sel = np.flatnonzero(ok & (rec.version == v))[::step]
        ax.scatter(t[sel], lat[sel], s=2, alpha=0.4, label=f"version {name or '(empty)'}")
    if (~ok).any():
        ax.scatter(t[~ok], lat[~ok], s=12, marker="x", color="red", label="errors")
    series = summary["timeseries"]
    xs = [p["t"] + 0.5 for p in series if p["p99_ms"] is not None]
    ax.plot(xs, [p["p99_ms"] for p in series if p["p99_ms"] is not None], color="black", lw=1.2, label="p99 per second")
    for k, s in enumerate(summary["swaps"]):
        ax.axvline(s["t"], color="green" if s["ok"] else "red", ls="--", lw=1,
                   label="swap" if k == 0 else None)
        ax.annotate(f"→{s['version']}", (s["t"], 1), xycoords=("data", "axes fraction"), fontsize=8,
                    ha="left", va="top")
    ax.set_yscale("log")
    ax.set_xlabel("time since start of measurement (s)")
    ax.set_ylabel("latency (ms, from scheduled send)")
    cfg = summary["config"]
    ax.set_title(f"{cfg['model']} @ {cfg['url']}: {summary['throughput_rps']:.0f} req/s, "
                 f"p99 {summary['latency_ms']['p99']} ms, errors {summary['errors']}")
    ax.legend(loc="upper right", fontsize=8, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
