"""Process CPU time from /proc, for server CPU per request (Linux only; None elsewhere)."""
from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime seconds) of one process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu(roots: list[int]) -> dict[int, float]:
    """CPU seconds of each process in the trees rooted at ``roots`` (MLServer's workers are children)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            s = _stat(int(entry.name))
            if s is not None:
                stats[int(entry.name)] = s
    out: dict[int, float] = {}
    frontier = [p for p in roots if p in stats]
    while frontier:
        pid = frontier.pop()
        if pid in out:
            continue
        out[pid] = stats[pid][1]
        frontier.extend(c for c, (ppid, _) in stats.items() if ppid == pid)
    return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two ``tree_cpu`` samples (processes born in between count from zero)."""
    return sum(after[p] - before.get(p, 0.0) for p in after)
