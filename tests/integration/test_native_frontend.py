"""The native front end's own failure modes, through swapserve.native (its one typed façade).

Each failure is a swapserve.errors class with a message that names the address and the fix,
never a silent ``False`` or a bare RuntimeError.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from swapserve import native
from swapserve.errors import FailedPrecondition, VersionNotReady

pytestmark = pytest.mark.skipif(not native.frontend_available(),
                                reason="the native front end is not built (no grpc++ at install)")


def test_create_out_of_descriptors_is_a_clear_error() -> None:
    """Create() makes every descriptor the front end needs; with none left it raises ResourceExhausted.

    Runs in a child process: the open-file limit is lowered below the next free descriptor.
    """
    script = textwrap.dedent("""
        import os, resource
        from swapserve import native
        from swapserve.errors import ResourceExhausted
        native.frontend_available()  # load grpc++ while descriptors are still there
        free = os.dup(0); os.close(free)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))
        try:
            native.Frontend("127.0.0.1:0", 1 << 20)
        except ResourceExhausted as exc:
            print("RAISED", exc)
        else:
            print("NO ERROR")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith(("RAISED", "NO ERROR")))
    assert line.startswith("RAISED"), out.stdout
    assert "127.0.0.1:0" in line and "eventfd()" in line and "ulimit -n" in line, line


def test_bind_failure_names_the_address() -> None:
    f = native.Frontend("256.0.0.1:1", 1 << 20)
    with pytest.raises(VersionNotReady, match=r"could not bind 256\.0\.0\.1:1"):
        f.start()


def test_start_twice_and_watch_unpolled_are_refused() -> None:
    f = native.Frontend("127.0.0.1:0", 1 << 20)
    try:
        assert f.start(polled=False) > 0
        with pytest.raises(FailedPrecondition, match="once"):
            f.start()
        with pytest.raises(FailedPrecondition, match="polled"):
            f.watch(0)
        assert f.poll(0.0) == native.PollResult.OFF  # threaded: nothing to poll
        assert f.finish(12345, 0, "") is False  # no such call: not an error
    finally:
        f.stop(0.0)
