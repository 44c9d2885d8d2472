"""Named points where a test can kill the server (SIGKILL), to prove crash consistency.

``crash_point("stage.after_commit")`` does nothing unless the environment variable
``SWAPSERVE_TEST_CRASH_AT`` names that point; then the process kills itself with SIGKILL (no
cleanup, no flush: what a power cut or the OOM killer does). ``NAME@N`` kills at the N-th time
the point is reached (``stage.after_commit@2``: the first stage change after the rollout's
start). Points in the code:

``stage.before_commit`` / ``stage.after_commit`` / ``stage.after_publish``
    a rollout stage change (and a promotion or the end of an A/B test): before its registry
    transaction, after it and before routing is published, after routing is published.
``rollback.after_journal`` / ``rollback.after_publish`` / ``rollback.after_commit``
    returning traffic to the champion (rollback, abort, a failed gate): the outbox line is on
    disk but routing is not published, routing is published but the registry not written, the
    registry is written but the outbox entry is not marked done.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "SWAPSERVE_TEST_CRASH_AT"

POINTS = ("stage.before_commit", "stage.after_commit", "stage.after_publish",
          "rollback.after_journal", "rollback.after_publish", "rollback.after_commit")


_seen: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """SIGKILL this process if ``$SWAPSERVE_TEST_CRASH_AT`` names this point (tests only; a no-op otherwise)."""
    want = os.environ.get(ENV)
    if not want:
        return
    point, _, nth = want.partition("@")
    if point != name:
        return
    _seen[name] += 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "POINTS", "crash_point"]
