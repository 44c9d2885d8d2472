"""Run one benchmark: build payloads, start worker processes, drive swaps, collect and summarise."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from swapserve.bench import native, procstat, report
from swapserve.bench.loop import WorkerSpec
from swapserve.bench.swap import SwapDriver, SwapFailed

if TYPE_CHECKING:
    from swapserve.tls import ClientTls

#: Python workers: client -> module run as ``python -m MODULE SPEC.pkl OUT.npz``.
WORKERS = {"raw": "swapserve.bench.worker_raw", "tritonclient": "swapserve.bench.worker_triton"}
#: Every --client value; "auto" is "native" when swapserve-loadgen is built, else "raw".
CLIENTS = ("auto", "native", *WORKERS)

#: Requests in flight one worker process sustains cheaply, by client; beyond it, add processes.
#: native: one thread, one HTTP/2 connection; 100 stays within the usual limit of concurrent
#: streams per connection (100 in Envoy, nginx), past which calls would queue in the client.
CONCURRENCY_PER_PROCESS = {"native": 100, "raw": 64, "tritonclient": 64}
#: Arrival rate one worker process sustains with a small send lag (req/s), by client.
#: native: ~70-110 µs of CPU per request measured against the no-op server (bench_harness.py),
#: so one process stays under a core at this rate.
RATE_PER_PROCESS = {"native": 8000.0, "raw": 4000.0, "tritonclient": 4000.0}


class BenchError(RuntimeError):
    pass


#: Why the native client cannot run a secured bench (the start of its error message).
NATIVE_PLAINTEXT = ("--client native speaks plaintext gRPC without credentials only (swapserve-loadgen has no TLS "
                    "and sends no token)")


def resolve_client(client: str, *, secured: str = "") -> str:
    """The client that runs for ``--client``: "auto" -> "native" when its binary is built, else "raw".

    ``secured`` names what the run needs that the native client lacks (e.g. "TLS (--tls-ca)");
    then "auto" is "raw" and "native" is refused. Raises ``BenchError`` for an unknown name,
    for "native" on a secured run, or for "native" when the binary is missing.
    """
    if client not in CLIENTS:
        raise BenchError(f"--client must be one of {list(CLIENTS)}, not {client!r}")
    if secured:
        if client == "native":
            raise BenchError(f"{NATIVE_PLAINTEXT}, and this run needs {secured}: use --client raw or "
                             "--client tritonclient (--client auto picks raw)")
        return "raw" if client == "auto" else client
    if client == "auto":
        return "native" if native.find_binary() is not None else "raw"
    if client == "native" and native.find_binary() is None:
        raise BenchError(f"--client native: {native.missing_message()}; or use --client raw")
    return client


@dataclass
class BenchConfig:
    url: str
    model: str
    concurrency: int = 1
    rate: float = 0.0                       # > 0: open loop at this arrival rate; concurrency is ignored
    duration: float = 10.0
    warmup: float = 1.0
    timeout: float = 30.0
    model_version: str = ""
    input_data: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    client: str = "auto"                    # auto | native | raw | tritonclient
    processes: int = 0                      # 0 = automatic
    server_pids: list[int] = field(default_factory=list)
    swap_every: float = 0.0
    versions: list[str] = field(default_factory=list)
    control_url: str = ""
    swap_command: str = ""
    distinct_requests: int = 64
    seed: int = 0
    progress: bool = False
    tls: ClientTls | None = None            # inference and control channels; None: plaintext
    token: str = ""                         # inference bearer token ("authorization: Bearer ..."); "": none
    control_token: str = ""                 # the swap's control service token; "": none

    def secured(self) -> str:
        """What this run needs beyond plaintext without credentials, in words ("" for nothing)."""
        needs = []
        if self.tls is not None:
            needs.append("mTLS (--tls-cert/--tls-key)" if self.tls.cert else "TLS (--tls-ca)")
        if self.token:
            needs.append("an inference token (--token-file)")
        return " and ".join(needs)

    def auto_processes(self) -> int:
        if self.processes > 0:
            return self.processes
        client = self.client if self.client in RATE_PER_PROCESS else "raw"  # "auto" before resolve_client
        if self.rate > 0:
            return max(1, math.ceil(self.rate / RATE_PER_PROCESS[client]))
        return max(1, math.ceil(self.concurrency / CONCURRENCY_PER_PROCESS[client]))

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_data"] = str(self.input_data) if self.input_data else None
        d["processes"] = self.auto_processes()
        d["mode"] = "open" if self.rate > 0 else "closed"
        d.pop("progress")
        # Which files, never their contents; whether tokens were sent, never the tokens.
        tls = self.tls
        d["tls"] = None if tls is None else {"ca": str(tls.ca) if tls.ca else None,
                                             "cert": str(tls.cert) if tls.cert else None,
                                             "key": str(tls.key) if tls.key else None}
        d["token"], d["control_token"] = bool(self.token), bool(self.control_token)
        return d


@dataclass
class BenchResult:
    summary: dict[str, Any]
    records: report.Records
    window_start: int


def _swap_driver(cfg: BenchConfig) -> SwapDriver | None:
    from swapserve.bench import swap

    if cfg.swap_every <= 0:
        return None
    if len(cfg.versions) < 2:
        raise BenchError("--swap-every needs --versions with at least two versions, e.g. --versions 1,2")
    if cfg.swap_command:
        return swap.command_driver(cfg.swap_command)
    if cfg.control_url:
        return swap.promote_driver(cfg.control_url, tls=cfg.tls, token=cfg.control_token)
    raise BenchError("--swap-every needs --control-url HOST:PORT (swapserve's control service) or --swap-command")


class _Swapper(threading.Thread):
    """Makes versions[k % n] live at window start + k * every, k = 1, 2, ... (versions[0] before the run)."""

    def __init__(self, driver: SwapDriver, model: str, versions: list[str], every: float, t0: int, end: int) -> None:
        super().__init__(daemon=True, name="bench-swapper")
        self.driver, self.model, self.versions, self.every, self.t0, self.end = driver, model, versions, every, t0, end
        self.events: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def swap(self, version: str) -> dict[str, Any]:
        began = time.monotonic_ns()
        try:
            self.driver(self.model, version)
            ok, error = True, None
        except SwapFailed as exc:
            ok, error = False, str(exc)
        return {"t": round((began - self.t0) / 1e9, 4), "version": version, "ok": ok,
                "seconds": round((time.monotonic_ns() - began) / 1e9, 4), "error": error}

    def run(self) -> None:
        for k in range(1, 1_000_000):
            due = self.t0 + int(k * self.every * 1e9)
            if due >= self.end or self.stop.wait(max(0.0, (due - time.monotonic_ns()) / 1e9)):
                return
            self.events.append(self.swap(self.versions[k % len(self.versions)]))


class _Worker:
    """One worker process of ``client`` (a Python worker module, or swapserve-loadgen for "native")."""

    def __init__(self, client: str, spec: WorkerSpec, tmp: Path, n: int) -> None:
        self.client = client
        if client == "native":
            argv, self.out = native.prepare(spec, tmp, n)
        else:
            spec_path, self.out = tmp / f"spec{n}.pkl", tmp / f"out{n}.npz"
            with open(spec_path, "wb") as f:
                pickle.dump(spec, f)
            argv = [sys.executable, "-m", WORKERS[client], str(spec_path), str(self.out)]
        self.completed = self.errors = 0
        self.lines: list[str] = []
        self.state = threading.Condition()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.err: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        stderr = self.proc.stderr
        threading.Thread(target=lambda: self.err.extend(stderr or ()), daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            with self.state:
                if line.startswith("progress "):
                    _, c, e = line.split()
                    self.completed, self.errors = int(c), int(e)
                else:
                    self.lines.append(line)
                self.state.notify_all()
        with self.state:
            self.lines.append("eof")
            self.state.notify_all()

    def wait_for(self, word: str, timeout: float) -> None:
        with self.state:
            if not self.state.wait_for(lambda: word in self.lines or "eof" in self.lines, timeout):
                raise BenchError(f"bench worker did not report '{word}' within {timeout:.0f}s")
            if word not in self.lines:
                self.proc.wait(5)
                raise BenchError(f"bench worker exited {self.proc.returncode}:\n" + "".join(self.err[-30:]))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def result(self) -> dict[str, np.ndarray]:
        """The records the worker saved: {sched, sent, done, status, version, version_table, cpu_s}."""
        if self.client == "native":
            return native.read_output(self.out)
        with np.load(self.out, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run one benchmark and return its summary (the ``--json`` document) and per-request records.

    ``cfg.client`` "auto" is resolved first (see ``resolve_client``); the summary's
    ``config.client`` names the client that ran. Raises ``BenchError`` when the workers cannot
    start (or a TLS file cannot be read); request failures are results, not exceptions.
    """
    from swapserve.bench.workload import build_payloads
    from swapserve.errors import ConfigError

    cfg = dataclasses.replace(cfg, client=resolve_client(cfg.client, secured=cfg.secured()))
    if cfg.tls is not None:
        try:
            cfg.tls.pem()  # a missing or non-PEM file fails here, naming it, not in every worker
        except ConfigError as exc:
            raise BenchError(str(exc)) from None
    if cfg.rate <= 0 and cfg.concurrency < 1:
        raise BenchError("give --concurrency >= 1 (closed loop) or --rate > 0 (open loop)")
    driver = _swap_driver(cfg)
    payloads, _meta = build_payloads(cfg.url, cfg.model, input_data=cfg.input_data, params=cfg.params,
                                     version=cfg.model_version, count=cfg.distinct_requests, seed=cfg.seed,
                                     tls=cfg.tls, token=cfg.token)
    nproc = cfg.auto_processes()
    if cfg.rate <= 0:
        nproc = min(nproc, cfg.concurrency)
    total_s = cfg.warmup + cfg.duration
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="swapserve-bench-") as tmpdir:
        tmp = Path(tmpdir)
        conc = _split(cfg.concurrency, nproc)
        workers = []
        try:
            for n in range(nproc):
                spec = WorkerSpec(url=cfg.url, model=cfg.model, payloads=payloads, duration_s=total_s,
                                  timeout_s=cfg.timeout, concurrency=conc[n] if cfg.rate <= 0 else 0,
                                  rate=cfg.rate, slot=n, slots=nproc, first_payload=n * 7919,
                                  tls=cfg.tls, token=cfg.token)
                workers.append(_Worker(cfg.client, spec, tmp, n))
            for w in workers:
                w.wait_for("ready", 120)
            if driver is not None:  # a known champion before the clock starts
                driver(cfg.model, cfg.versions[0])
            start = time.monotonic_ns() + 200_000_000
            for w in workers:
                w.send(str(start))
            window_start = start + int(cfg.warmup * 1e9)
            end = start + int(total_s * 1e9)
            time.sleep(max(0.0, (window_start - time.monotonic_ns()) / 1e9))
            server_before = procstat.tree_cpu(cfg.server_pids) if cfg.server_pids else None
            swapper = None
            if driver is not None:
                swapper = _Swapper(driver, cfg.model, cfg.versions, cfg.swap_every, window_start, end)
                swapper.start()
            _watch(workers, cfg, window_start, end)
            for w in workers:
                w.wait_for("done", cfg.timeout + 60)
            server_after = procstat.tree_cpu(cfg.server_pids) if cfg.server_pids else None
            if swapper is not None:
                swapper.stop.set()
                swapper.join(120)
        finally:
            for w in workers:
                w.send("abort")
                try:
                    w.proc.wait(30)
                except subprocess.TimeoutExpired:
                    w.kill()
        parts = [w.result() for w in workers]
    rec = report.Records.merge(parts, window_start)
    client_cpu = float(sum(float(p["cpu_s"]) for p in parts))
    server_cpu = (procstat.cpu_between(server_before, server_after)
                  if server_before is not None and server_after is not None else None)
    summary = report.summarize(rec, config=cfg.public(), window_start=window_start, duration_s=cfg.duration,
                               swaps=swapper.events if swapper else [], client_cpu_s=client_cpu,
                               server_cpu_s=server_cpu, processes=nproc, started_at=started_at)
    # Client CPU covers the warm-up too; scale it to the requests of the same span.
    total_requests = sum(len(p["status"]) for p in parts)
    if total_requests:
        summary["client"]["cpu_us_per_request"] = round(client_cpu / total_requests * 1e6, 2)
    return BenchResult(summary, rec, window_start)


def _watch(workers: list[_Worker], cfg: BenchConfig, window_start: int, end: int) -> None:
    """Wait for the end of scheduling, with a live line on a terminal."""
    if not cfg.progress:
        time.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9))
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    total = (end - window_start) / 1e9
    with Progress(TextColumn("[bold]bench"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("run", total=total, status="")
        while (now := time.monotonic_ns()) < end:
            done = sum(w.completed for w in workers)
            errs = sum(w.errors for w in workers)
            bar.update(task, completed=max(0.0, (now - window_start) / 1e9), status=f"{done} ok, {errs} errors")
            time.sleep(min(0.25, (end - now) / 1e9))
