"""Device memory budget: which resident versions may be evicted to make room for a preload."""
from __future__ import annotations

from dataclasses import dataclass

from swapserve.errors import ResourceExhausted

MIB = 1024 * 1024


@dataclass(frozen=True)
class Resident:
    """One resident version as the budget sees it."""

    model: str
    version: int
    bytes: int
    last_used: float
    #: Why it must stay (champion, previous champion, traffic, shadow, rollout); "" = evictable.
    protected_because: str = ""


def plan_eviction(device: str, budget: int, need: int, residents: list[Resident], model: str,
                  version: int) -> list[Resident]:
    """The least-recently-used evictable versions to unload so that ``need`` more bytes fit.

    Raises ResourceExhausted naming the budget, the need and what holds the memory when even
    evicting every unprotected version would not make room. Never evicts a protected version.
    """
    used = sum(r.bytes for r in residents)
    if used + need <= budget:
        return []
    evictable = sorted((r for r in residents if not r.protected_because), key=lambda r: r.last_used)
    chosen: list[Resident] = []
    freed = 0
    for r in evictable:
        if used - freed + need <= budget:
            break
        chosen.append(r)
        freed += r.bytes
    if used - freed + need <= budget:
        return chosen
    holders = ", ".join(
        f"{r.model}:{r.version} ({r.bytes / MIB:.1f} MiB{', ' + r.protected_because if r.protected_because else ''})"
        for r in sorted(residents, key=lambda r: -r.bytes))
    raise ResourceExhausted(
        f"model '{model}' version {version} needs ~{need / MIB:.1f} MiB on {device} but the memory budget is "
        f"{budget / MIB:.1f} MiB with {used / MIB:.1f} MiB held by: {holders or 'nothing'}; raise "
        "--device-memory-budget or unload a version that is not serving")
