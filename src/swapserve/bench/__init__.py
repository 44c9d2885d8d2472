"""Load-test harness (``swapserve bench``) for any KServe v2 / Triton gRPC server.

Layout: ``cli`` (arguments, output) -> ``runner`` (workers, swaps, CPU accounting) ->
``workload`` (pre-serialised requests; the only module here importing ``swapserve._proto``)
and the load generators, one subprocess each, all speaking the protocol in ``loop``:
``native`` (runs ``swapserve-loadgen``, the grpc++ worker built from csrc/loadgen; the
default when built), ``loop`` + ``worker_raw`` / ``worker_triton`` (Python workers, so
tritonclient and swapserve's protos never share a process); ``report`` (statistics,
JSON, table, plot), ``swap`` (how a version is made live), ``procstat`` (server CPU).

Security. ``BenchConfig.tls`` (a ``swapserve.tls.ClientTls``) puts the metadata call, every
Python worker and the swap's control client on TLS (mTLS with a client certificate);
``token`` is sent as ``authorization: Bearer TOKEN`` on every inference call, ``control_token``
on the swaps. The native worker speaks plaintext without credentials only: a secured run
resolves "auto" to "raw" and refuses "native" (``BenchError``).

Modes. Closed loop (``--concurrency C``): C users, each sends, waits, sends again;
latency = response - send. Open loop (``--rate R``): arrival k is due at k/R seconds
whatever is in flight, and latency = response - *scheduled* send, so queueing in the
server or in the harness is never hidden (no coordinated omission); ``send_lag_ms``
says how late the harness itself was.

Accounting. The measured window starts after ``--warmup``; a request belongs to it by
its scheduled time, and every such request ends as completed (status OK) or as an
error (by status code), so ``completed + errors == sent``. Requests still in flight
when scheduling stops are awaited. Percentiles: ``numpy.percentile(method="linear")``
over the latencies of successful requests. Client CPU: user+system time of the worker
processes from start to drain, per request. Server CPU (``--server-pid``, Linux): the
/proc utime+stime of that process and its descendants over the window, per request.

JSON document (``--json``; key set stable within a ``schema`` value)::

    {
      "schema": "swapserve.bench/1",
      "started_at": "2026-01-01T00:00:00+00:00",       # UTC
      "config": {url, model, mode: "closed"|"open", concurrency, rate, duration, warmup,
                 timeout, model_version, input_data, params,
                 client: "native"|"raw"|"tritonclient",   # the one that ran ("auto" resolved)
                 processes, server_pids, swap_every, versions, control_url, swap_command,
                 distinct_requests, seed, command?,    # command: argv, when run from the CLI
                 tls: {ca, cert, key} | null,          # the files' paths (null: plaintext)
                 token, control_token},                # whether one was sent (never the token)
      "duration_s": 10.02,                 # window start -> last response (>= --duration)
      "sent": 22000, "completed": 21998, "errors": 2,
      "errors_by_status": {"UNAVAILABLE": 2},          # gRPC status name -> count
      "throughput_rps": 2195.4,            # completed / duration_s
      "latency_ms": {"p50", "p90", "p99", "p99.9", "mean", "min", "max"},  # null if none completed
      "percentile_method": "...",
      "send_lag_ms": {"p50", "p99", "max"},            # actual - scheduled send (0 in closed loop)
      "versions": {"1": 11000, "2": 10998},            # successful responses per model_version
      "swaps": [{"t": 5.0, "version": "2", "ok": true, "seconds": 0.41, "error": null}],
      "client": {"processes": 1, "cpu_s": 4.1, "cpu_us_per_request": 150.2},
      "server": {"pids": [123], "cpu_s": 11.0, "cpu_us_per_request": 500.1},  # nulls without --server-pid
      "timeseries": [{"t": 0, "sent", "completed", "errors", "p50_ms", "p99_ms", "max_ms",
                      "versions": {"1": 2190}}, ...]   # per second; completions bucketed by
                                                       # response time, "sent" by scheduled time
    }

Python use: ``run_bench(BenchConfig(url=..., model=..., concurrency=8))`` returns the same
document (``.summary``) and every request's record (``.records``).
"""
from __future__ import annotations

__all__ = ["BenchConfig", "BenchResult", "run_bench"]


def __getattr__(name: str) -> object:
    # Lazy: worker_triton imports this package and must not pull swapserve._proto in.
    if name in __all__:
        from swapserve.bench import runner

        return getattr(runner, name)
    raise AttributeError(name)
