"""``swapserve bench``: argument parsing and output; the work is in ``swapserve.bench.runner``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from swapserve.cli.control import EXIT_USAGE, UsageError
from swapserve.cli.tlsargs import add_tls_arguments, client_tls


def _versions(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _read_token(path: str, flag: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    if not token:
        raise UsageError(f"{flag} {path} is empty")
    return token


def inference_token(args: argparse.Namespace) -> str:
    """--token-file, else $SWAPSERVE_INFERENCE_TOKEN, else "" (no token)."""
    if args.token_file:
        return _read_token(args.token_file, "--token-file")
    return os.environ.get("SWAPSERVE_INFERENCE_TOKEN", "").strip()


def control_token(args: argparse.Namespace) -> str:
    """--control-token-file, else $SWAPSERVE_TOKEN, else the file $SWAPSERVE_TOKEN_FILE (as the control verbs)."""
    if args.control_token_file:
        return _read_token(args.control_token_file, "--control-token-file")
    if token := os.environ.get("SWAPSERVE_TOKEN", "").strip():
        return token
    if path := os.environ.get("SWAPSERVE_TOKEN_FILE"):
        return _read_token(path, "$SWAPSERVE_TOKEN_FILE")
    return ""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="load-test a KServe v2 gRPC server (closed or open loop)",
                       description="Load-test any KServe v2 / Triton gRPC server. Closed loop with --concurrency, "
                                   "open loop (fixed arrival rate, latency from the scheduled send time) with --rate.")
    p.add_argument("--url", required=True, help="gRPC inference endpoint HOST:PORT")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--model-version", default="", help="pin every request to this version (default: route by policy)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight (default 1)")
    load.add_argument("--rate", type=float, default=None, help="open loop: arrivals per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline in seconds (default 30)")
    p.add_argument("--input-data", type=Path, default=None,
                   help="JSON or npz with the inputs (and parameters, model_version) of each request")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="request parameter on every request, e.g. routing_key=u7 (repeatable)")
    p.add_argument("--client", choices=["auto", "native", "raw", "tritonclient"], default="auto",
                   help="native: swapserve-loadgen, grpc++ generic calls on pre-serialised requests (cheapest); "
                        "raw: the same requests from Python grpc.aio; tritonclient: its aio infer(); "
                        "auto (default): native when it is built and the run needs no TLS or token, else raw")
    p.add_argument("--processes", type=int, default=0, help="client processes (default: automatic)")
    p.add_argument("--server-pid", type=int, action="append", default=[], metavar="PID",
                   help="local server process (its children count too): report server CPU per request")
    p.add_argument("--swap-every", type=float, default=0.0, metavar="S", help="make the next version live every S s")
    p.add_argument("--versions", type=_versions, default=[], help="versions to cycle through, e.g. 1,2")
    p.add_argument("--control-url", default="",
                   help="swapserve control service HOST:PORT (swaps promote through swapserve.cli.client)")
    add_tls_arguments(p)  # the inference port and the control service (one certificate serves both)
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the inference bearer token, sent as 'authorization: Bearer TOKEN' on every "
                        "request (default $SWAPSERVE_INFERENCE_TOKEN, the token itself)")
    p.add_argument("--control-token-file", default=None, metavar="FILE",
                   help="file holding the control service token for the swaps (default $SWAPSERVE_TOKEN, "
                        "then the file $SWAPSERVE_TOKEN_FILE)")
    p.add_argument("--swap-command", default="",
                   help="swap with this command instead, {model} and {version} substituted (for other servers)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the summary as JSON")
    p.add_argument("--records", type=Path, default=None, metavar="FILE.npz",
                   help="write every request's times, status and version (for your own statistics)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="latency-over-time plot marking swaps")
    p.add_argument("--quiet", action="store_true", help="no summary table")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.console import Console

    from swapserve.bench import native, report
    from swapserve.bench.runner import BenchConfig, BenchError, resolve_client, run_bench
    from swapserve.bench.swap import SwapFailed
    from swapserve.bench.workload import WorkloadError, parse_params

    console, errors = Console(), Console(stderr=True)
    try:
        cfg = BenchConfig(url=args.url, model=args.model, concurrency=args.concurrency or 1, rate=args.rate or 0.0,
                          duration=args.duration, warmup=args.warmup, timeout=args.timeout,
                          model_version=args.model_version, input_data=args.input_data,
                          params=parse_params(args.param), client=args.client, processes=args.processes,
                          server_pids=args.server_pid, swap_every=args.swap_every, versions=args.versions,
                          control_url=args.control_url, swap_command=args.swap_command,
                          progress=sys.stdout.isatty() and not args.quiet, tls=client_tls(args),
                          token=inference_token(args),
                          control_token=control_token(args) if args.control_url else "")
        resolve_client(cfg.client, secured=cfg.secured())  # flags that cannot work together stop here
    except (UsageError, BenchError, WorkloadError) as exc:
        print(f"swapserve bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.client == "auto" and cfg.secured():
        errors.print(f"[yellow]swapserve bench: using --client raw: the native client has no TLS and sends no "
                     f"token, and this run needs {cfg.secured()}[/yellow]")
    elif cfg.client == "auto" and native.find_binary() is None:
        errors.print(f"[yellow]swapserve bench: {native.missing_message()}; using --client raw[/yellow]")
    try:
        result = run_bench(cfg)
    except (BenchError, WorkloadError, SwapFailed) as exc:
        errors.print(f"[red]swapserve bench: {exc}[/red]")
        return 2
    summary = result.summary
    summary["config"]["command"] = ["swapserve", *sys.argv[1:]]
    if args.json:
        report.write_json(summary, args.json)
    if args.records:
        r = result.records
        np.savez(args.records, sched=r.sched - result.window_start, sent=r.sent - result.window_start,
                 done=r.done - result.window_start, status=r.status, version=r.version,
                 version_table=np.array(r.version_table, dtype=str))
    if args.plot:
        report.plot(result.records, summary, result.window_start, args.plot)
    if not args.quiet:
        report.print_summary(summary, console)
    return 1 if summary["swaps"] and any(not s["ok"] for s in summary["swaps"]) else 0
