"""Native router benchmarks: route() cost in C++ and from Python vs pure-Python routers,
and publish-to-visible latency of a routing snapshot.

    python benchmarks/bench_native.py [--repeat 5] [--json out.json]

Every figure is the median over ``--repeat`` runs of a per-run median. Targets (issue #3):
route <= 100 ns in C++, publish-to-visible median <= 1 us.
"""
from __future__ import annotations

import argparse
import bisect
import json
import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any

from swapserve.native import CohortRule, Router, RoutingSpec, bench_publish_visible, bench_route_ns
from swapserve.routing.reference import ReferenceRouter

SPEC = RoutingSpec(
    generation=1,
    versions=(1, 2),
    weights_bp=(9000, 1000),
    shadows=(3,),
    cohorts=(CohortRule("tier", "internal", 2),),
)
KEYS = [f"user-{i}" for i in range(1000)]
ATTRS = [{"routing_key": k, "slice": "eu"} for k in KEYS]


class DictRouter:
    """The fastest plausible pure-Python router: dict lookup, crc32, bisect (not our hash)."""

    def __init__(self) -> None:
        self._tables: dict[str, tuple[list[int], tuple[int, ...], dict[tuple[str, str], int], str, tuple[int, ...], int]] = {}

    def publish(self, model: str, spec: RoutingSpec) -> None:
        cumulative, total = [], 0
        for w in spec.weights_bp:
            total += w
            cumulative.append(total)
        cohorts = {(c.attribute, str(c.value)): c.version for c in spec.cohorts}
        self._tables[model] = (cumulative, spec.versions, cohorts, spec.key_attribute, spec.shadows, spec.generation)

    def route(self, model: str, attributes: dict[str, Any], request_id: str) -> tuple[int, tuple[int, ...], int]:
        cumulative, versions, cohorts, key_attribute, shadows, generation = self._tables[model]
        for (attribute, value), version in cohorts.items():
            if str(attributes.get(attribute)) == value:
                return version, shadows, generation
        key = attributes.get(key_attribute, request_id)
        bucket = zlib.crc32(str(key).encode()) % 10000
        return versions[bisect.bisect_right(cumulative, bucket)], shadows, generation


def per_call_ns(fn: Callable[[dict[str, Any]], object], rounds: int = 20) -> float:
    """Median over rounds of the mean ns per call over ATTRS."""
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for a in ATTRS:
            fn(a)
        samples.append((time.perf_counter_ns() - t0) / len(ATTRS))
    return statistics.median(samples)


def run_once(trials: int) -> dict[str, float]:
    native = Router()
    native.publish("m", SPEC)
    reference = ReferenceRouter()
    reference.publish("m", SPEC)
    plain = DictRouter()
    plain.publish("m", SPEC)

    out: dict[str, float] = {}
    out["route_cpp_ns"] = statistics.median(bench_route_ns(native, "m", KEYS, 7, 200))
    many = KEYS * 100
    samples = []
    for _ in range(7):
        t0 = time.perf_counter_ns()
        native.route_batch("m", many)
        samples.append((time.perf_counter_ns() - t0) / len(many))
    out["route_batch_per_key_ns"] = statistics.median(samples)
    out["route_python_native_ns"] = per_call_ns(lambda a: native.route("m", a, "req-1"))
    out["route_python_dict_ns"] = per_call_ns(lambda a: plain.route("m", a, "req-1"))
    out["route_python_reference_ns"] = per_call_ns(lambda a: reference.route("m", a, "req-1"), rounds=5)
    store, publish = bench_publish_visible(trials)
    out["store_to_visible_ns"] = statistics.median(store)
    out["store_to_visible_p99_ns"] = sorted(store)[int(0.99 * len(store))]
    out["publish_call_to_visible_ns"] = statistics.median(publish)
    return out


LABELS = {
    "route_cpp_ns": ("route(), C++ loop (guard + cohort + hash + lookup)", "<= 100"),
    "route_batch_per_key_ns": ("route_batch() per key, from Python", ""),
    "route_python_native_ns": ("Router.route() from Python (native)", ""),
    "route_python_dict_ns": ("dict + crc32 pure-Python router", ""),
    "route_python_reference_ns": ("reference router (same hash, pure Python)", ""),
    "store_to_visible_ns": ("publish: atomic store -> seen by spinning reader (median)", "<= 1000"),
    "store_to_visible_p99_ns": ("publish: atomic store -> seen (p99)", ""),
    "publish_call_to_visible_ns": ("publish: Router.publish call -> seen (median)", ""),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--trials", type=int, default=20000, help="publish-to-visible trials per run")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    runs = [run_once(args.trials) for _ in range(args.repeat)]
    result = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result["ratio_dict_over_native_python"] = result["route_python_dict_ns"] / result["route_python_native_ns"]
    result["ratio_reference_over_native_python"] = result["route_python_reference_ns"] / result["route_python_native_ns"]

    print(f"| metric (median of {args.repeat} runs) | ns | target |")
    print("|---|---:|---:|")
    for key, (label, target) in LABELS.items():
        print(f"| {label} | {result[key]:.0f} | {target} |")
    print(f"| ratio: dict router / native, both from Python | {result['ratio_dict_over_native_python']:.2f}x | |")
    print(f"| ratio: reference router / native, both from Python | {result['ratio_reference_over_native_python']:.1f}x | |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": runs, "median": result}, fh, indent=2)


if __name__ == "__main__":
    main()
