"""Prometheus metrics.

Triton's names and labels are used wherever the meaning is the same, so existing
Triton dashboards work unchanged. Request and execution figures are not kept in
prometheus-client objects: the request path adds them to each version's
``VersionStats`` (the tally ModelStatistics reports too), and ``_StatsCollector``
renders them when Prometheus scrapes. That keeps label lookups and per-metric locks
off the request path. prometheus-client's text exposition appends ``_total`` to every
counter family, which would break Triton dashboards, so Triton's cumulative series are
exported under their exact names with TYPE ``untyped``; PromQL's rate() and increase()
treat them the same. Our own histograms carry the ``swapserve_`` prefix.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from swapserve.telemetry.statistics import Buckets, StatsSnapshot, VersionStats

#: Triton counter name -> (help, value from a snapshot). Durations are reported in µs.
_COUNTERS: dict[str, tuple[str, Callable[[StatsSnapshot], float]]] = {
    "nv_inference_request_success": ("Number of successful inference requests, all batch sizes",
                                     lambda s: s.success.count),
    "nv_inference_count": ("Number of inferences performed (a batch of N counts N)", lambda s: s.inference_count),
    "nv_inference_exec_count": ("Number of model executions performed (a batch counts once)",
                                lambda s: s.execution_count),
    "nv_inference_request_duration_us": ("Cumulative inference request duration in microseconds",
                                         lambda s: (s.success.ns + s.fail.ns) / 1e3),
    "nv_inference_queue_duration_us": ("Cumulative inference queuing duration in microseconds",
                                       lambda s: s.queue.ns / 1e3),
    "nv_inference_compute_input_duration_us": ("Cumulative compute input duration in microseconds",
                                               lambda s: s.compute_input.ns / 1e3),
    "nv_inference_compute_infer_duration_us": ("Cumulative compute inference duration in microseconds",
                                               lambda s: s.compute_infer.ns / 1e3),
    "nv_inference_compute_output_duration_us": ("Cumulative inference compute output duration in microseconds",
                                                lambda s: s.compute_output.ns / 1e3),
}
#: Histogram name -> (help, the snapshot's buckets, scale from recorded units to exported ones).
_HISTOGRAMS: dict[str, tuple[str, Callable[[StatsSnapshot], Buckets | None], float]] = {
    "swapserve_request_latency_seconds": ("End-to-end server latency of successful requests",
                                          lambda s: s.request_ns, 1e-9),
    "swapserve_queue_latency_seconds": ("Time requests waited in the batcher queue", lambda s: s.queue_ns, 1e-9),
    "swapserve_compute_latency_seconds": ("Model execution time per batch", lambda s: s.compute_ns, 1e-9),
    "swapserve_batch_size": ("Rows per executed batch", lambda s: s.batch_rows, 1.0),
}


def _histogram(name: str, doc: str, series: list[tuple[list[str], Buckets]], scale: float) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["model", "version"])
    for labels, b in series:
        cumulative, running = [], 0
        for bound, n in zip((*b.bounds, float("inf")), b.counts):
            running += n
            cumulative.append((_le(bound * scale if bound != float("inf") else bound), running))
        family.add_metric(labels, cumulative, b.total * scale)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(round(bound, 9))


class _StatsCollector(Collector):
    """Triton's counters and our request histograms, read from every version's ``VersionStats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], VersionStats] = {}

    def stats(self, model: str, version: str) -> VersionStats:
        with self._lock:
            st = self._stats.get((model, version))
            if st is None:
                st = self._stats[(model, version)] = VersionStats(model, version)
            return st

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            every = list(self._stats.values())
        snaps = [st.snapshot() for st in every]
        for name, (doc, value) in _COUNTERS.items():
            family = Metric(name, doc, "unknown")
            for s in snaps:
                family.add_sample(name, {"model": s.model, "version": s.version}, float(value(s)))
            yield family
        failures = Metric("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
                          "unknown")
        for s in snaps:
            for reason, n in sorted(s.fail_by_reason.items()):
                failures.add_sample("nv_inference_request_failure",
                                    {"model": s.model, "version": s.version, "reason": reason}, float(n))
        yield failures
        for name, (doc, pick, scale) in _HISTOGRAMS.items():
            yield _histogram(name, doc, [([s.model, s.version], b) for s in snaps if (b := pick(s)) is not None],
                             scale)


class Metrics:
    """All of the server's metrics, registered on an injected ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._stats = _StatsCollector()
        self.registry.register(self._stats)
        self.version_ready = Gauge(
            "swapserve_version_ready", "1 when the version is resident and warmed", ["model", "version"],
            registry=self.registry)
        self.shadow_requests = Counter(
            "swapserve_shadow_requests", "Shadow copies by result: agree/diverge (vs the served answer), shed, error",
            ["model", "version", "result"], registry=self.registry)
        self.traffic_share = Gauge(
            "swapserve_traffic_share", "Share of unpinned traffic routed to the version (0..1)", ["model", "version"],
            registry=self.registry)
        self.rollout_stage = Gauge(
            "swapserve_rollout_stage", "Index of the active rollout's stage (-1: no rollout)", ["model"],
            registry=self.registry)
        self.rollbacks = Counter(
            "swapserve_rollbacks", "Automatic rollbacks by the rollout controller", ["model"], registry=self.registry)
        self.registry_pending_writes = Gauge(
            "swapserve_registry_pending_writes",
            "Decisions (rollbacks) live in routing but not yet recorded in the registry (outbox)",
            registry=self.registry)
        self.webhook_pending = Gauge(
            "swapserve_webhook_pending", "Rollout webhook deliveries not yet acknowledged by the receiver",
            registry=self.registry)
        self.feedback_forwarded = Counter(
            "swapserve_feedback_forwarded",
            "Feedback outcomes sent on to the replica that served them (or asked of every replica, for "
            "client-chosen ids), by final result: joined, excluded, duplicate, unknown, expired, invalid, or "
            "unreachable / refused when the serving replica did not answer / refused the forwarded report",
            ["model", "result"], registry=self.registry)
        self.serving_version = Gauge(
            "swapserve_serving_version", "Version that unpinned requests are routed to", ["model"],
            registry=self.registry)

    def stats(self, model: str, version: str) -> VersionStats:
        """The tally of one model version, created on first use and kept for the server's lifetime."""
        return self._stats.stats(model, version)
