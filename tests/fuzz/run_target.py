"""Run one fuzz target for a number of inputs (or seconds) and write what happened as JSON.

    python -m tests.fuzz.run_target TARGET --runs N [--engine atheris|builtin] [--stats FILE]
        [--artifacts DIR] [--seed K] [--seconds S]

``atheris`` (pip install -e '.[fuzz]'): libFuzzer's coverage-guided loop over the instrumented
swapserve modules, with the target's structure-aware mutator as libFuzzer's custom mutator (half
of the mutations are libFuzzer's own byte edits). ``builtin``: the same mutators without coverage
feedback, no extra dependency (what CI's short pass uses). Either way the target's ``one_input``
decides what a crash is (tests/fuzz/targets.py); a crash stops the run and leaves the input in
``--artifacts``; an input that takes longer than ``--timeout`` seconds is a hang.

The stats file is rewritten every couple of seconds and at the end: ``inputs``, ``seconds``,
``crash`` (the message or null), ``hang``, and ``rss`` samples ``[inputs, MiB]`` of this process
(for the network target, of the server processes too) so the caller can tell warm-up from growth.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tests.fuzz.targets import FuzzCrash, Target, corpus, make_target


def rss_mib(pid: int | str = "self") -> float:
    """Resident set size of a process now (VmRSS), MiB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class FuzzHang(Exception):
    pass


class Recorder:
    """Counts inputs, samples RSS, and writes the stats file (atomically) now and then."""

    def __init__(self, target: Target, name: str, runs: int, seconds: float, stats: Path | None,
                 artifacts: Path, engine: str) -> None:
        self.target, self.name, self.runs, self.seconds = target, name, runs, seconds
        self.stats, self.artifacts, self.engine = stats, artifacts, engine
        self.inputs = 0
        self.start = time.monotonic()
        self.next_write = self.start + 2.0
        self.rss: list[list[float]] = []
        self.extra_rss: dict[str, list[list[float]]] = {}
        self.crash: str | None = None
        self.hang = False
        self.next_sample = 1

    def sample(self) -> None:
        self.rss.append([self.inputs, round(rss_mib(), 2)])
        for label, pid in getattr(self.target, "watched_pids", lambda: {})().items():
            self.extra_rss.setdefault(label, []).append([self.inputs, round(rss_mib(pid), 2)])

    def write(self, done: bool = False) -> None:
        if self.stats is None:
            return
        out: dict[str, Any] = {
            "target": self.name, "engine": self.engine, "inputs": self.inputs, "runs": self.runs,
            "seconds": round(time.monotonic() - self.start, 2), "crash": self.crash, "hang": self.hang,
            "done": done, "rss": self.rss, "server_rss": self.extra_rss, "pid": os.getpid(),
        }
        tmp = self.stats.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(self.stats)

    def finished(self) -> bool:
        return (self.runs and self.inputs >= self.runs) or (self.seconds and time.monotonic() - self.start >= self.seconds)

    def after(self) -> None:
        self.inputs += 1
        if self.inputs >= self.next_sample:
            self.sample()
            # Dense early (warm-up), then every 2% of the run or every 1000 inputs.
            step = max(1000, (self.runs or 100_000) // 50)
            self.next_sample = self.inputs * 2 if self.inputs < step else self.inputs + step
        now = time.monotonic()
        if now >= self.next_write:
            self.next_write = now + 2.0
            self.write()

    def crashed(self, data: bytes, message: str, hang: bool = False) -> None:
        self.crash, self.hang = message, hang
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{'timeout' if hang else 'crash'}-{self.name}-{hashlib.sha1(data).hexdigest()}"
        path.write_bytes(data)
        self.crash = f"{message} (input saved to {path})"
        self.sample()
        self.write(done=True)


def _alarm(signum: int, frame: Any) -> None:
    raise FuzzHang()


def run_builtin(target: Target, rec: Recorder, seed: int, timeout: float) -> int:
    rng = random.Random(seed)
    seeds = [d for _, d in corpus(rec.name)] or target.seeds() or [b""]
    pool = list(seeds)
    signal.signal(signal.SIGALRM, _alarm)
    i = 0
    while not rec.finished():
        data = seeds[i] if i < len(seeds) else target.mutate(rng.choice(pool), target.max_len, rng)
        i += 1
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            target.one_input(data)
        except FuzzHang:
            rec.crashed(data, f"no answer within {timeout} s (hang)", hang=True)
            return 70
        except Exception as exc:  # noqa: BLE001 - any exception out of one_input is a crash
            rec.crashed(data, "".join(traceback.format_exception_only(type(exc), exc)).strip()
                        + "\n" + traceback.format_exc(limit=-8))
            return 77
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        rec.after()
        if rng.random() < 0.05:  # keep some mutants around as parents (no coverage feedback here)
            if len(pool) < 2000:
                pool.append(data)
            else:
                pool[rng.randrange(len(seeds), len(pool))] = data
    rec.sample()
    rec.write(done=True)
    return 0


def run_atheris(target: Target, rec: Recorder, seed: int, timeout: float, work: Path) -> int:
    import atheris

    committed = Path(__file__).resolve().parent / "corpus" / rec.name
    work.mkdir(parents=True, exist_ok=True)
    rec.artifacts.mkdir(parents=True, exist_ok=True)

    def one(data: bytes) -> None:
        if rec.finished():
            rec.sample()
            rec.write(done=True)
            os._exit(0)  # libFuzzer's own -runs would also count its dry runs
        try:
            target.one_input(data)
        except Exception as exc:
            rec.crashed(data, "".join(traceback.format_exception_only(type(exc), exc)).strip()
                        + "\n" + traceback.format_exc(limit=-8))
            raise
        rec.after()

    def mutator(data: bytes, max_size: int, mseed: int) -> bytes:
        rng = random.Random(mseed)
        if rng.random() < 0.5:
            return bytes(atheris.Mutate(data, max_size))
        return target.mutate(data, max_size, rng)

    args = [sys.argv[0], f"-seed={seed}", f"-max_len={target.max_len}", f"-timeout={int(timeout)}",
            "-rss_limit_mb=4096", "-error_exitcode=77", "-timeout_exitcode=70", "-print_final_stats=1",
            f"-artifact_prefix={rec.artifacts}/", "-reload=0", str(work)]
    if committed.is_dir():
        args.append(str(committed))
    atheris.Setup(args, one, custom_mutator=mutator)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target")
    ap.add_argument("--engine", choices=("atheris", "builtin"), default="builtin")
    ap.add_argument("--runs", type=int, default=0, help="inputs to run (0: until --seconds)")
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds one input may take (a hang beyond)")
    ap.add_argument("--stats", type=Path)
    ap.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    a = ap.parse_args(argv)
    if not a.runs and not a.seconds:
        ap.error("give --runs or --seconds")
    if a.engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["swapserve", "tests.fuzz"]):
            target = make_target(a.target)
            target.setup()
            # What the harness imports lazily, instrumented too.
            import swapserve.server.converters  # noqa: F401
            import swapserve.rollout.plan  # noqa: F401
            import swapserve.monitoring.monitor_config  # noqa: F401
            import swapserve.repository.config  # noqa: F401
            import swapserve.units  # noqa: F401
    else:
        target = make_target(a.target)
        target.setup()
    rec = Recorder(target, a.target, a.runs, a.seconds, a.stats, a.artifacts, a.engine)
    rec.sample()
    try:
        if a.engine == "atheris":
            return run_atheris(target, rec, a.seed, a.timeout, a.artifacts / f"corpus-{a.target}")
        return run_builtin(target, rec, a.seed, a.timeout)
    finally:
        target.close()


if __name__ == "__main__":
    sys.exit(main())
