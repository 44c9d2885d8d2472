"""A real, throwaway PostgreSQL server for tests (pytest plugin + plain helper).

Use it as a plugin (``pytest_plugins = ["tests.pg"]`` in a conftest) or import the
fixtures directly. Fixtures:

* ``postgres_server`` (session): a running ``PostgresServer``; stopped (by its PID) at
  the end of the session.
* ``postgres_url`` (session): ``postgresql+psycopg://swapserve@127.0.0.1:PORT/swapserve``.
* ``fresh_postgres_url`` (function): a new, empty database on the same server per test.

Binaries come from ``$SWAPSERVE_PG_BINDIR``, ``pg_config --bindir``, ``initdb`` on PATH or
``/usr/lib/postgresql/*/bin`` (newest first). postgres refuses to run as root, so as root
the server runs as the ``postgres`` OS user (Debian's package creates it) via ``runuser``.
No binaries: the tests are skipped, unless ``CI`` is set, where they fail — CI must test
PostgreSQL (``scripts/ensure-postgres.sh`` installs it).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The database role the server is initialised with (trust auth on 127.0.0.1 only).
PG_USER = "swapserve"
_START_TIMEOUT_S = 30.0
_db_counter = itertools.count(1)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_pg_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or ``None``."""
    candidates: list[Path] = []
    if os.environ.get("SWAPSERVE_PG_BINDIR"):
        candidates.append(Path(os.environ["SWAPSERVE_PG_BINDIR"]))
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(Path(out))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb") or "").parent)

    def major(p: Path) -> int:
        m = re.search(r"/(\d+)/bin$", str(p))
        return int(m.group(1)) if m else 0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server in a temporary directory; ``start()``, ``stop()``.

    Tuned for tests (fsync off): never point it at data you want to keep.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.root = Path(tempfile.mkdtemp(prefix="swapserve-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "postgres.log"
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root but there is no 'postgres' OS user (postgres refuses to "
                    "run as root); install Debian's postgresql package: scripts/ensure-postgres.sh"
                ) from None
            self._run_as = ["runuser", "-u", "postgres", "--"]
            self.sockets.mkdir()
            for p in (self.root, self.sockets):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        else:
            self.sockets.mkdir()

    def start(self) -> None:
        initdb = subprocess.run(
            [*self._run_as, str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER,
             "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"],
            capture_output=True, text=True, timeout=120,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}\n{initdb.stderr}")
        for _attempt in range(3):
            self.port = _free_port()
            if self._launch():
                return
            self.stop()  # most likely lost the port to someone else: try another one
        raise RuntimeError(f"PostgreSQL did not start; log:\n{self.log.read_text(errors='replace')[-4000:]}")

    def resume(self) -> None:
        """Start again after ``stop()``, same data and port (a database outage that ends)."""
        if not self._launch():
            raise RuntimeError(f"PostgreSQL did not restart; log:\n{self.log.read_text(errors='replace')[-4000:]}")

    def _launch(self) -> bool:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self._run_as, str(self.bindir / "postgres"), "-D", str(self.data),
                 "-p", str(self.port), "-k", str(self.sockets), "-h", "127.0.0.1",
                 "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=100"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self._wait_ready()

    def _wait_ready(self) -> bool:
        import psycopg

        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={PG_USER} dbname={database}"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        name = name or f"t{os.getpid()}_{next(_db_counter)}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def _postmaster_pid(self) -> int | None:
        # runuser may sit between us and postgres: the data directory names the real PID.
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def stop(self) -> None:
        """Fast shutdown of this server only (SIGINT to its PID), SIGKILL if it hangs."""
        proc, self.process = self.process, None
        if proc is None:
            return
        pid = self._postmaster_pid() or proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_pg_bindir()
    if bindir is None:
        msg = ("PostgreSQL binaries not found (looked at $SWAPSERVE_PG_BINDIR, pg_config --bindir, "
               "PATH, /usr/lib/postgresql/*/bin); run scripts/ensure-postgres.sh")
        if _ci():
            pytest.fail(f"CI must test PostgreSQL: {msg}", pytrace=False)
        pytest.skip(msg)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        msg = "psycopg is not installed; pip install 'swapserve[postgres]'"
        if _ci():
            pytest.fail(f"CI must test PostgreSQL: {msg}", pytrace=False)
        pytest.skip(msg)
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A database for the whole session: ``postgresql+psycopg://...@127.0.0.1:PORT/swapserve``."""
    return postgres_server.create_database("swapserve")


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> str:
    """A new, empty database for one test."""
    return postgres_server.create_database()
