"""A local fleet: PostgreSQL and 3 ``swapserve serve`` replicas on loopback (``scripts/dev fleet``).

Watch a change converge: promote through one replica, then ask any other for its status. Ports,
replica i = 0, 1, 2: gRPC 9001 + 10 i, metrics 9002 + 10 i, control 9003 + 10 i. State (the
PostgreSQL data directory and each replica's home) lives in a temporary directory removed on exit.
Ctrl-C stops the replicas (gracefully), then PostgreSQL.

    python scripts/fleet.py [--replicas 3] [--model-repository model_repository] [--base-port 9000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.pg import PostgresServer, find_pg_bindir  # noqa: E402  (the tests' throwaway server)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--base-port", type=int, default=9000)
    args = ap.parse_args()
    bindir = find_pg_bindir()
    if bindir is None:
        print("fleet: PostgreSQL binaries not found; run scripts/ensure-postgres.sh", file=sys.stderr)
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="swapserve-fleet-"))
    pg = PostgresServer(bindir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pg.start()
        registry = pg.create_database("swapserve")
        print(f"fleet: PostgreSQL on 127.0.0.1:{pg.port} (registry {registry})", flush=True)
        swapserve = str(Path(sys.executable).with_name("swapserve"))
        for i in range(args.replicas):
            base = args.base_port + 10 * i
            home = scratch / f"replica-{i}"
            home.mkdir()
            cmd = [swapserve, "serve", "--model-repository", str(args.model_repository), "--registry", registry,
                   "--replica-id", f"replica-{i}", "--host", "127.0.0.1", "--grpc-port", str(base + 1),
                   "--metrics-port", str(base + 2), "--control-address", f"127.0.0.1:{base + 3}"]
            log = open(home / "serve.log", "wb")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                          "SWAPSERVE_HOME": str(home)}))
            # One at a time: each imports torch and loads the models.
            while b"swapserve ready" not in (home / "serve.log").read_bytes():
                if procs[-1].poll() is not None:
                    print((home / "serve.log").read_text(errors="replace")[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.2)
            print(f"fleet: replica-{i}: gRPC 127.0.0.1:{base + 1}, control 127.0.0.1:{base + 3}, "
                  f"log {home / 'serve.log'}", flush=True)
        c0, c1 = args.base_port + 3, args.base_port + 13
        print(f"\nfleet: ready. Try:\n  swapserve promote digits 1 --url 127.0.0.1:{c0}\n"
              f"  swapserve status digits --url 127.0.0.1:{c1}    # every replica, its generation, converged?\n"
              "Ctrl-C stops the fleet.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("fleet: a replica exited; stopping the fleet", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        pg.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the fleet like Ctrl-C
    sys.exit(main())
