"""Rollouts: plans (stages, gates), sequential statistics and the pure gate decision.

The decision core is pure (no I/O, no clock): :func:`evaluate` turns cumulative per-slice counts
of champion and challenger into fail / hold / advance. The rollout controller owns time, traffic
changes, approvals, the registry and the audit log.
"""
from __future__ import annotations

from swapserve.rollout.gates import OVERALL, Decision, GateResult, Verdict, evaluate
from swapserve.rollout.plan import (
    BUILTIN_PLANS,
    CohortMatch,
    Gates,
    RolloutPlan,
    Stage,
    builtin_plan,
    load_plan,
    parse_plan,
)

__all__ = [
    "BUILTIN_PLANS", "OVERALL", "CohortMatch", "Decision", "GateResult", "Gates",
    "RolloutPlan", "Stage", "Verdict", "builtin_plan", "evaluate", "load_plan", "parse_plan",
]
